"""Issue 29's formats in `make bench`: forge writing VHDX, streamOptimized
VMDK, OVA and GCE's .tar.gz directly, against forge's raw image of the
same system and against forge raw followed by the peer converters
(`qemu-img convert`, GNU tar -S with gzip), all alternated in one group
so machine drift hits every command alike."""
import sys

from benchkit import FORGE, sh, measure_group


def formats_bench(res, c, top, a, w):
    print("VHDX, VMDK, OVA, GCE of the corpus", file=sys.stderr)
    rm = f"rm -rf {w}/*"
    img = f"{FORGE} image {top} --root {c} --format raw-efi"
    # GCE's disk is whole GiB: the raw image the peers start from is the same size.
    gib = -(-int(sh(f"{rm}; {img} -o {w}/g.tar.gz --json 2>/dev/null | "
                    "python3 -c 'import json,sys; print(json.load(sys.stdin)[\"size\"])'")) // (1 << 30))
    raw = f"{img} -o {w}/x.img"
    res.extend(measure_group([
        ("formats: forge raw .img", raw, rm),
        ("formats: forge .vhdx", f"{img} -o {w}/x.vhdx", rm),
        ("formats: forge .vmdk (streamOptimized)", f"{img} -o {w}/x.vmdk", rm),
        ("formats: forge .ova", f"{img} -o {w}/x.ova", rm),
        ("formats: forge GCE .tar.gz", f"{img} -o {w}/x.tar.gz", rm),
        ("formats: forge raw + qemu-img convert -O vhdx",
         f"{raw} && qemu-img convert -O vhdx {w}/x.img {w}/x.vhdx && sync", rm),
        ("formats: forge raw + qemu-img convert -O vmdk -o subformat=streamOptimized",
         f"{raw} && qemu-img convert -O vmdk -o subformat=streamOptimized {w}/x.img {w}/x.vmdk && sync",
         rm),
        ("formats: forge raw (--disk-size GiB) + tar --format=oldgnu -Sczf (GCE)",
         f"{img} --disk-size {gib}G -o {w}/disk.raw && tar --format=oldgnu -Sczf {w}/g.tar.gz "
         f"-C {w} disk.raw && sync", rm),
    ], a.runs))
    sizes = {}
    for name in ["x.vhdx", "x.vmdk", "x.ova", "x.tar.gz"]:
        sh(f"{rm}; {img} -o {w}/{name} 2>/dev/null")
        sizes[name] = int(sh(f"stat -c %s {w}/{name}"))
    sh(f"{rm}; {raw} 2>/dev/null && qemu-img convert -O vmdk -o subformat=streamOptimized "
       f"{w}/x.img {w}/q.vmdk && qemu-img convert -O vhdx {w}/x.img {w}/q.vhdx")
    sizes["qemu-img x.vmdk"] = int(sh(f"stat -c %s {w}/q.vmdk"))
    sizes["qemu-img x.vhdx"] = int(sh(f"stat -c %s {w}/q.vhdx"))
    print("formats: file sizes (bytes): " + ", ".join(f"{k} {v}" for k, v in sizes.items()),
          file=sys.stderr)
    res.append({"name": "formats: file sizes (bytes)", "sizes": sizes})
    sh(rm)


def lxc_bench(res, c, top, a, w):
    """forge lxc against GNU tar of the same tree (the closure and its
    registration; forge adds the Nix database and links) piped to xz -T0:
    its own section (`--only lxc`), since xz -6 over the closure takes
    most of half an hour for its runs."""
    print("LXC image of the corpus", file=sys.stderr)
    rm = f"rm -rf {w}/*"
    res.extend(measure_group([
        ("formats: forge lxc (xz -6)", f"{FORGE} lxc {top} --root {c} -o {w}/lxc", rm),
        ("formats: tar of the closure | xz -6 -T0",
         f"tar -C {c} -cf - nix | xz -6 -T0 > {w}/rootfs.tar.xz && sync", rm),
    ], a.runs))
    sh(rm)


def iso_bench(res, c, top, a, w):
    """forge's hybrid ISO against forge's raw-efi image of the same root
    (EROFS, lz4hc) and against the peer pipeline that makes the same ISO
    from the same files: mkfs.vfat + mcopy (the ESP), mkfs.erofs -zlz4hc
    (the root), xorriso -isohybrid-gpt-basdat, alternated."""
    print("ISO of the corpus", file=sys.stderr)
    rm = f"rm -rf {w}/*"
    img = f"{FORGE} image {top} --root {c}"
    # The peers' inputs, made once and not timed: the files forge's ESP
    # and root hold, read back by mtools and fsck.erofs.
    src = f"{w}-iso-inputs"
    sh(f"rm -rf {src} && mkdir -p {src}/esp {src}/root && {rm} && "
       f"{img} --format iso -o {w}/x.iso 2>/dev/null && "
       f"osirrox -indev stdio:{w}/x.iso -extract / {src}/files 2>/dev/null && "
       f"mcopy -s -i {src}/files/efi.img '::/*' {src}/esp/ && "
       f"fsck.erofs --extract={src}/root/t {src}/files/root.img >/dev/null")
    esp_kib = int(sh(f"stat -c %s {src}/files/efi.img")) // 1024
    sh(f"rm -rf {src}/files; {rm}")
    peer = (f"mkdir -p {w}/p && mkfs.vfat -C -F 32 -n ESP {w}/p/efi.img {esp_kib} >/dev/null && "
            f"mcopy -s -i {w}/p/efi.img {src}/esp/* ::/ && "
            f"mkfs.erofs -zlz4hc {w}/p/root.img {src}/root/t >/dev/null && "
            f"xorriso -as mkisofs -R -J -V NIXOS_ISO -o {w}/p.iso -e efi.img -no-emul-boot "
            f"-isohybrid-gpt-basdat {w}/p 2>/dev/null && sync")
    res.extend(measure_group([
        ("iso: forge image --format iso", f"{img} --format iso -o {w}/x.iso", rm),
        ("iso: forge image --format raw-efi --root-fs erofs",
         f"{img} --format raw-efi --root-fs erofs -o {w}/x.img", rm),
        ("iso: mkfs.vfat + mcopy + mkfs.erofs -zlz4hc + xorriso", peer, rm),
    ], a.runs))
    sh(f"rm -rf {src}; {rm}")
