//! Issue 24's defects in flash (identities at the bench, stale sidecars,
//! compressed sources, verify, interrupted flashes, reports): one
//! regression test per defect, named for the behaviour it keeps, on loop
//! devices. forge's are in defects_forge.rs.

use nixforge_tests::dir_with as files;
use nixforge_tests::flashing::*;
use nixforge_tests::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

// ---- flash ----

/// Two sparse loop devices of 1 GiB.
fn two_devices(dir: &Path) -> [(PathBuf, Loop); 2] {
    ["a", "b"].map(|n| sparse_device(dir, n, 1 << 30))
}

fn flash_two(img: &Path, devs: &[(PathBuf, Loop); 2], args: &[&str]) -> std::process::Output {
    flash()
        .arg(img)
        .arg(&devs[0].1.dev)
        .arg(&devs[1].1.dev)
        .args(args)
        .args(["--yes", "--allow-non-removable", "--no-probe"])
        .output()
        .unwrap()
}

/// Refused with exit 2, the error line holding each of `want`, and both
/// devices still all zeros.
fn refused_untouched(o: &std::process::Output, devs: &[(PathBuf, Loop); 2], want: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let line = the_error(&err);
    for w in want {
        assert!(line.contains(w), "want {w:?} in {line}");
    }
    for (f, _) in devs {
        let n = sh(&format!("tr -d '\\000' < {} | wc -c", f.display()));
        assert_eq!(n.trim(), "0", "{} was written", f.display());
    }
}

#[test]
fn one_identity_directory_never_reaches_two_devices_unasked() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let img = raw_efi(d.path(), 512);
    let devs = two_devices(d.path());
    let one = files(d.path(), "one", &[("hostname", "one\n")]);
    let (a, b) = (&devs[0].1.dev, &devs[1].1.dev);
    let o = flash_two(
        &img,
        &devs,
        &[
            "--identity",
            &format!("{a}={}", one.display()),
            "--identity",
            &format!("{b}={}", one.display()),
        ],
    );
    refused_untouched(&o, &devs, &["reaches both", "--same-identity"]);
    let ids = d.path().join("ids");
    files(&ids, "p1", &[("hostname", "p1\n")]);
    std::os::unix::fs::symlink(ids.join("p1"), ids.join("p2")).unwrap();
    let o = flash_two(&img, &devs, &["--identities", ids.to_str().unwrap()]);
    refused_untouched(&o, &devs, &["reaches both"]);
}

#[test]
fn hidden_entries_of_identities_are_skipped_and_left_over_ones_named() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let img = raw_efi(d.path(), 512);
    let devs = two_devices(d.path());
    let ids = d.path().join("ids");
    for n in ["p1", "p2", "p3"] {
        files(&ids, n, &[("hostname", &format!("{n}\n"))]);
    }
    files(&ids, ".git", &[("config", "x\n")]);
    let o = flash_two(&img, &devs, &["--identities", ids.to_str().unwrap()]);
    refused_untouched(&o, &devs, &["3 identities for 2 devices", "left over: p3"]);
    std::fs::remove_dir_all(ids.join("p3")).unwrap();
    let o = flash_two(
        &img,
        &devs,
        &["--identities", ids.to_str().unwrap(), "--json"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("skipped hidden .git"), "{err}");
    let r: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    let got: Vec<&str> = r.iter().map(|x| x["identity"].as_str().unwrap()).collect();
    assert!(
        got[0].ends_with("/p1") && got[1].ends_with("/p2"),
        "{got:?}"
    );
}

#[test]
fn a_device_without_an_identity_among_others_is_refused_unless_none_is_said() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let img = raw_efi(d.path(), 512);
    let devs = two_devices(d.path());
    let one = files(d.path(), "one", &[("hostname", "one\n")]);
    let (a, b) = (&devs[0].1.dev, &devs[1].1.dev);
    let first = format!("{a}={}", one.display());
    let o = flash_two(&img, &devs, &["--identity", &first]);
    refused_untouched(&o, &devs, &[b, "has no identity", "=none"]);
    let o = flash_two(
        &img,
        &devs,
        &["--identity", &first, "--identity", &format!("{b}=none")],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("identity: none"), "{err}");
}

#[test]
fn identity_files_are_validated_like_generated_ones_and_generation_skips_what_they_have() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let img = raw_efi(d.path(), 512);
    let devs = two_devices(d.path());
    let (a, b) = (&devs[0].1.dev, &devs[1].1.dev);
    for (f, bad) in [
        ("hostname", "pi 01/evil\n"),
        ("machine-id", "not-a-machine-id\n"),
    ] {
        let id = files(d.path(), &format!("bad-{f}"), &[(f, bad)]);
        let good = files(d.path(), "good", &[]);
        let o = flash_two(
            &img,
            &devs,
            &[
                "--identity",
                &format!("{a}={}", id.display()),
                "--identity",
                &format!("{b}={}", good.display()),
            ],
        );
        refused_untouched(&o, &devs, &[&format!("bad-{f}/{f}")]);
    }
    // One identity brings its own key: --generate-host-keys makes one for
    // the other only (the help's "unless the identity has one").
    let keyed = files(d.path(), "keyed", &[("hostname", "keyed\n")]);
    ok(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "own", "-f"])
        .arg(keyed.join("ssh_host_ed25519_key")));
    let bare = files(d.path(), "bare", &[("hostname", "bare\n")]);
    let o = flash_two(
        &img,
        &devs,
        &[
            "--identity",
            &format!("{a}={}", keyed.display()),
            "--identity",
            &format!("{b}={}", bare.display()),
            "--generate-host-keys",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    let own = std::fs::read_to_string(keyed.join("ssh_host_ed25519_key.pub")).unwrap();
    assert_eq!(
        r[0]["host_key"]["public"].as_str().unwrap().trim(),
        own.trim()
    );
    assert!(r[1]["host_key"]["public"]
        .as_str()
        .unwrap()
        .ends_with("root@bare"));
}

#[test]
fn a_stale_bmap_and_manifest_beside_a_rebuilt_image_are_refused_before_writing() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let sys = system("x86_64");
    let build = |name: &str, timeout: &str| {
        let img = d.path().join(name);
        ok(forge_image_of(&sys)
            .args(["--format", "raw-efi", "--loader-timeout", timeout, "-o"])
            .arg(&img));
        img
    };
    let old = build("old.img", "0");
    let img = build("disk.img", "5");
    // Only loader.conf in the ESP differs: same size and first MiB.
    assert_eq!(len(&old), len(&img));
    let head = |p: &Path| sh(&format!("head -c 1048576 {} | sha256sum", p.display()));
    assert_eq!(head(&old), head(&img));
    assert_ne!(sha256_file(&old), sha256_file(&img));
    for s in [".bmap", ".layout.json"] {
        std::fs::copy(
            format!("{}{s}", old.display()),
            format!("{}{s}", img.display()),
        )
        .unwrap();
    }
    let devs = two_devices(d.path());
    let o = flash_two(&img, &devs, &[]);
    refused_untouched(
        &o,
        &devs,
        &[
            "disk.img: bytes",
            "do not match the checksum in",
            "disk.img.bmap",
        ],
    );
}

#[test]
fn a_pzstd_image_and_a_multithreaded_xz_flash_and_inspect_reads_both() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let img = raw_efi(d.path(), 512);
    let z = d.path().join("disk.img.zst");
    ok(Command::new("pzstd")
        .args(["-q", "-p", "2", "-o"])
        .arg(&z)
        .arg(&img));
    assert_eq!(
        &std::fs::read(&z).unwrap()[1..4],
        &[0x2A, 0x4D, 0x18],
        "a skippable frame first"
    );
    std::fs::copy(
        format!("{}.bmap", img.display()),
        format!("{}.bmap", z.display()),
    )
    .unwrap();
    let (_f, lo) = sparse_device(d.path(), "card", len(&img));
    ok(flash()
        .arg(&z)
        .arg(&lo.dev)
        .args(["--yes", "--allow-non-removable"]));
    ok(Command::new("cmp")
        .arg("-n")
        .arg(len(&img).to_string())
        .arg(&img)
        .arg(&lo.dev));
    let j: Value = serde_json::from_str(&ok(forge().arg("inspect").arg(&z).arg("--json"))).unwrap();
    assert_eq!(j["partitions"].as_array().unwrap().len(), 3, "{j}");
    let xz = d.path().join("disk.img.xz");
    // -0 with -T2 still writes hundreds of blocks, in half the CPU of -6.
    sh(&format!(
        "xz -0 -T2 -c {} > {}",
        img.display(),
        xz.display()
    ));
    // A multi-threaded xz (several blocks) is decompressed as it is read
    // (issue 28); the card first overwritten so the bytes must come from it.
    sh(&format!(
        "dd if=/dev/urandom of={} bs=1M count=4 conv=notrunc status=none",
        lo.dev
    ));
    ok(flash()
        .arg(&xz)
        .arg(&lo.dev)
        .args(["--yes", "--allow-non-removable", "--no-bmap"]));
    ok(Command::new("cmp")
        .arg("-n")
        .arg(len(&img).to_string())
        .arg(&img)
        .arg(&lo.dev));
    // forge inspect reads it too (it named xz and stopped, before).
    let j: Value =
        serde_json::from_str(&ok(forge().arg("inspect").arg(&xz).arg("--json"))).unwrap();
    assert_eq!(j["partitions"].as_array().unwrap().len(), 3, "{j}");
}

#[test]
fn flash_verify_reads_a_card_mounted_read_only_and_points_at_except_state() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let img = raw_efi(d.path(), 512);
    let (_f, lo) = sparse_device(d.path(), "card", len(&img) + (256 << 20));
    ok(flash()
        .arg(&img)
        .arg(&lo.dev)
        .args(["--yes", "--allow-non-removable", "--fill"]));
    let parts = lo.partitions();
    let verify = |extra: &[&str]| {
        flash()
            .arg("verify")
            .arg(&img)
            .arg(&lo.dev)
            .arg("--allow-non-removable")
            .args(extra)
            .output()
            .unwrap()
    };
    let o = verify(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("--except-state"), "{err}");
    {
        let m = tempfile::tempdir().unwrap();
        ok(Command::new("mount")
            .args(["-o", "ro"])
            .arg(&parts[1])
            .arg(m.path()));
        let o = verify(&["--except-state"]);
        let _ = Command::new("umount").arg(m.path()).status();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let m = tempfile::tempdir().unwrap();
    ok(Command::new("mount").arg(&parts[2]).arg(m.path()));
    let o = verify(&["--except-state"]);
    let _ = Command::new("umount").arg(m.path()).status();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("refusing to verify") && !err.contains("write"),
        "{err}"
    );
}

/// A flashed card (its backing file and loop device) and a second flash
/// of it held with its tables wiped (`NIXFORGE_FLASH_PAUSE=body`): the
/// child, the stderr lines it has said, and the rest of its stderr.
struct Held {
    f: PathBuf,
    lo: Loop,
    child: std::process::Child,
    seen: Vec<String>,
    rest: std::io::Lines<std::io::BufReader<std::process::ChildStderr>>,
    _d: tempfile::TempDir,
}

fn flashed_then_held_at_body() -> Held {
    use std::io::{BufRead, BufReader};
    let d = tempfile::tempdir().unwrap();
    let img = raw_efi(d.path(), 512);
    let (f, lo) = sparse_device(d.path(), "card", len(&img));
    let args = ["--yes", "--allow-non-removable"];
    ok(flash().arg(&img).arg(&lo.dev).args(args));
    assert!(
        Path::new(&format!("{}p1", lo.dev)).exists(),
        "a flashed card has its nodes"
    );
    let mut child = flash()
        .arg(&img)
        .arg(&lo.dev)
        .args(args)
        .env("NIXFORGE_FLASH_PAUSE", "body")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut rest = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    for l in rest.by_ref().map_while(Result::ok) {
        let at = l.contains("paused at body");
        seen.push(l);
        if at {
            break;
        }
    }
    assert!(
        seen.iter().any(|l| l.contains("paused at body")),
        "{seen:?}"
    );
    Held {
        f,
        lo,
        child,
        seen,
        rest,
        _d: d,
    }
}

#[test]
fn flash_list_says_when_partition_nodes_outlive_a_killed_flash() {
    let _g = privileged();
    let mut h = flashed_then_held_at_body();
    let lo = &h.lo;
    let line = |list: &str| -> String {
        list.lines()
            .find(|l| l.starts_with(&format!("{} ", lo.dev)))
            .unwrap_or_else(|| panic!("{} not listed:\n{list}", lo.dev))
            .to_string()
    };
    // Killed while held: the table is wiped, the kernel's nodes stay.
    h.child.kill().unwrap();
    h.child.wait().unwrap();
    let after = line(&ok(flash().args(["list", "--all"])));
    assert!(
        after.contains("p1") && after.contains("stale: the disk holds no partition table"),
        "{after}"
    );
}

#[test]
fn an_interrupted_flash_leaves_no_partition_nodes_behind() {
    let _g = privileged();
    let mut h = flashed_then_held_at_body();
    let p1 = format!("{}p1", h.lo.dev);
    ok(Command::new("kill").args(["-INT", &h.child.id().to_string()]));
    // Its last words are read (a closed pipe would fail its stderr).
    h.seen.extend(h.rest.by_ref().map_while(Result::ok));
    let st = h.child.wait().unwrap();
    assert!(
        h.seen.iter().any(|l| l.contains("stopped by SIGINT")),
        "{:?}",
        h.seen
    );
    assert_eq!(st.code(), Some(130));
    assert!(no_table_left(&h.f));
    assert!(!Path::new(&p1).exists(), "{p1} outlived the wiped table");
}

#[test]
fn the_report_names_the_machine_id_and_the_probe_and_a_json_refusal_is_json() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let img = raw_efi(d.path(), 512);
    let devs = two_devices(d.path());
    let id = files(d.path(), "one", &[("hostname", "one\n")]);
    let o = flash()
        .arg(&img)
        .arg(&devs[0].1.dev)
        .args(["--identity", id.to_str().unwrap(), "--probe", "--json"])
        .args(["--yes", "--allow-non-removable"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    let m = r[0]["machine_id"].as_str().unwrap();
    assert!(
        m.len() == 32 && m.bytes().all(|b| b.is_ascii_hexdigit()),
        "{m}"
    );
    assert_eq!(r[0]["probe"], "passed");
    let part = format!("{}p3", devs[0].1.dev);
    let _ = Command::new("partx").args(["-a", &devs[0].1.dev]).output();
    let on_card = ok(Command::new("debugfs").args(["-R", "cat /identity/machine-id", &part]));
    assert_eq!(on_card.trim(), m);
    // Refused: still one JSON object on stdout.
    let o = flash()
        .arg(&img)
        .arg(d.path().join("nonexistent"))
        .args(["--json", "--yes"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["refused"], true);
    assert!(v["error"].as_str().unwrap().contains("nonexistent"), "{v}");
}
