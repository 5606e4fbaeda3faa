//! VM disk images (issue 13): qcow2 and VHD written directly by forge,
//! judged by qemu-img (check, info, compare against the raw image), booted
//! under OVMF, built twice to the same bytes, read back by forge inspect
//! and, for a fixed VHD, written by flash.

use nixforge_tests::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub(crate) fn forge_vm(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(name);
    ok(forge_image_of(&system("x86_64"))
        .args(["--format", "raw-efi", "-o"])
        .arg(&out)
        .args(extra));
    out
}

pub(crate) fn info(p: &Path, format: &str) -> Value {
    serde_json::from_str(&ok(Command::new("qemu-img")
        .args(["info", "--output=json", "-f", format])
        .arg(p)))
    .unwrap()
}

fn identical(raw: &Path, other: &Path, format: &str) {
    let out = ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", format])
        .arg(raw)
        .arg(other));
    assert!(out.contains("Images are identical"), "{out}");
}

#[test]
fn qcow2_and_vhds_pass_qemu_img_and_equal_the_raw_image() {
    let d = tempfile::tempdir().unwrap();
    let raw = forge_vm(d.path(), "x.img", &[]);
    let size = std::fs::metadata(&raw).unwrap().len();
    assert_eq!(size % (1 << 20), 0);
    let q = forge_vm(d.path(), "x.qcow2", &[]);
    let chk = ok(Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&q));
    assert!(chk.contains("No errors were found on the image"), "{chk}");
    let i = info(&q, "qcow2");
    assert_eq!(
        (i["format"].as_str(), i["virtual-size"].as_u64()),
        (Some("qcow2"), Some(size))
    );
    assert_eq!(
        i["format-specific"]["data"]["compat"], "1.1",
        "qcow2 version 3"
    );
    identical(&raw, &q, "qcow2");
    // Compressed: clean, the same disk, smaller.
    let c = forge_vm(d.path(), "c.qcow2", &["--compression", "deflate"]);
    let chk = ok(Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&c));
    assert!(
        chk.contains("No errors were found on the image") && chk.contains("compressed clusters"),
        "{chk}"
    );
    assert!(!chk.contains(" 0.00% compressed clusters"), "{chk}");
    identical(&raw, &c, "qcow2");
    assert!(std::fs::metadata(&c).unwrap().len() < std::fs::metadata(&q).unwrap().len());
    for (name, ty) in [("f.vhd", "fixed"), ("d.vhd", "dynamic")] {
        let v = forge_vm(d.path(), name, &["--vhd-type", ty]);
        let i = info(&v, "vpc");
        assert_eq!(
            (i["format"].as_str(), i["virtual-size"].as_u64()),
            (Some("vpc"), Some(size)),
            "{name}"
        );
        identical(&raw, &v, "vpc");
        // Beside a VM image: its layout manifest, no bmap.
        assert!(Path::new(&format!("{}.layout.json", v.display())).is_file());
        assert!(!Path::new(&format!("{}.bmap", v.display())).exists());
    }
    // A fixed VHD is the raw image and a footer.
    let f = std::fs::read(d.path().join("f.vhd")).unwrap();
    assert_eq!(f.len() as u64, size + 512);
    assert_eq!(sha256_file(&raw), {
        let p = d.path().join("f-raw");
        std::fs::write(&p, &f[..size as usize]).unwrap();
        sha256_file(&p)
    });
}

#[test]
fn vm_images_built_twice_are_identical() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    for (name, extra) in [
        ("x.qcow2", &[][..]),
        ("f.vhd", &["--vhd-type", "fixed"][..]),
        ("d.vhd", &["--vhd-type", "dynamic"][..]),
    ] {
        let x = forge_vm(a.path(), name, extra);
        let y = forge_vm(b.path(), name, extra);
        assert_eq!(sha256_file(&x), sha256_file(&y), "{name}");
    }
}

pub(crate) fn boots(image: &Path) {
    let b = boot("x86_64", image, 512, Duration::from_secs(180));
    assert_eq!(
        b.marker.as_deref(),
        Some("NIXFORGE-BOOT-OK root=ro var=rw table=gpt init=found"),
        "serial log ({}):\n{}",
        image.display(),
        b.log
    );
}

#[test]
fn qcow2_boots_under_ovmf() {
    let d = tempfile::tempdir().unwrap();
    boots(&forge_vm(d.path(), "x.qcow2", &[]));
}

#[test]
fn vhd_boots_under_ovmf() {
    let d = tempfile::tempdir().unwrap();
    boots(&forge_vm(d.path(), "x.vhd", &[]));
}

#[test]
fn inspect_reads_qcow2_and_vhd_as_the_raw_image() {
    let d = tempfile::tempdir().unwrap();
    let raw = forge_vm(d.path(), "x.img", &[]);
    let json = |p: &Path| -> Value {
        serde_json::from_str(&ok(forge().arg("inspect").arg(p).arg("--json"))).unwrap()
    };
    let want = json(&raw);
    for (name, extra) in [
        ("x.qcow2", &[][..]),
        ("f.vhd", &[][..]),
        ("d.vhd", &["--vhd-type", "dynamic"][..]),
    ] {
        let got = json(&forge_vm(d.path(), name, extra));
        for k in ["table", "disk_id", "size", "partitions", "head_sha256"] {
            assert_eq!(got[k], want[k], "{name}: {k}");
        }
        assert!(got.get("warnings").is_none(), "{name}: {got}");
    }
}

#[test]
fn base_image_without_a_state_partition() {
    let d = tempfile::tempdir().unwrap();
    let q = forge_vm(d.path(), "base.qcow2", &["--state-size", "none"]);
    let m: Value =
        serde_json::from_slice(&std::fs::read(format!("{}.layout.json", q.display())).unwrap())
            .unwrap();
    assert_eq!(roles(&m), ["esp", "root"]);
    assert!(m.get("identity").is_none());
    let chk = ok(Command::new("qemu-img").args(["check"]).arg(&q));
    assert!(chk.contains("No errors"), "{chk}");
}

#[test]
fn bad_vm_output_options_are_refused_and_nothing_is_left() {
    let d = tempfile::tempdir().unwrap();
    let err = |name: &str, extra: &[&str]| -> String {
        let e = fails(
            forge_image_of(&system("x86_64"))
                .args(["--format", "raw-efi", "-o"])
                .arg(d.path().join(name))
                .args(extra),
        );
        assert!(
            dir_entries(d.path()).is_empty(),
            "{:?}",
            dir_entries(d.path())
        );
        the_error(&e).to_string()
    };
    let e = err("x.qcow2", &["--vhd-type", "dynamic"]);
    assert!(
        e.contains("x.qcow2: --vhd-type applies to .vhd outputs only"),
        "{e}"
    );
    let e = err("x.vhd", &["--sector-size", "4096"]);
    assert!(
        e.contains("x.vhd: vhd (fixed) has 512-byte sectors; --sector-size 4096 does not apply"),
        "{e}"
    );
    let e = err("x.vhd", &["--compression", "deflate"]);
    assert!(
        e.contains("x.vhd: --compression deflate applies to .qcow2 outputs only"),
        "{e}"
    );
    let e = err("x.vmdk", &["--sector-size", "4096"]);
    assert!(
        e.contains("x.vmdk: vmdk (streamOptimized) has 512-byte sectors"),
        "{e}"
    );
    let e = err("x.vdi", &[]);
    assert!(
        e.contains("unknown output extension") && e.contains(".qcow2, .vhd, .vhdx, .vmdk, .ova"),
        "{e}"
    );
    // A size a VHD cannot carry: not a whole number of MiB.
    let e = err("x.vhd", &["--disk-size", "1073742336"]);
    assert!(
        e.contains("whole number of MiB") && e.contains("1073742336"),
        "{e}"
    );
    let sd = fails(
        forge_image_of(&system("aarch64"))
            .args(["--format", "sd-aarch64", "-o"])
            .arg(d.path().join("sd.qcow2")),
    );
    assert!(
        the_error(&sd).contains("qcow2, VHD, VHDX and VMDK outputs are for --format raw-efi"),
        "{sd}"
    );
}

#[test]
fn flash_writes_a_fixed_vhd_as_its_raw_part_and_refuses_qcow2_and_dynamic_vhd() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let raw = forge_vm(d.path(), "x.img", &[]);
    let f = forge_vm(d.path(), "f.vhd", &[]);
    let size = std::fs::metadata(&raw).unwrap().len();
    let backing = d.path().join("disk");
    std::fs::write(&backing, vec![0xFFu8; size as usize]).unwrap();
    let lo = Loop::attach(&backing, &[]);
    ok(Command::new(bin("flash")).arg(&f).arg(&lo.dev).args([
        "--yes",
        "--allow-non-removable",
        "--quiet",
    ]));
    drop(lo);
    assert_eq!(
        sha256_file(&backing),
        sha256_file(&raw),
        "exactly the raw part, every byte"
    );
    let q = forge_vm(d.path(), "x.qcow2", &[]);
    let dy = forge_vm(d.path(), "d.vhd", &["--vhd-type", "dynamic"]);
    for (img, what) in [(&q, "a qcow2 image"), (&dy, "a dynamic VHD image")] {
        let out = Command::new(bin("flash"))
            .arg(img)
            .arg("/dev/null")
            .arg("--yes")
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{e}");
        assert!(the_error(&e).contains(what), "{e}");
    }
}
