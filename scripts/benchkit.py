"""The measuring part of make bench (scripts/bench.py): where the
binaries are, and how a command is timed: whole processes, wall seconds
and peak RSS from GNU time, medians, alternated with what they are
compared with."""
import contextlib, os, statistics, subprocess, sys, tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# The release build `make build` makes (static, for the host's triple;
# the Makefile exports where), or cargo's default place.
REL = os.environ.get("NIXFORGE_RELEASE_DIR") or os.path.join(REPO, "target/release")
FORGE = os.path.join(REL, "forge")
FLASH = os.path.join(REL, "flash")


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, check=True, text=True, capture_output=True, **kw).stdout


def timed_run(cmd):
    """(wall seconds, peak RSS KiB) of one run of `cmd`."""
    f = tempfile.NamedTemporaryFile(delete=False)
    subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", f.name, "bash", "-c", cmd],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    e, m = open(f.name).read().split()[-2:]
    os.unlink(f.name)
    return float(e), int(m)


def worse(new, old, floor):
    """Whether `new` is a regression of `old`: over 5 % more, and more
    than `floor` (same unit) more."""
    return new > old * 1.05 and new - old > floor


def result(name, cmd, times, rss):
    r = {"name": name, "cmd": cmd, "median_s": statistics.median(times), "runs": times, "peak_rss_kib": max(rss)}
    print(f"  {name}: {r['median_s']:.2f} s (runs {times}), peak RSS {max(rss) // 1024} MiB", file=sys.stderr)
    return r


def measure(name, cmd, runs, setup=None):
    """Median wall seconds and max peak RSS (KiB) of `cmd` over `runs` runs."""
    times, rss = [], []
    for _ in range(runs):
        if setup:
            sh(setup)
        t, m = timed_run(cmd)
        times.append(t)
        rss.append(m)
    return result(name, cmd, times, rss)


def measure_pair(a, b, runs):
    """Two (name, cmd[, setup]) alternated ABBA after one warm-up run of each, so
    neither always runs first after the other (page cache, writeback):
    medians and peak RSS of each."""
    return measure_group([a, b], runs)


def measure_group(cmds, runs):
    """(name, cmd[, setup]) commands alternated after a warm-up run of
    each: run i goes through them rotated by i and, every other run,
    reversed (ABBA for two), so none always follows the same one while
    the disk drifts. `setup` runs untimed before each run of its command.
    Medians and peak RSS of each."""
    def once(c):
        if len(c) > 2 and c[2]:
            sh(c[2])
        return timed_run(c[1])
    for c in cmds:
        once(c)
    got = {c[0]: ([], []) for c in cmds}
    n = len(cmds)
    for i in range(runs):
        order = cmds[i % n:] + cmds[:i % n]
        if i % 2:
            order = order[::-1]
        for c in order:
            t, m = once(c)
            got[c[0]][0].append(t)
            got[c[0]][1].append(m)
    return [result(c[0], c[1], *got[c[0]]) for c in cmds]


_DIRECT = {}


def direct(w):
    """dd's flag for O_DIRECT writes into `w`, or "" where its filesystem
    has none (tmpfs: the bench's CPU-bound run), decided once by trying."""
    if w not in _DIRECT:
        probe = subprocess.run(f"dd if=/dev/zero of={w}/probe.bin bs=4096 count=1 oflag=direct status=none",
                               shell=True, capture_output=True)
        sh(f"rm -f {w}/probe.bin")
        _DIRECT[w] = "oflag=direct" if probe.returncode == 0 else ""
        if not _DIRECT[w]:
            print(f"{w} takes no O_DIRECT (tmpfs?): the disk-limit rows are dd's plain writes "
                  "there, a memory bandwidth", file=sys.stderr)
    return _DIRECT[w]


def disk_limit(w, nbytes, name):
    """(name, cmd, setup): dd writing `nbytes` of zeros into `w` with
    O_DIRECT (where it has it) and fsync, what this disk allows for an
    output of that size."""
    blocks = max(1, nbytes // (4 << 20))
    return (name, f"dd if=/dev/zero of={w}/limit.bin bs=4M count={blocks} {direct(w)} conv=fsync status=none",
            f"rm -f {w}/limit.bin")


def disk_rate(w):
    """This disk's write rate (MB/s) with O_DIRECT, 1 GiB, best of three."""
    best = 0.0
    for _ in range(3):
        t, _ = timed_run(f"dd if=/dev/zero of={w}/rate.bin bs=4M count=256 {direct(w)} conv=fsync status=none")
        best = max(best, (1 << 30) / 1e6 / max(t, 1e-3))
        sh(f"rm -f {w}/rate.bin")
    return best


@contextlib.contextmanager
def loop_device(backing, size):
    """A loop device over a new sparse file `backing` of `size` bytes,
    detached and removed afterwards (its partitions first)."""
    sh(f"rm -f {backing}; truncate -s {size} {backing}")
    dev = sh(f"losetup -f --show {backing}").strip()
    try:
        yield dev
    finally:
        sh(f"partx -d {dev} || true; losetup -d {dev}")
        os.unlink(backing)


def whole_disk(w):
    """'MAJ:MIN' of the disk holding directory `w` (a partition's disk),
    or None where `w` is on no block device (tmpfs)."""
    st = os.stat(w)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    sysfs = f"/sys/dev/block/{dev}"
    if not os.path.exists(sysfs):
        return None
    if os.path.exists(os.path.join(sysfs, "partition")):
        return open(os.path.join(sysfs, "..", "dev")).read().strip()
    return dev


@contextlib.contextmanager
def throttled(w, mb_s):
    """This process and its children in a cgroup whose writes to the disk
    holding `w` are held to `mb_s` MB/s: a disk-bound machine, made on
    any machine (`make bench BENCH_ARGS="--throttle 400"`). cgroup v1's blkio
    (or v2's io.max) bounds direct I/O, as forge's image data and the
    disk-limit dd write; buffered writes reach the disk through
    writeback, which v1 does not charge to the cgroup."""
    dev = whole_disk(w)
    if dev is None:
        sys.exit(f"--throttle: {w} is on no block device (tmpfs?): nothing to throttle")
    v1 = "/sys/fs/cgroup/blkio"
    if os.path.isdir(v1):
        cg, knob, value = os.path.join(v1, "nixforge-bench"), "blkio.throttle.write_bps_device", f"{dev} {mb_s * 1000000}"
        root = v1
    elif os.path.exists("/sys/fs/cgroup/cgroup.controllers") and \
            "io" in open("/sys/fs/cgroup/cgroup.controllers").read().split():
        sh("echo +io > /sys/fs/cgroup/cgroup.subtree_control")
        cg, knob, value = "/sys/fs/cgroup/nixforge-bench", "io.max", f"{dev} wbps={mb_s * 1000000}"
        root = "/sys/fs/cgroup"
    else:
        sys.exit("--throttle: no blkio or io cgroup controller here")
    os.makedirs(cg, exist_ok=True)
    with open(os.path.join(cg, knob), "w") as f:
        f.write(value)
    with open(os.path.join(cg, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    print(f"writes to {dev} throttled to {mb_s} MB/s ({cg})", file=sys.stderr)
    try:
        yield
    finally:
        with open(os.path.join(root, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        os.rmdir(cg)
