//! `forge image --verity` (issue 25): the root's dm-verity hash
//! partition, judged by veritysetup (verify, dump, and the bytes of its
//! own `format`), sfdisk (the partition GUIDs are the root hash's halves)
//! and mtools (the root hash on the kernel command line).

use nixforge_tests::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Verity {
    dir: tempfile::TempDir,
    img: PathBuf,
    layout: Value,
}

fn forge_verity(extra: &[&str]) -> Verity {
    let sys = system("x86_64");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let out = ok(forge_image_of(&sys)
        .args(["--format", "raw-efi", "--verity", "--json", "-o"])
        .arg(&img)
        .args(extra));
    Verity {
        layout: serde_json::from_str(&out).unwrap(),
        img,
        dir,
    }
}

impl Verity {
    fn part(&self, role: &str) -> &Value {
        let parts = self.layout["partitions"].as_array().unwrap();
        parts
            .iter()
            .find(|p| p["role"] == role)
            .unwrap_or_else(|| panic!("no {role} partition"))
    }
    /// The partition of `role` copied out to its own file.
    fn extract(&self, role: &str) -> PathBuf {
        let p = self.part(role);
        let to = self.dir.path().join(role);
        sh(&format!(
            "dd if={} of={} bs=1M skip={} count={} status=none",
            self.img.display(),
            to.display(),
            p["offset"].as_u64().unwrap() >> 20,
            p["size"].as_u64().unwrap() >> 20
        ));
        to
    }
    fn verity(&self, key: &str) -> String {
        self.layout["verity"][key]
            .to_string()
            .trim_matches('"')
            .to_string()
    }
}

fn veritysetup(args: &[&str], files: &[&Path]) -> std::process::Output {
    Command::new("veritysetup")
        .args(args)
        .args(files)
        .output()
        .unwrap()
}

#[test]
fn the_hash_partition_verifies_equals_veritysetup_format_and_catches_a_flipped_byte() {
    let v = forge_verity(&[]);
    assert_eq!(
        roles(&v.layout),
        ["esp", "root", "root-verity", "root-verity-sig", "state"]
    );
    assert_eq!(v.part("root-verity")["type_name"], "root-x86-64-verity");
    // Unsigned, the signature's slot is empty and "Linux reserved" (forge sign fills it).
    assert_eq!(v.part("root-verity-sig")["type_name"], "linux-reserved");
    let (root, hash) = (v.extract("root"), v.extract("root-verity"));
    let root_hash = v.verity("root_hash");
    assert_eq!(root_hash.len(), 64);
    let out = veritysetup(&["verify"], &[&root, &hash, Path::new(&root_hash)]);
    assert!(
        out.status.success(),
        "veritysetup verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // dump shows the parameters the manifest gives.
    let dump = String::from_utf8_lossy(&veritysetup(&["dump"], &[&hash]).stdout).into_owned();
    let field = |k: &str| {
        dump.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().last())
            .unwrap_or_else(|| panic!("{k} in\n{dump}"))
            .to_string()
    };
    assert_eq!(field("Hash type:"), "1");
    assert_eq!(field("Hash algorithm:"), "sha256");
    assert_eq!(field("Data block size:"), "4096");
    assert_eq!(field("Salt:"), v.verity("salt"));
    assert_eq!(field("Data blocks:"), v.verity("data_blocks"));
    // The bytes `veritysetup format` writes for the same root, salt and
    // UUID are ours; the rest of the partition is zeros.
    let reference = v.dir.path().join("reference.hash");
    let out = veritysetup(
        &[
            "format",
            &format!("--data-blocks={}", v.verity("data_blocks")),
            &format!("--salt={}", v.verity("salt")),
            &format!("--uuid={}", field("UUID:")),
        ],
        &[&root, &reference],
    );
    assert!(
        out.status.success(),
        "veritysetup format: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&root_hash),
        "format's root hash"
    );
    let ours = std::fs::read(&hash).unwrap();
    let theirs = std::fs::read(&reference).unwrap();
    assert!(
        ours[..theirs.len()] == theirs[..],
        "the hash tree differs from veritysetup format's"
    );
    assert!(ours[theirs.len()..].iter().all(|&b| b == 0));
    // One flipped byte of the root is caught.
    let mut bytes = std::fs::read(&root).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x40;
    std::fs::write(&root, &bytes).unwrap();
    let out = veritysetup(&["verify"], &[&root, &hash, Path::new(&root_hash)]);
    assert!(
        !out.status.success(),
        "a flipped byte at {at} passed veritysetup verify"
    );
}

#[test]
fn guids_are_the_root_hash_halves_and_the_hash_is_on_the_kernel_command_line() {
    let v = forge_verity(&[]);
    let h = v.verity("root_hash");
    let uuid = |hex: &str| {
        format!(
            "{}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        )
    };
    // As the table holds them (sfdisk reads the GPT itself).
    let table: Value =
        serde_json::from_str(&ok(Command::new("sfdisk").arg("--json").arg(&v.img))).unwrap();
    let parts = table["partitiontable"]["partitions"].as_array().unwrap();
    assert_eq!(
        parts[1]["uuid"].as_str().unwrap().to_lowercase(),
        uuid(&h[..32])
    );
    assert_eq!(
        parts[2]["uuid"].as_str().unwrap().to_lowercase(),
        uuid(&h[32..])
    );
    assert_eq!(
        parts[2]["type"].as_str().unwrap().to_lowercase(),
        "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5"
    );
    let esp = format!("{}@@{}", v.img.display(), v.part("esp")["offset"]);
    let entry =
        ok(Command::new("mtype").args(["-i", &esp, "::/loader/entries/nixos-generation-1.conf"]));
    let options = entry.lines().find(|l| l.starts_with("options ")).unwrap();
    assert!(options.ends_with(&format!(" roothash={h}")), "{options}");
    // The manifest beside the image says the same as --json.
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(v.img.with_extension("img.layout.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["verity"], v.layout["verity"]);
    // forge inspect reads it back from the image alone.
    let seen: Value =
        serde_json::from_str(&ok(forge().arg("inspect").arg(&v.img).arg("--json"))).unwrap();
    assert_eq!(seen["verity"], v.layout["verity"], "{seen}");
    assert_eq!(
        roles(&seen),
        ["esp", "root", "root-verity", "root-verity-sig", "state"]
    );
}

#[test]
fn the_same_inputs_give_the_same_bytes_whatever_the_mtimes_and_in_a_vm_container() {
    let a = forge_verity(&[]);
    let b = forge_verity(&[]);
    assert_eq!(sha256_file(&a.img), sha256_file(&b.img));
    assert_eq!(a.layout["verity"], b.layout["verity"]);
    // A copy of the store with every mtime moved: the same bytes.
    let sys = system("x86_64");
    let copy = copy_store(&sys, true, false);
    sh(&format!(
        "find {} -exec touch -h -d @123456789 {{}} +",
        copy.path().display()
    ));
    let moved = a.dir.path().join("moved.img");
    ok(forge()
        .arg("image")
        .arg(&sys.result)
        .arg("--root")
        .arg(copy.path())
        .args(["--format", "raw-efi", "--verity", "-o"])
        .arg(&moved));
    assert_eq!(
        sha256_file(&a.img),
        sha256_file(&moved),
        "mtimes changed the bytes"
    );
    // The seed decides the salt, and so the hash.
    let c = forge_verity(&["--seed", "another"]);
    assert_ne!(
        a.verity("salt"),
        c.verity("salt"),
        "the salt derives from the seed"
    );
    assert_ne!(a.verity("root_hash"), c.verity("root_hash"));
    // A VM disk with verity holds the same guest bytes.
    let q = a.dir.path().join("vm.qcow2");
    ok(forge_image_of(&sys)
        .args(["--format", "raw-efi", "--verity", "-o"])
        .arg(&q));
    ok(Command::new("qemu-img").arg("check").arg(&q));
    ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&a.img)
        .arg(&q));
}

#[test]
fn verity_with_a_writable_root_is_refused_writing_nothing() {
    let x86 = system("x86_64");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let err = fails(
        forge_image_of(&x86)
            .args(["--format", "raw-efi", "--verity", "--root-mode", "rw", "-o"])
            .arg(&img),
    );
    assert!(
        the_error(&err).contains("--verity needs a read-only root"),
        "{err}"
    );
    assert_eq!(dir_entries(dir.path()), Vec::<String>::new());
}

/// A --verity image boots under OVMF with its root opened through the
/// kernel's dm-verity (the fixture's stage 1 runs dmsetup with the root
/// hash from the command line); with one byte of a file changed, reading
/// that file fails (EIO) while the rest boots.
#[test]
fn boots_through_dm_verity_and_a_changed_file_reads_as_an_error() {
    let v = forge_verity(&[]);
    let b = boot("x86_64", &v.img, 512, std::time::Duration::from_secs(240));
    assert_eq!(
        b.marker.as_deref(),
        Some("NIXFORGE-BOOT-OK root=ro var=rw table=gpt init=found verity=on read=ok"),
        "serial log:\n{}",
        b.log
    );
    // The registration file's first data block, found by debugfs in the
    // root partition; one byte of it flipped in the image.
    let root = v.extract("root");
    let out = ok(Command::new("debugfs")
        .arg("-R")
        .arg("bmap /nix-path-registration 0")
        .arg(&root));
    let block: u64 = out
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("debugfs bmap: {out:?}"));
    let at = v.part("root")["offset"].as_u64().unwrap() + block * 4096 + 7;
    let mut img = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&v.img)
        .unwrap();
    let mut byte = [0u8; 1];
    use std::io::{Read, Seek, SeekFrom, Write};
    img.seek(SeekFrom::Start(at)).unwrap();
    img.read_exact(&mut byte).unwrap();
    img.seek(SeekFrom::Start(at)).unwrap();
    img.write_all(&[byte[0] ^ 0x20]).unwrap();
    drop(img);
    let b = boot("x86_64", &v.img, 512, std::time::Duration::from_secs(240));
    assert_eq!(
        b.marker.as_deref(),
        Some("NIXFORGE-BOOT-OK root=ro var=rw table=gpt init=found verity=on read=eio"),
        "serial log:\n{}",
        b.log
    );
}
