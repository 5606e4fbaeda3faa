//! `flash` (issue 6) on real loop block devices: writes, verification,
//! every refusal (each proving zero bytes written), and faults.

use nixforge_tests::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn flash() -> Command {
    let mut c = Command::new(bin("flash"));
    c.stdin(Stdio::null());
    c
}

/// A forged raw-efi image (and its .bmap) in a temporary directory.
fn raw_efi(dir: &Path, sector: u32) -> PathBuf {
    let sys = system("x86_64");
    let img = dir.join("disk.img");
    ok(forge()
        .arg("image")
        .arg(&sys.result)
        .arg("--root")
        .arg(&sys.root)
        .args([
            "--format",
            "raw-efi",
            "--sector-size",
            &sector.to_string(),
            "-o",
        ])
        .arg(&img));
    img
}

/// A backing file of `size` bytes, every byte 0xFF (a disk full of old data).
fn stale_file(path: &Path, size: u64) {
    sh(&format!(
        "head -c {size} /dev/zero | tr '\\000' '\\377' > {}",
        path.display()
    ));
}

fn len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

/// Bytes `off..off+n` of a file hold only 0xFF.
fn still_stale(p: &Path, off: u64, n: u64) -> bool {
    sh(&format!(
        "dd if={} bs=4096 skip={} count={} status=none | tr -d '\\377' | wc -c",
        p.display(),
        off / 4096,
        n / 4096
    ))
    .trim()
        == "0"
}

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
    assert!(rep["verified"].as_u64().unwrap() >= mapped);
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
    let sys = system("aarch64");
    let d = tempfile::tempdir().unwrap();
    let fw = d.path().join("fw");
    std::fs::create_dir(&fw).unwrap();
    std::fs::write(fw.join("start4.elf"), b"firmware").unwrap();
    let zst = d.path().join("nixos.img.zst");
    ok(forge()
        .arg("image")
        .arg(&sys.result)
        .arg("--root")
        .arg(&sys.root)
        .args(["--format", "sd-aarch64", "--firmware"])
        .arg(&fw)
        .arg("-o")
        .arg(&zst));
    let raw = d.path().join("raw.img");
    sh(&format!("zstd -dqc {} > {}", zst.display(), raw.display()));
    let backing = d.path().join("disk");
    stale_file(&backing, len(&raw));
    let lo = Loop::attach(&backing, &[]);
    // nixos.img.bmap beside nixos.img.zst is found by itself.
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

struct Disk {
    _d: tempfile::TempDir,
    img: PathBuf,
    backing: PathBuf,
    before: String,
    lo: Loop,
}

fn disk(extra_losetup: &[&str], size_delta: i64) -> Disk {
    let d = tempfile::tempdir().unwrap();
    let img = raw_efi(d.path(), 512);
    let backing = d.path().join("disk");
    stale_file(&backing, (len(&img) as i64 + size_delta) as u64);
    let before = sha256_file(&backing);
    let lo = Loop::attach(&backing, extra_losetup);
    Disk {
        _d: d,
        img,
        backing,
        before,
        lo,
    }
}

fn refused(cmd: &mut Command, check: &str) -> String {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("refusing to write to") && err.contains(&format!(": {check}: ")),
        "{err}"
    );
    err
}

impl Disk {
    fn untouched(&self) {
        assert_eq!(
            sha256_file(&self.backing),
            self.before,
            "zero bytes were written"
        );
    }
}

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
fn root_offset(img: &Path) -> u64 {
    let r: Value =
        serde_json::from_str(&ok(forge().arg("inspect").arg(img).arg("--json"))).unwrap();
    r["partitions"][1]["offset"].as_u64().unwrap()
}

fn head_is_blank(p: &Path) -> bool {
    // No GPT signature and no MBR boot signature in the first MiB.
    let b = std::fs::read(p).unwrap();
    &b[512..520] != b"EFI PART" && b[510..512] != [0x55, 0xAA]
}

#[test]
fn a_source_that_does_not_match_its_bmap_is_caught_and_leaves_nothing_bootable() {
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
    assert!(!out.status.success());
    assert!(
        err.contains("do not match the bmap's checksum") && err.contains("first MiB wiped"),
        "{err}"
    );
    drop(t.lo);
    assert!(head_is_blank(&t.backing));
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
        err.contains(&format!("writing {} at byte", lo.dev)) && err.contains("first MiB wiped"),
        "{err}"
    );
    drop(lo);
    let head_ok = head_is_blank(&backing);
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
