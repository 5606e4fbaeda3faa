//! flash from compressed sources (issue 28): an image compressed by
//! Debian's xz (also multi-threaded), gzip and bzip2 is recognised by its
//! content, decompressed as it is read, and lands on a loop device as the
//! same bytes (with its bmap beside it, found by the image's name without
//! the compressor's suffix, or without a bmap); a truncated one is refused
//! before anything is written. Foreign images (no forge manifest: a
//! Raspberry Pi OS-shaped card, a hybrid ISO) are written as they are.

use nixforge_tests::flashing::*;
use nixforge_tests::*;
use std::path::Path;
use std::process::Command;

/// `img` compressed by `cmd` (a shell command reading stdin) into `name`.
fn compressed(img: &Path, cmd: &str, name: &str) -> std::path::PathBuf {
    let out = img.with_file_name(name);
    sh(&format!("{cmd} < {} > {}", img.display(), out.display()));
    out
}

/// Flash `src` to a card of stale bytes; the card's bytes after, or the
/// error (with the card's bytes unchanged) when flash refuses.
fn flash_to_stale(src: &Path, backing: &Path, size: u64, extra: &[&str]) -> Result<String, String> {
    stale_file(backing, size);
    let before = sha256_file(backing);
    let lo = Loop::attach(backing, &[]);
    let o = flash()
        .arg(src)
        .arg(&lo.dev)
        .args(["--yes", "--allow-non-removable", "--json"])
        .args(extra)
        .output()
        .unwrap();
    drop(lo);
    if o.status.success() {
        return Ok(String::from_utf8_lossy(&o.stdout).into_owned());
    }
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(sha256_file(backing), before, "refused, yet written: {err}");
    Err(err)
}

#[test]
fn xz_gzip_and_bzip2_images_flash_to_the_raw_image_and_truncated_ones_are_refused() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let img = small_raw_efi(d.path());
    let size = len(&img);
    let backing = d.path().join("card");
    for (cmd, name) in [
        // Several 8 MiB blocks, as xz -T writes them.
        ("xz -0 -T2 --block-size=8MiB -c", "disk.img.xz"),
        ("gzip -1 -c", "disk.img.gz"),
        ("bzip2 -1 -c", "disk.img.bz2"),
    ] {
        let src = compressed(&img, cmd, name);
        // The bmap beside disk.img is found: unmapped ranges skipped,
        // keeping their old bytes; the mapped ones are the image's.
        let out = flash_to_stale(&src, &backing, size, &[]).unwrap();
        let r: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(
            r[0]["report"]["skipped"].as_u64().unwrap() > 0,
            "{name}: {out}"
        );
        let v = ok(Command::new("sfdisk").arg("-V").arg(&backing));
        assert!(v.contains("No errors detected"), "{name}: {v}");
        // forge inspect reads the compressed image as the raw one.
        let j = ok(forge().arg("inspect").arg(&src).arg("--json"));
        let j: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(j["size"].as_u64(), Some(size), "{name}: {j}");
        assert_eq!(j["partitions"].as_array().unwrap().len(), 3, "{name}: {j}");
        // Without a bmap: every byte, the image exactly.
        flash_to_stale(&src, &backing, size, &["--no-bmap"]).unwrap();
        assert_eq!(sha256_file(&backing), sha256_file(&img), "{name}");
        // Truncated: refused before anything is written, with a bmap (its
        // ranges are checked first) or without (the size is counted).
        let cut = d.path().join(format!("cut-{name}"));
        std::fs::copy(&src, &cut).unwrap();
        sh(&format!(
            "truncate -s {} {}",
            len(&src) * 2 / 3,
            cut.display()
        ));
        std::fs::copy(d.path().join("disk.img.bmap"), with(&cut, ".bmap")).unwrap();
        for extra in [&[][..], &["--no-bmap"][..]] {
            let err = flash_to_stale(&cut, &backing, size, extra).unwrap_err();
            assert!(
                the_error(&err).contains(&format!("cut-{name}")),
                "{name} {extra:?}: {err}"
            );
            assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        }
    }
}

/// A foreign card image shaped like Raspberry Pi OS's (an MBR with a FAT
/// boot partition at 4 MiB and an ext4 root, by sfdisk, mkfs.vfat and
/// mkfs.ext4) and a hybrid ISO as Ubuntu's are made (xorriso: ISO 9660,
/// an appended EFI partition, GPT and protective MBR).
fn foreign_images(dir: &Path) -> [std::path::PathBuf; 2] {
    let rpi = dir.join("raspios.img");
    let iso = dir.join("hybrid.iso");
    let (r, i, d) = (rpi.display(), iso.display(), dir.display());
    sh(&format!(
        "set -e; truncate -s 128M {r}
         printf 'label: dos\\nlabel-id: 0x5452574f\\nstart=8192, size=65536, type=c\\nstart=73728, type=83\\n' | sfdisk -q {r}
         mkfs.vfat -n bootfs --offset 8192 {r} 32768 >/dev/null
         mkfs.ext4 -q -L rootfs -E offset=$((73728*512)) {r} 94208k
         mkdir -p {d}/tree && echo hello > {d}/tree/README
         truncate -s 4M {d}/efi.img && mkfs.vfat -n EFI {d}/efi.img >/dev/null
         xorriso -as mkisofs -quiet -o {i} -V HYBRID -J -R -partition_offset 16 \
           -append_partition 2 C12A7328-F81F-11D2-BA4B-00A0C93EC93B {d}/efi.img -appended_part_as_gpt \
           -e --interval:appended_partition_2:all:: -no-emul-boot {d}/tree"
    ));
    [rpi, iso]
}

#[test]
fn foreign_images_a_raspberry_pi_os_card_and_a_hybrid_iso_flash_and_fill_is_refused() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let backing = d.path().join("card");
    for img in foreign_images(d.path()) {
        let name = img.file_name().unwrap().to_string_lossy().into_owned();
        // A card of the image's size gets its bytes exactly.
        flash_to_stale(&img, &backing, len(&img), &[]).unwrap();
        assert_eq!(sha256_file(&backing), sha256_file(&img), "{name}");
        // Options that need forge's layout manifest say so, write nothing.
        for extra in [&["--fill"][..], &["--hostname", "pi"][..]] {
            let err = flash_to_stale(&img, &backing, len(&img) * 2, extra).unwrap_err();
            assert!(
                the_error(&err).contains("no layout manifest") && err.contains(&name),
                "{name} {extra:?}: {err}"
            );
            assert_eq!(err.trim().lines().count(), 1, "{err}");
        }
    }
    // On a larger card the ISO's GPT moves to the card's end and the ISO
    // still reads: its El Torito EFI image and its files.
    let iso = d.path().join("hybrid.iso");
    flash_to_stale(&iso, &backing, 64 << 20, &[]).unwrap();
    let v = ok(Command::new("sgdisk").arg("-v").arg(&backing));
    assert!(v.contains("No problems found"), "{v}");
    let t = ok(Command::new("xorriso")
        .args(["-indev"])
        .arg(&backing)
        .args(["-report_el_torito", "plain"]));
    assert!(t.contains("El Torito boot img :   1  UEFI"), "{t}");
    let readme = d.path().join("README.out");
    ok(Command::new("osirrox")
        .arg("-indev")
        .arg(&backing)
        .args(["-extract", "/README"])
        .arg(&readme));
    assert_eq!(std::fs::read_to_string(readme).unwrap(), "hello\n");
}
