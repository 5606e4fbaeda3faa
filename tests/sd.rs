//! `forge image --format sd-aarch64` (issue 5): booted by U-Boot through
//! extlinux, judged by sfdisk, fsck.fat, e2fsck, zstd and bmaptool.

use nixforge_tests::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

struct Sd {
    dir: tempfile::TempDir,
    layout: Value,
}

impl Sd {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A firmware directory standing in for the Pi firmware + U-Boot builds.
fn firmware(dir: &Path) -> PathBuf {
    let fw = dir.join("firmware");
    std::fs::create_dir_all(fw.join("overlays")).unwrap();
    std::fs::write(fw.join("start4.elf"), b"pi firmware\n".repeat(3000)).unwrap();
    std::fs::write(
        fw.join("u-boot-rpi4.bin"),
        (0..700_000u32).map(|i| (i * 7) as u8).collect::<Vec<u8>>(),
    )
    .unwrap();
    std::fs::write(fw.join("overlays/disable-bt.dtbo"), b"overlay").unwrap();
    fw
}

fn forge_sd(sys: &System, out_name: &str, extra: &[&str]) -> Sd {
    let dir = tempfile::tempdir().unwrap();
    let fw = firmware(dir.path());
    let out = ok(forge_image_of(sys)
        .args(["--format", "sd-aarch64", "--json", "--firmware"])
        .arg(&fw)
        .arg("-o")
        .arg(dir.path().join(out_name))
        .args(extra));
    Sd {
        layout: serde_json::from_str(&out).unwrap(),
        dir,
    }
}

fn part(layout: &Value, n: usize) -> (u64, u64) {
    let p = &layout["partitions"][n - 1];
    (p["offset"].as_u64().unwrap(), p["size"].as_u64().unwrap())
}

#[test]
fn sd_image_boots_under_u_boot_through_extlinux() {
    let sys = system("aarch64");
    let sd = forge_sd(&sys, "nixos.img", &[]);
    boots_through_extlinux(&sd.path("nixos.img"), "table=mbr init=found");
}

#[test]
fn table_filesystems_and_firmware_pass_their_judges() {
    let sys = system("aarch64");
    let sd = forge_sd(&sys, "nixos.img", &[]);
    let img = sd.path("nixos.img");
    let v = ok(Command::new("sfdisk").arg("-V").arg(&img));
    assert!(v.contains("No errors detected"), "{v}");
    let dump: Value =
        serde_json::from_str(&ok(Command::new("sfdisk").arg("--json").arg(&img))).unwrap();
    let parts = dump["partitiontable"]["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 3);
    assert_eq!(parts[0]["type"], "c");
    assert_eq!(parts[0]["start"], 16384, "firmware starts at 8 MiB");
    assert_eq!(parts[1]["type"], "83");
    assert_eq!(parts[1]["bootable"], true);
    assert_eq!(parts[2]["type"], "83");
    let sig = sd.layout["disk_id"].as_str().unwrap();
    assert_eq!(dump["partitiontable"]["id"], format!("0x{sig}"));
    assert_eq!(
        sd.layout["partitions"][1]["guid"],
        format!("{sig}-02"),
        "Pi PARTUUID"
    );
    let d = tempfile::tempdir().unwrap();
    for (n, judge, label) in [
        (1, "fsck.fat", "FIRMWARE"),
        (2, "e2fsck", "NIXOS_SD"),
        (3, "e2fsck", "state"),
    ] {
        let (off, size) = part(&sd.layout, n);
        let f = d.path().join(format!("p{n}"));
        sh(&format!(
            "dd if={} of={} bs=1M skip={} count={} status=none",
            img.display(),
            f.display(),
            off >> 20,
            size >> 20
        ));
        ok(Command::new(judge)
            .arg(if judge == "e2fsck" { "-fn" } else { "-n" })
            .arg(&f));
        let probe = ok(Command::new("blkid")
            .args(["-p", "-o", "value", "-s", "LABEL"])
            .arg(&f));
        assert_eq!(probe.trim(), label);
    }
    // The firmware partition holds the inputs byte for byte, plus config.txt.
    let fw = firmware(d.path());
    let (off, _) = part(&sd.layout, 1);
    let mt = format!("{}@@{off}", img.display());
    for f in ["start4.elf", "u-boot-rpi4.bin", "overlays/disable-bt.dtbo"] {
        let got = d.path().join("got");
        let _ = std::fs::remove_file(&got);
        ok(Command::new("mcopy")
            .arg("-i")
            .arg(&mt)
            .arg(format!("::/{f}"))
            .arg(&got));
        assert!(
            std::fs::read(&got).unwrap() == std::fs::read(fw.join(f)).unwrap(),
            "{f}"
        );
    }
    let got = d.path().join("config.txt");
    ok(Command::new("mcopy")
        .arg("-i")
        .arg(&mt)
        .arg("::/config.txt")
        .arg(&got));
    let cfg = std::fs::read_to_string(&got).unwrap();
    for want in [
        "arm_64bit=1",
        "enable_uart=1",
        "[pi4]",
        "[pi3]",
        "[pi5]",
        "kernel=u-boot-rpi4.bin",
    ] {
        assert!(cfg.contains(want), "config.txt lacks {want}:\n{cfg}");
    }
}

#[test]
fn extlinux_and_boot_files_follow_nixos() {
    let _g = privileged();
    let sys = system("aarch64");
    let sd = forge_sd(&sys, "nixos.img", &[]);
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root.img");
    let (off, size) = part(&sd.layout, 2);
    sh(&format!(
        "dd if={} of={} bs=1M skip={} count={} status=none",
        sd.path("nixos.img").display(),
        root.display(),
        off >> 20,
        size >> 20
    ));
    let m = Mounted::ext4(&root, 0, "ro");
    let conf = std::fs::read_to_string(m.path().join("boot/extlinux/extlinux.conf")).unwrap();
    let boot: Value = serde_json::from_slice(
        &std::fs::read(sys.physical(&format!("{}/boot.json", sys.toplevel))).unwrap(),
    )
    .unwrap();
    let v1 = &boot["org.nixos.bootspec.v1"];
    let clean = |p: &str| p.trim_start_matches("/nix/store/").replace('/', "-");
    let kernel = clean(v1["kernel"].as_str().unwrap());
    assert!(conf.contains("DEFAULT nixos-default\n"), "{conf}");
    assert!(
        conf.contains(&format!("  LINUX ../nixos/{kernel}\n")),
        "{conf}"
    );
    assert!(
        conf.contains(&format!(
            "  APPEND init={} console=ttyAMA0 panic=-1\n",
            v1["init"].as_str().unwrap()
        )),
        "{conf}"
    );
    assert!(
        conf.contains("LABEL nixos-1-specialisation-rescue"),
        "{conf}"
    );
    // Kernel bytes unchanged (still an uncompressed Image), dtbs copied.
    let k = std::fs::read(m.path().join("boot/nixos").join(&kernel)).unwrap();
    assert!(k == std::fs::read(sys.physical(v1["kernel"].as_str().unwrap())).unwrap());
    assert_eq!(&k[0x38..0x3C], b"ARM\x64");
    let fdtdir = conf
        .lines()
        .find_map(|l| l.trim().strip_prefix("FDTDIR ../nixos/"))
        .unwrap();
    assert!(m
        .path()
        .join("boot/nixos")
        .join(fdtdir)
        .join("broadcom/bcm2711-rpi-4-b.dtb")
        .is_file());
}

#[test]
fn zstd_output_is_the_raw_image_and_bmaptool_reproduces_it() {
    let sys = system("aarch64");
    let z = forge_sd(&sys, "nixos.img.zst", &[]);
    let r = forge_sd(&sys, "nixos.img", &[]);
    let zst = z.path("nixos.img.zst");
    ok(Command::new("zstd").arg("-t").arg(&zst));
    assert!(
        !z.path("nixos.img").exists(),
        "the raw temporary must not be left"
    );
    let raw_sha = sha256_file(&r.path("nixos.img"));
    assert_eq!(
        sh(&format!(
            "zstd -dc {} | sha256sum | cut -d' ' -f1",
            zst.display()
        ))
        .trim(),
        raw_sha
    );
    // The .bmap beside the .zst (its own name, so it never replaces a
    // raw image's) describes the raw image; bmaptool finds it by itself.
    let target = z.path("target.img");
    ok(Command::new("bmaptool").arg("copy").arg(&zst).arg(&target));
    assert_eq!(sha256_file(&target), raw_sha);
    assert_eq!(
        sha256_file(&z.path("nixos.img.zst.bmap")),
        sha256_file(&r.path("nixos.img.bmap"))
    );
    // The partitions' hashes, noted on the way to the compressor, are
    // those of the raw image's bytes.
    for n in 1..=3 {
        let (off, size) = part(&z.layout, n);
        let got = sh(&format!(
            "dd if={} bs=1M skip={off} count={size} iflag=skip_bytes,count_bytes status=none | sha256sum | cut -d' ' -f1",
            r.path("nixos.img").display()
        ));
        assert_eq!(
            z.layout["partitions"][n - 1]["sha256"],
            got.trim(),
            "partition {n}"
        );
    }
}

#[test]
fn xz_output_is_the_raw_image_the_same_twice_and_bmaptool_and_inspect_read_it() {
    let sys = system("aarch64");
    let x = forge_sd(&sys, "nixos.img.xz", &["--xz-level", "0"]);
    let r = forge_sd(&sys, "nixos.img", &[]);
    let xz = x.path("nixos.img.xz");
    let info = ok(Command::new("xz")
        .args(["-t", "-v", "--robot", "-l"])
        .arg(&xz));
    assert!(info.contains("CRC64"), "{info}");
    let raw_sha = sha256_file(&r.path("nixos.img"));
    let unpacked = sh(&format!("xz -dc {} | sha256sum", xz.display()));
    assert_eq!(unpacked.split_whitespace().next(), Some(raw_sha.as_str()));
    // The manifest's whole-image SHA-256 is the raw bytes', as sha256sum says.
    assert_eq!(x.layout["image_sha256"], raw_sha);
    assert_eq!(
        sha256_file(&x.path("nixos.img.xz.bmap")),
        sha256_file(&r.path("nixos.img.bmap"))
    );
    let target = x.path("target.img");
    ok(Command::new("bmaptool").arg("copy").arg(&xz).arg(&target));
    assert_eq!(sha256_file(&target), raw_sha);
    let seen = ok(forge().args(["inspect", "--json"]).arg(&xz));
    let seen: serde_json::Value = serde_json::from_str(&seen).unwrap();
    assert_eq!(seen["disk_id"], x.layout["disk_id"], "{seen}");
    let again = forge_sd(&sys, "nixos.img.xz", &["--xz-level", "0"]);
    assert_eq!(sha256_file(&again.path("nixos.img.xz")), sha256_file(&xz));
}

#[test]
fn same_input_gives_the_same_zst_and_raw_image() {
    let sys = system("aarch64");
    let a = forge_sd(&sys, "nixos.img.zst", &[]);
    let b = forge_sd(&sys, "nixos.img.zst", &[]);
    assert_eq!(
        sha256_file(&a.path("nixos.img.zst")),
        sha256_file(&b.path("nixos.img.zst"))
    );
    assert_eq!(
        sha256_file(&a.path("nixos.img.zst.bmap")),
        sha256_file(&b.path("nixos.img.zst.bmap"))
    );
}

// ---- bad input ----

fn sd_err(sys: &System, out: &Path, extra: &[&str]) -> String {
    let e = fails(
        forge_image_of(sys)
            .args(["--format", "sd-aarch64"])
            .args(extra),
    );
    assert!(
        dir_entries(out).iter().all(|e| e == "firmware"),
        "left behind: {:?}",
        dir_entries(out)
    );
    the_error(&e).to_string()
}

#[test]
fn sd_aarch64_without_firmware_or_without_what_config_txt_starts_is_refused() {
    let sys = system("aarch64");
    let d = tempfile::tempdir().unwrap();
    firmware(d.path());
    let out = |n: &str| d.path().join(n).to_string_lossy().into_owned();
    // No firmware at all, and firmware without what config.txt starts.
    let e = sd_err(&sys, d.path(), &["-o", &out("a.img")]);
    assert!(
        e.contains("sd-aarch64 needs the Pi firmware and U-Boot: give --firmware"),
        "{e}"
    );
    let only_fw = d.path().join("firmware/start4.elf");
    let e = sd_err(
        &sys,
        d.path(),
        &["--firmware", only_fw.to_str().unwrap(), "-o", &out("a.img")],
    );
    assert!(
        e.contains("config.txt starts u-boot-rpi3.bin, u-boot-rpi4.bin, u-boot-rpi5.bin (kernel=)")
            && e.contains("none of them is among the --firmware files"),
        "{e}"
    );
}

#[test]
fn bad_input_is_refused_and_nothing_is_left() {
    let sys = system("aarch64");
    let d = tempfile::tempdir().unwrap();
    let fw = firmware(d.path());
    let out = |n: &str| d.path().join(n).to_string_lossy().into_owned();
    let e = sd_err(
        &sys,
        d.path(),
        &["--firmware", "/nonexistent/firmware", "-o", &out("a.img")],
    );
    assert!(
        e.contains("--firmware /nonexistent/firmware") && e.contains("No such file"),
        "{e}"
    );
    // More firmware than the partition holds.
    std::fs::write(fw.join("huge.bin"), vec![9u8; 40 << 20]).unwrap();
    let e = sd_err(
        &sys,
        d.path(),
        &[
            "--firmware",
            fw.to_str().unwrap(),
            "--firmware-size",
            "34M",
            "-o",
            &out("a.img"),
        ],
    );
    assert!(
        e.contains("too small for this content") && e.contains("bytes are needed"),
        "{e}"
    );
    std::fs::remove_file(fw.join("huge.bin")).unwrap();
    let e = sd_err(
        &sys,
        d.path(),
        &["--firmware", fw.to_str().unwrap(), "-o", &out("a.dmg")],
    );
    assert!(
        e.contains("a.dmg") && e.contains("unknown output extension") && e.contains(".img.zst"),
        "{e}"
    );
    let x86 = system("x86_64");
    let e = sd_err(
        &x86,
        d.path(),
        &["--firmware", fw.to_str().unwrap(), "-o", &out("a.img")],
    );
    assert!(
        e.contains("x86_64-linux") && e.contains("aarch64-linux") && e.contains("--format raw-efi"),
        "{e}"
    );
}

/// `--verity` on a Pi card: extlinux and the kernels on the (now bootable)
/// firmware partition, `roothash=` in extlinux.conf, the hash partition
/// after the root; veritysetup verifies it, forge inspect --verify too,
/// and U-Boot boots it with the root opened through dm-verity.
#[test]
fn sd_card_with_verity_boots_under_u_boot_through_dm_verity() {
    let sys = system("aarch64");
    let sd = forge_sd(&sys, "nixos.img", &["--verity"]);
    let img = sd.path("nixos.img");
    assert_eq!(
        roles(&sd.layout),
        ["firmware", "root", "root-verity", "state"]
    );
    let parts = sd.layout["partitions"].as_array().unwrap();
    assert_eq!(
        parts[0]["bootable"], true,
        "U-Boot boots the partition with extlinux"
    );
    assert_eq!(parts[1]["bootable"], false);
    let hash = sd.layout["verity"]["root_hash"].as_str().unwrap();
    let fat = format!("{}@@{}", img.display(), part(&sd.layout, 1).0);
    let conf = ok(Command::new("mtype").args(["-i", &fat, "::/boot/extlinux/extlinux.conf"]));
    assert!(conf.contains(&format!(" roothash={hash}")), "{conf}");
    // An MBR's PARTUUIDs do not come from the root hash: the line names
    // the partitions, and systemd's own generator (as a NixOS initrd with
    // nixforge.verity runs it) opens root from exactly partitions 2 and 3
    // of this disk, as libblkid names them.
    let line = conf
        .lines()
        .find_map(|l| l.trim().strip_prefix("APPEND "))
        .unwrap_or_else(|| panic!("no APPEND in {conf}"));
    let props = ok(Command::new("blkid").args(["-p", "-o", "udev"]).arg(&img));
    let id = props
        .lines()
        .find_map(|l| l.strip_prefix("ID_PART_TABLE_UUID="))
        .unwrap_or_else(|| panic!("no table id: {props}"));
    assert_eq!(
        crate::ab_updates::verity_generator(line, sd.dir.path()),
        format!("attach 'root' '/dev/disk/by-partuuid/{id}-02' '/dev/disk/by-partuuid/{id}-03' '{hash}' ''")
    );
    let bytes = std::fs::read(&img).unwrap();
    let cut = |n: usize, name: &str| {
        let (off, size) = part(&sd.layout, n);
        let p = sd.dir.path().join(name);
        std::fs::write(&p, &bytes[off as usize..(off + size) as usize]).unwrap();
        p
    };
    let (root, verity) = (cut(2, "root.part"), cut(3, "verity.part"));
    let v = Command::new("veritysetup")
        .arg("verify")
        .args([&root, &verity])
        .arg(hash)
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    let seen: Value = serde_json::from_str(&ok(forge()
        .args(["inspect", "--json", "--verify"])
        .arg(&img)))
    .unwrap();
    assert_eq!(seen["verified"]["root_hash"], hash);
    boots_through_extlinux(&img, "table=mbr init=found verity=on read=ok");
}

#[test]
fn sd_image_with_an_erofs_root_boots_under_u_boot_from_the_firmware_partition() {
    let sys = system("aarch64");
    let sd = forge_sd(&sys, "erofs.img", &["--root-fs", "erofs"]);
    let parts = sd.layout["partitions"].as_array().unwrap();
    assert_eq!(parts[1]["filesystem"]["kind"], "erofs");
    assert_eq!(
        parts[0]["bootable"], true,
        "extlinux on the FAT: U-Boot reads no EROFS"
    );
    boots_through_extlinux(&sd.path("erofs.img"), "table=mbr init=found rootfs=erofs");
}

/// U-Boot (QEMU's virt) boots `img` through extlinux.conf, and stage 1
/// reports `root=ro var=rw` and then `rest`.
fn boots_through_extlinux(img: &Path, rest: &str) {
    let b = boot("aarch64", img, 512, Duration::from_secs(300));
    let want = format!("NIXFORGE-BOOT-OK root=ro var=rw {rest}");
    assert_eq!(
        b.marker.as_deref(),
        Some(want.as_str()),
        "serial log:\n{}",
        b.log
    );
    assert!(
        b.log.contains("Found /boot/extlinux/extlinux.conf"),
        "{}",
        b.log
    );
}
