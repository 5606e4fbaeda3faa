//! `flash` (issue 6) on real loop block devices: writes, verification,
//! every refusal (each proving zero bytes written), and faults.

use nixforge_tests::flashing::*;
use nixforge_tests::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn judge_device(lo: &Loop) {
    let v = ok(Command::new("sgdisk").arg("-v").arg(&lo.dev));
    assert!(
        v.contains("No problems found") && !v.contains("Creating new GPT"),
        "{v}"
    );
    let parts = lo.partitions();
    assert_eq!(parts.len(), 3, "{parts:?}");
    ok(Command::new("fsck.fat").arg("-n").arg(&parts[0]));
    ok(Command::new("e2fsck").arg("-fn").arg(&parts[1]));
    ok(Command::new("e2fsck").arg("-fn").arg(&parts[2]));
    let m = tempfile::tempdir().unwrap();
    ok(Command::new("mount")
        .args(["-o", "ro"])
        .arg(&parts[1])
        .arg(m.path()));
    let has_store = m.path().join("nix/store").is_dir();
    ok(Command::new("umount").arg(m.path()));
    assert!(has_store);
}

fn flashes_a_gpt_image_onto_a_larger_stale_disk(sector: u32) {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let img = raw_efi(d.path(), sector);
    let backing = d.path().join("disk");
    stale_file(&backing, len(&img) + (64 << 20));
    let lo = Loop::attach(&backing, &["-b", &sector.to_string()]);
    let out = ok(flash()
        .arg(&img)
        .arg(&lo.dev)
        .args(["--yes", "--allow-non-removable", "--json"]));
    let r: Value = serde_json::from_str(&out).unwrap();
    let rep = &r[0]["report"];
    assert_eq!(r[0]["ok"], true);
    assert_eq!(rep["gpt_moved"], true);
    let bmap = std::fs::read_to_string(format!("{}.bmap", img.display())).unwrap();
    let mapped: u64 = bmap
        .lines()
        .find_map(|l| l.trim().strip_prefix("<MappedBlocksCount>"))
        .unwrap()
        .trim_end_matches("</MappedBlocksCount>")
        .trim()
        .parse::<u64>()
        .unwrap()
        * 4096;
    assert_eq!(
        rep["written"], mapped,
        "exactly the mapped blocks are written"
    );
    assert_eq!(
        rep["verified"].as_u64().unwrap(),
        verified_bytes(mapped, true, sector as u64)
    );
    judge_device(&lo);
    // Unmapped blocks were not written: the middle of the empty ESP is stale.
    drop(lo);
    assert!(still_stale(&backing, 300 << 20, 1 << 20));
    // And `flash verify` agrees, after the table moved.
    let lo = Loop::attach(&backing, &["-b", &sector.to_string()]);
    ok(flash()
        .arg("verify")
        .arg(&img)
        .arg(&lo.dev)
        .arg("--allow-non-removable"));
}

#[test]
fn gpt_image_to_larger_stale_disk_512() {
    flashes_a_gpt_image_onto_a_larger_stale_disk(512);
}

#[test]
fn gpt_image_to_larger_stale_disk_4096() {
    flashes_a_gpt_image_onto_a_larger_stale_disk(4096);
}

#[test]
fn without_a_bmap_every_byte_is_written() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let img = raw_efi(d.path(), 512);
    let backing = d.path().join("disk");
    stale_file(&backing, len(&img));
    let lo = Loop::attach(&backing, &[]);
    let out = ok(flash().arg(&img).arg(&lo.dev).args([
        "--yes",
        "--allow-non-removable",
        "--no-bmap",
        "--json",
    ]));
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r[0]["report"]["written"], len(&img));
    drop(lo);
    assert_eq!(
        sha256_file(&backing),
        sha256_file(&img),
        "same size, every byte written"
    );
}

#[test]
fn zst_with_its_bmap_and_a_bmaptool_bmap() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let zst = sd_image(d.path(), "nixos.img.zst");
    let raw = d.path().join("raw.img");
    sh(&format!("zstd -dqc {} > {}", zst.display(), raw.display()));
    let backing = d.path().join("disk");
    stale_file(&backing, len(&raw));
    let lo = Loop::attach(&backing, &[]);
    // nixos.img.zst.bmap beside nixos.img.zst is found by itself.
    let out = ok(flash()
        .arg(&zst)
        .arg(&lo.dev)
        .args(["--yes", "--allow-non-removable", "--json"]));
    let r: Value = serde_json::from_str(&out).unwrap();
    let written = r[0]["report"]["written"].as_u64().unwrap();
    assert_eq!(
        r[0]["report"]["skipped"].as_u64().unwrap(),
        len(&raw) - written
    );
    assert!(
        written < len(&raw) / 2,
        "unmapped ranges are skipped ({written} written)"
    );
    drop(lo);
    // Mapped blocks equal the image; an unmapped stretch keeps its old bytes.
    assert!(still_stale(&backing, 400 << 20, 1 << 20));
    let v = ok(Command::new("sfdisk").arg("-V").arg(&backing));
    assert!(v.contains("No errors detected"), "{v}");
    // A bmap made by bmaptool from the raw image is accepted too.
    let bt = d.path().join("bt.bmap");
    ok(Command::new("bmaptool")
        .args(["create", "-o"])
        .arg(&bt)
        .arg(&raw));
    let backing2 = d.path().join("disk2");
    stale_file(&backing2, len(&raw));
    let lo = Loop::attach(&backing2, &[]);
    ok(flash()
        .arg(&raw)
        .arg(&lo.dev)
        .args(["--yes", "--allow-non-removable", "--bmap"])
        .arg(&bt));
}

// ---- refusals: each names its check, exits 2, writes nothing ----

#[test]
fn refuses_non_removable_read_only_too_small_and_unconfirmed() {
    let _g = privileged();
    let t = disk(&[], 64 << 20);
    refused(flash().arg(&t.img).arg(&t.lo.dev).arg("--yes"), "removable");
    refused(
        flash()
            .arg(&t.img)
            .arg(&t.lo.dev)
            .arg("--allow-non-removable"),
        "confirmed",
    );
    t.untouched();
    let t = disk(&["-r"], 64 << 20);
    refused(
        flash()
            .arg(&t.img)
            .arg(&t.lo.dev)
            .args(["--yes", "--allow-non-removable"]),
        "writable",
    );
    t.untouched();
    let t = disk(&[], -(1 << 20));
    refused(
        flash()
            .arg(&t.img)
            .arg(&t.lo.dev)
            .args(["--yes", "--allow-non-removable"]),
        "large enough",
    );
    t.untouched();
}

#[test]
fn refuses_mounted_partition_node_and_symlink_to_a_refused_disk() {
    let _g = privileged();
    let t = disk(&[], 64 << 20);
    // Give the disk a real table first, so it has partitions to mount.
    ok(flash()
        .arg(&t.img)
        .arg(&t.lo.dev)
        .args(["--yes", "--allow-non-removable", "--quiet"]));
    let parts = t.lo.partitions();
    let before = sha256_file(&t.backing);
    refused(
        flash()
            .arg(&t.img)
            .arg(&parts[1])
            .args(["--yes", "--allow-non-removable"]),
        "whole disk",
    );
    // A partition mounted directly.
    let m = tempfile::tempdir().unwrap();
    ok(Command::new("mount")
        .args(["-t", "ext4", "-o", "ro"])
        .arg(&parts[1])
        .arg(m.path()));
    let e = refused(
        flash()
            .arg(&t.img)
            .arg(&t.lo.dev)
            .args(["--yes", "--allow-non-removable"]),
        "not mounted",
    );
    let unmount = || {
        let _ = Command::new("umount").arg(m.path()).status();
    };
    if !e.contains(&m.path().display().to_string()) {
        unmount();
        panic!("{e}");
    }
    // The same disk reached through a symlink, as /dev/disk/by-id would be.
    let link = t._d.path().join("by-id-link");
    std::os::unix::fs::symlink(&t.lo.dev, &link).unwrap();
    let e = refused(
        flash()
            .arg(&t.img)
            .arg(&link)
            .args(["--yes", "--allow-non-removable"]),
        "not mounted",
    );
    unmount();
    assert!(e.contains("resolved from") && e.contains(&t.lo.dev), "{e}");
    // A partition in use as the backing of another loop device (a loop mount).
    let inner = Loop::attach(Path::new(&parts[1]), &["-r"]);
    let e = refused(
        flash()
            .arg(&t.img)
            .arg(&t.lo.dev)
            .args(["--yes", "--allow-non-removable"]),
        "no holders",
    );
    assert!(e.contains(&inner.dev), "{e}");
    drop(inner);
    assert_eq!(sha256_file(&t.backing), before);
}

#[test]
fn refuses_regular_files_and_missing_nodes_creating_nothing() {
    let d = tempfile::tempdir().unwrap();
    let img = raw_efi(d.path(), 512);
    let file = d.path().join("not-a-disk");
    std::fs::write(&file, b"precious").unwrap();
    refused(
        flash()
            .arg(&img)
            .arg(&file)
            .args(["--yes", "--allow-non-removable"]),
        "block device",
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    let missing = d.path().join("sdz");
    refused(
        flash()
            .arg(&img)
            .arg(&missing)
            .args(["--yes", "--allow-non-removable"]),
        "exists",
    );
    assert!(!missing.exists(), "flash must never create the target");
}

// ---- faults: detected, non-zero exit, nothing bootable left ----

/// Byte offset of the root partition, as `forge inspect` reads it.
#[test]
fn a_source_that_does_not_match_its_bmap_is_refused_before_any_write() {
    let _g = privileged();
    let t = disk(&[], 64 << 20);
    // Corrupt one mapped byte of the root filesystem after the bmap was made.
    let root_off = root_offset(&t.img);
    sh(&format!(
        "printf 'X' | dd of={} bs=1 seek={} conv=notrunc status=none",
        t.img.display(),
        root_off + 1124
    ));
    let out = flash()
        .arg(&t.img)
        .arg(&t.lo.dev)
        .args(["--yes", "--allow-non-removable"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("do not match the checksum in"), "{err}");
    t.untouched();
}

#[test]
fn a_device_that_runs_out_of_space_mid_write_is_caught() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let img = raw_efi(d.path(), 512);
    // A loop device over a sparse file on a 16 MiB tmpfs: it claims the full
    // size, and writes fail (ENOSPC) once the tmpfs is full.
    let fs = d.path().join("tmpfs");
    std::fs::create_dir(&fs).unwrap();
    ok(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&fs));
    let backing = fs.join("disk");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(len(&img))
        .unwrap();
    let lo = Loop::attach(&backing, &[]);
    let out = flash()
        .arg(&img)
        .arg(&lo.dev)
        .args(["--yes", "--allow-non-removable", "--quiet"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("writing {} at byte", lo.dev))
            && err.contains("partition tables wiped"),
        "{err}"
    );
    drop(lo);
    let head_ok = no_table_left(&backing);
    let _ = Command::new("umount").arg(&fs).status();
    assert!(head_ok, "the first MiB must not hold a partition table");
}

#[test]
fn standalone_verify_catches_a_corrupted_byte() {
    let _g = privileged();
    let t = disk(&[], 64 << 20);
    ok(flash()
        .arg(&t.img)
        .arg(&t.lo.dev)
        .args(["--yes", "--allow-non-removable", "--quiet"]));
    let root_off = root_offset(&t.img);
    sh(&format!(
        "printf 'X' | dd of={} bs=1 seek={} conv=notrunc status=none; sync",
        t.lo.dev,
        root_off + 1124
    ));
    let out = flash()
        .arg("verify")
        .arg(&t.img)
        .arg(&t.lo.dev)
        .arg("--allow-non-removable")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    // The very byte, and what it holds against what it should.
    let want = std::fs::read(&t.img).unwrap()[(root_off + 1124) as usize];
    assert!(
        err.contains(&format!(
            "byte {} reads 0x58 from the device but the image has {want:#04x}",
            root_off + 1124
        )),
        "{err}"
    );
}

// ---- several devices from one run ----

#[test]
fn two_devices_in_one_run_and_one_failing_does_not_stop_the_other() {
    let _g = privileged();
    let good = disk(&[], 64 << 20);
    // The second device runs out of space mid-write (a loop device over a
    // sparse file on a 16 MiB tmpfs).
    let fs = good._d.path().join("tmpfs");
    std::fs::create_dir(&fs).unwrap();
    ok(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&fs));
    let small = fs.join("disk");
    std::fs::File::create(&small)
        .unwrap()
        .set_len(len(&good.img))
        .unwrap();
    let bad = Loop::attach(&small, &[]);
    let out = flash()
        .arg(&good.img)
        .arg(&good.lo.dev)
        .arg(&bad.dev)
        .args(["--yes", "--allow-non-removable", "--json"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    drop(bad);
    let bad_head_blank = no_table_left(&small);
    let _ = Command::new("umount").arg(&fs).status();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(r[0]["ok"], true, "{r}");
    assert_eq!(r[1]["ok"], false, "{r}");
    assert!(r[1]["error"].as_str().unwrap().contains("at byte"), "{r}");
    assert!(r[0]["report"]["verified"].as_u64().unwrap() > 0);
    assert!(bad_head_blank);
    judge_device(&good.lo);
}

#[test]
fn two_devices_in_one_run_both_written_and_verified() {
    let _g = privileged();
    let a = disk(&[], 64 << 20);
    let backing_b = a._d.path().join("disk-b");
    stale_file(&backing_b, len(&a.img));
    let b = Loop::attach(&backing_b, &[]);
    let out = ok(flash().arg(&a.img).arg(&a.lo.dev).arg(&b.dev).args([
        "--yes",
        "--allow-non-removable",
        "--json",
    ]));
    let r: Value = serde_json::from_str(&out).unwrap();
    for (i, dev) in [&a.lo.dev, &b.dev].into_iter().enumerate() {
        assert_eq!(r[i]["ok"], true, "{r}");
        assert_eq!(r[i]["device"], dev.as_str());
        let rep = &r[i]["report"];
        assert_eq!(
            rep["verified"].as_u64().unwrap(),
            verified_bytes(
                rep["written"].as_u64().unwrap(),
                rep["gpt_moved"].as_bool().unwrap(),
                512
            )
        );
    }
    // Only the larger disk needed its backup GPT moved.
    assert_eq!(r[0]["report"]["gpt_moved"], true);
    assert_eq!(r[1]["report"]["gpt_moved"], false);
    judge_device(&a.lo);
    judge_device(&b);
}

// ---- faults a loop device cannot produce: an injecting sink ----

use flash::device::{BlockDevice, Device};
use flash::preflight::{Host, Need};
use flash::write;
use std::sync::atomic::{AtomicBool, Ordering};

enum Fault {
    /// EIO from the write that covers this byte.
    IoErrorAt(u64),
    /// The write covering this byte stops there; then either the device
    /// takes nothing more, or the rest goes through on the retry.
    ShortAt { at: u64, then_nothing: bool },
    /// The byte flips between the write and the read-back.
    CorruptBeforeVerify(u64),
}

/// A real loop device with one injected fault.
struct Faulty {
    inner: Device,
    path: String,
    fault: Fault,
    fired: AtomicBool,
}

impl BlockDevice for Faulty {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn sector_size(&self) -> u64 {
        self.inner.sector_size()
    }
    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<usize> {
        let covers = |x: u64| off <= x && x < off + buf.len() as u64;
        match self.fault {
            Fault::IoErrorAt(x) if covers(x) => {
                return Err(std::io::Error::from_raw_os_error(libc::EIO))
            }
            Fault::ShortAt { at, then_nothing } if covers(at) => {
                if !self.fired.swap(true, Ordering::SeqCst) {
                    return self.inner.write_at(&buf[..(at - off) as usize], off);
                }
                if then_nothing {
                    return Ok(0);
                }
            }
            _ => {}
        }
        self.inner.write_at(buf, off)
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        self.inner.read_at(buf, off)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
    }
    fn drop_cache(&self) -> std::io::Result<()> {
        if let Fault::CorruptBeforeVerify(x) = self.fault {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.path)?;
            let mut b = [0u8];
            f.read_exact_at(&mut b, x)?;
            f.write_all_at(&[!b[0]], x)?;
            f.sync_all()?;
        }
        self.inner.drop_cache()
    }
}

/// Flash `t.img` through a faulty sink over `t.lo` (and any more sinks).
/// What the fixture image asks of a loop device (not removable).
fn need(size: u64) -> Need {
    Need {
        size,
        sector: Some(512),
        allow_non_removable: true,
    }
}

fn flash_faulty(t: &Disk, fault: Fault, more: Vec<Box<dyn BlockDevice>>) -> Vec<Res> {
    let src = flash::source::Source::open(&t.img, flash::source::BmapChoice::Auto).unwrap();
    let target =
        flash::preflight::check(&Host::default(), Path::new(&t.lo.dev), need(src.size)).unwrap();
    let faulty = Faulty {
        inner: Device::open(&target, true).unwrap(),
        path: t.lo.dev.clone(),
        fault,
        fired: AtomicBool::new(false),
    };
    let mut sinks: Vec<Box<dyn BlockDevice>> = vec![Box::new(faulty)];
    sinks.extend(more);
    let opts = write::Options::verifying(true);
    write::flash(&src, sinks, &opts, &flash::Silent)
        .into_iter()
        .map(|r| {
            r.map_err(|e| {
                (
                    format!("{e:#}"),
                    e.downcast_ref::<write::Mismatch>().is_some(),
                )
            })
        })
        .collect()
}

/// A device's result: the outcome, or (message, is a verify mismatch).
type Res = Result<write::Outcome, (String, bool)>;

/// A mapped byte inside the root filesystem, 76 KiB into a mapped range of
/// at least 128 KiB (so not on a write boundary), read from the .bmap.
fn root_byte(t: &Disk) -> u64 {
    let root = root_offset(&t.img);
    let bmap = std::fs::read_to_string(format!("{}.bmap", t.img.display())).unwrap();
    bmap.split("<Range")
        .skip(1)
        .filter_map(|r| {
            let span = r.split('>').nth(1)?.split('<').next()?.trim();
            let (a, b) = span.split_once('-').unwrap_or((span, span));
            let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
            Some((a * 4096, (b + 1 - a) * 4096))
        })
        .find(|&(o, l)| o >= root && l >= 128 << 10)
        .map(|(o, _)| o + (76 << 10))
        .expect("a mapped range in the root filesystem")
}

#[test]
fn an_io_error_at_an_offset_is_reported_there_and_leaves_nothing_bootable() {
    let _g = privileged();
    let t = disk(&[], 64 << 20);
    let x = root_byte(&t);
    let r = flash_faulty(&t, Fault::IoErrorAt(x), vec![]);
    let (msg, mismatch) = r[0].as_ref().unwrap_err();
    assert!(!mismatch);
    let at: u64 = msg
        .split("at byte ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{msg}"));
    assert!(at <= x && x - at < 8 << 20, "{msg}");
    assert!(
        msg.contains(&t.lo.dev)
            && msg.contains("Input/output error")
            && msg.contains("partition tables wiped"),
        "{msg}"
    );
    drop(t.lo);
    assert!(no_table_left(&t.backing));
}

#[test]
fn a_short_write_then_nothing_is_an_error_and_leaves_nothing_bootable() {
    let _g = privileged();
    let t = disk(&[], 64 << 20);
    let x = root_byte(&t);
    let r = flash_faulty(
        &t,
        Fault::ShortAt {
            at: x,
            then_nothing: true,
        },
        vec![],
    );
    let (msg, _) = r[0].as_ref().unwrap_err();
    assert!(
        msg.contains(&format!("writing {} at byte {x}: short write", t.lo.dev)),
        "{msg}"
    );
    assert!(msg.contains("partition tables wiped"), "{msg}");
    drop(t.lo);
    assert!(no_table_left(&t.backing));
}

#[test]
fn a_short_write_that_the_device_then_completes_gives_a_verified_disk() {
    let _g = privileged();
    let t = disk(&[], 64 << 20);
    let x = root_byte(&t);
    let r = flash_faulty(
        &t,
        Fault::ShortAt {
            at: x,
            then_nothing: false,
        },
        vec![],
    );
    let o = r[0].as_ref().unwrap_or_else(|e| panic!("{}", e.0));
    assert!(o.gpt_moved);
    assert_eq!(o.verified, verified_bytes(o.written, true, 512));
    judge_device(&t.lo);
}

#[test]
fn a_byte_corrupted_before_verify_is_found_exactly_and_leaves_nothing_bootable() {
    let _g = privileged();
    let t = disk(&[], 64 << 20);
    let x = root_byte(&t) + 1234;
    let want = std::fs::read(&t.img).unwrap()[x as usize];
    let r = flash_faulty(&t, Fault::CorruptBeforeVerify(x), vec![]);
    let (msg, mismatch) = r[0].as_ref().unwrap_err();
    assert!(mismatch, "{msg}");
    assert!(
        msg.contains(&format!(
            "byte {x} reads {:#04x} from the device but the image has {want:#04x}",
            !want
        )),
        "{msg}"
    );
    assert!(msg.contains("partition tables wiped"), "{msg}");
    drop(t.lo);
    assert!(no_table_left(&t.backing));
}

#[test]
fn a_failing_device_among_several_leaves_the_others_written() {
    let _g = privileged();
    let t = disk(&[], 64 << 20);
    let backing_b = t._d.path().join("disk-b");
    stale_file(&backing_b, len(&t.img));
    let b = Loop::attach(&backing_b, &[]);
    let src = flash::source::Source::open(&t.img, flash::source::BmapChoice::None).unwrap();
    let tb = flash::preflight::check(&Host::default(), Path::new(&b.dev), need(src.size)).unwrap();
    let good: Box<dyn BlockDevice> = Box::new(Device::open(&tb, true).unwrap());
    let r = flash_faulty(&t, Fault::IoErrorAt(root_byte(&t)), vec![good]);
    assert!(r[0].is_err());
    let o = r[1].as_ref().unwrap_or_else(|e| panic!("{}", e.0));
    assert!(!o.gpt_moved, "the same size as the image");
    assert_eq!(o.verified, o.written);
    judge_device(&b);
}
