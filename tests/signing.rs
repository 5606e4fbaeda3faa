//! Signed images (issue 25): systemd-boot and the UKIs signed for Secure
//! Boot (`--secure-boot-key`), judged by sbverify and by OVMF enforcing
//! Secure Boot with Debian's snakeoil keys; the root hash signed in a
//! root-verity-sig partition (`--verity-key`), judged by `openssl cms
//! -verify` and systemd-dissect; keys that cannot sign refused.

use nixforge_tests::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const UKI: &str = "::/EFI/Linux/nixos-generation-1.efi";

fn signed(dir: &Path, name: &str, extra: &[&str]) -> (PathBuf, Value) {
    let key = snakeoil_key(dir);
    let img = dir.join(name);
    let mut args = vec!["--secure-boot-key", key.to_str().unwrap()];
    args.extend(["--secure-boot-cert", SNAKEOIL_CERT]);
    args.extend(extra);
    let layout = uki_image(&img, &args);
    (img, layout)
}

/// mtools' name for the image's ESP.
fn esp(img: &Path, layout: &Value) -> String {
    format!("{}@@{}", img.display(), layout["partitions"][0]["offset"])
}

fn copy_out(esp: &str, file: &str, to: &Path) {
    ok(Command::new("mcopy").args(["-n", "-i", esp, file]).arg(to));
}

fn sbverify(file: &Path) -> std::process::Output {
    Command::new("sbverify")
        .args(["--cert", SNAKEOIL_CERT])
        .arg(file)
        .output()
        .unwrap()
}

#[test]
fn sbverify_accepts_systemd_boot_under_both_names_and_every_uki() {
    let dir = tempfile::tempdir().unwrap();
    let (img, layout) = signed(dir.path(), "disk.img", &[]);
    let part = esp(&img, &layout);
    for f in [
        "::/EFI/BOOT/BOOTX64.EFI",
        "::/EFI/systemd/systemd-bootx64.efi",
        UKI,
        "::/EFI/Linux/nixos-generation-1-specialisation-rescue.efi",
    ] {
        let out = dir.path().join("pe.efi");
        copy_out(&part, f, &out);
        let v = sbverify(&out);
        assert!(
            v.status.success(),
            "{f}: {}",
            String::from_utf8_lossy(&v.stderr)
        );
        assert!(String::from_utf8_lossy(&v.stdout).contains("Signature verification OK"));
    }
    // Another certificate is not taken for this one.
    let unrelated = dir.path().join("other.pem");
    sh(&format!(
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout /dev/null -out {} -subj /CN=other -days 1 2>/dev/null",
        unrelated.display()
    ));
    let uki = dir.path().join("uki.efi");
    copy_out(&part, UKI, &uki);
    let v = Command::new("sbverify")
        .arg("--cert")
        .arg(&unrelated)
        .arg(&uki)
        .output()
        .unwrap();
    assert!(!v.status.success());
    // Unsigned, sbverify finds no signature.
    let plain = dir.path().join("plain.img");
    let l = uki_image(&plain, &[]);
    copy_out(&esp(&plain, &l), UKI, &uki);
    assert!(!sbverify(&uki).status.success());
    // Same inputs and key, same bytes.
    let (again, _) = signed(dir.path(), "again.img", &[]);
    assert_eq!(sha256_file(&img), sha256_file(&again));
}

#[test]
fn secure_boot_boots_the_signed_image_and_refuses_unsigned_or_changed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (img, layout) = signed(dir.path(), "disk.img", &["--verity"]);
    let b = boot_secure(&img, Duration::from_secs(300));
    assert_eq!(
        b.marker.as_deref(),
        Some("NIXFORGE-BOOT-OK root=ro var=rw table=gpt init=found verity=on read=ok"),
        "serial log:\n{}",
        b.log
    );
    // The same image unsigned: the firmware will not start systemd-boot.
    let plain = dir.path().join("plain.img");
    uki_image(&plain, &["--verity"]);
    let b = boot_secure(&plain, Duration::from_secs(300));
    assert_eq!(b.marker, None, "{}", b.log);
    assert!(
        b.log.contains("Access Denied") || b.log.contains("Security Violation"),
        "{}",
        b.log
    );
    // One byte of the signed UKI changed (in its .linux section): systemd-boot
    // starts, the firmware refuses the UKI.
    let esp = esp(&img, &layout);
    let uki = dir.path().join("uki.efi");
    copy_out(&esp, UKI, &uki);
    let mut bytes = std::fs::read(&uki).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&uki, &bytes).unwrap();
    assert!(
        !sbverify(&uki).status.success(),
        "sbverify takes the changed UKI"
    );
    ok(Command::new("mcopy")
        .args(["-o", "-n", "-i", &esp])
        .arg(&uki)
        .arg(UKI));
    let b = boot_secure(&img, Duration::from_secs(300));
    assert_eq!(b.marker, None, "{}", b.log);
    assert!(
        b.log.contains("Access Denied") || b.log.contains("Security Violation"),
        "{}",
        b.log
    );
}

/// The root-verity-sig partition's JSON.
fn verity_sig(img: &Path, layout: &Value) -> Value {
    let parts = layout["partitions"].as_array().unwrap();
    let p = parts
        .iter()
        .find(|p| p["role"] == "root-verity-sig")
        .expect("a root-verity-sig partition");
    let bytes = std::fs::read(img).unwrap();
    let at = p["offset"].as_u64().unwrap() as usize;
    let part = &bytes[at..at + p["size"].as_u64().unwrap() as usize];
    let end = part.iter().position(|&b| b == 0).unwrap();
    assert!(
        part[end..].iter().all(|&b| b == 0),
        "NUL padding after the JSON"
    );
    serde_json::from_slice(&part[..end]).unwrap()
}

#[test]
fn the_signed_root_hash_verifies_with_openssl_and_systemd_dissect_finds_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = snakeoil_key(dir.path());
    let img = dir.path().join("disk.img");
    let out = ok(forge_image_of(&system("x86_64"))
        .args(["--format", "raw-efi", "--verity", "--json", "--verity-key"])
        .arg(&key)
        .args(["--verity-cert", SNAKEOIL_CERT, "-o"])
        .arg(&img));
    let layout: Value = serde_json::from_str(&out).unwrap();
    let sig = verity_sig(&img, &layout);
    let root = layout["verity"]["root_hash"].as_str().unwrap();
    assert_eq!(sig["rootHash"], root);
    let fp = sh(&format!(
        "openssl x509 -in {SNAKEOIL_CERT} -outform DER | sha256sum"
    ));
    assert_eq!(
        sig["certificateFingerprint"],
        fp.split_whitespace().next().unwrap()
    );
    use base64::Engine;
    let der = base64::engine::general_purpose::STANDARD
        .decode(sig["signature"].as_str().unwrap())
        .unwrap();
    let (p7, content) = (dir.path().join("sig.p7"), dir.path().join("roothash"));
    std::fs::write(&p7, der).unwrap();
    let verify = |text: &str| {
        std::fs::write(&content, text).unwrap();
        Command::new("openssl")
            .args([
                "cms", "-verify", "-binary", "-inform", "DER", "-purpose", "any", "-in",
            ])
            .arg(&p7)
            .arg("-content")
            .arg(&content)
            .args(["-CAfile", SNAKEOIL_CERT, "-out", "/dev/null"])
            .output()
            .unwrap()
    };
    let v = verify(root);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    assert!(!verify(&root.replace('0', "1")).status.success());
    // systemd's own reader of Discoverable Partitions images.
    let dissect = ok(Command::new("systemd-dissect")
        .arg("--json=short")
        .arg(&img));
    for d in ["\"root\"", "\"root-verity\"", "\"root-verity-sig\""] {
        assert!(dissect.contains(d), "{d} missing: {dissect}");
    }
    assert_eq!(
        roles(&layout),
        ["esp", "root", "root-verity", "root-verity-sig", "state"]
    );
}

#[test]
fn keys_that_cannot_sign_are_refused_with_one_line_writing_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let good = snakeoil_key(&keys);
    let other = keys.join("other.key");
    let nosign = keys.join("nosign.pem");
    sh(&format!(
        "cd {} && openssl req -x509 -newkey rsa:2048 -nodes -keyout nosign.key -out nosign.pem -subj /CN=ca -days 1 -addext keyUsage=keyCertSign 2>/dev/null && openssl genpkey -algorithm RSA -out other.key 2>/dev/null",
        keys.display()
    ));
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let img = out.join("disk.img");
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            sb(&other, Path::new(SNAKEOIL_CERT)),
            format!(
                "{} does not match the certificate {SNAKEOIL_CERT}",
                other.display()
            ),
        ),
        (
            sb(&keys.join("nosign.key"), &nosign),
            format!(
                "{}: its key usage does not allow digital signatures",
                nosign.display()
            ),
        ),
        (
            sb(&keys.join("absent.key"), Path::new(SNAKEOIL_CERT)),
            format!("{}: No such file", keys.join("absent.key").display()),
        ),
        (
            sb(Path::new(SNAKEOIL_KEY), Path::new(SNAKEOIL_CERT)),
            format!("{SNAKEOIL_KEY}: the key is encrypted"),
        ),
    ];
    for (args, want) in cases {
        let err = fails(
            forge_image_of(&system("x86_64"))
                .args(["--format", "raw-efi", "--uki", "--uki-stub", STUB])
                .args(&args)
                .arg("-o")
                .arg(&img),
        );
        assert!(the_error(&err).contains(&want), "want {want:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    let err = fails(
        forge_image_of(&system("x86_64"))
            .args(["--format", "raw-efi"])
            .args(sb(&good, Path::new(SNAKEOIL_CERT)))
            .arg("-o")
            .arg(&img),
    );
    assert!(
        the_error(&err).contains("--secure-boot-key goes with --uki"),
        "{err}"
    );
    let err = fails(
        forge_image_of(&system("x86_64"))
            .args(["--format", "raw-efi", "--verity-key"])
            .arg(&good)
            .args(["--verity-cert", SNAKEOIL_CERT, "-o"])
            .arg(&img),
    );
    assert!(
        the_error(&err).contains("--verity-key goes with --verity"),
        "{err}"
    );
    assert_eq!(dir_entries(&out), Vec::<String>::new());
}

fn sb(key: &Path, cert: &Path) -> Vec<String> {
    vec![
        "--secure-boot-key".into(),
        key.display().to_string(),
        "--secure-boot-cert".into(),
        cert.display().to_string(),
    ]
}

/// `forge sign` with the snakeoil key for both signatures.
fn forge_sign(key: &Path, image: &Path, out: &Path) -> Command {
    let mut c = forge();
    c.arg("sign").arg(image).arg("-o").arg(out);
    for flag in ["--secure-boot", "--verity"] {
        c.arg(format!("{flag}-key")).arg(key);
        c.arg(format!("{flag}-cert")).arg(SNAKEOIL_CERT);
    }
    c
}

#[test]
fn forge_sign_after_the_build_makes_the_image_built_with_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    let key = snakeoil_key(dir.path());
    let plain = dir.path().join("plain.img");
    uki_image(&plain, &["--verity"]);
    let mut both = vec!["--verity".to_string()];
    for flag in ["--secure-boot", "--verity"] {
        both.extend([format!("{flag}-key"), key.display().to_string()]);
        both.extend([format!("{flag}-cert"), SNAKEOIL_CERT.to_string()]);
    }
    let built = dir.path().join("built.img");
    uki_image(&built, &both.iter().map(String::as_str).collect::<Vec<_>>());
    let signed = dir.path().join("signed.img");
    let report: Value =
        serde_json::from_str(&ok(forge_sign(&key, &plain, &signed).arg("--json"))).unwrap();
    assert_eq!(report["signed"].as_array().unwrap().len(), 4, "{report}");
    // The image, its bmap and its manifest: those of the image built with the keys.
    for suffix in ["", ".bmap", ".layout.json"] {
        let (a, b) = (with(&built, suffix), with(&signed, suffix));
        assert_eq!(sha256_file(&a), sha256_file(&b), "{}", b.display());
    }
    // bmaptool writes the signed image by its bmap: the same bytes.
    let copy = dir.path().join("copy.img");
    ok(Command::new("bmaptool")
        .args(["copy", "--bmap"])
        .arg(with(&signed, ".bmap"))
        .arg(&signed)
        .arg(&copy));
    assert_eq!(sha256_file(&copy), sha256_file(&signed));
    // Signing in place replaces the image and its sidecars whole.
    ok(&mut forge_sign(&key, &plain, &plain));
    assert_eq!(sha256_file(&plain), sha256_file(&built));
    assert_eq!(
        sha256_file(&with(&plain, ".bmap")),
        sha256_file(&with(&built, ".bmap"))
    );
}

#[test]
fn forge_sign_refuses_what_it_cannot_sign_writing_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let key = snakeoil_key(dir.path());
    let plain = dir.path().join("plain.img.zst");
    uki_image(&plain, &[]);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let signed = out.join("signed.img");
    let err = fails(&mut forge_sign(&key, &plain, &signed));
    assert!(
        the_error(&err).contains("no GPT: forge sign takes a raw"),
        "{err}"
    );
    assert!(the_error(&err).contains("plain.img.zst"), "{err}");
    // No --verity: nothing to sign the root hash in.
    let raw = dir.path().join("raw.img");
    uki_image(&raw, &[]);
    let err = fails(&mut forge_sign(&key, &raw, &signed));
    assert!(
        the_error(&err).contains("build the image with --verity"),
        "{err}"
    );
    let err = fails(forge().arg("sign").arg(&raw).arg("-o").arg(&signed));
    assert!(the_error(&err).contains("nothing to sign with"), "{err}");
    // Type 1 entries (no --uki): nothing would sign their initrds.
    let type1 = dir.path().join("type1.img");
    ok(forge_image_of(&system("x86_64"))
        .args(["--format", "raw-efi", "-o"])
        .arg(&type1));
    let err = fails(
        forge()
            .arg("sign")
            .arg(&type1)
            .arg("-o")
            .arg(&signed)
            .args(["--secure-boot-key"])
            .arg(&key)
            .args(["--secure-boot-cert", SNAKEOIL_CERT]),
    );
    assert!(
        the_error(&err).contains("no Unified Kernel Images on the ESP"),
        "{err}"
    );
    let other = dir.path().join("other.key");
    sh(&format!(
        "openssl genpkey -algorithm RSA -out {} 2>/dev/null",
        other.display()
    ));
    let err = fails(&mut forge_sign(&other, &raw, &signed));
    assert!(
        the_error(&err).contains("does not match the certificate"),
        "{err}"
    );
    assert_eq!(dir_entries(&out), Vec::<String>::new());
}

#[test]
fn inspect_shows_the_signatures_and_verify_checks_the_root_whole() {
    let dir = tempfile::tempdir().unwrap();
    let key = snakeoil_key(dir.path());
    let img = dir.path().join("disk.img");
    uki_image(&img, &["--verity"]);
    ok(&mut forge_sign(&key, &img, &img));
    let text = ok(forge().arg("inspect").arg("--verify").arg(&img));
    let snakeoil = "O=SnakeOil,L=Fort Collins,ST=Colorado,C=US";
    assert!(
        text.contains(&format!("signed yes, by {snakeoil}")),
        "{text}"
    );
    assert!(text.contains("cmdline init=/nix/store/"), "{text}");
    // The partition rows' columns line up, `root-x86-64-verity` and all.
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" at ") && l.contains(" size "))
        .collect();
    let at: Vec<usize> = rows.iter().map(|l| l.find(" at ").unwrap()).collect();
    assert!(rows.len() == 5 && at.iter().all(|&a| a == at[0]), "{text}");
    assert!(
        text.contains("verified over") && text.contains(&format!("signed by {snakeoil}")),
        "{text}"
    );
    let seen: Value = serde_json::from_str(&ok(forge()
        .args(["inspect", "--json", "--verify"])
        .arg(&img)))
    .unwrap();
    assert_eq!(seen["verified"]["root_hash"], seen["verity"]["root_hash"]);
    let esp = &seen["partitions"][0]["boot_entries"];
    let ukis: Vec<&Value> = esp
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["loader"] == "uki")
        .collect();
    assert_eq!(ukis.len(), 2, "{esp}");
    // One data byte of the root changed: --verify names its block, exit 1.
    let root = seen["partitions"][1]["offset"].as_u64().unwrap();
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[(root + 5 * 4096 + 17) as usize] ^= 1;
    let bad = dir.path().join("bad.img");
    std::fs::write(&bad, &bytes).unwrap();
    let err = fails(forge().arg("inspect").arg("--verify").arg(&bad));
    assert!(
        the_error(&err).contains(&format!(
            "root data block 5 (image byte {})",
            root + 5 * 4096
        )),
        "{err}"
    );
    // Without --verify it reads as before (inspect does not hash the root).
    ok(forge().arg("inspect").arg(&bad));
    // A hash device that claims 2^40 data blocks: refused by the root
    // partition's size (it was hashed by its own number, until memory
    // ran out).
    let hash = seen["partitions"][2]["offset"].as_u64().unwrap();
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[(hash + 72) as usize..(hash + 80) as usize].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&bad, &bytes).unwrap();
    let err = fails(forge().arg("inspect").arg("--verify").arg(&bad));
    assert!(
        the_error(&err).contains(&format!(
            "the hash device at offset {hash} covers 1099511627776 blocks of 4096 bytes, more than the root partition's"
        )),
        "{err}"
    );
}

/// A Nix key pair made by Nix itself, into `dir`: (secret key file,
/// public key).
fn nix_keys(dir: &Path) -> (PathBuf, String) {
    let (sk, pk) = nix_keys_named(dir, "ci.example-1");
    (sk, std::fs::read_to_string(&pk).unwrap())
}

#[test]
fn a_nix_key_signs_the_layout_manifest_as_openssl_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (sk, pk) = nix_keys(dir.path());
    let img = dir.path().join("disk.img");
    ok(forge_image_of(&system("x86_64"))
        .args(["--format", "raw-efi", "-o"])
        .arg(&img));
    let manifest = with(&img, ".layout.json");
    let m: Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    assert_eq!(m["bmap_sha256"], sha256_file(&with(&img, ".bmap")));
    assert_eq!(m["toplevel"], system("x86_64").toplevel);
    let before = sha256_file(&img);
    let out = ok(forge().arg("sign").arg(&img).arg("--key").arg(&sk));
    assert!(out.contains("with ci.example-1"), "{out}");
    assert_eq!(
        sha256_file(&img),
        before,
        "--key alone leaves the image as it is"
    );
    let sig = std::fs::read_to_string(with(&img, ".sig")).unwrap();
    assert!(
        sig.starts_with("ci.example-1:") && sig.ends_with('\n'),
        "{sig}"
    );
    assert!(openssl_verifies(dir.path(), &pk, &manifest, &sig));
    // The judge is not blind: the manifest edited by one byte does not verify.
    let edited = dir.path().join("edited.json");
    assert!(std::fs::read_to_string(&manifest)
        .unwrap()
        .contains("\"gpt\""));
    std::fs::write(
        &edited,
        std::fs::read_to_string(&manifest)
            .unwrap()
            .replacen("\"gpt\"", "\"GPT\"", 1),
    )
    .unwrap();
    assert!(!openssl_verifies(dir.path(), &pk, &edited, &sig));
    // forge inspect names the key, and checks it against trusted keys.
    let text = ok(forge().arg("inspect").arg(&img));
    assert!(text.contains("by ci.example-1: not checked"), "{text}");
    let pk_file = dir.path().join("ci.example-1.pk");
    let text = ok(forge()
        .arg("inspect")
        .arg(&img)
        .arg("--trust")
        .arg(&pk_file));
    assert!(
        text.contains("by ci.example-1: verified with a trusted key"),
        "{text}"
    );
    let other = tempfile::tempdir().unwrap();
    nix_keys(other.path());
    let err = fails(
        forge()
            .arg("inspect")
            .arg(&img)
            .arg("--trust")
            .arg(other.path().join("ci.example-1.pk")),
    );
    assert!(
        the_error(&err).contains("not a signature of")
            && the_error(&err).contains("by the trusted key \"ci.example-1\""),
        "{err}"
    );
    // Signing PE files with --key too: the new image's manifest is signed.
    let key = snakeoil_key(dir.path());
    let uki = dir.path().join("uki.img");
    uki_image(&uki, &[]);
    let signed = dir.path().join("signed.img");
    ok(forge()
        .arg("sign")
        .arg(&uki)
        .arg("-o")
        .arg(&signed)
        .arg("--key")
        .arg(&sk)
        .arg("--secure-boot-key")
        .arg(&key)
        .args(["--secure-boot-cert", SNAKEOIL_CERT]));
    let sig = std::fs::read_to_string(with(&signed, ".sig")).unwrap();
    assert!(openssl_verifies(
        dir.path(),
        &pk,
        &with(&signed, ".layout.json"),
        &sig
    ));
    // forge image over a signed image drops the signature of the old manifest.
    ok(forge_image_of(&system("x86_64"))
        .args(["--format", "raw-efi", "-o"])
        .arg(&img));
    assert!(!with(&img, ".sig").exists());
}

#[test]
fn manifest_signing_refuses_wrong_keys_and_manifests_writing_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (sk, pk) = nix_keys(dir.path());
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let img = out.join("disk.img");
    ok(forge_image_of(&system("x86_64"))
        .args(["--format", "raw-efi", "-o"])
        .arg(&img));
    let before = dir_entries(&out);
    // The public key given as the secret one: the format wanted is named.
    let pub_file = dir.path().join("ci.example-1.pk");
    let err = fails(forge().arg("sign").arg(&img).arg("--key").arg(&pub_file));
    assert!(
        the_error(&err).contains("not a Nix secret key, NAME:BASE64 of 64 bytes"),
        "{err}"
    );
    assert!(!pk.is_empty());
    let err = fails(
        forge()
            .arg("sign")
            .arg(&img)
            .arg("--key")
            .arg(&sk)
            .arg("-o")
            .arg(out.join("x.img")),
    );
    assert!(the_error(&err).contains("drop -o"), "{err}");
    // A manifest of another image beside this one.
    let other = dir.path().join("other.img");
    ok(forge_image_of(&system("x86_64"))
        .args(["--format", "raw-efi", "--seed", "other", "-o"])
        .arg(&other));
    std::fs::copy(with(&other, ".layout.json"), with(&img, ".layout.json")).unwrap();
    let err = fails(forge().arg("sign").arg(&img).arg("--key").arg(&sk));
    assert!(the_error(&err).contains("describes another image"), "{err}");
    assert_eq!(dir_entries(&out), before, "no IMAGE.sig");
}
