//! `forge image --uki` (issue 25): a Unified Kernel Image per boot entry,
//! read by objdump (the PE sections) and booted by systemd-boot under
//! OVMF, which lists `EFI/Linux/` itself (there are no type 1 entries).

use nixforge_tests::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn forge_uki(dir: &Path, extra: &[&str]) -> (PathBuf, Value) {
    let img = dir.join("disk.img");
    let layout = uki_image(&img, extra);
    (img, layout)
}

/// Generation 1's UKI, copied out of the ESP (`IMAGE@@OFFSET`) into `dir`.
fn generation_1_uki(esp: &str, dir: &Path) -> PathBuf {
    let uki = dir.join("uki.efi");
    ok(Command::new("mcopy")
        .args(["-i", esp, "::/EFI/Linux/nixos-generation-1.efi"])
        .arg(&uki));
    uki
}

/// A PE file's section names in order (objdump's), and objdump's text.
fn sections(pe: &Path) -> (Vec<String>, String) {
    let headers = ok(Command::new("objdump").arg("-h").arg(pe));
    let names = headers
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|n| n.starts_with('.'))
        .map(str::to_string)
        .collect();
    (names, headers)
}

#[test]
fn each_entry_is_a_uki_with_its_sections_and_no_type1_entries() {
    let dir = tempfile::tempdir().unwrap();
    let (img, layout) = forge_uki(dir.path(), &["--verity"]);
    let esp = format!("{}@@{}", img.display(), layout["partitions"][0]["offset"]);
    let listing = ok(Command::new("mdir").args(["-b", "-i", &esp, "::/EFI/Linux"]));
    assert!(listing.contains("nixos-generation-1.efi"), "{listing}");
    assert!(!Command::new("mdir")
        .args(["-i", &esp, "::/loader/entries"])
        .output()
        .unwrap()
        .status
        .success());
    let conf = ok(Command::new("mtype").args(["-i", &esp, "::/loader/loader.conf"]));
    assert!(conf.contains("default nixos-generation-1.efi"), "{conf}");
    let uki = generation_1_uki(&esp, dir.path());
    // ukify's order after the stub's own sections, .linux last.
    let (names, headers) = sections(&uki);
    let at = names.iter().position(|n| *n == ".osrel").expect(".osrel");
    assert_eq!(
        names[at..],
        [".osrel", ".cmdline", ".uname", ".initrd", ".linux"],
        "{headers}"
    );
    assert!(
        names.iter().any(|n| n == ".text") && names.iter().any(|n| n == ".sbat"),
        "{headers}"
    );
    let uname = String::from_utf8(pe_section(&uki, ".uname", dir.path())).unwrap();
    let kver = std::fs::read_to_string(fixtures().join("x86_64/kver")).unwrap();
    assert_eq!(uname, kver.trim());
    let cmdline = String::from_utf8(pe_section(&uki, ".cmdline", dir.path())).unwrap();
    let hash = layout["verity"]["root_hash"].as_str().unwrap();
    assert!(cmdline.starts_with("init=/nix/store/"), "{cmdline}");
    assert!(cmdline.ends_with(&format!(" roothash={hash}")), "{cmdline}");
    // The same inputs, the same bytes.
    let again = tempfile::tempdir().unwrap();
    let (img2, _) = forge_uki(again.path(), &["--verity"]);
    assert_eq!(sha256_file(&img), sha256_file(&img2));
}

#[test]
fn a_devicetree_the_bootspec_names_is_the_ukis_dtb_section() {
    let sys = system("x86_64");
    let (copy, src) = store_with_devicetree(&sys);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let mut c = forge();
    c.arg("image")
        .arg(&sys.toplevel)
        .arg("--root")
        .arg(copy.path());
    let layout = uki_image_with(c, &img, &[]);
    let esp = format!("{}@@{}", img.display(), layout["partitions"][0]["offset"]);
    let uki = generation_1_uki(&esp, dir.path());
    let (names, headers) = sections(&uki);
    let at = names.iter().position(|n| *n == ".osrel").expect(".osrel");
    assert_eq!(
        names[at..],
        [".osrel", ".cmdline", ".dtb", ".uname", ".initrd", ".linux"],
        "{headers}"
    );
    assert_eq!(
        pe_section(&uki, ".dtb", dir.path()),
        std::fs::read(&src).unwrap()
    );
}

#[test]
fn systemd_boot_boots_the_uki_and_its_command_line_reaches_the_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = forge_uki(dir.path(), &[]);
    let b = boot("x86_64", &img, 512, Duration::from_secs(240));
    assert_eq!(
        b.marker.as_deref(),
        Some("NIXFORGE-BOOT-OK root=ro var=rw table=gpt init=found"),
        "serial log:\n{}",
        b.log
    );
    // With verity, roothash= comes from the UKI's .cmdline.
    let (img, _) = forge_uki(dir.path(), &["--verity"]);
    let b = boot("x86_64", &img, 512, Duration::from_secs(240));
    assert_eq!(
        b.marker.as_deref(),
        Some("NIXFORGE-BOOT-OK root=ro var=rw table=gpt init=found verity=on read=ok"),
        "serial log:\n{}",
        b.log
    );
}

#[test]
fn uki_options_out_of_place_are_refused_writing_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let arm = system("aarch64");
    let err = fails(
        forge_image_of(&arm)
            .args(["--format", "sd-aarch64", "--uki", "-o"])
            .arg(dir.path().join("sd.img")),
    );
    assert!(
        the_error(&err).contains("--uki is for --format raw-efi"),
        "{err}"
    );
    let x86 = system("x86_64");
    let stubs = tempfile::tempdir().unwrap();
    let far = stubs.path().join("far.efi");
    std::fs::write(&far, stub_with_headers_past_its_end()).unwrap();
    let far_arg = far.to_str().unwrap();
    let far_err = format!("the EFI stub {far_arg}: not a PE image (headers past the end)");
    let cases: [(&[&str], &str); 4] = [
        // The fixture's systemd has no stub beside systemd-boot.
        (&[], "no EFI stub beside the system's systemd-boot"),
        (&["--uki-stub", "/nonexistent/stub"], "/nonexistent/stub"),
        // A file that is not a PE image, named.
        (
            &["--uki-stub", "/etc/hostname"],
            "the EFI stub /etc/hostname: not a PE image",
        ),
        // A PE32+ whose headers (where the sections are added) are said to
        // reach past the file: it panicked before.
        (&["--uki-stub", far_arg], &far_err),
    ];
    for (i, (args, want)) in cases.into_iter().enumerate() {
        let err = fails(
            forge_image_of(&x86)
                .args(["--format", "raw-efi", "--uki"])
                .args(args)
                .arg("-o")
                .arg(dir.path().join(format!("{i}.img"))),
        );
        assert!(the_error(&err).contains(want), "{err}");
    }
    assert_eq!(dir_entries(dir.path()), Vec::<String>::new());
}

/// A PE32+ of 1.5 KiB, no sections, whose optional header is said to be
/// 60 KiB and its headers 64 KiB.
fn stub_with_headers_past_its_end() -> Vec<u8> {
    let mut b = vec![0u8; 0x600];
    let mut put = |at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
    put(0, b"MZ");
    put(0x3C, &0x80u32.to_le_bytes());
    put(0x80, b"PE\0\0");
    put(0x84 + 16, &0xF000u16.to_le_bytes());
    let opt = 0x84 + 20;
    put(opt, &0x20Bu16.to_le_bytes());
    put(opt + 32, &0x1000u32.to_le_bytes());
    put(opt + 36, &0x200u32.to_le_bytes());
    put(opt + 60, &0x10000u32.to_le_bytes());
    put(opt + 108, &16u32.to_le_bytes());
    b
}
