//! `forge closure` against Nix itself (issue 2): closures, NAR hashes and
//! sizes, references, registration, and every bad input the issue names.

use nixforge_tests::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

fn closure_json(system: &Path, root: &Path, extra: &[&str]) -> Value {
    let out = ok(forge()
        .arg("closure")
        .arg(system)
        .arg("--root")
        .arg(root)
        .arg("--json")
        .args(extra));
    serde_json::from_str(&out).unwrap()
}

fn paths_of(c: &Value) -> BTreeMap<String, Value> {
    c["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["path"].as_str().unwrap().to_string(), p.clone()))
        .collect()
}

fn refs_of(p: &Value) -> BTreeSet<String> {
    p["references"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect()
}

fn lines(s: &str) -> BTreeSet<String> {
    s.lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

fn check_against_nix(arch: &'static str) {
    // Taking Nix's recorded hashes (the NAR sizes from metadata), and
    // hashing every NAR ourselves: both as `nix-store --dump` gives them.
    for extra in [&[][..], &["--verify-nar"][..]] {
        check_against_nix_with(arch, extra);
    }
}

fn check_against_nix_with(arch: &'static str, extra: &[&str]) {
    let sys = system(arch);
    let c = closure_json(&sys.result, &sys.root, extra);
    assert_eq!(c["source"], "nix-db");
    assert_eq!(c["toplevel"], sys.toplevel.as_str());
    let ours = paths_of(&c);
    let nix = lines(&sys.nix_store(&["-qR", &sys.toplevel]));
    assert_eq!(
        ours.keys().cloned().collect::<BTreeSet<_>>(),
        nix,
        "closure differs from nix-store -qR"
    );
    for (path, p) in &ours {
        // narHash and narSize as `nix-store --dump` gives them.
        // --dump serializes a file system path: give it the physical one.
        let phys = sys.physical(path);
        let dump = sh(&format!(
            "nix-store --dump {} | sha256sum | cut -d' ' -f1",
            phys.display()
        ));
        let size: u64 = sh(&format!("nix-store --dump {} | wc -c", phys.display()))
            .trim()
            .parse()
            .unwrap();
        let b32 =
            ok(Command::new("nix-hash").args(["--type", "sha256", "--to-base32", dump.trim()]));
        assert_eq!(
            p["narHash"],
            format!("sha256:{}", b32.trim()),
            "narHash of {path}"
        );
        assert_eq!(p["narSize"], size, "narSize of {path}");
        let nix_refs = lines(&sys.nix_store(&["-q", "--references", path]));
        assert_eq!(refs_of(p), nix_refs, "references of {path}");
    }
}

#[test]
fn recorded_hashes_are_taken_sizes_checked_and_verify_nar_hashes() {
    let sys = system("x86_64");
    let copy = copy_store(&sys, true, false);
    let boot: Value = serde_json::from_slice(
        &std::fs::read(sys.physical(&format!("{}/boot.json", sys.toplevel))).unwrap(),
    )
    .unwrap();
    let initrd = boot["org.nixos.bootspec.v1"]["initrd"]
        .as_str()
        .unwrap()
        .to_string();
    let f = copy.path().join(initrd.trim_start_matches('/'));
    // One byte changed, the size kept: the recorded hash is taken as it is
    // (nothing is read), and --verify-nar finds the change.
    let mut b = std::fs::read(&f).unwrap();
    b[100] ^= 0xFF;
    std::fs::write(&f, &b).unwrap();
    let c = closure_json(&sys.result, copy.path(), &[]);
    let theirs = closure_json(&sys.result, &sys.root, &[]);
    assert_eq!(c["paths"], theirs["paths"]);
    let e = fails(
        forge()
            .arg("closure")
            .arg(&sys.result)
            .arg("--root")
            .arg(copy.path())
            .arg("--verify-nar"),
    );
    let store_path = initrd.rsplit_once('/').unwrap().0;
    let e = the_error(&e);
    assert!(
        e.contains(store_path) && e.contains("contents hash to"),
        "{e}"
    );
    // A size that changed is found without hashing (a NAR pads contents
    // to 8 bytes: grow the file by 8).
    b.extend([0u8; 8]);
    std::fs::write(&f, &b).unwrap();
    let e = fails(
        forge()
            .arg("closure")
            .arg(&sys.result)
            .arg("--root")
            .arg(copy.path()),
    );
    let e = the_error(&e);
    assert!(
        e.contains(store_path) && e.contains("its NAR is") && e.contains("records"),
        "{e}"
    );
    // forge image takes the recorded sizes and holds each path's to the
    // tree it reads for the root (the closure walked once, not twice):
    // the same refusal, and nothing written.
    let out = tempfile::tempdir().unwrap();
    let e = fails(
        forge()
            .arg("image")
            .arg(&sys.result)
            .arg("--root")
            .arg(copy.path())
            .args(["--format", "raw-efi", "-o"])
            .arg(out.path().join("x.img")),
    );
    let e = the_error(&e);
    assert!(
        e.contains(store_path) && e.contains("its NAR is") && e.contains("records"),
        "{e}"
    );
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}

#[test]
fn x86_64_closure_hashes_sizes_and_references_equal_nix() {
    check_against_nix("x86_64");
}

#[test]
fn aarch64_closure_hashes_sizes_and_references_equal_nix() {
    check_against_nix("aarch64");
}

#[test]
fn registration_loads_into_a_fresh_store_and_verifies() {
    let sys = system("x86_64");
    let reg = ok(forge()
        .arg("closure")
        .arg(&sys.result)
        .arg("--root")
        .arg(&sys.root)
        .arg("--registration"));
    // A fresh store holding only the closure's files (no database yet).
    let fresh = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(fresh.path().join("nix/store")).unwrap();
    for p in lines(&sys.nix_store(&["-qR", &sys.toplevel])) {
        ok(Command::new("cp")
            .arg("-a")
            .arg(sys.physical(&p))
            .arg(fresh.path().join("nix/store/")));
    }
    let (ok_, err) = load_db_and_verify(fresh.path(), reg.as_bytes());
    assert!(ok_ && !err.contains("modified"), "verify failed: {err}");
    let q = ok(Command::new("nix-store")
        .arg("--store")
        .arg(fresh.path())
        .args(["-qR", &sys.toplevel]));
    assert_eq!(lines(&q), lines(&sys.nix_store(&["-qR", &sys.toplevel])));
    // The judge can fail: corrupt one file and verify must complain.
    let lib = lines(&q)
        .into_iter()
        .find(|p| p.contains("fixture-lib"))
        .unwrap();
    let f = fresh
        .path()
        .join(lib.trim_start_matches('/'))
        .join("lib/libfixture.so");
    std::fs::write(&f, "tampered\n").unwrap();
    let v = Command::new("nix-store")
        .arg("--store")
        .arg(fresh.path())
        .args(["--verify", "--check-contents"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&v.stderr);
    assert!(
        !v.status.success() || err.contains("modified"),
        "verify missed corruption: {err}"
    );
}

#[test]
fn scanning_finds_the_references_nix_found() {
    let sys = system("x86_64");
    let copy = copy_store(&sys, false, true);
    let c = closure_json(Path::new(&sys.toplevel), copy.path(), &[]);
    assert_eq!(c["source"], "scan");
    let ours = paths_of(&c);
    assert_eq!(
        ours.keys().cloned().collect::<BTreeSet<_>>(),
        lines(&sys.nix_store(&["-qR", &sys.toplevel]))
    );
    for (path, p) in &ours {
        assert_eq!(
            refs_of(p),
            lines(&sys.nix_store(&["-q", "--references", path])),
            "{path}"
        );
        assert_eq!(
            p["narHash"],
            sys.nix_store(&["-q", "--hash", path]).trim(),
            "{path}"
        );
    }
    // The blob's only reference sits inside binary bytes.
    let blob = ours
        .iter()
        .find(|(k, _)| k.contains("fixture-blob"))
        .unwrap()
        .1;
    assert!(refs_of(blob).iter().any(|r| r.contains("fixture-data")));
}

#[test]
fn closure_info_is_used_when_given() {
    let sys = system("x86_64");
    let ci = tempfile::tempdir().unwrap();
    let paths = sys.nix_store(&["-qR", &sys.toplevel]);
    std::fs::write(ci.path().join("store-paths"), &paths).unwrap();
    let mut args = vec!["--dump-db"];
    args.extend(paths.lines());
    std::fs::write(ci.path().join("registration"), sys.nix_store(&args)).unwrap();
    let c = closure_json(
        &sys.result,
        &sys.root,
        &["--closure-info", ci.path().to_str().unwrap()],
    );
    assert_eq!(c["source"], "closure-info");
    assert_eq!(
        paths_of(&c).keys().cloned().collect::<BTreeSet<_>>(),
        lines(&paths)
    );
}

#[test]
fn dangling_symlink_is_serialized_not_followed() {
    let sys = system("x86_64");
    let c = closure_json(&sys.result, &sys.root, &[]);
    let (blob, p) = paths_of(&c)
        .into_iter()
        .find(|(k, _)| k.contains("fixture-blob"))
        .unwrap();
    let link = sys.physical(&blob).join("share/dangling");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(!link.exists(), "fixture's link should dangle");
    assert_eq!(p["narHash"], sys.nix_store(&["-q", "--hash", &blob]).trim());
}

#[test]
fn corpus_closure_equals_closure_paths() {
    // A 48 MiB corpus keeps the test quick; `make bench` reads the 2 GiB one.
    let d = tempfile::tempdir().unwrap();
    let script = workspace().join("../shared/bench/make-store-corpus.py");
    ok(Command::new("python3")
        .arg(&script)
        .arg(d.path())
        .args(["--mib", "48"]));
    let top = std::fs::read_to_string(d.path().join("toplevel")).unwrap();
    let c = closure_json(Path::new(top.trim()), d.path(), &[]);
    assert_eq!(c["source"], "scan");
    let want = lines(&std::fs::read_to_string(d.path().join("closure-paths")).unwrap());
    assert!(want.len() > 10, "corpus too small to mean anything");
    assert_eq!(paths_of(&c).keys().cloned().collect::<BTreeSet<_>>(), want);
}

// ---- bad input: one line, naming the file/path, non-zero exit ----

fn closure_err(system: &Path, root: &Path) -> String {
    fails(forge().arg("closure").arg(system).arg("--root").arg(root))
}

#[test]
fn missing_boot_json_is_synthesized_from_the_toplevel() {
    let sys = system("x86_64");
    let copy = copy_store(&sys, false, true);
    let top = copy.path().join(sys.toplevel.trim_start_matches('/'));
    std::fs::remove_file(top.join("boot.json")).unwrap();
    let out = forge()
        .arg("closure")
        .arg(&sys.toplevel)
        .args(["--root"])
        .arg(copy.path())
        .arg("--json")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bootspec synthesized"));
    let c: Value = serde_json::from_slice(&out.stdout).unwrap();
    let orig = closure_json(&sys.result, &sys.root, &[]);
    for f in [
        "kernel",
        "initrd",
        "init",
        "kernelParams",
        "system",
        "toplevel",
    ] {
        assert_eq!(c["bootspec"]["spec"][f], orig["bootspec"]["spec"][f], "{f}");
    }
    assert_eq!(c["bootspec"]["synthesized"], true);
    // Without kernel either, it is an error naming boot.json and what is missing.
    std::fs::remove_file(top.join("kernel")).unwrap();
    let e = closure_err(Path::new(&sys.toplevel), copy.path());
    let e = the_error(&e);
    assert!(
        e.contains("boot.json: missing") && e.contains("kernel"),
        "{e}"
    );
}

fn with_boot_json(content: &str) -> String {
    let sys = system("x86_64");
    let copy = copy_store(&sys, false, true);
    let bj = copy
        .path()
        .join(sys.toplevel.trim_start_matches('/'))
        .join("boot.json");
    std::fs::remove_file(&bj).unwrap(); // a hard link: do not write through it
    std::fs::write(&bj, content).unwrap();
    closure_err(Path::new(&sys.toplevel), copy.path())
}

#[test]
fn malformed_boot_json_names_the_file() {
    let e = with_boot_json("{ \"org.nixos.bootspec.v1\": ");
    let e = the_error(&e);
    assert!(e.contains("boot.json: malformed JSON"), "{e}");
}

#[test]
fn wrong_bootspec_version_names_what_was_found() {
    let e = with_boot_json(r#"{"org.nixos.bootspec.v2": {}}"#);
    let e = the_error(&e);
    assert!(
        e.contains("boot.json") && e.contains("org.nixos.bootspec.v2") && e.contains("v1"),
        "{e}"
    );
}

#[test]
fn missing_bootspec_field_is_named() {
    let e = with_boot_json(r#"{"org.nixos.bootspec.v1": {"system": "x86_64-linux"}}"#);
    assert!(
        the_error(&e).contains("org.nixos.bootspec.v1.init: missing"),
        "{e}"
    );
}

#[test]
fn system_that_is_not_a_store_path_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let e = closure_err(d.path(), Path::new("/"));
    let e = the_error(&e);
    assert!(
        e.contains("not a store path") && e.contains(&d.path().display().to_string()),
        "{e}"
    );
}

#[test]
fn missing_referenced_path_names_both_paths() {
    let sys = system("x86_64");
    let nix = lines(&sys.nix_store(&["-qR", &sys.toplevel]));
    let lib = nix
        .iter()
        .find(|p| p.contains("fixture-lib"))
        .unwrap()
        .clone();
    let hello = nix
        .iter()
        .find(|p| p.contains("fixture-hello"))
        .unwrap()
        .clone();
    // With the Nix database the reference is known: an error naming both.
    let copy = copy_store(&sys, true, true);
    ok(Command::new("rm")
        .arg("-rf")
        .arg(copy.path().join(lib.trim_start_matches('/'))));
    let e = closure_err(Path::new(&sys.toplevel), copy.path());
    let e = the_error(&e);
    assert!(
        e.contains(&hello) && e.contains(&lib) && e.contains("not in the store"),
        "{e}"
    );
    // Scanning, as Nix, counts only paths present; the dangling mention is
    // a warning naming both paths.
    let copy = copy_store(&sys, false, true);
    ok(Command::new("rm")
        .arg("-rf")
        .arg(copy.path().join(lib.trim_start_matches('/'))));
    let out = forge()
        .arg("closure")
        .arg(&sys.toplevel)
        .arg("--root")
        .arg(copy.path())
        .arg("--json")
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines()
            .any(|l| l.starts_with("warning: ") && l.contains(&hello) && l.contains(&lib)),
        "{err}"
    );
    let c: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!paths_of(&c).contains_key(&lib));
}

#[test]
fn unreadable_file_is_named() {
    let sys = system("x86_64");
    let copy = copy_store(&sys, false, false);
    let nix = lines(&sys.nix_store(&["-qR", &sys.toplevel]));
    let data = nix.iter().find(|p| p.contains("fixture-data")).unwrap();
    let f = copy
        .path()
        .join(data.trim_start_matches('/'))
        .join("share/self.txt");
    sh(&format!(
        "chmod 755 {}; chmod 000 {}",
        copy.path().display(),
        f.display()
    ));
    // As root everything is readable: run forge as nobody.
    let e = fails(
        Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(bin("forge"))
            .arg("closure")
            .arg(&sys.toplevel)
            .arg("--root")
            .arg(copy.path()),
    );
    let e = the_error(&e);
    assert!(
        e.contains(&f.display().to_string()) && e.contains("Permission denied"),
        "{e}"
    );
}
