//! Issue 24's defects in forge (vm fleets, images, oci), found by trying
//! every workflow as its users would: one regression test per defect,
//! named for the behaviour it keeps. Judged by debugfs, stat, qemu-img,
//! umoci, skopeo and mtools. flash's are in defects_flash.rs.

use nixforge_tests::dir_with as files;
use nixforge_tests::flashing::*;
use nixforge_tests::*;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

// ---- forge vm ----

/// A raw-efi qcow2 forged with `seed`; without a state partition unless
/// `state`.
fn base(dir: &Path, name: &str, seed: &str, state: bool) -> PathBuf {
    let out = dir.join(name);
    let mut c = forge_image_of(&system("x86_64"));
    c.args(["--format", "raw-efi", "--seed", seed]);
    if !state {
        c.args(["--state-size", "none"]);
    }
    ok(c.arg("-o").arg(&out));
    out
}

fn vm(args: &[&str], base: &Path, out: &Path) -> Command {
    let mut c = forge();
    c.arg("vm")
        .args(args)
        .arg("--base")
        .arg(base)
        .arg("-o")
        .arg(out);
    c
}

/// `debugfs -R REQ IMAGE` (an identity disk is a bare ext4 image).
fn debugfs(image: &Path, req: &str) -> String {
    ok(Command::new("debugfs").args(["-R", req]).arg(image))
}

fn fleet() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("vms");
    std::fs::create_dir(&out).unwrap();
    (d, out)
}

#[test]
fn a_base_with_its_own_state_partition_is_refused_and_nothing_is_made() {
    let (d, out) = fleet();
    let b = base(d.path(), "base.qcow2", "one", true);
    let err = fails(&mut vm(&["web1"], &b, &out));
    let line = the_error(&err);
    assert!(
        line.contains("base.qcow2")
            && line.contains("partition 3")
            && line.contains("--state-size none"),
        "{line}"
    );
    assert!(dir_entries(&out).is_empty(), "{:?}", dir_entries(&out));
}

#[test]
fn an_upgrade_without_an_identity_keeps_every_identity_file() {
    let (d, out) = fleet();
    let b1 = base(d.path(), "b1.qcow2", "one", false);
    let b2 = base(d.path(), "b2.qcow2", "two", false);
    let id = files(
        d.path(),
        "web1",
        &[
            ("authorized_keys", "ssh-ed25519 AAAA op\n"),
            ("hosts", "10.0.0.2 db\n"),
            ("resolv.conf", "nameserver 10.0.0.1\n"),
        ],
    );
    let made: Value = serde_json::from_str(&ok(vm(
        &[
            "web1",
            "--identity",
            id.to_str().unwrap(),
            "--generate-host-keys",
            "--json",
        ],
        &b1,
        &out,
    )
    .env("SOURCE_DATE_EPOCH", "1")))
    .unwrap();
    let disk = out.join("web1-identity.img");
    let before = debugfs(&disk, "ls -l /");
    let up: Value =
        serde_json::from_str(&ok(&mut vm(&["web1", "--upgrade", "--json"], &b2, &out))).unwrap();
    let after = debugfs(&disk, "ls -l /");
    for f in [
        "authorized_keys",
        "hosts",
        "resolv.conf",
        "machine-id",
        "ssh_host_ed25519_key",
    ] {
        assert!(after.contains(f), "{f} lost on upgrade:\n{after}");
    }
    assert_eq!(before, after, "same files, modes and sizes");
    assert_eq!(debugfs(&disk, "cat /hosts"), "10.0.0.2 db\n");
    let m0 = &made["machines"][0];
    let m1 = &up["machines"][0];
    assert_eq!(m1["machine_id"], m0["machine_id"]);
    assert_eq!(m1["host_key"]["fingerprint"], m0["host_key"]["fingerprint"]);
    assert_eq!(m1["var_kept"], true);
}

#[test]
fn an_identity_disk_holding_a_host_key_is_private_whatever_the_umask() {
    let (d, out) = fleet();
    let b = base(d.path(), "base.qcow2", "one", false);
    let cmd = |name: &str, keys: bool| {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(r#"umask 000; exec "$@""#)
            .arg("sh")
            .arg(bin("forge"))
            .args(["vm", name, "--base"])
            .arg(&b)
            .arg("-o")
            .arg(&out);
        if keys {
            c.arg("--generate-host-keys");
        }
        c
    };
    ok(&mut cmd("keyed", true));
    ok(&mut cmd("plain", false));
    let mode = |f: &str| std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("keyed-identity.img"), 0o600);
    // The control: the same umask gives other outputs its mode.
    assert_eq!(mode("plain-identity.img"), 0o666);
    assert_eq!(mode("keyed.xml"), 0o666);
}

#[test]
fn two_runs_into_one_fleet_directory_never_both_succeed() {
    let (d, out) = fleet();
    let b = base(d.path(), "base.qcow2", "one", false);
    let spawn = || {
        vm(&["web1", "--generate-host-keys", "--json"], &b, &out)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, c) = (spawn(), spawn());
    let outs = [a.wait_with_output().unwrap(), c.wait_with_output().unwrap()];
    let won: Vec<_> = outs.iter().filter(|o| o.status.success()).collect();
    assert_eq!(won.len(), 1, "exactly one run makes web1");
    let lost = outs.iter().find(|o| !o.status.success()).unwrap();
    assert!(
        String::from_utf8_lossy(&lost.stderr).contains("web1-"),
        "{}",
        String::from_utf8_lossy(&lost.stderr)
    );
    let r: Value = serde_json::from_slice(&won[0].stdout).unwrap();
    let printed = r["machines"][0]["host_key"]["public"].as_str().unwrap();
    let on_disk = debugfs(
        &out.join("web1-identity.img"),
        "cat /ssh_host_ed25519_key.pub",
    );
    assert_eq!(
        on_disk.trim(),
        printed.trim(),
        "the key printed is the key on disk"
    );
}

#[test]
fn hidden_directories_are_not_machines() {
    let (d, out) = fleet();
    let b = base(d.path(), "base.qcow2", "one", false);
    let ids = d.path().join("ids");
    files(&ids, "web1", &[("hosts", "x\n")]);
    files(&ids, ".git", &[("config", "secrets\n")]);
    let err = String::from_utf8_lossy(
        &vm(&["--identities", ids.to_str().unwrap()], &b, &out)
            .output()
            .unwrap()
            .stderr,
    )
    .into_owned();
    assert!(err.contains("skipped hidden .git"), "{err}");
    assert_eq!(
        dir_entries(&out),
        [
            "web1-boot.qcow2",
            "web1-identity.img",
            "web1-var.qcow2",
            "web1.xml"
        ]
    );
}

#[test]
fn nothing_to_upgrade_zero_vcpus_or_memory_and_a_bad_identity_are_refused() {
    let (d, out) = fleet();
    let b = base(d.path(), "base.qcow2", "one", false);
    let line = fails(&mut vm(&["typo", "--upgrade"], &b, &out));
    assert!(
        the_error(&line).contains("VM typo: nothing to upgrade"),
        "{line}"
    );
    for args in [
        ["x", "--vcpus", "0"],
        ["x", "--memory", "0"],
        ["x", "--var-size", "100T"],
    ] {
        let o = vm(&args, &b, &out).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(args[1]),
            "{args:?}"
        );
    }
    for (f, bad) in [
        ("hostname", "pi 01/evil\n"),
        ("machine-id", "not-a-machine-id\n"),
    ] {
        let id = files(d.path(), &format!("bad-{f}"), &[(f, bad)]);
        let err = fails(&mut vm(
            &["x", "--identity", id.to_str().unwrap()],
            &b,
            &out,
        ));
        assert!(the_error(&err).contains(&format!("bad-{f}/{f}")), "{err}");
    }
    assert!(dir_entries(&out).is_empty());
}

#[test]
fn a_generated_hostname_gives_way_to_the_identitys_own() {
    let (d, out) = fleet();
    let b = base(d.path(), "base.qcow2", "one", false);
    let id = files(d.path(), "web1", &[("hostname", "db-primary\n")]);
    ok(&mut vm(
        &["web1", "--identity", id.to_str().unwrap(), "--hostname"],
        &b,
        &out,
    ));
    assert_eq!(
        debugfs(&out.join("web1-identity.img"), "cat /hostname"),
        "db-primary\n"
    );
}

#[test]
fn huge_disks_take_table_memory_by_content_and_absurd_sizes_are_one_line() {
    let d = tempfile::tempdir().unwrap();
    let sys = system("x86_64");
    // 1 TiB: its qcow2 tables follow what is written (572 MB peak when
    // they spanned the virtual size; about 180 MB now, mostly the
    // state filesystem's bitmaps).
    let big = d.path().join("big.qcow2");
    let out = Command::new("/usr/bin/time")
        .args(["-f", "peak %M"])
        .arg(bin("forge"))
        .args(["image"])
        .arg(&sys.result)
        .arg("--root")
        .arg(&sys.root)
        .args(["--format", "raw-efi", "--disk-size", "1T", "-o"])
        .arg(&big)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let kb: u64 = err
        .lines()
        .find_map(|l| l.strip_prefix("peak "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(kb < 400_000, "peak {kb} KiB for a 1 TiB qcow2");
    let chk = ok(Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&big));
    assert!(chk.contains("No errors were found"), "{chk}");
    let huge = d.path().join("huge.qcow2");
    let err = fails(
        forge_image_of(&sys)
            .args(["--format", "raw-efi", "--disk-size", "100T", "-o"])
            .arg(&huge),
    );
    assert!(the_error(&err).contains("at most 16 TiB"), "{err}");
    assert!(!huge.exists());
}

#[test]
fn a_verify_nar_mismatch_prints_both_hashes_in_nixs_own_form() {
    let sys = system("x86_64");
    let copy = copy_store(&sys, true, false);
    let kernel = std::fs::read_link(sys.physical(&format!("{}/kernel", sys.toplevel))).unwrap();
    let f = copy
        .path()
        .join(kernel.to_str().unwrap().trim_start_matches('/'));
    let mut b = std::fs::read(&f).unwrap();
    b[100] ^= 0xFF;
    std::fs::write(&f, &b).unwrap();
    let e = fails(
        forge()
            .arg("closure")
            .arg(&sys.result)
            .arg("--root")
            .arg(copy.path())
            .arg("--verify-nar"),
    );
    let line = the_error(&e);
    // The Nix database records base16; both are shown as Nix prints them.
    let hashes: Vec<&str> = line
        .split_whitespace()
        .filter(|w| w.starts_with("sha256:"))
        .map(|w| w.trim_end_matches(','))
        .collect();
    assert_eq!(hashes.len(), 2, "{line}");
    for h in hashes {
        assert_eq!(h.len(), "sha256:".len() + 52, "{line}");
    }
}

#[test]
fn a_dynamic_vhd_stores_no_block_of_only_zeros() {
    let d = tempfile::tempdir().unwrap();
    let sys = system("x86_64");
    let raw = d.path().join("disk.img");
    ok(forge_image_of(&sys)
        .args(["--format", "raw-efi", "-o"])
        .arg(&raw));
    let vhd = d.path().join("disk.vhd");
    ok(forge_image_of(&sys)
        .args(["--format", "raw-efi", "--vhd-type", "dynamic", "-o"])
        .arg(&vhd));
    let cmp = ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "vpc"])
        .arg(&raw)
        .arg(&vhd));
    assert!(cmp.contains("identical"), "{cmp}");
    // The peer: qemu-img convert stores only blocks holding data.
    let q = d.path().join("q.vhd");
    ok(Command::new("qemu-img")
        .args(["convert", "-O", "vpc", "-o", "subformat=dynamic"])
        .arg(&raw)
        .arg(&q));
    assert!(
        len(&vhd) <= len(&q),
        "{} bytes, qemu-img's {}",
        len(&vhd),
        len(&q)
    );
}

#[test]
fn firmware_can_name_its_file_on_the_card() {
    let d = tempfile::tempdir().unwrap();
    let sys = system("aarch64");
    let uboot = d.path().join("u-boot.bin");
    std::fs::write(&uboot, b"u-boot").unwrap();
    let img = d.path().join("sd.img");
    let mut c = forge_image_of(&sys);
    c.args(["--format", "sd-aarch64", "--firmware"]);
    ok(c.arg(format!("u-boot-rpi3.bin={}", uboot.display()))
        .arg("-o")
        .arg(&img));
    let j: Value =
        serde_json::from_str(&ok(forge().arg("inspect").arg(&img).arg("--json"))).unwrap();
    let off = j["partitions"][0]["offset"].as_u64().unwrap();
    let dir = ok(Command::new("mdir")
        .args(["-b", "-i"])
        .arg(format!("{}@@{off}", img.display())));
    assert!(
        dir.contains("u-boot-rpi3.bin") && !dir.contains("u-boot.bin\n"),
        "{dir}"
    );
    // Without the name, config.txt's kernel= file is missing: said so.
    let err = fails(
        forge_image_of(&sys)
            .args(["--format", "sd-aarch64", "--firmware"])
            .arg(&uboot)
            .arg("-o")
            .arg(d.path().join("bad.img")),
    );
    assert!(the_error(&err).contains("NAME=FILE"), "{err}");
    let err = fails(
        forge_image_of(&sys)
            .args(["--format", "sd-aarch64", "--firmware"])
            .arg(format!("u-boot-rpi3.bin={}", d.path().display()))
            .arg("-o")
            .arg(d.path().join("bad.img")),
    );
    assert!(the_error(&err).contains("not a file"), "{err}");
}

// ---- forge oci ----

fn unpacked_rootfs(dir: &Path, args: &[&str], path: &str) -> (Value, PathBuf) {
    let sys = system("x86_64");
    let img = dir.join("img");
    ok(forge()
        .arg("oci")
        .arg(path)
        .arg("--root")
        .arg(&sys.root)
        .args(args)
        .arg("-o")
        .arg(&img));
    let config: Value = serde_json::from_str(&ok(Command::new("skopeo")
        .args(["inspect", "--config"])
        .arg(format!("oci:{}", img.display()))))
    .unwrap();
    let bundle = dir.join("bundle");
    ok(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:latest", img.display()))
        .arg(&bundle));
    (config, bundle.join("rootfs"))
}

#[test]
fn an_added_user_joins_the_group_its_gid_names_and_path_finds_sw_under_root() {
    let sys = system("x86_64");
    let d = tempfile::tempdir().unwrap();
    let (config, rootfs) =
        unpacked_rootfs(d.path(), &["--add-user", "app:1000:65534"], &sys.toplevel);
    let group = std::fs::read_to_string(rootfs.join("etc/group")).unwrap();
    assert_eq!(group, "root:x:0:\nnobody:x:65534:\n");
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(passwd.contains("app:x:1000:65534:"), "{passwd}");
    // The toplevel's `sw` is an absolute link into the store: followed
    // inside --root, so PATH is what it is with the store at /.
    let env = config["config"]["Env"][0].as_str().unwrap().to_string();
    assert!(sys.physical(&format!("{}/sw", sys.toplevel)).is_symlink());
    assert!(env.contains(&format!("{}/sw/bin", sys.toplevel)), "{env}");
    let bad = fails(
        forge()
            .arg("oci")
            .arg(&sys.toplevel)
            .arg("--root")
            .arg(&sys.root)
            .args(["--add-user", "a:4294967295", "-o"])
            .arg(d.path().join("bad")),
    );
    assert!(the_error(&bad).contains("4294967295"), "{bad}");
}

#[test]
fn smaller_mistakes_get_their_own_words_before_anything_is_written() {
    let sys = system("x86_64");
    let d = tempfile::tempdir().unwrap();
    // A VHD's size rule, before any partition is written.
    let vhd = d.path().join("x.vhd");
    let err = fails(
        forge_image_of(&sys)
            .args(["--format", "raw-efi", "--disk-size", "1000500K", "-o"])
            .arg(&vhd),
    );
    let line = the_error(&err);
    assert!(
        line.contains("whole number of MiB") && !line.contains("writing"),
        "{line}"
    );
    assert!(!err.contains("wrote the"), "{err}");
    // A missing output directory is named, not a temporary file in it.
    for args in [
        &["ext4", "."][..],
        &["oci", sys.toplevel.as_str(), "--root"][..],
    ] {
        let mut c = forge();
        c.args(args);
        if args[0] == "oci" {
            c.arg(&sys.root);
        }
        let err = fails(c.arg("-o").arg(d.path().join("no/such/out.tar")));
        let line = the_error(&err);
        assert!(
            line.contains("output directory")
                && line.contains("no/such")
                && !line.contains(".out.tar."),
            "{line}"
        );
    }
    // An unusable cache points at --no-cache.
    let err = fails(
        forge()
            .args(["oci", &sys.toplevel, "--root"])
            .arg(&sys.root)
            .env("HOME", "/proc")
            .arg("-o")
            .arg(d.path().join("c")),
    );
    assert!(the_error(&err).contains("--no-cache"), "{err}");
    // An entrypoint or user the image lacks is warned about.
    let out = forge()
        .args(["oci", &sys.toplevel, "--root"])
        .arg(&sys.root)
        .args([
            "--entrypoint",
            "/bin/nothere",
            "--user",
            "ghost",
            "--no-cache",
            "-o",
        ])
        .arg(d.path().join("w"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning: the entrypoint /bin/nothere is not in the image"),
        "{err}"
    );
    assert!(
        err.contains("warning: --user ghost: no account ghost"),
        "{err}"
    );
}

/// Every field of `want` is in `got` with the same value.
fn contains(got: &Value, want: &Value, at: &str) {
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => {
            for (k, v) in w {
                let there = g.get(k).unwrap_or_else(|| panic!("{at}.{k} missing"));
                contains(there, v, &format!("{at}.{k}"));
            }
        }
        (Value::Array(g), Value::Array(w)) => {
            assert_eq!(g.len(), w.len(), "{at}");
            for (i, (g, w)) in g.iter().zip(w).enumerate() {
                contains(g, w, &format!("{at}[{i}]"));
            }
        }
        _ => assert_eq!(got, want, "{at}"),
    }
}

#[test]
fn inspect_reads_back_every_field_of_the_layout_manifest() {
    let d = tempfile::tempdir().unwrap();
    let raw = raw_efi(d.path(), 512);
    let sd = sd_image(d.path(), "nixos.img.zst");
    for img in [raw, sd] {
        let manifest: Value = serde_json::from_slice(
            &std::fs::read(format!("{}.layout.json", img.display())).unwrap(),
        )
        .unwrap();
        let got: Value =
            serde_json::from_str(&ok(forge().arg("inspect").arg(&img).arg("--json"))).unwrap();
        let mut manifest = manifest;
        // The one field inspect cannot read back: the system's version is
        // a file in the root filesystem (it is what the build said).
        let version = manifest.as_object_mut().unwrap().remove("system_version");
        assert_eq!(version, Some(Value::from("25.05.fixture")));
        contains(&got, &manifest, &img.display().to_string());
    }
}
