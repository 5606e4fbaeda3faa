"""make bench's report: every measurement as a Markdown table, then the
ratios each issue set a goal for, and OUT/results.json."""
import json, os


def report(res, a, out):
    by = {r["name"]: r for r in res}
    ratio = lambda a_, b_: by[a_]["median_s"] / by[b_]["median_s"]
    print(f"\n| benchmark ({a.mib} MiB corpus, {a.runs} runs, median) | seconds | peak RSS |")
    print("|---|---:|---:|")
    for r in res:
        # A shell pipe in a name would end the table's cell.
        r = dict(r, name=r["name"].replace("|", "\\|"))
        if "mb_s" in r:
            print(f"| {r['name']} | {r['mb_s']:.0f} MB/s | |")
            continue
        if "sizes" in r:
            sizes = ", ".join(f"{k} {v / (1 << 20):.1f} MiB" for k, v in r["sizes"].items())
            print(f"| {r['name']} | {sizes} | |")
            continue
        if "bytes" in r:
            print(f"| {r['name']} | {r['bytes'] / (1 << 20):.1f} MiB | |")
            continue
        print(f"| {r['name']} | {r['median_s']:.2f} | {r['peak_rss_kib'] // 1024} MiB |")
    print("\n| ratio | value | goal |\n|---|---:|---:|")
    for label, x, y, goal in [
        ("forge closure / tar", "forge closure --json", "tar -cf - store | cat > /dev/null", "≤ 1.2"),
        ("forge ext4 / mkfs.ext4 -d", "forge ext4", "mkfs.ext4 -d", "≤ 0.55"),
        ("forge ext4 / tar + sync", "forge ext4", "tar -cf OUT tree && sync", "≤ 1.1"),
        ("forge image / pipeline", "forge image --format raw-efi", "mkfs.vfat+mcopy+mkfs.ext4 -d+sgdisk+dd", "≤ 0.5"),
        ("forge image / tar + sync", "forge image --format raw-efi", "tar -cf OUT tree && sync", "≤ 1.2"),
        ("forge raw-efi --verity / its pipeline (veritysetup format)", "forge image --format raw-efi --verity",
         "mkfs.vfat+mcopy+mkfs.ext4 -d+veritysetup format+sgdisk+dd", "(none)"),
        ("forge --verity --uki signed / plain raw-efi, alternated",
         "forge image --format raw-efi --verity --uki --secure-boot-key (paired)",
         "forge image --format raw-efi (paired)", "≤ 1.25"),
        ("forge --verity --uki signed / its pipeline, alternated",
         "forge image --format raw-efi --verity --uki --secure-boot-key (paired)",
         "mkfs.ext4 -d+veritysetup format+objcopy UKI+sbsign+mkfs.vfat/mcopy+sgdisk+dd", "≤ 0.3"),
        ("forge sd-aarch64 .zst / sd pipeline", "forge image --format sd-aarch64 -o .img.zst", "mkfs.ext4 -d+mkfs.vfat/mcopy+sfdisk+dd+zstd -T0 -3", "≤ 0.5"),
        ("forge .qcow2 / raw + qemu-img convert", "vm: forge .qcow2", "vm: forge raw + qemu-img convert -O qcow2", "≤ 0.55"),
        ("forge .qcow2 / forge raw", "vm: forge .qcow2", "vm: forge raw .img", "≤ 1.1"),
        ("forge .vhd / forge raw", "vm: forge .vhd (fixed)", "vm: forge raw .img", "≤ 1.05"),
        ("forge ext4 / its disk limit", "forge ext4",
         "ext4: disk limit (dd oflag=direct of forge ext4's allocated bytes)", "≤ 1.05 (disk-bound)"),
        ("forge raw / its disk limit", "vm: forge raw .img",
         "vm: disk limit (dd oflag=direct of the raw image's mapped bytes)", "≤ 1.05 (disk-bound)"),
        ("forge .qcow2 / the raw image's disk limit", "vm: forge .qcow2",
         "vm: disk limit (dd oflag=direct of the raw image's mapped bytes)", "≤ 1.05 (disk-bound)"),
        ("forge .vhd / the raw image's disk limit", "vm: forge .vhd (fixed)",
         "vm: disk limit (dd oflag=direct of the raw image's mapped bytes)", "≤ 1.05 (disk-bound)"),
        ("forge image closure-info / its disk limit", "info: forge image, closure-info",
         "info: disk limit (dd oflag=direct of the image's mapped bytes)", "≤ 1.05 (disk-bound)"),
        ("forge image scan mode / its disk limit", "info: forge image, scan mode",
         "info: disk limit (dd oflag=direct of the image's mapped bytes)", "≤ 1.15 (disk-bound)"),
        ("forge .qcow2 deflate / qemu-img convert -c", "vm: forge .qcow2 --compression deflate",
         "vm: qemu-img convert -c -O qcow2 (of the raw image)", "≤ 0.5"),
        ("forge image closure-info / scan mode", "info: forge image, closure-info", "info: forge image, scan mode", "≤ 0.7"),
        ("forge image closure-info / tar once", "info: forge image, closure-info", "info: tar of the store, piped to /dev/null", "≤ 1.2"),
        ("forge oci / tar piped to pigz -p 2", "oci: forge oci (gzip -6, no cache)", "oci: tar of the paths, piped to pigz -p 2 -6", "≤ 1.0"),
        ("forge oci rebuild (cache) / full build", "oci: forge oci rebuild, one small path changed (cache)",
         "oci: forge oci of the changed corpus (empty cache)", "≤ 0.2"),
        ("flash --fill --identity / plain flash (32 GiB)", "provision: flash --fill --identity --generate-host-keys, 32 GiB device",
         "provision: flash (write + verify), 32 GiB device", "≤ 1.1"),
        ("forge erofs / mkfs.erofs, both uncompressed, alternated", "erofs: forge erofs --compression none",
         "erofs: mkfs.erofs (uncompressed)", "(none)"),
        ("forge erofs / mkfs.erofs, both lz4hc, alternated", "erofs: forge erofs (lz4hc)", "erofs: mkfs.erofs -zlz4hc", "≤ 0.5"),
        ("forge image --root-fs erofs (lz4hc) / ext4 root, alternated", "erofs: forge image --root-fs erofs (lz4hc)",
         "erofs: forge image (ext4 root)", "≤ 1.5"),
        ("forge image --root-fs erofs, lz4 / ext4 root, alternated",
         "erofs: forge image --root-fs erofs --erofs-compression lz4", "erofs: forge image (ext4 root)", "≤ 1.5"),
        ("forge image --root-fs erofs, lz4, --verity / without, alternated",
         "erofs: forge image --root-fs erofs --erofs-compression lz4 --verity",
         "erofs: forge image --root-fs erofs --erofs-compression lz4", "(none)"),
        ("forge image --root-fs erofs, none / ext4 root, alternated",
         "erofs: forge image --root-fs erofs --erofs-compression none", "erofs: forge image (ext4 root)", "≤ 1.5"),
        ("flash of the sd-aarch64 card, EROFS root / ext4 root, alternated",
         "card: flash .img.zst, EROFS root (write + verify)", "card: flash .img.zst, ext4 root (write + verify)", "(none)"),
        ("forge update / forge image --slots 2, alternated", "updates: forge update (root, UKI, SHA256SUMS)",
         "updates: forge image --slots 2 --uki", "≤ 0.6"),
        ("forge .vhdx / forge raw", "formats: forge .vhdx", "formats: forge raw .img", "≤ 1.15"),
        ("forge .vmdk / forge raw", "formats: forge .vmdk (streamOptimized)", "formats: forge raw .img", "≤ 1.15"),
        ("forge .ova / forge raw", "formats: forge .ova", "formats: forge raw .img", "≤ 1.15"),
        ("forge GCE .tar.gz / forge raw", "formats: forge GCE .tar.gz", "formats: forge raw .img", "≤ 1.15"),
        ("forge .vhdx / raw + qemu-img convert", "formats: forge .vhdx",
         "formats: forge raw + qemu-img convert -O vhdx", "≤ 0.5"),
        ("forge .vmdk / raw + qemu-img convert", "formats: forge .vmdk (streamOptimized)",
         "formats: forge raw + qemu-img convert -O vmdk -o subformat=streamOptimized", "≤ 0.5"),
        ("forge iso / forge raw-efi (EROFS root)", "iso: forge image --format iso",
         "iso: forge image --format raw-efi --root-fs erofs", "≤ 1.15"),
        ("forge iso / mkfs.vfat + mcopy + mkfs.erofs + xorriso", "iso: forge image --format iso",
         "iso: mkfs.vfat + mcopy + mkfs.erofs -zlz4hc + xorriso", "≤ 0.5"),
        ("forge lxc / tar \\| xz -T0", "formats: forge lxc (xz -6)",
         "formats: tar of the closure | xz -6 -T0", "(none)"),
        ("forge GCE / raw + tar -Sczf", "formats: forge GCE .tar.gz",
         "formats: forge raw (--disk-size GiB) + tar --format=oldgnu -Sczf (GCE)", "(none)"),
        ("flash from a URL / from the file, alternated", "sources: flash http://127.0.0.1 URL (write + verify)",
         "sources: flash FILE (write + verify)", "≤ 1.1"),
        ("flash .img.xz / xz -dc \\| dd, alternated", "sources: flash .img.xz (write + verify)",
         "sources: xz -dc | dd oflag=direct", "≤ 0.8"),
        ("flash+verify / dd", "flash (write + verify)", "dd bs=4M oflag=direct conv=fsync", "≤ 1.0"),
        ("flash+verify / bmaptool copy", "flash (write + verify)", "bmaptool copy", "≤ 0.8"),
        ("forge vm, 20 VMs / qemu-img + mkfs.ext4 + ssh-keygen, alternated",
         "fleet: forge vm, 20 VMs (1 GiB /var each, host keys)",
         "fleet: qemu-img create + mkfs.ext4 + ssh-keygen, 20 VMs", "≤ 0.3"),
        ("flash --trust (signed) + verify / dd, alternated", "signed: flash --trust (write + verify)",
         "signed: dd bs=4M oflag=direct conv=fsync", "≤ 0.95"),
    ]:
        if x in by and y in by:
            print(f"| {label} | {ratio(x, y):.2f} | {goal} |")
    for r in res:
        if r["name"].startswith("forge sign --key"):
            print(f"| {r['name']} | {r['median_s']:.3f} s | < 0.1 s |")
        if "du_kib" in r:
            print(f"| {r['name']}: host bytes (du) | {r['du_kib'] / 1024:.1f} MiB | < 5 MiB |")
    json.dump(res, open(os.path.join(out, "results.json"), "w"), indent=2)
