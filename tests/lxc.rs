//! forge lxc (issue 29): a system as an LXC image, rootfs.tar.xz and
//! metadata.tar.xz, judged by xz, GNU tar, PyYAML and Nix: the rootfs
//! extracts to the closure (diff -r against the store) with a Nix database
//! `nix-store --verify --check-contents` accepts and /sbin/init; the
//! metadata names the architecture and creation date; the same bytes on
//! one thread or all; bad output refused with one line, nothing left.

use nixforge_tests::*;
use std::path::Path;
use std::process::Command;

const EPOCH: &str = "1700000000";

fn forge_lxc(out: &Path, threads: Option<&str>, extra: &[&str]) -> serde_json::Value {
    let sys = system("x86_64");
    let mut c = forge();
    c.arg("lxc")
        .arg(&sys.result)
        .arg("--root")
        .arg(&sys.root)
        .arg("-o")
        .arg(out)
        .arg("--json")
        .args(extra)
        .env("SOURCE_DATE_EPOCH", EPOCH);
    if let Some(n) = threads {
        c.env("RAYON_NUM_THREADS", n);
    }
    serde_json::from_str(&ok(&mut c)).unwrap()
}

#[test]
fn lxc_tarballs_hold_the_closure_with_its_database_and_the_metadata() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("lxc");
    let report = forge_lxc(&out, None, &[]);
    assert_eq!(report["architecture"], "x86_64");
    for f in ["rootfs.tar.xz", "metadata.tar.xz"] {
        ok(Command::new("xz").arg("-t").arg(out.join(f)));
    }
    assert_eq!(
        ok(Command::new("tar")
            .arg("-tJf")
            .arg(out.join("metadata.tar.xz")))
        .trim(),
        "metadata.yaml"
    );
    let m = d.path().join("m");
    std::fs::create_dir(&m).unwrap();
    ok(Command::new("tar")
        .arg("-xJf")
        .arg(out.join("metadata.tar.xz"))
        .arg("-C")
        .arg(&m));
    let facts = ok(Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, yaml\n\
             y = yaml.safe_load(open(sys.argv[1]))\n\
             print(y['architecture'], y['creation_date'], y['properties']['os'])",
        )
        .arg(m.join("metadata.yaml")));
    assert_eq!(facts.trim(), format!("x86_64 {EPOCH} nixos"));

    let r = d.path().join("r");
    std::fs::create_dir(&r).unwrap();
    ok(Command::new("tar")
        .arg("-xJf")
        .arg(out.join("rootfs.tar.xz"))
        .arg("-C")
        .arg(&r));
    let sys = system("x86_64");
    let toplevel = report["toplevel"].as_str().unwrap();
    assert_eq!(
        std::fs::read_link(r.join("sbin/init")).unwrap(),
        Path::new(&format!("{toplevel}/init"))
    );
    let closure = sys.nix_store(&["-qR", toplevel]);
    let paths: Vec<&str> = closure.lines().collect();
    assert!(paths.len() > 3, "{closure}");
    for p in &paths {
        let rel = p.trim_start_matches('/');
        diff_tree(&sys.root.join(rel), &r.join(rel), &[]);
    }
    let mut stored: Vec<String> = dir_entries(&r.join("nix/store"));
    stored.sort();
    let mut want: Vec<String> = paths
        .iter()
        .map(|p| p.trim_start_matches("/nix/store/").to_string())
        .collect();
    want.sort();
    assert_eq!(stored, want, "the closure and nothing else");
    // The Nix database in the tarball: the store as Nix sees it.
    let v = Command::new("nix-store")
        .arg("--store")
        .arg(&r)
        .args(["--verify", "--check-contents"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&v.stderr);
    assert!(v.status.success() && !err.contains("modified"), "{err}");
    let q = ok(Command::new("nix-store")
        .arg("--store")
        .arg(&r)
        .args(["-qR", toplevel]));
    assert_eq!(q.lines().count(), paths.len(), "{q}");
}

#[test]
fn lxc_tarballs_are_the_same_bytes_on_one_thread_or_all() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    // Two xz blocks of 8 MiB: one per core, or both on one.
    forge_lxc(&a, None, &["--xz-level", "1"]);
    forge_lxc(&b, Some("1"), &["--xz-level", "1"]);
    for f in ["rootfs.tar.xz", "metadata.tar.xz"] {
        assert_eq!(sha256_file(&a.join(f)), sha256_file(&b.join(f)), "{f}");
    }
}

#[test]
fn lxc_output_that_is_a_file_is_refused_and_nothing_is_left() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("plain");
    std::fs::write(&file, "x").unwrap();
    let sys = system("x86_64");
    let e = fails(
        forge()
            .arg("lxc")
            .arg(&sys.result)
            .arg("--root")
            .arg(&sys.root)
            .arg("-o")
            .arg(&file),
    );
    assert!(the_error(&e).contains("plain"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert_eq!(dir_entries(d.path()), ["plain"]);
    // A system that is not one: refused before anything is made.
    let out = d.path().join("out");
    let e = fails(
        forge()
            .arg("lxc")
            .arg(d.path().join("nope"))
            .arg("-o")
            .arg(&out),
    );
    assert!(the_error(&e).contains("nope"), "{e}");
    assert!(!out.exists());
}
