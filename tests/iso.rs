//! `forge image --format iso` (issue 29): a hybrid ISO 9660 image read by
//! xorriso, isoinfo (Rock Ridge, Joliet, El Torito) and osirrox, its El
//! Torito EFI image a FAT that fsck.fat passes and its root an EROFS that
//! fsck.erofs passes, its GPT valid for sgdisk; the same bytes twice;
//! booted under OVMF from a CD-ROM drive and, flashed by flash to a loop
//! device, as a disk.

use nixforge_tests::flashing::*;
use nixforge_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn iso(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(name);
    ok(forge_image_of(&system("x86_64"))
        .args(["--format", "iso", "-o"])
        .arg(&out)
        .args(extra));
    out
}

#[test]
fn an_iso_is_read_by_xorriso_isoinfo_and_osirrox_and_is_the_same_twice() {
    let d = tempfile::tempdir().unwrap();
    let img = iso(d.path(), "nixos.iso", &[]);
    let report = ok(Command::new("xorriso")
        .args(["-indev"])
        .arg(&img)
        .args(["-report_el_torito", "plain"]));
    assert!(
        report.contains("El Torito boot img :   1  UEFI  y   none")
            && report.contains("El Torito img path :   1  /efi.img"),
        "{report}"
    );
    let info = ok(Command::new("isoinfo").arg("-d").arg("-i").arg(&img));
    for want in [
        "Volume id: NIXOS_ISO",
        "El Torito VD version 1 found",
        "Joliet with UCS level 3 found",
        "Rock Ridge signatures version 1 found",
    ] {
        assert!(info.contains(want), "{want}: {info}");
    }
    // Rock Ridge's names and modes, and Joliet's names.
    let rr = ok(Command::new("isoinfo").args(["-l", "-R", "-i"]).arg(&img));
    for name in ["boot.cat", "efi.img", "root.img"] {
        let line = rr.lines().find(|l| l.ends_with(&format!(" {name} ")));
        assert!(
            line.is_some_and(|l| l.starts_with("-r--r--r--")),
            "{name}: {rr}"
        );
    }
    let joliet = ok(Command::new("isoinfo").args(["-l", "-J", "-i"]).arg(&img));
    assert!(
        joliet.contains(" efi.img ") && joliet.contains(" root.img "),
        "{joliet}"
    );
    // The files are the GPT's partitions: osirrox extracts them, fsck.fat
    // passes the El Torito image and fsck.erofs the root.
    let x = extract(&img, &d.path().join("x"));
    ok(Command::new("fsck.fat").arg("-n").arg(x.join("efi.img")));
    ok(Command::new("fsck.erofs").arg(x.join("root.img")));
    let gpt = ok(Command::new("sgdisk").arg("-v").arg(&img));
    assert!(gpt.contains("No problems found"), "{gpt}");
    let parts = ok(Command::new("sfdisk").args(["-J"]).arg(&img));
    let parts: serde_json::Value = serde_json::from_str(&parts).unwrap();
    let start = |i: usize| {
        parts["partitiontable"]["partitions"][i]["start"]
            .as_u64()
            .unwrap()
            * 512
    };
    let bytes_at = |off: u64, len: u64| {
        let f = std::fs::read(&img).unwrap();
        sha2_hex(&f[off as usize..(off + len) as usize])
    };
    let esp = std::fs::read(x.join("efi.img")).unwrap();
    assert_eq!(bytes_at(start(0), esp.len() as u64), sha2_hex(&esp));
    // forge inspect reads the volume back as the layout manifest has it.
    let inspected: serde_json::Value =
        serde_json::from_str(&ok(forge().arg("inspect").arg("--json").arg(&img))).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(with(&img, ".layout.json")).unwrap()).unwrap();
    assert_eq!(inspected["iso"], manifest["iso"]);
    assert_eq!(manifest["iso"]["efi_boot"], "efi.img");
    // Built again: the same bytes.
    let again = iso(d.path(), "again.iso", &[]);
    assert_eq!(sha256_file(&img), sha256_file(&again));
}

/// The volume's files, as osirrox extracts them into `to`.
fn extract(img: &Path, to: &Path) -> PathBuf {
    ok(Command::new("osirrox")
        .arg("-indev")
        .arg(img)
        .args(["-extract", "/"])
        .arg(to));
    to.to_path_buf()
}

fn sha2_hex(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

#[test]
fn what_an_iso_cannot_be_is_refused_in_one_line_and_nothing_is_written() {
    let d = tempfile::tempdir().unwrap();
    let sys = system("x86_64");
    for (args, out, want) in [
        (&["--format", "iso"][..], "x.img", ".iso"),
        (&["--format", "raw-efi"][..], "x.iso", ".iso"),
        (
            &["--format", "iso", "--root-mode", "rw"][..],
            "x.iso",
            "read-only",
        ),
        (
            &["--format", "iso", "--state-size", "64M"][..],
            "x.iso",
            "--state-size",
        ),
        (
            &["--format", "iso", "--slots", "2", "--uki"][..],
            "x.iso",
            "--slots",
        ),
        (
            &["--format", "iso", "--sector-size", "4096"][..],
            "x.iso",
            "--sector-size",
        ),
    ] {
        let o = d.path().join(out);
        let err = fails(forge_image_of(&sys).args(args).arg("-o").arg(&o));
        assert!(the_error(&err).contains(want), "{args:?}: {err}");
        assert_eq!(
            dir_entries(d.path()),
            Vec::<String>::new(),
            "{args:?} wrote"
        );
    }
}

#[test]
fn an_iso_boots_under_ovmf_from_a_cd_and_flashed_to_a_loop_device_as_a_disk() {
    let d = tempfile::tempdir().unwrap();
    let img = iso(d.path(), "nixos.iso", &["--verity"]);
    let b = boot_cd(&img, Duration::from_secs(300));
    let m = b.marker.unwrap_or_else(|| panic!("no marker: {}", b.log));
    assert!(
        m.starts_with("NIXFORGE-BOOT-OK root=ro var=rw table=gpt init=found live=yes disk=sr0")
            && m.contains("verity=on read=ok")
            && m.contains("rootfs=erofs"),
        "{m}"
    );
    // flash writes it as the raw image it is; the card boots as a disk.
    let card = d.path().join("card");
    std::fs::File::create(&card)
        .unwrap()
        .set_len(len(&img) + (8 << 20))
        .unwrap();
    {
        let _g = privileged();
        let lo = Loop::attach(&card, &[]);
        // No state partition: nothing to fill, refused before writing.
        let err = fails(flash().arg(&img).arg(&lo.dev).args([
            "--yes",
            "--allow-non-removable",
            "--fill",
        ]));
        assert!(the_error(&err).contains("no state partition"), "{err}");
        ok(flash()
            .arg(&img)
            .arg(&lo.dev)
            .args(["--yes", "--allow-non-removable"]));
    }
    let b = boot("x86_64", &card, 512, Duration::from_secs(300));
    let m = b.marker.unwrap_or_else(|| panic!("no marker: {}", b.log));
    assert!(
        m.contains("live=yes disk=vda") && m.contains("verity=on read=ok"),
        "{m}"
    );
}

/// `forge sign` of an ISO built without keys (in the sandbox) gives the
/// ISO built with them, its bmap and manifest too; the signed UKIs pass
/// sbverify and the volume still reads as one.
#[test]
fn forge_sign_of_an_iso_makes_the_iso_built_with_the_keys() {
    let d = tempfile::tempdir().unwrap();
    let key = snakeoil_key(d.path());
    let uki = ["--verity", "--uki", "--uki-stub", STUB];
    let plain = iso(d.path(), "plain.iso", &uki);
    let mut keyed: Vec<String> = uki.iter().map(|s| s.to_string()).collect();
    for flag in ["--secure-boot", "--verity"] {
        keyed.extend([format!("{flag}-key"), key.display().to_string()]);
        keyed.extend([format!("{flag}-cert"), SNAKEOIL_CERT.to_string()]);
    }
    let keyed: Vec<&str> = keyed.iter().map(String::as_str).collect();
    let built = iso(d.path(), "built.iso", &keyed);
    let signed = d.path().join("signed.iso");
    let mut sign = forge();
    sign.arg("sign").arg(&plain).arg("-o").arg(&signed);
    for flag in ["--secure-boot", "--verity"] {
        sign.arg(format!("{flag}-key")).arg(&key);
        sign.arg(format!("{flag}-cert")).arg(SNAKEOIL_CERT);
    }
    ok(&mut sign);
    for suffix in ["", ".bmap", ".layout.json"] {
        let (a, b) = (with(&built, suffix), with(&signed, suffix));
        assert_eq!(sha256_file(&a), sha256_file(&b), "{}", b.display());
    }
    assert_ne!(sha256_file(&plain), sha256_file(&signed));
    let x = extract(&signed, &d.path().join("x"));
    ok(Command::new("fsck.fat").arg("-n").arg(x.join("efi.img")));
    let esp = x.join("efi.img");
    let list = ok(Command::new("mdir")
        .args(["-b", "-i"])
        .arg(&esp)
        .arg("::/EFI/Linux/"));
    let ukis: Vec<&str> = list.lines().filter(|l| l.ends_with(".efi")).collect();
    assert!(!ukis.is_empty(), "{list}");
    for u in ukis {
        let out = d.path().join("uki.efi");
        let _ = std::fs::remove_file(&out);
        ok(Command::new("mcopy").arg("-i").arg(&esp).arg(u).arg(&out));
        ok(Command::new("sbverify")
            .args(["--cert", SNAKEOIL_CERT])
            .arg(&out));
    }
}
