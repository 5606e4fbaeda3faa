#!/usr/bin/env bash
# make demo: forge the built-in x86_64 fixture system into a raw-efi image
# and boot it under QEMU/OVMF (software emulation, ~15 s), printing the
# serial console. Exits non-zero unless the system reports a good boot.
set -euo pipefail
fix=$(realpath "${1:?fixtures dir}"); out=$(realpath -m "${2:?output dir}")
forge=${NIXFORGE_RELEASE_DIR:-target/release}/forge
mkdir -p "$out"
sys=$fix/x86_64
echo "== forge closure (the system the image will hold)"
# Into a file first: `| head` would close the pipe early, and with pipefail
# the writer's broken pipe would fail the demo.
$forge closure "$sys/result" --root "$sys/store" > "$out/closure.txt"
head -8 "$out/closure.txt"
echo "== forge image --format raw-efi"
$forge image "$sys/result" --root "$sys/store" --format raw-efi -o "$out/disk.img" --json > "$out/layout.json"
python3 - "$out/layout.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['image']}: {r['size']} bytes, {r['mapped_bytes']} mapped, disk {r['disk_id']}")
for p in r["partitions"]:
    fs = p["filesystem"] or {}
    print(f"  {p['number']} {p['name']:6} {fs.get('kind', '-'):5} at {p['offset']:>10} size {p['size']:>10} label {fs.get('label', '-')} uuid {fs.get('uuid', '-')}{' (read-only)' if p['read_only'] else ''}")
PY
echo "== booting under QEMU (OVMF → systemd-boot → Linux → fixture stage 1)"
cp /usr/share/OVMF/OVMF_VARS_4M.fd "$out/vars.fd"
cp --sparse=always "$out/disk.img" "$out/boot.img"
timeout 300 qemu-system-x86_64 -accel tcg -machine q35 -m 512 \
  -drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
  -drive if=pflash,format=raw,unit=1,file="$out/vars.fd" \
  -drive if=virtio,format=raw,file="$out/boot.img" \
  -nic none -display none -no-reboot -serial file:"$out/serial.log" || true
grep -a -E "Linux version|EXT4-fs \(vda|NIXFORGE" "$out/serial.log" | sed 's/^/  /'
if grep -aq "NIXFORGE-BOOT-OK" "$out/serial.log"; then
  echo "== demo OK: the forged image booted (full log: $out/serial.log)"
else
  echo "== demo FAILED: no boot marker (see $out/serial.log)" >&2
  exit 1
fi
