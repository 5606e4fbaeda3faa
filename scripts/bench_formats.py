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
    # forge lxc against GNU tar of the same tree (the closure and its
    # registration; forge adds the Nix database and links) piped to xz -T0.
    res.extend(measure_group([
        ("formats: forge lxc (xz -6)", f"{FORGE} lxc {top} --root {c} -o {w}/lxc", rm),
        ("formats: tar of the closure | xz -6 -T0",
         f"tar -C {c} -cf - nix | xz -6 -T0 > {w}/rootfs.tar.xz && sync", rm),
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
