//! forge's outputs under wrong input and interruption (issue 12): an
//! image and its sidecars appear whole or not at all, never replace
//! another image's, and leave nothing behind on any signal.

use nixforge_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn raw_efi(out: &Path, seed: &str) -> Command {
    let mut c = forge_image_of(&system("x86_64"));
    c.args(["--format", "raw-efi", "--seed", seed, "-o"])
        .arg(out);
    c
}

fn sidecar(img: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}{suffix}", img.display()))
}

/// The bmap and the manifest beside `img` are its own: bmaptool copies it
/// with the bmap's checksums, and the manifest names its disk id and size.
fn sidecars_match(img: &Path) {
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("copy");
    ok(Command::new("bmaptool")
        .args(["-q", "copy", "--bmap"])
        .arg(sidecar(img, ".bmap"))
        .arg(img)
        .arg(&t));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sidecar(img, ".layout.json")).unwrap()).unwrap();
    let i: serde_json::Value =
        serde_json::from_str(&ok(forge().arg("inspect").arg(img).arg("--json"))).unwrap();
    assert_eq!(m["disk_id"], i["disk_id"]);
    assert_eq!(m["size"], i["size"]);
    assert_eq!(m["head_sha256"], i["head_sha256"]);
}

#[test]
fn zst_output_never_replaces_the_bmap_of_a_raw_image_beside_it() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("x.img");
    ok(&mut raw_efi(&img, "one"));
    let before = sha256_file(&sidecar(&img, ".bmap"));
    let zst = d.path().join("x.img.zst");
    ok(&mut raw_efi(&zst, "two"));
    assert_eq!(sha256_file(&sidecar(&img, ".bmap")), before);
    assert!(sidecar(&zst, ".bmap").is_file());
    sidecars_match(&img);
    assert_eq!(
        dir_entries(d.path()),
        [
            "x.img",
            "x.img.bmap",
            "x.img.layout.json",
            "x.img.zst",
            "x.img.zst.bmap",
            "x.img.zst.layout.json"
        ]
    );
}

#[test]
fn killed_or_interrupted_forge_image_leaves_no_temporary_file() {
    for signal in ["KILL", "INT", "TERM"] {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("x.img");
        let mut child = spawn_paused(&mut raw_efi(&img, "one"), "wrote the ESP");
        ok(Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string()));
        child.wait().unwrap();
        assert_eq!(
            dir_entries(d.path()),
            Vec::<String>::new(),
            "SIG{signal} mid-write left files"
        );
    }
}

#[test]
fn killed_forge_update_leaves_the_published_versions_as_they_were() {
    use crate::ab_updates::slots_cmd;
    let d = tempfile::tempdir().unwrap();
    let publ = d.path().join("pub");
    let update = |v: &str| {
        let mut c = slots_cmd("update", &["--verity", "--version", v, "--source"]);
        c.arg(&publ).arg("-o").arg(&publ);
        c
    };
    ok(&mut update("1"));
    // Every file by name and SHA-256, the definitions' too.
    let published = || {
        let defs = publ.join("sysupdate.d");
        let files = |d: &Path| {
            dir_entries(d)
                .into_iter()
                .filter(|n| n != "sysupdate.d")
                .map(|n| (sha256_file(&d.join(&n)), n))
                .collect::<Vec<_>>()
        };
        (files(&publ), files(&defs))
    };
    let before = published();
    // Version 2's root is written (unnamed, not yet in the directory) when
    // forge is killed; so is version 1 made again with another seed.
    for (v, extra) in [("2", &[][..]), ("1", &["--seed", "again"][..])] {
        let mut child = spawn_paused(update(v).args(extra), &format!("wrote nixos_{v}_"));
        ok(Command::new("kill")
            .arg("-KILL")
            .arg(child.id().to_string()));
        child.wait().unwrap();
        assert_eq!(published(), before, "version {v} killed");
    }
}

#[test]
fn bmap_path_that_is_a_directory_leaves_no_image() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("x.img");
    std::fs::create_dir(sidecar(&img, ".bmap")).unwrap();
    let e = fails(&mut raw_efi(&img, "one"));
    assert!(the_error(&e).contains("x.img.bmap: is a directory"), "{e}");
    assert_eq!(dir_entries(d.path()), ["x.img.bmap"]);
}

#[test]
fn a_missing_output_directory_is_made_one_level_deep_and_removed_again_when_the_run_fails() {
    let d = tempfile::tempdir().unwrap();
    // Fails after the directory is made: the disk cannot hold the parts.
    let img = d.path().join("out/x.img");
    let e = fails(raw_efi(&img, "one").args(["--disk-size", "100M"]));
    assert!(the_error(&e).contains("--disk-size"), "{e}");
    assert!(
        dir_entries(d.path()).is_empty(),
        "{:?}",
        dir_entries(d.path())
    );
    // A run that succeeds keeps it (a Nix builder has no mkdir for $out).
    ok(&mut raw_efi(&img, "one"));
    assert_eq!(
        dir_entries(&d.path().join("out")),
        ["x.img", "x.img.bmap", "x.img.layout.json"]
    );
    // Two levels missing, or a file in the way: one line, nothing made.
    let deep = d.path().join("a/b/x.img");
    let e = fails(&mut raw_efi(&deep, "one"));
    assert!(the_error(&e).contains("a/b"), "{e}");
    let under_file = d.path().join("out/x.img/y.img");
    let e = fails(&mut raw_efi(&under_file, "one"));
    assert!(the_error(&e).contains("x.img"), "{e}");
    assert_eq!(dir_entries(d.path()), ["out"]);
}

#[test]
fn output_naming_a_directory_is_refused_before_building_with_one_cause() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("x.img");
    std::fs::create_dir(&img).unwrap();
    let e = fails(&mut raw_efi(&img, "one"));
    let line = the_error(&e);
    assert_eq!(line, format!("error: {}: is a directory", img.display()));
    assert!(!e.contains("closure:"), "failed only after work began: {e}");
}

#[test]
fn two_runs_to_the_same_output_leave_a_matching_image_bmap_and_manifest() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("x.img");
    for round in 0..3 {
        let mut a = raw_efi(&img, &format!("a{round}"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut b = raw_efi(&img, &format!("b{round}"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
        sidecars_match(&img);
        assert_eq!(
            dir_entries(d.path()),
            ["x.img", "x.img.bmap", "x.img.layout.json"]
        );
    }
}

// ---- forge inspect reads what flash reads, and says what is wrong ----

fn inspect_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(forge().arg("inspect").arg(p).arg("--json"))).unwrap()
}

#[test]
fn inspect_reads_block_devices_and_zst_images_like_the_raw_image() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("x.img");
    ok(&mut raw_efi(&img, "one"));
    let zst = d.path().join("x.img.zst");
    ok(&mut raw_efi(&zst, "one"));
    let want = inspect_json(&img);
    assert_eq!(want["table"], "gpt");
    assert_eq!(want["partitions"].as_array().unwrap().len(), 3);
    let lo = Loop::attach(&img, &["-r"]);
    for (what, got) in [
        ("block device", inspect_json(Path::new(&lo.dev))),
        ("zst", inspect_json(&zst)),
    ] {
        for k in [
            "table",
            "sector_size",
            "disk_id",
            "size",
            "partitions",
            "head_sha256",
        ] {
            assert_eq!(got[k], want[k], "{what}: {k}");
        }
    }
}

#[test]
fn inspect_of_something_that_is_not_an_image_fails_saying_so() {
    let d = tempfile::tempdir().unwrap();
    let cases: [(&str, Vec<u8>); 3] = [
        ("empty", Vec::new()),
        ("text", b"hello, not a disk\n".to_vec()),
        (
            "random",
            (0..70_000u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
        ),
    ];
    for (name, bytes) in cases {
        let p = d.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let e = fails(forge().arg("inspect").arg(&p));
        let line = the_error(&e);
        assert_eq!(
            line,
            format!(
                "error: {}: no partition table (not a disk image)",
                p.display()
            )
        );
    }
}

#[test]
fn inspect_of_a_truncated_image_warns() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("x.img");
    ok(&mut raw_efi(&img, "one"));
    ok(Command::new("truncate").args(["-s", "-1M"]).arg(&img));
    let out = ok(forge().arg("inspect").arg(&img));
    assert!(
        out.contains("warning: the image is")
            && out.contains("reaches byte")
            && out.contains("truncated?"),
        "{out}"
    );
    // Its manifest (of the whole image) no longer matches either.
    assert!(
        out.contains("x.img.layout.json describes another image"),
        "{out}"
    );
}

/// An ESP whose root directory's cluster chain comes back to itself:
/// inspect read it on until the kernel killed it for its memory; now it
/// warns, and `forge sign` (which reads the ESP) refuses in one line,
/// writing nothing.
#[test]
fn an_esp_whose_cluster_chain_loops_is_a_warning_or_a_refusal() {
    use std::os::unix::fs::FileExt;
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("x.img");
    ok(&mut raw_efi(&img, "one"));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let esp = 1 << 20;
    let mut boot = [0u8; 512];
    f.read_exact_at(&mut boot, esp).unwrap();
    let le = |o: usize, n: usize| {
        boot[o..o + n]
            .iter()
            .rev()
            .fold(0u64, |v, &b| v << 8 | b as u64)
    };
    let (sector, reserved, root) = (le(11, 2), le(14, 2), le(44, 4));
    f.write_all_at(
        &(root as u32).to_le_bytes(),
        esp + reserved * sector + root * 4,
    )
    .unwrap();
    drop(f);
    let out = ok(forge().arg("inspect").arg(&img));
    assert!(
        out.contains(&format!(
            "warning: partition 1: its boot entries cannot be read: FAT cluster chain loops (at cluster {root})"
        )),
        "{out}"
    );
    let keys = tempfile::tempdir().unwrap();
    let key = snakeoil_key(keys.path());
    let signed = d.path().join("signed.img");
    let e = fails(
        forge()
            .arg("sign")
            .arg(&img)
            .arg("-o")
            .arg(&signed)
            .arg("--secure-boot-key")
            .arg(&key)
            .args(["--secure-boot-cert", SNAKEOIL_CERT]),
    );
    assert!(
        the_error(&e).ends_with(&format!(
            "{}: FAT cluster chain loops (at cluster {root})",
            img.display()
        )),
        "{e}"
    );
    let mut left = dir_entries(d.path());
    left.sort();
    assert_eq!(left, ["x.img", "x.img.bmap", "x.img.layout.json"]);
}

#[test]
fn forge_fat_refuses_two_names_that_differ_only_in_case() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("a.txt"), b"one").unwrap();
    std::fs::write(src.join("A.TXT"), b"two").unwrap();
    let out = d.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let e = fails(
        forge()
            .arg("fat")
            .arg(&src)
            .arg("-o")
            .arg(out.join("esp.img"))
            .args(["--size", "64M"]),
    );
    let line = the_error(&e);
    assert!(
        line.contains("\"A.TXT\" and \"a.txt\" are one name on FAT (names are case-insensitive)"),
        "{line}"
    );
    assert!(dir_entries(&out).is_empty());
}

#[test]
fn running_out_of_space_says_so_once_with_one_offset_and_leaves_nothing() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    ok(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=20M", "tmpfs"])
        .arg(d.path()));
    let img = d.path().join("x.img");
    let e = fails(&mut raw_efi(&img, "one"));
    let entries = dir_entries(d.path());
    ok(Command::new("umount").arg(d.path()));
    let line = the_error(&e);
    assert_eq!(line.matches("No space left on device").count(), 1, "{line}");
    assert_eq!(line.matches("at byte").count(), 1, "{line}");
    assert!(
        line.contains(&format!("writing {}", img.display())),
        "{line}"
    );
    assert!(entries.is_empty(), "{entries:?}");
}

/// Options and arguments in a clap help text that have no description.
fn undescribed(help: &str) -> Vec<String> {
    let lines: Vec<&str> = help.lines().collect();
    let mut bad = Vec::new();
    let mut in_list = false;
    for (i, l) in lines.iter().enumerate() {
        if l.ends_with(':') && !l.starts_with(' ') {
            in_list = matches!(*l, "Options:" | "Arguments:");
            continue;
        }
        let t = l.trim_start();
        if !in_list || !(l.starts_with("  ") && (t.starts_with('-') || t.starts_with('<'))) {
            continue;
        }
        // "  --flag <V>  text" on one line, or the text on the next,
        // indented deeper.
        // (A bare "[default: …]" is no description.)
        let same_line = t
            .split_once("  ")
            .is_some_and(|(_, d)| !d.trim().is_empty() && !d.trim().starts_with('['));
        let next_line = lines
            .get(i + 1)
            .is_some_and(|n| n.starts_with("          ") && !n.trim().is_empty());
        if !same_line && !next_line {
            bad.push(t.to_string());
        }
    }
    bad
}

#[test]
fn help_describes_every_option_with_examples_and_exit_codes() {
    let forge_cmds: &[&[&str]] = &[
        &[],
        &["closure"],
        &["ext4"],
        &["fat"],
        &["image"],
        &["inspect"],
        &["erofs"],
        &["update"],
    ];
    let flash_cmds: &[&[&str]] = &[&[], &["list"], &["verify"]];
    for (bin_name, cmds) in [("forge", forge_cmds), ("flash", flash_cmds)] {
        for sub in cmds {
            let help = ok(Command::new(bin(bin_name)).args(*sub).arg("--help"));
            let bad = undescribed(&help);
            assert!(
                bad.is_empty(),
                "{bin_name} {sub:?} --help: undescribed {bad:?}\n{help}"
            );
            if sub.is_empty() {
                assert!(
                    help.contains("Examples:") && help.contains("Exit status:"),
                    "{help}"
                );
            }
        }
    }
    let image = ok(forge().args(["image", "--help"]));
    for ext in [".img", ".raw", ".img.zst", ".raw.zst"] {
        assert!(image.contains(ext), "forge image --help lists {ext}");
    }
}

#[test]
fn gpt_fields_that_would_overflow_are_refused_by_inspect_and_flash_not_wrapped() {
    use formats::gpt::{Gpt, Partition};
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("huge.img");
    let mut head = Gpt {
        sector: 512,
        disk_sectors: 1 << 15,
        disk_guid: [1; 16],
        partitions: vec![Partition {
            type_guid: [2; 16],
            guid: [3; 16],
            first_lba: 2048,
            last_lba: u64::MAX / 512 + 5,
            attributes: 0,
            name: "p".into(),
        }],
    }
    .primary();
    head.resize(16 << 20, 0);
    std::fs::write(&img, head).unwrap();
    let e = fails(forge().arg("inspect").arg(&img));
    let line = the_error(&e);
    assert!(
        line.contains("huge.img: its partition table: primary GPT header at byte 512: partition 1: LBAs 2048..=")
            && line.ends_with("are not a valid range"),
        "{line}"
    );
    let out = Command::new(bin("flash"))
        .arg(&img)
        .arg("/dev/null")
        .arg("--yes")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(the_error(&err).contains("not a valid range"), "{err}");
}

#[test]
fn make_install_puts_binaries_man_pages_and_completions_in_place() {
    let d = tempfile::tempdir().unwrap();
    let bin_dir = bin("forge").parent().unwrap().to_path_buf();
    ok(Command::new("make")
        .current_dir(workspace())
        .arg("install")
        .arg(format!("DESTDIR={}", d.path().display()))
        .arg("PREFIX=/usr")
        .arg(format!("BIN_DIR={}", bin_dir.display())));
    let usr = d.path().join("usr");
    for f in [
        "bin/forge",
        "bin/flash",
        "share/man/man1/forge.1",
        "share/man/man1/forge-image.1",
        "share/man/man1/forge-vm.1",
        "share/man/man1/flash.1",
        "share/man/man1/flash-verify.1",
        "share/bash-completion/completions/forge",
        "share/zsh/site-functions/_flash",
        "share/fish/vendor_completions.d/forge.fish",
    ] {
        assert!(usr.join(f).is_file(), "{f} installed");
    }
    // bash takes the completion; man renders the page.
    let c = ok(Command::new("bash").arg("-c").arg(format!(
        "source {}; complete -p forge",
        usr.join("share/bash-completion/completions/forge")
            .display()
    )));
    assert!(c.contains("-F _forge forge"), "{c}");
    let page = ok(Command::new("man")
        .arg("-l")
        .arg(usr.join("share/man/man1/forge-image.1"))
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100"));
    assert!(
        page.contains("forge-image") && page.contains("--disk-size"),
        "{page}"
    );
}
