#!/usr/bin/env python3
"""make bench: nixforge against the peer tools, measured in the same run.

    scripts/bench.py OUT [--mib 2048] [--runs 3] [--base REV]

Builds (once, cached in OUT/corpus-MIB) the shared store-shaped corpus
(../shared/bench/make-store-corpus.py) with the fixture kernel and initrd,
then times whole processes, warm page cache, median of --runs runs, with
peak RSS from GNU time. Prints a Markdown table (copy it to BENCHMARKS.md)
and writes OUT/results.json.

With --base REV it also builds forge at git revision REV (once, cached in
OUT/base-REV) and runs old and new alternately on the same corpus, run by
run, so that drift in the machine hits both alike; the outputs must be
byte-identical, and a median more than 5 % worse, or a peak RSS more than
5 % and more than 4 MiB worse, is flagged.
"""
import argparse, json, os, shutil, statistics, subprocess, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchkit import (REPO, FORGE, FLASH, sh, worse, measure, loop_device,  # noqa: E402
                      measure_pair, measure_group, disk_limit, disk_rate, throttled)
from bench_formats import formats_bench, lxc_bench, iso_bench  # noqa: E402
from bench_sources import sources_bench  # noqa: E402
from bench_report import report  # noqa: E402


def corpus(out, mib, fixtures):
    # Past 2 GiB this machine's packages under the script's default 24 MiB
    # cap run out: allow larger packages there.
    cap = 24 if mib <= 2048 else 1024
    d = os.path.join(out, f"corpus-{mib}" + ("" if cap == 24 else f"-cap{cap}"))
    if not os.path.exists(os.path.join(d, "toplevel")):
        shutil.rmtree(d, ignore_errors=True)
        x86 = os.path.join(fixtures, "x86_64/inputs")
        sh(f"python3 {REPO}/../shared/bench/make-store-corpus.py {d} --mib {mib} --max-pkg-mib {cap} "
           f"--kernel {x86}/kernel/bzImage --initrd {x86}/initrd/initrd")
    return d, open(os.path.join(d, "toplevel")).read().strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--mib", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--fixtures", default=os.path.join(REPO, "build/fixtures"))
    ap.add_argument("--only", default="closure,ext4,image,sd,erofs,updates,vm,formats,lxc,iso,fleet,info,oci,flash,sources,provision",
                    help="comma-separated sections to run; `base` alone: only the comparison with --base")
    ap.add_argument("--base", metavar="REV",
                    help="also run forge at git revision REV interleaved with this tree's")
    ap.add_argument("--scaling", action="store_true",
                    help="forge ext4 vs mkfs.ext4 -d on 512, 1024, 2048 and 4096 MiB corpora")
    ap.add_argument("--throttle", type=int, metavar="MB_S",
                    help="hold direct writes to OUT's disk to MB_S MB/s (a cgroup): a disk-bound run on any machine")
    a = ap.parse_args()
    if a.throttle:
        os.makedirs(a.out, exist_ok=True)
        with throttled(os.path.abspath(a.out), a.throttle):
            return run(a)
    return run(a)


def run(a):
    os.makedirs(a.out, exist_ok=True)
    out = os.path.abspath(a.out)
    if a.scaling:
        return scaling(out, a)
    c, top = corpus(out, a.mib, a.fixtures)
    sh("sync")  # a freshly built corpus is still being written back
    store = os.path.join(c, "nix/store")
    w = os.path.join(out, "work")
    os.makedirs(w, exist_ok=True)
    # Warm the page cache the same way for everyone.
    sh(f"tar -cf - -C {c} nix | cat > /dev/null")
    # The disk's own rate first, so runs on other machines read side by side.
    rate = disk_rate(w)
    name = "disk write rate (dd oflag=direct, 1 GiB, best of 3)"
    if a.throttle:
        name += f", throttled to {a.throttle} MB/s"
    print(f"{name}: {rate:.0f} MB/s", file=sys.stderr)
    res = [{"name": name, "mb_s": rate}]

    # Correctness first: on the full corpus (no Nix database, so scanning)
    # the closure must equal the corpus's own list.
    got = json.loads(sh(f"{FORGE} closure {top} --root {c} --json 2>/dev/null"))
    want = open(os.path.join(c, "closure-paths")).read().split()
    assert sorted(p["path"] for p in got["paths"]) == sorted(want), "corpus closure differs from closure-paths"
    print(f"closure of the corpus equals closure-paths ({len(want)} paths)", file=sys.stderr)

    only = set(a.only.split(","))
    if only == {"base"}:
        return against_base(out, c, top, a, w)
    if "closure" in only:
        closure_bench(res, c, top, a)
    if "ext4" in only or "image" in only or "sd" in only:
        ext4_and_images(res, c, top, a, w, store, only)
    if "erofs" in only:
        erofs_bench(res, c, top, a, w)
        erofs_cards(res, c, top, a, w)
    if "updates" in only:
        updates_bench(res, c, top, a, w)
    if "vm" in only:
        vm_bench(res, c, top, a, w)
    if "formats" in only:
        formats_bench(res, c, top, a, w)
    if "lxc" in only:
        lxc_bench(res, c, top, a, w)
    if "iso" in only:
        iso_bench(res, c, top, a, w)
    if "fleet" in only:
        fleet_bench(res, c, top, a, w)
    if "info" in only:
        info_bench(res, c, top, a, w)
    if "oci" in only:
        oci_bench(res, c, top, a, w)
    if "flash" in only:
        flash_bench(res, c, top, a, w)
    if "sources" in only:
        sources_bench(res, c, top, a, w)
    if "provision" in only:
        provision_bench(res, c, top, a, w)
    report(res, a, out)
    if a.base:
        against_base(out, c, top, a, w)


def closure_bench(res, c, top, a):
    print("closure + NAR hashing", file=sys.stderr)
    # GNU tar skips reading file data when its output is /dev/null itself,
    # so the peer writes through a pipe.
    res.extend(measure_pair(
        ("tar -cf - store | cat > /dev/null", f"tar -cf - -C {c} nix | cat > /dev/null"),
        ("forge closure --json", f"{FORGE} closure {top} --root {c} --json > /dev/null"),
        a.runs))


STUB = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub"
SNAKEOIL = "/usr/share/ovmf/PkKek-1-snakeoil"


def verified_images(res, c, top, a, w, parts):
    """Issue 25: raw-efi with --verity, --uki and Secure Boot signatures
    against plain raw-efi (alternated, the same run), and the usual tools'
    way to the same image: mkfs, veritysetup format, a UKI by objcopy (the
    sections ukify adds), sbsign, mkfs.vfat/mcopy, sgdisk, dd."""
    kernel, initrd, sd, inodes, esp, root, state = parts
    keys = w + "-keys"
    os.makedirs(keys, exist_ok=True)
    key, cert = f"{keys}/db.key", f"{SNAKEOIL}.pem"
    sh(f"openssl pkey -passin pass:snakeoil -in {SNAKEOIL}.key -out {key}")
    rm = f"rm -rf {w}/*"
    sign = f"--key {key} --cert {cert}"
    pipeline = f"""set -e; cd {w}
truncate -s {root} root.img; mkfs.ext4 -q -F -N {inodes} -d {c} root.img
rh=$(veritysetup format root.img verity.img | sed -n 's/^Root hash:[[:space:]]*//p')
vsz=$(( ($(stat -c %s verity.img) + 1048575) / 1048576 * 1048576 ))
printf 'ID=nixos\n' > osrel; printf 'init={top}/init roothash=%s' "$rh" > cmdline
objcopy --add-section .osrel=osrel --change-section-vma .osrel=0x20000 \
  --add-section .cmdline=cmdline --change-section-vma .cmdline=0x30000 \
  --add-section .linux={kernel} --change-section-vma .linux=0x2000000 \
  --add-section .initrd={initrd} --change-section-vma .initrd=0x3000000 {STUB} uki.efi
sbsign {sign} --output uki.signed uki.efi 2>/dev/null
sbsign {sign} --output sdboot.efi {sd}/lib/systemd/boot/efi/systemd-bootx64.efi 2>/dev/null
truncate -s {esp} esp.img; mkfs.vfat -F 32 -n ESP esp.img >/dev/null
mmd -i esp.img ::/EFI ::/EFI/BOOT ::/EFI/systemd ::/EFI/Linux ::/loader
mcopy -i esp.img sdboot.efi ::/EFI/BOOT/BOOTX64.EFI; mcopy -i esp.img sdboot.efi ::/EFI/systemd/systemd-bootx64.efi
mcopy -i esp.img uki.signed ::/EFI/Linux/nixos.efi
printf 'timeout 0\n' > loader.conf; mcopy -i esp.img loader.conf ::/loader/loader.conf
truncate -s {state} state.img; mkfs.ext4 -q -F -L state state.img
truncate -s $(({(1 << 20) + esp + root + state + (1 << 20)} + vsz)) disk.img
sgdisk -n 1:2048:+{esp >> 10}K -t 1:ef00 -n 2:0:+{root >> 10}K -t 2:8304 \
  -n 3:0:+$((vsz / 1024))K -t 3:2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5 -n 4:0:+{state >> 10}K -t 4:8310 disk.img >/dev/null
dd if=esp.img of=disk.img bs=4M seek=1 oflag=seek_bytes conv=notrunc,sparse status=none
dd if=root.img of=disk.img bs=4M seek=$((1048576+{esp})) oflag=seek_bytes conv=notrunc,sparse status=none
dd if=verity.img of=disk.img bs=4M seek=$((1048576+{esp}+{root})) oflag=seek_bytes conv=notrunc,sparse status=none
dd if=state.img of=disk.img bs=4M seek=$((1048576+{esp}+{root}+vsz)) oflag=seek_bytes conv=notrunc,sparse status=none
rm esp.img root.img verity.img state.img uki.efi uki.signed sdboot.efi; sync"""
    image = f"{FORGE} image {top} --root {c} --format raw-efi -o {w}/disk.img"
    signed = (f"{FORGE} image {top} --root {c} --format raw-efi --verity --uki --uki-stub {STUB} "
              f"--secure-boot-key {key} --secure-boot-cert {cert} -o {w}/disk.img")
    res.extend(measure_group([
        ("forge image --format raw-efi (paired)", image, rm),
        ("forge image --format raw-efi --verity --uki --secure-boot-key (paired)", signed, rm),
        ("mkfs.ext4 -d+veritysetup format+objcopy UKI+sbsign+mkfs.vfat/mcopy+sgdisk+dd", pipeline, rm),
    ], a.runs))
    sh(rm)


def ext4_and_images(res, c, top, a, w, store, only):
    rm = f"rm -rf {w}/*"
    print("ext4 of the corpus", file=sys.stderr)
    plan = sh(f"{FORGE} ext4 {c} -o {w}/x.img --owner 0:0 --dry-run")
    size = int(plan.split(": ")[1].split(" bytes")[0])
    size = (size * 11 // 10 + (1 << 20) - 1) >> 20 << 20
    inodes = int(plan.split("inodes (")[1].split(" used")[0]) + 1000
    ext4 = f"{FORGE} ext4 {c} -o {w}/x.img --owner 0:0 --size {size}"
    written = int(sh(f"{rm}; {ext4} 2>/dev/null && du --block-size=1 {w}/x.img").split()[0])
    # Alternated (issue 31): a drifting disk moves every ratio alike.
    res.extend(measure_group([
        ("tar -cf OUT tree && sync", f"tar -cf {w}/x.tar -C {c} nix && sync", rm),
        ("mkfs.ext4 -d", f"truncate -s {size} {w}/x.img && mkfs.ext4 -q -F -N {inodes} -d {c} {w}/x.img", rm),
        ("forge ext4", ext4, rm),
        disk_limit(w, written, "ext4: disk limit (dd oflag=direct of forge ext4's allocated bytes)"),
    ], a.runs))

    print("raw-efi image of the corpus", file=sys.stderr)
    sd = sh(f"ls -d {store}/*-systemd-corpus").strip()
    boot = json.load(open(f"{c}{top}/boot.json"))["org.nixos.bootspec.v1"]
    kernel, initrd = c + boot["kernel"], c + boot["initrd"]
    esp, state = 512 << 20, 256 << 20
    root = size
    pipeline = f"""set -e; cd {w}
truncate -s {esp} esp.img; mkfs.vfat -F 32 -n ESP esp.img >/dev/null
mmd -i esp.img ::/EFI ::/EFI/BOOT ::/EFI/systemd ::/EFI/nixos ::/loader ::/loader/entries
mcopy -i esp.img {sd}/lib/systemd/boot/efi/systemd-bootx64.efi ::/EFI/BOOT/BOOTX64.EFI
mcopy -i esp.img {sd}/lib/systemd/boot/efi/systemd-bootx64.efi ::/EFI/systemd/systemd-bootx64.efi
mcopy -i esp.img {kernel} ::/EFI/nixos/kernel.efi; mcopy -i esp.img {initrd} ::/EFI/nixos/initrd.efi
printf 'timeout 0\\n' > loader.conf; mcopy -i esp.img loader.conf ::/loader/loader.conf
truncate -s {root} root.img; mkfs.ext4 -q -F -N {inodes} -d {c} root.img
truncate -s {state} state.img; mkfs.ext4 -q -F -L state state.img
truncate -s {(1 << 20) + esp + root + state + (1 << 20)} disk.img
sgdisk -n 1:2048:+{esp >> 10}K -t 1:ef00 -n 2:0:+{root >> 10}K -t 2:8304 -n 3:0:+{state >> 10}K -t 3:8310 disk.img >/dev/null
dd if=esp.img of=disk.img bs=4M seek=1 oflag=seek_bytes conv=notrunc,sparse status=none
dd if=root.img of=disk.img bs=4M seek=$((1048576+{esp})) oflag=seek_bytes conv=notrunc,sparse status=none
dd if=state.img of=disk.img bs=4M seek=$((1048576+{esp}+{root})) oflag=seek_bytes conv=notrunc,sparse status=none
rm esp.img root.img state.img; sync"""
    res.extend(measure_pair(
        ("mkfs.vfat+mcopy+mkfs.ext4 -d+sgdisk+dd", pipeline, rm),
        ("forge image --format raw-efi", f"{FORGE} image {top} --root {c} --format raw-efi -o {w}/disk.img", rm),
        a.runs))
    # The same with a dm-verity hash partition (issue 25): the usual tools
    # add veritysetup format and a partition; forge hashes the root first.
    verity_pipeline = pipeline.replace(
        "truncate -s " + str(state) + " state.img",
        "veritysetup format root.img verity.img >/dev/null\n"
        "vsz=$(( ($(stat -c %s verity.img) + 1048575) / 1048576 * 1048576 ))\n"
        "truncate -s " + str(state) + " state.img").replace(
        f"truncate -s {(1 << 20) + esp + root + state + (1 << 20)} disk.img",
        f"truncate -s $(({(1 << 20) + esp + root + state + (1 << 20)} + vsz)) disk.img").replace(
        f"-n 3:0:+{state >> 10}K -t 3:8310",
        f"-n 3:0:+$((vsz / 1024))K -t 3:2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5 -n 4:0:+{state >> 10}K -t 4:8310").replace(
        f"dd if=state.img of=disk.img bs=4M seek=$((1048576+{esp}+{root}))",
        f"dd if=verity.img of=disk.img bs=4M seek=$((1048576+{esp}+{root})) oflag=seek_bytes conv=notrunc,sparse status=none\n"
        f"dd if=state.img of=disk.img bs=4M seek=$((1048576+{esp}+{root}+vsz))").replace(
        "rm esp.img root.img state.img", "rm esp.img root.img verity.img state.img")
    res.extend(measure_pair(
        ("mkfs.vfat+mcopy+mkfs.ext4 -d+veritysetup format+sgdisk+dd", verity_pipeline, rm),
        ("forge image --format raw-efi --verity",
         f"{FORGE} image {top} --root {c} --format raw-efi --verity -o {w}/disk.img", rm),
        a.runs))
    sh(rm)
    verified_images(res, c, top, a, w, (kernel, initrd, sd, inodes, esp, root, state))

    print("sd-aarch64 image of the corpus, compressed", file=sys.stderr)
    fw = firmware(w)
    fws = 128 << 20
    sd_pipeline = f"""set -e; cd {w}
truncate -s {fws} fw.img; mkfs.vfat -F 32 -n FIRMWARE fw.img >/dev/null
mcopy -i fw.img {fw}/start4.elf {fw}/u-boot-rpi4.bin ::/
printf 'arm_64bit=1\n' > config.txt; mcopy -i fw.img config.txt ::/config.txt
truncate -s {root} root.img; mkfs.ext4 -q -F -N {inodes} -L NIXOS_SD -d {c} root.img
truncate -s {(8 << 20) + fws + root} sd.img
printf 'label: dos\nstart=16384, size={fws >> 9}, type=c\nstart={(8 << 20) + fws >> 9}, type=83, bootable\n' | sfdisk -q sd.img
dd if=fw.img of=sd.img bs=4M seek={8 << 20} oflag=seek_bytes conv=notrunc,sparse status=none
dd if=root.img of=sd.img bs=4M seek={(8 << 20) + fws} oflag=seek_bytes conv=notrunc,sparse status=none
zstd -q -T0 -3 sd.img -o sd.img.zst; rm fw.img root.img sd.img; sync"""
    csd = aarch64_corpus(c, top, a)
    res.extend(measure_pair(
        ("mkfs.ext4 -d+mkfs.vfat/mcopy+sfdisk+dd+zstd -T0 -3", sd_pipeline, rm),
        ("forge image --format sd-aarch64 -o .img.zst",
         f"{FORGE} image {top} --root {csd} --format sd-aarch64 --firmware {fw} --state-size none -o {w}/sd.img.zst",
         rm),
        a.runs))
    sh(rm)



def base_forge(out, rev):
    """forge built at git revision `rev`, from a `git archive` of it (no
    worktree left registered in the repository)."""
    full = sh(f"git -C {REPO} rev-parse --verify {rev}^{{commit}}").strip()
    d = os.path.join(out, f"base-{full[:12]}")
    exe = os.path.join(d, "target/release/forge")
    if not os.path.exists(exe):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        sh(f"git -C {REPO} archive {full} | tar -x -C {d}")
        print(f"building forge at {full[:12]} in {d}", file=sys.stderr)
        sh(f"cd {d} && cargo build --release --quiet -p nixforge --bin forge")
    return exe, full[:12]


# raw-efi in every container: (output name, flags).
ALL_CONTAINERS = [
    ("fx.img", ""),
    ("fx.img.zst", ""),
    ("fx.qcow2", ""),
    ("fx-deflate.qcow2", "--compression deflate"),
    ("fx.vhd", "--vhd-type fixed"),
    ("fx-dynamic.vhd", "--vhd-type dynamic"),
]

# Outputs whose bytes changed on purpose since the base (BENCH_BASE in
# the Makefile): name suffix -> why. Compared all the same, reported,
# not failed.
# Manifest fields added since the base (issue 26: what a signature of the
# manifest vouches for: the system, the bmap's hash, the image's SHA-256
# and the ranges' BLAKE3); the rest of the manifest is compared as before.
MANIFEST_ADDED = ("toplevel", "system_version", "bmap_sha256", "image_sha256", "ranges")


def same_manifest(po, pn):
    """The manifests equal once the added fields are left out (of both: a
    base after some of them has them too)."""
    old, new = json.load(open(po)), json.load(open(pn))
    for k in MANIFEST_ADDED:
        old.pop(k, None)
        new.pop(k, None)
    return old == new


BYTES_CHANGED = {
    "dynamic.vhd": "issue 24: a dynamic VHD's blocks are stored in image order and all-zero "
                   "blocks are not stored (its size now equals qemu-img convert's)",
}


def compare_outputs(w, old, tmpl, n, flags, what, bad):
    """One forge command at the base and here; the image, its .bmap (if
    any) and .layout.json compared byte for byte."""
    for side, exe in (("old", old), ("new", FORGE)):
        o = os.path.join(w, side)
        shutil.rmtree(o, ignore_errors=True)
        os.makedirs(o)
        sh(tmpl.format(f=exe, o=o, n=n, flags=flags) + " 2>/dev/null")
    names = [n, n + ".bmap", n + ".layout.json"]
    for f in names:
        po, pn = os.path.join(w, "old", f), os.path.join(w, "new", f)
        if not os.path.exists(po) and not os.path.exists(pn):
            continue
        both = os.path.exists(po) and os.path.exists(pn)
        if both and f.endswith(".layout.json") and same_manifest(po, pn):
            continue
        if not both or subprocess.run(["cmp", "-s", po, pn]).returncode:
            why = next((v for k, v in BYTES_CHANGED.items() if f.endswith(k)), None)
            if why:
                print(f"  {what} {f}: differs, on purpose: {why}", file=sys.stderr)
            else:
                bad.append(f"{what}: {f} differs")
    print(f"  {what} {n}: compared", file=sys.stderr)


def against_base(out, c, top, a, w):
    """The same forge commands at the base revision and here, alternated run
    by run (ABBA, so neither always runs second); outputs compared byte for
    byte."""
    old, rev = base_forge(out, a.base)
    csd = aarch64_corpus(c, top, a)
    fw = firmware(w)
    cases = [
        ("closure --json", "{f} closure {top} --root {c} --json > {o}/closure.json", ["closure.json"]),
        ("image raw-efi .img", "{f} image {top} --root {c} --format raw-efi -o {o}/disk.img",
         ["disk.img", "disk.img.bmap"]),
        ("image sd-aarch64 .img.zst",
         "{f} image {top} --root {csd} --format sd-aarch64 --firmware {fw} --state-size none -o {o}/sd.img.zst",
         ["sd.img.zst", ("sd.img.bmap", "sd.img.zst.bmap")]),
    ]
    print(f"\nforge at {rev} (old) against this tree (new), interleaved", file=sys.stderr)
    rows, bad = [], []
    # The fixtures too, bytes only (they take a fraction of a second).
    fx = a.fixtures
    x86, arm = f"{fx}/x86_64", f"{fx}/aarch64"
    # Every container, with its sidecars: the images, their bmaps and
    # layout manifests must be the base's byte for byte (named changes
    # aside, see BYTES_CHANGED).
    fixture_cases = [(f"{{f}} image {x86}/result --root {x86}/store --format raw-efi {{flags}} -o {{o}}/{{n}}", n, flags)
                     for n, flags in ALL_CONTAINERS]
    fixture_cases += [
        (f"{{f}} image {arm}/result --root {arm}/store --format sd-aarch64 --firmware {fw} {{flags}} -o {{o}}/{{n}}", n, "")
        for n in ("fx-sd.img.zst", "fx-sd.img")
    ]
    for tmpl, n, flags in fixture_cases:
        compare_outputs(w, old, tmpl, n, flags, "fixture", bad)
    # The corpus in the containers the timed cases below do not cover.
    for n, flags in ALL_CONTAINERS:
        if n.endswith(".img"):
            continue
        tmpl = f"{{f}} image {top} --root {c} --format raw-efi {{flags}} -o {{o}}/{{n}}"
        compare_outputs(w, old, tmpl, "corpus-" + n, flags, "corpus", bad)
    for name, tmpl, outputs in cases:
        runs = {"old": [], "new": []}
        for i in range(a.runs):
            # ABBA: each side goes first in every other round.
            sides = (("old", old), ("new", FORGE))
            for side, exe in sides if i % 2 == 0 else sides[::-1]:
                o = os.path.join(w, side)
                shutil.rmtree(o, ignore_errors=True)
                os.makedirs(o)
                cmd = tmpl.format(f=exe, top=top, c=c, csd=csd, fw=fw, o=o)
                runs[side].append(measure(f"{name} ({side})", cmd, 1))
            if i == 0:
                for f in outputs:
                    # (old name, new name): the .zst's bmap was renamed
                    # from NAME.img.bmap to NAME.img.zst.bmap (issue 12).
                    fo, fn = f if isinstance(f, tuple) else (f, f)
                    if not os.path.exists(os.path.join(w, "old", fo)):
                        fo = fn  # a base after the rename
                    same = subprocess.run(["cmp", "-s", os.path.join(w, "old", fo), os.path.join(w, "new", fn)]).returncode == 0
                    if not same:
                        bad.append(f"{name}: {fn} differs")
        med = {s: statistics.median(r["median_s"] for r in runs[s]) for s in runs}
        rss = {s: max(r["peak_rss_kib"] for r in runs[s]) for s in runs}
        rows.append((name, med, rss, runs))
        if worse(med["new"], med["old"], 0):
            bad.append(f"{name}: median {med['new'] / med['old']:.3f}x the base")
        # Memory: worse only past 5 % and past 4 MiB too (a few MiB of
        # page-size noise on a small peak is not a regression).
        if worse(rss["new"], rss["old"], 4096):
            bad.append(f"{name}: peak RSS {rss['new'] / rss['old']:.3f}x the base "
                       f"({(rss['new'] - rss['old']) // 1024} MiB more)")
    shutil.rmtree(os.path.join(w, "old"), ignore_errors=True)
    shutil.rmtree(os.path.join(w, "new"), ignore_errors=True)
    print(f"\n| {a.mib} MiB corpus, {a.runs} runs each, alternated | {rev} median | this tree median | ratio | peak RSS old / new |")
    print("|---|---:|---:|---:|---:|")
    for name, med, rss, runs in rows:
        print(f"| forge {name} | {med['old']:.2f} s | {med['new']:.2f} s | {med['new'] / med['old']:.3f} | "
              f"{rss['old'] // 1024} / {rss['new'] // 1024} MiB |")
    print("\noutputs byte-identical: " + ("yes" if not any("differs" in b for b in bad) else "NO"))
    for b in bad:
        print(f"  worse or different: {b}")
    json.dump([{"name": n, "median_s": m, "peak_rss_kib": r} for n, m, r, _ in rows],
              open(os.path.join(out, "base-results.json"), "w"), indent=2)
    if bad:
        sys.exit(1)


def firmware(w):
    """Stand-in Pi firmware files (their content does not matter here)."""
    fw = os.path.join(w, "..", "firmware")
    if not os.path.exists(os.path.join(fw, "u-boot-rpi4.bin")):
        os.makedirs(fw, exist_ok=True)
        sh(f"head -c 3000000 /dev/urandom > {fw}/start4.elf; head -c 600000 /dev/urandom > {fw}/u-boot-rpi4.bin")
    return fw


def aarch64_corpus(c, top, a):
    """The corpus is an x86_64 system: a hard-linked variant whose bootspec
    says aarch64-linux and whose kernel file is the arm64 fixture Image lets
    sd-aarch64 run on the same tree (scanning checks no hashes)."""
    csd = c + "-aarch64"
    if not os.path.exists(csd):
        sh(f"cp -al {c} {csd}")
        bj = f"{csd}{top}/boot.json"
        doc = json.load(open(bj))
        boot = doc["org.nixos.bootspec.v1"]
        boot["system"] = "aarch64-linux"
        os.unlink(bj)
        json.dump(doc, open(bj, "w"))
        k = csd + boot["kernel"]
        os.unlink(k)
        shutil.copy(os.path.join(a.fixtures, "aarch64/inputs/kernel/Image"), k)
    return csd


def erofs_bench(res, c, top, a, w):
    """Issue 30: forge erofs against mkfs.erofs on the corpus, uncompressed
    and with lz4hc (forge compresses on every core; Debian's mkfs.erofs 1.5
    on one), alternated, with every image's size beside ext4's; and forge
    image with an EROFS root (lz4hc, the default; lz4 also with --verity)
    against the ext4 one, alternated."""
    print("EROFS of the corpus", file=sys.stderr)
    rm = f"rm -f {w}/e.img {w}/m.img"
    res.extend(measure_pair(
        ("erofs: forge erofs --compression none", f"{rm}; {FORGE} erofs {c} -o {w}/e.img --owner 0:0 --compression none"),
        ("erofs: mkfs.erofs (uncompressed)", f"{rm}; mkfs.erofs --quiet -T1 --all-root {w}/m.img {c}"),
        a.runs))
    res.extend(measure_pair(
        ("erofs: forge erofs (lz4hc)", f"{rm}; {FORGE} erofs {c} -o {w}/e.img --owner 0:0"),
        ("erofs: mkfs.erofs -zlz4hc", f"{rm}; mkfs.erofs --quiet -T1 --all-root -zlz4hc {w}/m.img {c}"),
        a.runs))
    s = f"{w}/size.img"
    for name, cmd in [
        ("forge erofs --compression none", f"{FORGE} erofs {c} -o {s} --owner 0:0 --compression none"),
        ("forge erofs (lz4hc)", f"{FORGE} erofs {c} -o {s} --owner 0:0"),
        ("forge erofs --compression lz4", f"{FORGE} erofs {c} -o {s} --owner 0:0 --compression lz4"),
        ("mkfs.erofs", f"mkfs.erofs --quiet -T1 --all-root {s} {c}"),
        ("mkfs.erofs -zlz4hc", f"mkfs.erofs --quiet -T1 --all-root -zlz4hc {s} {c}"),
        ("forge ext4 (auto size)", f"{FORGE} ext4 {c} -o {s} --owner 0:0"),
    ]:
        sh(f"rm -f {s}; {cmd} 2>/dev/null")
        res.append({"name": f"erofs size: {name}", "bytes": os.path.getsize(s)})
    sh(f"rm -f {s}")
    img = f"{FORGE} image {top} --root {c} --format raw-efi -o {w}/i.img 2>/dev/null"
    res.extend(measure_group([
        ("erofs: forge image (ext4 root)", img),
        ("erofs: forge image --root-fs erofs (lz4hc)", img.replace(" -o ", " --root-fs erofs -o ")),
        ("erofs: forge image --root-fs erofs --erofs-compression lz4",
         img.replace(" -o ", " --root-fs erofs --erofs-compression lz4 -o ")),
        # The root planned (compressed) once, then hashed (issue 25).
        ("erofs: forge image --root-fs erofs --erofs-compression lz4 --verity",
         img.replace(" -o ", " --root-fs erofs --erofs-compression lz4 --verity -o ")),
        ("erofs: forge image --root-fs erofs --erofs-compression none",
         img.replace(" -o ", " --root-fs erofs --erofs-compression none -o ")),
    ], a.runs))
    sh(f"rm -f {w}/i.img*")


def erofs_cards(res, c, top, a, w):
    """Issue 30: the sd-aarch64 card (`.img.zst`) with an EROFS root (lz4hc)
    against the ext4 one: each card's compressed file and the bytes flash
    writes (the bmap's mapped ranges), and flash (write + verify) of each
    to the same loop device, alternated."""
    print("sd-aarch64 cards with EROFS and ext4 roots, flashed", file=sys.stderr)
    fw, csd = firmware(w), aarch64_corpus(c, top, a)
    size = 0
    for fs in ("ext4", "erofs"):
        out = f"{w}/card-{fs}.img.zst"
        sh(f"{FORGE} image {top} --root {csd} --format sd-aarch64 --firmware {fw} "
           f"--state-size none --root-fs {fs} -o {out} 2>/dev/null")
        bmap = open(out + ".bmap").read()
        field = lambda name: int(bmap.split(f"<{name}>")[1].split("<")[0])  # noqa: E731
        size = max(size, field("BlocksCount") * field("BlockSize"))
        res.append({"name": f"card ({fs} root): .img.zst", "bytes": os.path.getsize(out)})
        res.append({"name": f"card ({fs} root): written by flash (mapped)",
                    "bytes": field("MappedBlocksCount") * field("BlockSize")})
    with loop_device(os.path.join(w, "card-target"), size + (64 << 20)) as dev:
        flash = f"{FLASH} {{}} {dev} --yes --allow-non-removable --quiet"
        res.extend(measure_pair(
            ("card: flash .img.zst, ext4 root (write + verify)", flash.format(f"{w}/card-ext4.img.zst")),
            ("card: flash .img.zst, EROFS root (write + verify)", flash.format(f"{w}/card-erofs.img.zst")),
            a.runs))
    sh(f"rm -f {w}/card-*")


def updates_bench(res, c, top, a, w):
    """Issue 27: forge update (a version's root filesystem, UKI and
    SHA256SUMS) against forge image --slots 2 of the same system and
    version (the whole disk), alternated; goal: update <= 0.6x image."""
    print("A/B update artefacts of the corpus", file=sys.stderr)
    args = f"{top} --root {c} --uki --uki-stub {STUB} --version 2"
    rm = f"rm -rf {w}/*"
    res.extend(measure_pair(
        ("updates: forge image --slots 2 --uki", f"{FORGE} image {args} --slots 2 -o {w}/ab.img", rm),
        ("updates: forge update (root, UKI, SHA256SUMS)", f"{FORGE} update {args} -o {w}/pub", rm),
        a.runs))
    sh(rm)


def vm_bench(res, c, top, a, w):
    """VM disks (issue 13): forge writing qcow2 and VHD directly, against
    forge's raw image alone and followed by qemu-img convert, and against
    the disk's own limit (dd of the raw image's mapped bytes), all
    alternated (issue 31)."""
    print("VM disk images of the corpus", file=sys.stderr)
    rm = f"rm -rf {w}/*"
    img = f"{FORGE} image {top} --root {c} --format raw-efi"
    mapped = json.loads(sh(f"{rm}; {img} -o {w}/x.img --json 2>/dev/null"))["mapped_bytes"]
    res.extend(measure_group([
        ("vm: forge raw .img", f"{img} -o {w}/x.img", rm),
        ("vm: forge .qcow2", f"{img} -o {w}/x.qcow2", rm),
        ("vm: forge .vhd (fixed)", f"{img} -o {w}/x.vhd", rm),
        ("vm: forge raw + qemu-img convert -O qcow2",
         f"{img} -o {w}/x.img && qemu-img convert -O qcow2 {w}/x.img {w}/x.qcow2 && sync", rm),
        disk_limit(w, mapped, "vm: disk limit (dd oflag=direct of the raw image's mapped bytes)"),
    ], a.runs))
    sh(f"{rm}; {img} -o {w}/x.img 2>/dev/null")
    res.extend(measure_pair(
        ("vm: forge .qcow2 --compression deflate", f"rm -f {w}/c.qcow2; {img} --compression deflate -o {w}/c.qcow2"),
        ("vm: qemu-img convert -c -O qcow2 (of the raw image)",
         f"rm -f {w}/c.qcow2; qemu-img convert -c -O qcow2 {w}/x.img {w}/c.qcow2 && sync"),
        a.runs))
    sh(rm)


def fleet_bench(res, c, top, a, w):
    """20 VMs from one base in one call (issue 14): wall time, and the host
    bytes all their outputs take (du)."""
    print("a fleet of 20 VMs", file=sys.stderr)
    base = os.path.join(w, "..", "fleet-base.qcow2")
    if not os.path.exists(base):
        sh(f"{FORGE} image {top} --root {c} --format raw-efi --state-size none -o {base} 2>/dev/null")
    machines = os.path.join(w, "..", "fleet-machines")
    for i in range(20):
        m = os.path.join(machines, f"vm{i:02}")
        os.makedirs(m, exist_ok=True)
        open(os.path.join(m, "hostname"), "w").write(f"vm{i:02}\n")
    vms = os.path.join(w, "vms")
    forge_vm = (f"mkdir -p {vms} && {FORGE} vm --base {base} --identities {machines} "
                f"--generate-host-keys --var-size 1G -o {vms} > /dev/null")
    # Issue 31: against the same files made with qemu-img, mkfs.ext4 and
    # ssh-keygen (scripts/fleet-peer.sh), alternated.
    peer = f"{REPO}/scripts/fleet-peer.sh {base} {machines} {vms}"
    pair = measure_pair(
        ("fleet: forge vm, 20 VMs (1 GiB /var each, host keys)", forge_vm, f"rm -rf {vms}"),
        ("fleet: qemu-img create + mkfs.ext4 + ssh-keygen, 20 VMs", peer, f"rm -rf {vms}"),
        a.runs)
    sh(f"rm -rf {vms}; {forge_vm}")
    du = int(sh(f"du -sk {vms}").split()[0])
    pair[0]["du_kib"] = du
    print(f"  fleet outputs take {du} KiB on the host (du)", file=sys.stderr)
    res.extend(pair)
    sh(f"rm -rf {vms}")


def closure_info(c, top):
    """A closureInfo directory for a corpus (made once, not timed)."""
    info = c + "-closure-info"
    if not os.path.exists(os.path.join(info, "registration")):
        os.makedirs(info, exist_ok=True)
        sh(f"{FORGE} closure {top} --root {c} --registration > {info}/registration")
        shutil.copy(os.path.join(c, "closure-paths"), os.path.join(info, "store-paths"))
    return info


def info_bench(res, c, top, a, w):
    """With closure-info (issue 16) Nix's hashes are taken and each file is
    read once: raw-efi from closure-info against scan mode (which hashes
    every NAR), against reading the closure once with tar, and against the
    disk's limit for its mapped bytes, alternated (issue 31)."""
    print("raw-efi from closure-info", file=sys.stderr)
    info = closure_info(c, top)
    rm = f"rm -rf {w}/*"
    img = f"{FORGE} image {top} --root {c} --format raw-efi -o {w}/x.img"
    mapped = json.loads(sh(f"{rm}; {img} --json 2>/dev/null"))["mapped_bytes"]
    res.extend(measure_group([
        ("info: forge image, closure-info", f"{img} --closure-info {info}", rm),
        ("info: forge image, scan mode", img, rm),
        ("info: tar of the store, piped to /dev/null", f"tar -cf - -C {c} nix | cat > /dev/null"),
        disk_limit(w, mapped, "info: disk limit (dd oflag=direct of the image's mapped bytes)"),
    ], a.runs))
    sh(rm)


def oci_bench(res, c, top, a, w):
    """forge oci (issue 15): the whole image (gzip -6, the closure from
    closure-info, no cache) against tar of the same paths through pigz -p 2
    -6; and a rebuild with the layer cache after one small path changed."""
    print("OCI image of the corpus", file=sys.stderr)
    info = closure_info(c, top)
    out, cache = os.path.join(w, "oci"), os.path.join(w, "oci-cache")
    rm = f"rm -rf {out} {cache}"
    oci = f"{FORGE} oci {top} --root {c} --closure-info {info} -o {out}"
    listing = os.path.join(w, "oci-paths")
    open(listing, "w").write("".join(l[1:] + "\n" for l in open(os.path.join(info, "store-paths")).read().split()))
    # Alternated (issue 31), as are the rebuild and the full build below.
    res.extend(measure_pair(
        ("oci: forge oci (gzip -6, no cache)", f"{oci} --no-cache", rm),
        ("oci: tar of the paths, piped to pigz -p 2 -6", f"tar -cf - -C {c} -T {listing} | pigz -p 2 -6 > /dev/null"),
        a.runs))
    # One small path changed, in a hard-linked copy of the corpus, with its
    # own closure info (made untimed).
    c2 = c + "-oci-changed"
    if not os.path.exists(c2):
        sh(f"cp -al {c} {c2}")
        paths = json.loads(sh(f"{FORGE} closure {top} --root {c} --closure-info {info} --json 2>/dev/null"))["paths"]
        small = min((p for p in paths if p["path"] != top and p["narSize"] > 4096), key=lambda p: (p["narSize"], p["path"]))
        target = sh(f"find {c2}{small['path']} -type f | sort | head -1").strip()
        data = open(target, "rb").read()
        os.unlink(target)  # break the hard link
        open(target, "wb").write(data + b"changed\n")
        print(f"  changed {target}", file=sys.stderr)
        shutil.rmtree(c2 + "-closure-info", ignore_errors=True)
    info2 = closure_info(c2, top)
    oci2 = f"{FORGE} oci {top} --root {c2} --closure-info {info2} -o {out}"
    primed = os.path.join(w, "..", "oci-cache-primed")
    if not os.path.exists(primed):
        sh(f"{oci} --cache {primed} 2>/dev/null; rm -rf {out}")
    res.extend(measure_pair(
        ("oci: forge oci rebuild, one small path changed (cache)", f"{oci2} --cache {cache}",
         f"{rm}; cp -al {primed} {cache}"),
        ("oci: forge oci of the changed corpus (empty cache)", f"{oci2} --cache {cache}", rm),
        a.runs))
    # What the rebuild did: only the changed path's layer and the
    # customisation layer compressed, every other layer from the cache.
    sh(f"{rm}; cp -al {primed} {cache}")
    got = json.loads(sh(f"{oci2} --cache {cache} --json 2>/dev/null"))
    fresh = [l for l in got["layers"] if not l["cached"]]
    assert len(fresh) == 2, f"rebuild compressed {len(fresh)} layers"
    print(f"  rebuild: {len(got['layers'])} layers, compressed again: "
          f"{[len(l['paths']) for l in fresh]} paths, {sum(l['size'] for l in fresh)} bytes", file=sys.stderr)
    sh(rm)


def flash_bench(res, c, top, a, w):
    """flash + verify of the corpus's raw-efi image to a loop device, against
    dd (no verify) and bmaptool copy, in the same run."""
    print("flash to a loop device", file=sys.stderr)
    img = os.path.join(w, "flash.img")
    sh(f"{FORGE} image {top} --root {c} --format raw-efi -o {img} 2>/dev/null")
    size = os.path.getsize(img)
    try:
        with loop_device(os.path.join(w, "flash-target"), size + (64 << 20)) as dev:
            res.extend(measure_group([
                ("dd bs=4M oflag=direct conv=fsync", f"dd if={img} of={dev} bs=4M oflag=direct conv=fsync status=none"),
                ("bmaptool copy", f"bmaptool -q copy {img} {dev}"),
                ("flash (write + verify)", f"{FLASH} {img} {dev} --yes --allow-non-removable --quiet"),
            ], a.runs))
            # Issue 26: the same image signed, flashed with --trust (each range
            # checked against its signed hash before it is written, no
            # separate pass over the source), alternated with dd.
            key = os.path.join(w, "bench-key")
            sh(f"nix-store --generate-binary-cache-key bench-1 {key}.sk {key}.pk")
            res.append(measure(f"forge sign --key (the manifest of a {size >> 20} MiB image)",
                               f"{FORGE} sign {img} --key {key}.sk", a.runs))
            res.extend(measure_pair(
                ("signed: dd bs=4M oflag=direct conv=fsync", f"dd if={img} of={dev} bs=4M oflag=direct conv=fsync status=none"),
                ("signed: flash --trust (write + verify)",
                 f"{FLASH} {img} {dev} --yes --allow-non-removable --quiet --trust {key}.pk"),
                a.runs))
    finally:
        for f in (img, img + ".bmap", img + ".layout.json", img + ".sig"):
            if os.path.exists(f):
                os.unlink(f)


def provision_bench(res, c, top, a, w):
    """flash --fill with an identity (issue 17) against a plain flash of the
    same image (the corpus's raw-efi), onto a sparse 32 GiB loop device."""
    print("flash --fill --identity onto a sparse 32 GiB loop device", file=sys.stderr)
    img = os.path.join(w, "prov.img")
    sh(f"{FORGE} image {top} --root {c} --format raw-efi -o {img} 2>/dev/null")
    ident = os.path.join(w, "prov-identity")
    os.makedirs(ident, exist_ok=True)
    open(os.path.join(ident, "hostname"), "w").write("bench\n")
    try:
        with loop_device(os.path.join(w, "prov-target"), 32 << 30) as dev:
            flash = f"{FLASH} {img} {dev} --yes --allow-non-removable --quiet"
            res.extend(measure_pair(
                ("provision: flash (write + verify), 32 GiB device", flash),
                ("provision: flash --fill --identity --generate-host-keys, 32 GiB device",
                 f"{flash} --fill --identity {ident} --generate-host-keys"),
                max(a.runs, 6)))
    finally:
        for f in (img, img + ".bmap", img + ".layout.json"):
            os.unlink(f)


def scaling(out, a):
    """Does forge ext4's time grow linearly with the tree? (issue 3)
    forge ext4 and mkfs.ext4 -d of each corpus alternated (issue 31)."""
    rows = []
    w = os.path.join(out, "work")
    os.makedirs(w, exist_ok=True)
    for mib in [512, 1024, 2048, 4096]:
        c, _ = corpus(out, mib, a.fixtures)
        sh("sync")  # a freshly built corpus is still being written back
        data = int(sh(f"du -sb {c}/nix/store").split()[0])
        entries = int(sh(f"find {c}/nix/store | wc -l"))
        sh(f"tar -cf - -C {c} nix | cat > /dev/null")
        plan = sh(f"{FORGE} ext4 {c} -o {w}/x.img --owner 0:0 --dry-run")
        size = int(plan.split(": ")[1].split(" bytes")[0])
        size = (size * 11 // 10 + (1 << 20) - 1) >> 20 << 20
        inodes = int(plan.split("inodes (")[1].split(" used")[0]) + 1000
        rm = f"rm -rf {w}/*"
        f, m = measure_pair(
            (f"forge ext4 {mib}", f"{FORGE} ext4 {c} -o {w}/x.img --owner 0:0 --size {size}", rm),
            (f"mkfs.ext4 -d {mib}", f"truncate -s {size} {w}/x.img && mkfs.ext4 -q -F -N {inodes} -d {c} {w}/x.img", rm),
            a.runs)
        sh(rm)
        rows.append((mib, data, entries, f, m))
    print("\n| corpus (requested) | data | entries | forge ext4 median / best | best s per GiB | peak RSS | mkfs.ext4 -d median / best | ratio of medians |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mib, data, entries, f, m in rows:
        gib = data / (1 << 30)
        print(f"| {mib} MiB | {gib:.2f} GiB | {entries} | {f['median_s']:.2f} / {min(f['runs']):.2f} s | "
              f"{min(f['runs']) / gib:.2f} | {f['peak_rss_kib'] // 1024} MiB | "
              f"{m['median_s']:.2f} / {min(m['runs']):.2f} s | {f['median_s'] / m['median_s']:.2f} |")


if __name__ == "__main__":
    main()
