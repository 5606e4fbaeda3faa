//! The ext4 writer judged by e2fsck, the kernel's ext4, debugfs and the
//! ext4-view crate (issue 3).

use nixforge_tests::*;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

pub(crate) const EPOCH: i64 = 1_700_000_000;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// A name of 1–255 bytes: any bytes but '/' and NUL, often with
    /// spaces and non-UTF-8 bytes.
    fn name(&mut self, taken: &mut std::collections::HashSet<Vec<u8>>) -> Vec<u8> {
        loop {
            let len = match self.below(10) {
                0 => 255,
                1 => 1 + self.below(255) as usize,
                _ => 1 + self.below(24) as usize,
            };
            let n: Vec<u8> = (0..len)
                .map(|_| match self.below(6) {
                    0 => b' ',
                    1 => 0x80 + self.below(0x80) as u8,
                    _ => b'a' + self.below(26) as u8,
                })
                .collect();
            if n != b"." && n != b".." && n != b"lost+found" && taken.insert(n.clone()) {
                return n;
            }
        }
    }
}

/// A random tree: every kind of entry (files, directories, short and long
/// symlinks, hard links, character and block devices, a fifo, a socket),
/// sizes around block boundaries, deep nesting, odd permissions.
pub(crate) fn random_tree(root: &Path, seed: u64) {
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut dirs = vec![root.to_path_buf()];
    let mut files: Vec<PathBuf> = Vec::new();
    let sizes = [0u64, 1, 4095, 4096, 4097, 8191, 8193, 65536, 200_000];
    for d in 0..12 {
        let parent = dirs[r.below(dirs.len() as u64) as usize].clone();
        let mut taken = std::collections::HashSet::new();
        let entries = [0u64, 1, 100, 5, 20][d % 5];
        let dir = parent.join(OsStr::from_bytes(&r.name(&mut taken)));
        if dir.exists() {
            continue;
        }
        fs::create_dir(&dir).unwrap();
        for _ in 0..entries {
            let p = dir.join(OsStr::from_bytes(&r.name(&mut taken)));
            match r.below(10) {
                0..=5 => {
                    let size = if r.below(3) == 0 {
                        r.below(300_000)
                    } else {
                        sizes[r.below(sizes.len() as u64) as usize]
                    };
                    let data: Vec<u8> = (0..size).map(|i| (i as u8) ^ (seed as u8)).collect();
                    fs::write(&p, data).unwrap();
                    let mode = [0o644, 0o755, 0o4755, 0o2711, 0o600, 0o444][r.below(6) as usize];
                    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
                    std::os::unix::fs::chown(
                        &p,
                        Some(r.below(70000) as u32),
                        Some(r.below(3000) as u32),
                    )
                    .unwrap();
                    files.push(p);
                }
                6 => {
                    let len = [1u64, 59, 60, 61, 4000][r.below(5) as usize] as usize;
                    // Path-shaped (a '/' every 50 bytes): ext4-view refuses
                    // components over 255 bytes even inside link targets.
                    let target: String = (0..len)
                        .map(|i| {
                            if i % 50 == 49 {
                                '/'
                            } else {
                                (b'a' + (i % 26) as u8) as char
                            }
                        })
                        .collect();
                    symlink(target, &p).unwrap();
                }
                7 if !files.is_empty() => {
                    let f = &files[r.below(files.len() as u64) as usize];
                    fs::hard_link(f, &p).unwrap();
                }
                8 => {
                    let ok = Command::new("mknod")
                        .arg(&p)
                        .args(["c", "1", "7"])
                        .status()
                        .unwrap();
                    assert!(ok.success());
                }
                _ => {
                    fs::create_dir(&p).unwrap();
                    fs::set_permissions(&p, fs::Permissions::from_mode(0o1777)).unwrap();
                    dirs.push(p);
                }
            }
        }
        dirs.push(dir);
    }
    // 50 levels deep, a fifo and a big-minor device at the bottom.
    let mut deep = root.join("deep");
    for i in 0..50 {
        deep = deep.join(format!("level-{i}"));
    }
    fs::create_dir_all(&deep).unwrap();
    ok(Command::new("mkfifo").arg(deep.join("fifo")));
    // Socket paths are limited to 108 bytes: bind relative to the directory.
    ok(Command::new("python3")
        .args([
            "-c",
            "import socket; socket.socket(socket.AF_UNIX).bind('sock')",
        ])
        .current_dir(&deep));
    ok(Command::new("mknod")
        .arg(deep.join("blk"))
        .args(["b", "259", "300"]));
}

fn forge_ext4(src: &Path, out: &Path, extra: &[&str]) {
    ok(forge()
        .env("SOURCE_DATE_EPOCH", EPOCH.to_string())
        .arg("ext4")
        .arg(src)
        .arg("-o")
        .arg(out)
        .args(extra));
}

fn e2fsck(img: &Path) {
    ok(Command::new("e2fsck").arg("-fn").arg(img));
}

/// Every entry of `src` has the same type, mode, owner, size, links,
/// device numbers, link target and content in `mnt`, and every timestamp
/// in `mnt` is the epoch; the root of `mnt` has `root_extra` more links
/// (ext4's lost+found).
pub(crate) fn compare_stat(src: &Path, mnt: &Path, root_extra: u64) -> usize {
    let mut n = 0;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let (s, m) = (src.join(&rel), mnt.join(&rel));
        let (a, b) = (
            fs::symlink_metadata(&s).unwrap(),
            fs::symlink_metadata(&m).unwrap(),
        );
        let what = s.display();
        assert_eq!(a.mode(), b.mode(), "mode of {what}");
        assert_eq!((a.uid(), a.gid()), (b.uid(), b.gid()), "owner of {what}");
        let extra_link = if rel.as_os_str().is_empty() {
            root_extra
        } else {
            0
        };
        assert_eq!(a.nlink() + extra_link, b.nlink(), "nlink of {what}");
        assert_eq!(a.rdev(), b.rdev(), "device of {what}");
        for t in [b.mtime(), b.atime(), b.ctime()] {
            assert_eq!(t, EPOCH, "timestamp of {what}");
        }
        let ft = a.file_type();
        if ft.is_file() {
            assert_eq!(a.len(), b.len(), "size of {what}");
            assert!(
                fs::read(&s).unwrap() == fs::read(&m).unwrap(),
                "content of {what}"
            );
        } else if ft.is_symlink() {
            assert_eq!(
                fs::read_link(&s).unwrap(),
                fs::read_link(&m).unwrap(),
                "target of {what}"
            );
        } else if ft.is_dir() {
            for e in fs::read_dir(&s).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        }
        n += 1;
    }
    n
}

/// ext4-view reads back the same names, file contents and link targets.
fn compare_ext4_view(src: &Path, img: &Path) {
    let fs4 = ext4_view::Ext4::load_from_path(img).unwrap();
    let mut stack = vec![PathBuf::from("/")];
    while let Some(rel) = stack.pop() {
        let host = src.join(rel.strip_prefix("/").unwrap());
        let p = ext4_view::Path::try_from(rel.as_os_str().as_bytes()).unwrap();
        let md = fs::symlink_metadata(&host).unwrap();
        if md.is_dir() {
            let mut names: Vec<Vec<u8>> = Vec::new();
            for e in fs4.read_dir(p).unwrap() {
                let e = e.unwrap();
                let name: Vec<u8> = AsRef::<[u8]>::as_ref(&e.file_name()).to_vec();
                let top_lf = rel == Path::new("/") && name == b"lost+found";
                if name != b"." && name != b".." && !top_lf {
                    names.push(name);
                }
            }
            names.sort();
            let mut want: Vec<Vec<u8>> = fs::read_dir(&host)
                .unwrap()
                .map(|e| e.unwrap().file_name().as_bytes().to_vec())
                .collect();
            want.sort();
            assert_eq!(names, want, "entries of {}", host.display());
            for n in &names {
                stack.push(rel.join(OsStr::from_bytes(n)));
            }
        } else if md.file_type().is_symlink() {
            let t = fs4.read_link(p).unwrap();
            let t: &[u8] = t.as_ref();
            assert_eq!(
                t,
                fs::read_link(&host).unwrap().as_os_str().as_bytes(),
                "{}",
                host.display()
            );
        } else if md.is_file() {
            let got = fs4
                .read(p)
                .unwrap_or_else(|e| panic!("ext4-view read {}: {e}", host.display()));
            assert!(got == fs::read(&host).unwrap(), "{}", host.display());
        }
    }
}

#[test]
fn random_trees_pass_e2fsck_and_the_kernel_agrees() {
    let _g = privileged();
    for seed in 1..=6u64 {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::create_dir(&src).unwrap();
        random_tree(&src, seed);
        let img = d.path().join("fs.img");
        forge_ext4(&src, &img, &[]);
        e2fsck(&img);
        let m = Mounted::ext4(&img, 0, "ro");
        diff_tree(&src, m.path(), &["lost+found"]);
        let n = compare_stat(&src, m.path(), 1);
        assert!(n > 60, "seed {seed}: only {n} entries compared");
        drop(m);
        compare_ext4_view(&src, &img);
    }
}

#[test]
fn large_directories_are_hashed_and_lookups_work() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    for (dir, n) in [("ten-thousand", 10_000), ("hundred-thousand", 100_000)] {
        let p = src.join(dir);
        fs::create_dir_all(&p).unwrap();
        for i in 0..n {
            // Long names, so 100k entries need a two-level index.
            fs::write(
                p.join(format!("entry-with-a-longer-name-to-fill-leaves-{i:07}")),
                b"",
            )
            .unwrap();
        }
    }
    fs::create_dir(src.join("empty")).unwrap();
    fs::create_dir(src.join("one")).unwrap();
    fs::write(src.join("one/only"), b"x").unwrap();
    let img = d.path().join("fs.img");
    forge_ext4(&src, &img, &["--owner", "0:0"]);
    e2fsck(&img);
    let dump = |dir: &str| {
        ok(Command::new("debugfs")
            .arg("-R")
            .arg(format!("htree_dump /{dir}"))
            .arg(&img))
    };
    assert!(dump("ten-thousand").contains("Indirect levels: 0"));
    assert!(dump("hundred-thousand").contains("Indirect levels: 1"));
    let m = Mounted::ext4(&img, 0, "ro");
    // Lookups by name go through the hash index: every name must be found.
    for (dir, n) in [("ten-thousand", 10_000), ("hundred-thousand", 100_000)] {
        for i in (0..n).step_by(97) {
            let p = m
                .path()
                .join(dir)
                .join(format!("entry-with-a-longer-name-to-fill-leaves-{i:07}"));
            assert!(p.exists(), "{} not found by lookup", p.display());
        }
        assert_eq!(fs::read_dir(m.path().join(dir)).unwrap().count(), n);
    }
    assert_eq!(fs::read_dir(m.path().join("empty")).unwrap().count(), 0);
}

#[test]
fn sparse_files_stay_sparse_and_extent_index_is_built() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    fs::create_dir(&src).unwrap();
    // 5 GiB with data at a few places.
    sh(&format!(
        "f={s}/sparse; truncate -s 5G $f; for off in 0 1073741824 4294967299 5368709000; do \
         printf 'data@%s' $off | dd of=$f bs=1 seek=$off conv=notrunc status=none; done; \
         g={s}/fragmented; truncate -s 0 $g; for i in $(seq 0 39); do \
         head -c 4096 /dev/urandom | dd of=$g bs=4096 seek=$((i*2)) conv=notrunc status=none; done",
        s = src.display()
    ));
    let img = d.path().join("fs.img");
    forge_ext4(&src, &img, &[]);
    e2fsck(&img);
    let allocated = fs::metadata(&img).unwrap().blocks() * 512;
    assert!(
        allocated < 32 << 20,
        "image holds {allocated} bytes: holes were written"
    );
    let ex = ok(Command::new("debugfs")
        .arg("-R")
        .arg("ex /fragmented")
        .arg(&img));
    assert!(
        ex.lines().any(|l| l.trim_start().starts_with("0/ 1")),
        "no index level:\n{ex}"
    );
    let m = Mounted::ext4(&img, 0, "ro");
    // Same data segments (as SEEK_DATA/SEEK_HOLE see them, block-aligned)
    // with the same bytes; everything else is a hole and reads as zeros.
    sh(&format!(
        r#"python3 - {} {} <<'EOF'
import os, sys
def segs(p):
    fd = os.open(p, os.O_RDONLY); size = os.fstat(fd).st_size; out = []; pos = 0
    while pos < size:
        try: d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError: break
        h = os.lseek(fd, d, os.SEEK_HOLE); out.append((d // 4096 * 4096, h)); pos = h
    return fd, size, out
a, b = segs(sys.argv[1]), segs(sys.argv[2])
assert a[1] == b[1], ("sizes", a[1], b[1])
assert a[2] == b[2], ("segments", a[2], b[2])
for d, h in a[2]:
    assert os.pread(a[0], h - d, d) == os.pread(b[0], h - d, d), ("bytes", d)
assert len(a[2]) >= 3, a[2]
EOF"#,
        src.join("sparse").display(),
        m.path().join("sparse").display()
    ));
    ok(Command::new("cmp")
        .arg(src.join("fragmented"))
        .arg(m.path().join("fragmented")));
    let blocks = fs::metadata(m.path().join("sparse")).unwrap().blocks();
    assert!(blocks <= 8 * 8, "sparse file occupies {blocks} sectors");
}

#[test]
fn state_profile_has_a_clean_journal_and_takes_writes() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("seed"), b"state").unwrap();
    let img = d.path().join("state.img");
    forge_ext4(
        &src,
        &img,
        &["--journal", "--size", "64M", "--label", "state"],
    );
    let h = ok(Command::new("dumpe2fs").arg("-h").arg(&img));
    assert!(
        h.lines()
            .any(|l| l.starts_with("Filesystem features:") && l.contains("has_journal")),
        "{h}"
    );
    assert!(
        h.contains("Journal start:            0"),
        "journal not clean:\n{h}"
    );
    assert!(h.contains("Filesystem volume name:   state"));
    e2fsck(&img);
    {
        let m = Mounted::ext4(&img, 0, "rw");
        for i in 0..500 {
            fs::write(m.path().join(format!("w{i}")), vec![i as u8; 10_000]).unwrap();
        }
        fs::create_dir(m.path().join("newdir")).unwrap();
        fs::remove_file(m.path().join("seed")).unwrap();
    }
    e2fsck(&img);
}

fn build_sha(src: &Path, dir: &Path, name: &str) -> String {
    let img = dir.join(name);
    forge_ext4(src, &img, &["--seed", "determinism"]);
    sha256_file(&img)
}

#[test]
fn same_input_gives_same_bytes_whatever_mtimes_and_creation_order() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a");
    fs::create_dir(&a).unwrap();
    random_tree(&a, 42);
    let h1 = build_sha(&a, d.path(), "1.img");
    let h2 = build_sha(&a, d.path(), "2.img");
    assert_eq!(h1, h2);
    // The same tree, copied entry by entry in reverse order, with new mtimes.
    let b = d.path().join("b");
    sh(&format!(
        "cd {a} && find . -mindepth 1 -type d -print0 | sort -rz | while IFS= read -r -d '' p; do mkdir -p \"{b}/$p\"; done; \
         cp -a --no-preserve=timestamps {a}/. {b}/; find {b} -exec touch -h -d '2001-02-03' {{}} +",
        a = a.display(),
        b = b.display()
    ));
    diff_tree(&a, &b, &[]);
    assert_eq!(build_sha(&b, d.path(), "3.img"), h1);
}

fn assert_nothing_left(dir: &Path, keep: &[&str]) {
    let left: Vec<String> = dir_entries(dir)
        .into_iter()
        .filter(|e| !keep.contains(&e.as_str()))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn fixed_size_too_small_fails_saying_what_is_needed() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("big"), vec![1u8; 6 << 20]).unwrap();
    let e = fails(
        forge()
            .arg("ext4")
            .arg(&src)
            .arg("-o")
            .arg(d.path().join("out.img"))
            .args(["--size", "4M"]),
    );
    let e = the_error(&e);
    assert!(
        e.contains("4194304-byte filesystem is too small") && e.contains("bytes are needed"),
        "{e}"
    );
    assert_nothing_left(d.path(), &["src"]);
}

#[test]
fn more_inodes_than_a_fixed_size_allows_fails() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    fs::create_dir(&src).unwrap();
    for i in 0..20_000 {
        fs::write(src.join(i.to_string()), b"").unwrap();
    }
    let e = fails(
        forge()
            .arg("ext4")
            .arg(&src)
            .arg("-o")
            .arg(d.path().join("out.img"))
            .args(["--size", "1M"]),
    );
    let e = the_error(&e);
    assert!(
        e.contains("20011 inodes") && e.contains("holds at most"),
        "{e}"
    );
    assert_nothing_left(d.path(), &["src"]);
}

#[test]
fn unreadable_source_file_is_named_and_nothing_is_left() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("fine"), b"ok").unwrap();
    fs::write(src.join("secret"), vec![3u8; 10_000]).unwrap();
    let out = d.path().join("out");
    fs::create_dir(&out).unwrap();
    sh(&format!(
        "chmod 755 {d}; chmod 000 {s}/secret; chmod 777 {o}",
        d = d.path().display(),
        s = src.display(),
        o = out.display()
    ));
    // Root reads everything: run as nobody.
    let e = fails(
        Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(bin("forge"))
            .arg("ext4")
            .arg(&src)
            .arg("-o")
            .arg(out.join("fs.img")),
    );
    let e = the_error(&e);
    assert!(
        e.contains(&format!("{}/secret", src.display())) && e.contains("Permission denied"),
        "{e}"
    );
    assert_nothing_left(&out, &[]);
}
