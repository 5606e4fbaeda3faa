//! Helpers shared by the flash tests: forged images, stale disks on loop
//! devices, and checks that nothing was written or left bootable.

use crate::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub fn flash() -> Command {
    let mut c = tool("flash");
    c.stdin(Stdio::null());
    c
}

/// A forged raw-efi image (and its .bmap) in a temporary directory.
pub fn raw_efi(dir: &Path, sector: u32) -> PathBuf {
    let sys = system("x86_64");
    let img = dir.join("disk.img");
    ok(forge_image_of(&sys)
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

/// A forged sd-aarch64 image named `name` in `dir` (stand-in firmware and
/// U-Boot files beside it).
pub fn sd_image(dir: &Path, name: &str) -> PathBuf {
    let fw = dir.join("fw");
    std::fs::create_dir_all(&fw).unwrap();
    std::fs::write(fw.join("start4.elf"), b"firmware").unwrap();
    std::fs::write(fw.join("u-boot-rpi4.bin"), b"u-boot").unwrap();
    let img = dir.join(name);
    ok(forge_image_of(&system("aarch64"))
        .args(["--format", "sd-aarch64", "--firmware"])
        .arg(&fw)
        .arg("-o")
        .arg(&img));
    img
}

/// A backing file of `size` bytes, every byte 0xFF (a disk full of old data).
pub fn stale_file(path: &Path, size: u64) {
    sh(&format!(
        "head -c {size} /dev/zero | tr '\\000' '\\377' > {}",
        path.display()
    ));
}

/// A sparse backing file `name` of `size` bytes in `dir`, on a loop device.
pub fn sparse_device(dir: &Path, name: &str, size: u64) -> (PathBuf, Loop) {
    let f = dir.join(name);
    std::fs::File::create(&f).unwrap().set_len(size).unwrap();
    let lo = Loop::attach(&f, &[]);
    (f, lo)
}

pub fn len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

/// Bytes `off..off+n` of a file hold only 0xFF.
pub fn still_stale(p: &Path, off: u64, n: u64) -> bool {
    sh(&format!(
        "dd if={} bs=4096 skip={} count={} status=none | tr -d '\\377' | wc -c",
        p.display(),
        off / 4096,
        n / 4096
    ))
    .trim()
        == "0"
}

pub struct Disk {
    pub _d: tempfile::TempDir,
    pub img: PathBuf,
    pub backing: PathBuf,
    pub before: String,
    pub lo: Loop,
}

pub fn disk(extra_losetup: &[&str], size_delta: i64) -> Disk {
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

pub fn refused(cmd: &mut Command, check: &str) -> String {
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
    pub fn untouched(&self) {
        assert_eq!(
            sha256_file(&self.backing),
            self.before,
            "zero bytes were written"
        );
    }
}

pub fn root_offset(img: &Path) -> u64 {
    let r: serde_json::Value =
        serde_json::from_str(&ok(forge().arg("inspect").arg(img).arg("--json"))).unwrap();
    r["partitions"][1]["offset"].as_u64().unwrap()
}

/// No MBR boot signature, no primary GPT header (at either sector size)
/// and no backup GPT header at the end of the disk's backing file.
pub fn no_table_left(p: &Path) -> bool {
    let b = std::fs::read(p).unwrap();
    let gpt_at = |o: usize| b.get(o..o + 8) == Some(b"EFI PART".as_slice());
    let n = b.len();
    b[510..512] != [0x55, 0xAA]
        && !gpt_at(512)
        && !gpt_at(4096)
        && !gpt_at(n - 512)
        && !gpt_at(n - 4096)
}

/// What flash reads back: every byte it wrote, plus, when a GPT's backup
/// moved to the disk's end, that backup (its 16 KiB entry array and its
/// header sector).
pub fn verified_bytes(written: u64, gpt_moved: bool, sector: u64) -> u64 {
    written + if gpt_moved { 16384 + sector } else { 0 }
}

/// A small raw-efi image of the x86_64 fixture (about 90 MiB: a 40 MiB
/// ESP, a 32 MiB state partition) with its bmap and layout manifest.
pub fn small_raw_efi(dir: &Path) -> PathBuf {
    let img = dir.join("disk.img");
    ok(forge_image_of(&system("x86_64"))
        .args([
            "--format",
            "raw-efi",
            "--esp-size",
            "40M",
            "--state-size",
            "32M",
            "-o",
        ])
        .arg(&img));
    img
}
