//! flash under interruption (issue 12): whatever moment a flash of image B
//! over disk A is killed or interrupted at, no tool finds a usable
//! partition table, old or new, primary or backup; SIGINT and SIGTERM say
//! so and exit 130 and 143. The moment is made sure by a pause point
//! (`NIXFORGE_FLASH_PAUSE`, see `flash::Meter::reached`).

use nixforge_tests::flashing::*;
use nixforge_tests::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

/// A raw-efi image of the x86_64 fixture forged with `seed`, in `dir`.
fn forged(dir: &Path, name: &str, seed: &str) -> PathBuf {
    let img = dir.join(name);
    ok(forge_image_of(&system("x86_64"))
        .args(["--format", "raw-efi", "--seed", seed, "-o"])
        .arg(&img));
    img
}

/// Disk A (a flashed raw-efi image) on a loop device, and image B.
struct Scene {
    _d: tempfile::TempDir,
    b: PathBuf,
    backing: PathBuf,
    lo: Loop,
}

fn scene() -> Scene {
    let d = tempfile::tempdir().unwrap();
    let b = forged(d.path(), "b.img", "disk B");
    scene_with(d, b)
}

/// Disk A, as large as `b` or larger, on a loop device.
fn scene_with(d: tempfile::TempDir, b: PathBuf) -> Scene {
    let a = forged(d.path(), "a.img", "disk A");
    let backing = d.path().join("disk");
    stale_file(&backing, len(&a).max(len(&b)));
    let lo = Loop::attach(&backing, &[]);
    ok(flash()
        .arg(&a)
        .arg(&lo.dev)
        .args(["--yes", "--allow-non-removable", "--quiet"]));
    let dump = ok(Command::new("sfdisk").arg("-d").arg(&lo.dev));
    assert!(dump.contains("label: gpt"), "disk A has its table: {dump}");
    Scene {
        _d: d,
        b,
        backing,
        lo,
    }
}

/// Start flashing B, held at `point`; returns once it is there, with the
/// rest of its stderr to come.
fn paused_at(s: &Scene, point: &str) -> (Child, Receiver<String>) {
    let mut child = flash()
        .arg(&s.b)
        .arg(&s.lo.dev)
        .args(["--yes", "--allow-non-removable"])
        .env("NIXFORGE_FLASH_PAUSE", point)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let want = format!("paused at {point}");
    loop {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(l) if l.contains(&want) => break,
            Ok(_) => {}
            Err(e) => panic!("flash never reached {point}: {e}"),
        }
    }
    (child, rx)
}

/// No tool finds a table: sfdisk, sgdisk (nor a backup to rebuild from),
/// blkid, wipefs; and the backing file has no signature at either end.
fn no_usable_table(s: &Scene, when: &str) {
    let dev = &s.lo.dev;
    let out = Command::new("sfdisk").arg("-d").arg(dev).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("does not contain a recognized partition table"),
        "{when}: sfdisk -d: {err} {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v = ok(Command::new("sgdisk").arg("-v").arg(dev));
    assert!(
        v.contains("Creating new GPT entries in memory") && !v.contains("backup"),
        "{when}: sgdisk -v: {v}"
    );
    let b = Command::new("blkid").arg("-p").arg(dev).output().unwrap();
    assert_eq!(b.status.code(), Some(2), "{when}: blkid -p finds {b:?}");
    let w = ok(Command::new("wipefs").arg("-n").arg(dev));
    assert_eq!(w.trim(), "", "{when}: wipefs -n: {w}");
    assert!(no_table_left(&s.backing), "{when}: a signature is left");
}

#[test]
fn flash_killed_at_any_point_leaves_no_usable_table_old_or_new() {
    let _g = privileged();
    let s = scene();
    for point in ["cleared", "body", "head"] {
        let (mut child, _) = paused_at(&s, point);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        no_usable_table(&s, &format!("SIGKILL at {point}"));
    }
}

fn interrupted_by(signal: &str, code: i32, point: &str) {
    let _g = privileged();
    let s = scene();
    let (mut child, rest) = paused_at(&s, point);
    ok(Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string()));
    let status = child.wait().unwrap();
    let err: Vec<String> = rest.iter().collect();
    assert_eq!(
        status.code(),
        Some(code),
        "exit status after SIG{signal}: {err:?}"
    );
    assert!(
        err.iter()
            .any(|l| l.contains(&format!("stopped by SIG{signal}"))
                && l.contains("partition tables were wiped")),
        "{err:?}"
    );
    no_usable_table(&s, &format!("SIG{signal}"));
}

#[test]
fn flash_interrupted_by_sigint_wipes_the_tables_and_exits_130() {
    interrupted_by("INT", 130, "body");
}

#[test]
fn flash_interrupted_by_sigterm_wipes_the_tables_and_exits_143() {
    // Just before the new head: it must not be written.
    interrupted_by("TERM", 143, "head");
}

#[test]
fn mbr_image_over_a_gpt_disk_leaves_no_old_backup_gpt() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let sd = sd_image(d.path(), "sd.img");
    let s = scene_with(d, sd);
    ok(flash()
        .arg(&s.b)
        .arg(&s.lo.dev)
        .args(["--yes", "--allow-non-removable", "--quiet"]));
    let dump = ok(Command::new("sfdisk").arg("-d").arg(&s.lo.dev));
    assert!(dump.contains("label: dos"), "{dump}");
    // sgdisk sees the MBR alone: no GPT, not even a backup to offer.
    let v = ok(Command::new("sgdisk").arg("-v").arg(&s.lo.dev));
    assert!(
        !v.contains("GPT: damaged") && !v.contains("backup") && !v.contains("corrupt GPT"),
        "{v}"
    );
    let w = ok(Command::new("wipefs").arg("-n").arg(&s.lo.dev));
    assert!(!w.contains("gpt") && w.contains("dos"), "{w}");
}

// ---- sources refused before the first byte: exit 2, one line, the
// device's bytes unchanged ----

/// Run flash on `t`'s device with `args` (the source first); it must be
/// refused with exit 2, one error line containing every `want`, and the
/// device untouched.
fn source_refused(t: &Disk, args: &[&std::ffi::OsStr], want: &[&str]) {
    let out = flash()
        .args(args)
        .arg(&t.lo.dev)
        .args(["--yes", "--allow-non-removable"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let line = the_error(&err);
    for w in want {
        assert!(line.contains(w), "want {w:?} in: {line}");
    }
    t.untouched();
}

fn os(s: &Path) -> &std::ffi::OsStr {
    s.as_os_str()
}

#[test]
fn flash_writes_any_file_as_an_image_no_more() {
    let _g = privileged();
    let t = disk(&[], 0);
    let text = t.img.with_file_name("notes.txt");
    std::fs::write(&text, "these are not the bytes of a disk\n\n\n\n").unwrap();
    source_refused(
        &t,
        &[os(&text)],
        &["notes.txt", "no partition table", "--raw"],
    );
}

#[test]
fn truncated_zst_is_refused_before_writing() {
    let _g = privileged();
    let t = disk(&[], 0);
    let zst = t.img.with_extension("img.zst");
    ok(Command::new("zstd")
        .args(["-q", "-T0"])
        .arg(&t.img)
        .arg("-o")
        .arg(&zst));
    ok(Command::new("truncate")
        .args(["-s", &(len(&zst) / 2).to_string()])
        .arg(&zst));
    source_refused(
        &t,
        &[os(&zst)],
        &["disk.img.zst", "ends inside a zstd frame", "truncated"],
    );
}

#[test]
fn bmap_of_another_image_of_the_same_size_is_refused_before_writing() {
    let _g = privileged();
    let t = disk(&[], 0);
    let other = forged(t.img.parent().unwrap(), "other.img", "another seed");
    assert_eq!(len(&other), len(&t.img));
    let bmap = PathBuf::from(format!("{}.bmap", other.display()));
    source_refused(
        &t,
        &[os(&t.img), "--bmap".as_ref(), os(&bmap)],
        &[
            "disk.img: bytes 0..",
            "do not match the checksum in",
            "other.img.bmap",
        ],
    );
}

#[test]
fn raw_image_shorter_than_its_partition_table_is_refused() {
    let _g = privileged();
    let t = disk(&[], 0);
    let short = t.img.with_file_name("short.img");
    std::fs::copy(&t.img, &short).unwrap();
    ok(Command::new("truncate").args(["-s", "-1M"]).arg(&short));
    source_refused(
        &t,
        &[os(&short)],
        &["short.img", "partition table reaches byte", "truncated"],
    );
}

#[test]
fn same_device_twice_even_through_a_symlink_is_refused() {
    let _g = privileged();
    let t = disk(&[], 0);
    let link = t.img.with_file_name("alias");
    std::os::unix::fs::symlink(&t.lo.dev, &link).unwrap();
    for second in [Path::new(&t.lo.dev), link.as_path()] {
        let err = refused(
            flash()
                .arg(&t.img)
                .arg(&t.lo.dev)
                .arg(second)
                .args(["--yes", "--allow-non-removable"]),
            "distinct",
        );
        assert!(err.contains("the same disk as"), "{err}");
        the_error(&err);
        t.untouched();
    }
}

#[test]
fn bad_sha256_is_refused_before_hashing() {
    let _g = privileged();
    let t = disk(&[], 0);
    let out = flash()
        .arg(&t.img)
        .arg(&t.lo.dev)
        .args(["--yes", "--allow-non-removable", "--sha256", "xyz"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("\"xyz\" is not a SHA-256 (64 hex digits)"),
        "{err}"
    );
    t.untouched();
}

#[test]
fn qcow2_vhd_and_oci_tarballs_are_refused_by_name() {
    let _g = privileged();
    let t = disk(&[], 0);
    let dir = t.img.parent().unwrap();
    let qcow2 = dir.join("x.qcow2");
    ok(Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(&t.img)
        .arg(&qcow2));
    source_refused(&t, &[os(&qcow2)], &["x.qcow2", "a qcow2 image"]);
    let vhd = dir.join("x.vhd");
    ok(Command::new("qemu-img")
        .args(["convert", "-O", "vpc", "-o", "subformat=dynamic"])
        .arg(&t.img)
        .arg(&vhd));
    source_refused(&t, &[os(&vhd)], &["x.vhd", "a dynamic VHD image"]);
    let tar = dir.join("oci.tar");
    ok(Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(dir)
        .arg("disk.img.layout.json"));
    source_refused(&t, &[os(&tar)], &["oci.tar", "a tar archive"]);
}

#[test]
fn a_layout_manifest_of_another_image_is_refused() {
    let _g = privileged();
    let t = disk(&[], 0);
    let other = forged(t.img.parent().unwrap(), "other.img", "another seed");
    std::fs::copy(
        format!("{}.layout.json", other.display()),
        format!("{}.layout.json", t.img.display()),
    )
    .unwrap();
    source_refused(
        &t,
        &[os(&t.img), "--no-bmap".as_ref()],
        &["disk.img.layout.json describes another image", "disk id"],
    );
}

/// Exit 2 for every refusal before the first write, each leaving the
/// device as it was: a --sha256 mismatch, a malformed SOURCE_DATE_EPOCH,
/// a bmap that is not one, --fill without a layout manifest, a device
/// another process holds, flash run without root.
#[test]
fn every_refusal_before_the_first_write_exits_2_and_writes_nothing() {
    let _g = privileged();
    let t = disk(&[], 0);
    let run = |cmd: &mut Command, want: &str| {
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{want}: {err}");
        assert!(the_error(&err).contains(want), "want {want:?} in {err}");
        t.untouched();
    };
    let base = || {
        let mut c = flash();
        c.arg(&t.img)
            .arg(&t.lo.dev)
            .args(["--yes", "--allow-non-removable"]);
        c
    };
    run(base().args(["--sha256", &"0".repeat(64)]), "SHA-256 is");
    run(
        base().arg("--fill").env("SOURCE_DATE_EPOCH", "yesterday"),
        "SOURCE_DATE_EPOCH=\"yesterday\" is not a number",
    );
    let junk = t.img.with_file_name("junk.bmap");
    std::fs::write(&junk, "<bmap>not really</bmap>\n").unwrap();
    run(base().arg("--bmap").arg(&junk), "junk.bmap");
    let bare = t.img.with_file_name("bare.img");
    std::fs::copy(&t.img, &bare).unwrap();
    run(
        flash().arg(&bare).arg(&t.lo.dev).args([
            "--yes",
            "--allow-non-removable",
            "--no-bmap",
            "--fill",
        ]),
        "no layout manifest",
    );
    // Another process holds the disk (as udisks or a second flash would).
    let mut holder = Command::new("flock")
        .args(["-x", &t.lo.dev, "sleep", "30"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    run(&mut base(), &t.lo.dev);
    let _ = holder.kill();
    let _ = holder.wait();
    // Not root: the image readable by anyone, the device not.
    std::fs::set_permissions(
        t.img.parent().unwrap(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin("flash"))
        .arg(&t.img)
        .arg(&t.lo.dev)
        .args(["--yes", "--allow-non-removable"])
        .stdin(Stdio::null());
    run(&mut c, &t.lo.dev);
}
