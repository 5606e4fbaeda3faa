"""Issue 28's sources in `make bench`: flash of the corpus's raw-efi image
from a URL on 127.0.0.1 (tests/tools/httpserve.py, with ranges) against
the same file from disk, and from a multi-block `.img.xz` against
`xz -dc | dd` of it, all alternated in one group on one loop device."""
import os
import subprocess
import sys
import time

from benchkit import FLASH, FORGE, REPO, sh, measure_group, loop_device


def sources_bench(res, c, top, a, w):
    print("flash from a URL and from .xz", file=sys.stderr)
    img = os.path.join(w, "src.img")
    sh(f"{FORGE} image {top} --root {c} --format raw-efi -o {img} 2>/dev/null")
    size = os.path.getsize(img)
    # Blocks of 16 MiB, as xz -T writes them, so the decoder can use every core.
    sh(f"xz -3 -T0 --block-size=16MiB -kc {img} > {img}.xz")
    port = 18000 + os.getpid() % 1000
    server = subprocess.Popen(["python3", os.path.join(REPO, "tests/tools/httpserve.py"), w, str(port), "--ranges"])
    time.sleep(1)
    flash = f"{FLASH} --yes --allow-non-removable --quiet"
    try:
        with loop_device(os.path.join(w, "sources-target"), size + (64 << 20)) as dev:
            res.extend(measure_group([
                ("sources: flash FILE (write + verify)", f"{flash} {img} {dev}"),
                ("sources: flash http://127.0.0.1 URL (write + verify)",
                 f"{flash} http://127.0.0.1:{port}/src.img {dev}"),
                ("sources: flash .img.xz (write + verify)", f"{flash} {img}.xz {dev}"),
                ("sources: xz -dc | dd oflag=direct", f"xz -dc {img}.xz | dd of={dev} bs=4M iflag=fullblock "
                 "oflag=direct conv=fsync status=none"),
            ], a.runs))
    finally:
        server.kill()
        for f in (img, img + ".xz", img + ".bmap", img + ".layout.json"):
            if os.path.exists(f):
                os.unlink(f)
