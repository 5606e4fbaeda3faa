//! Signed images from CI to the card (issue 26): `forge image --sign`
//! with a key Nix made, `flash --trust` on loop devices. Every bad input
//! is refused before the first byte (the device keeps its old bytes) or,
//! found while writing, stops before its range reaches the device, with
//! no table left that anything would use.

use nixforge_tests::flashing::*;
use nixforge_tests::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A signed raw-efi image `name` of the x86_64 fixture in `dir`, forged
/// with `seed` (`.zst` names make a zstd one).
fn signed(dir: &Path, name: &str, seed: &str, sk: &Path) -> PathBuf {
    let img = dir.join(name);
    ok(forge_image_of(&system("x86_64"))
        .args(["--format", "raw-efi", "--seed", seed, "--sign"])
        .arg(sk)
        .arg("-o")
        .arg(&img));
    img
}

/// A stale disk (0xFF) on a loop device, as large as `img`'s raw bytes.
struct Card {
    backing: PathBuf,
    before: String,
    lo: Loop,
}

fn card(dir: &Path, size: u64) -> Card {
    let backing = (0..)
        .map(|i| dir.join(format!("card{i}")))
        .find(|p| !p.exists())
        .expect("a free name");
    stale_file(&backing, size);
    Card {
        before: sha256_file(&backing),
        lo: Loop::attach(&backing, &[]),
        backing,
    }
}

fn flash_to(img: &Path, c: &Card, extra: &[&std::ffi::OsStr]) -> std::process::Output {
    flash()
        .arg(img)
        .arg(&c.lo.dev)
        .args(["--yes", "--allow-non-removable"])
        .args(extra)
        .output()
        .unwrap()
}

/// Refused with exit 2, one line holding every `want`; not a byte written.
fn refused_before_writing(img: &Path, c: &Card, extra: &[&std::ffi::OsStr], want: &[&str]) {
    let out = flash_to(img, c, extra);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{want:?}: {err}");
    let line = the_error(&err);
    for w in want {
        assert!(line.contains(w), "want {w:?} in: {line}");
    }
    assert_eq!(
        sha256_file(&c.backing),
        c.before,
        "{want:?}: nothing written"
    );
}

/// A key pair, two images it signed (`disk.img`, `b.img`) and a card as
/// large as the first: (secret, public, disk.img, b.img, card).
fn two_signed(dir: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf, Card) {
    let (sk, pk) = nix_keys_named(dir, "ci.example-1");
    let img = signed(dir, "disk.img", "a", &sk);
    let b = signed(dir, "b.img", "b", &sk);
    let c = card(dir, len(&img));
    (sk, pk, img, b, c)
}

fn os<P: AsRef<std::ffi::OsStr> + ?Sized>(p: &P) -> &std::ffi::OsStr {
    p.as_ref()
}

#[test]
fn a_signed_image_is_written_verified_and_its_card_checked_later() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let (sk, pk) = nix_keys_named(d.path(), "ci.example-1");
    let img = signed(d.path(), "disk.img", "a", &sk);
    // The same bytes forge sign --key makes after the build.
    let sig = std::fs::read_to_string(with(&img, ".sig")).unwrap();
    std::fs::remove_file(with(&img, ".sig")).unwrap();
    ok(forge().arg("sign").arg(&img).arg("--key").arg(&sk));
    assert_eq!(std::fs::read_to_string(with(&img, ".sig")).unwrap(), sig);
    let c = card(d.path(), len(&img));
    let out = flash_to(&img, &c, &[os("--trust"), os(&pk), os("--json")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r[0]["signed"]["key"], "ci.example-1", "{r}");
    assert_eq!(r[0]["signed"]["anchor"], pk.to_str().unwrap());
    assert_eq!(r[0]["signed"]["version"], "25.05.fixture", "{r}");
    assert!(r[0]["report"]["verified"].as_u64().unwrap() > 0, "{r}");
    ok(Command::new("sgdisk").arg("-v").arg(&c.lo.dev));
    // Later: the card against the signed image, the key from a directory.
    let keys = d.path().join("trusted-keys.d");
    std::fs::create_dir(&keys).unwrap();
    std::fs::copy(&pk, keys.join("ci.pub")).unwrap();
    let out = ok(flash()
        .args(["verify", "--allow-non-removable", "--trusted-keys"])
        .arg(&keys)
        .arg(&img)
        .arg(&c.lo.dev)
        .stderr(std::process::Stdio::piped()));
    assert!(out.contains("matches"), "{out}");
    // A .zst signed after its build (forge reads only its first MiB) and
    // flashed with its own sidecars.
    let zst = d.path().join("z.img.zst");
    ok(forge_image_of(&system("x86_64"))
        .args(["--format", "raw-efi", "--seed", "a", "-o"])
        .arg(&zst));
    ok(forge().arg("sign").arg(&zst).arg("--key").arg(&sk));
    let out = flash_to(&zst, &c, &[os("--trust"), os(&pk)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The same key as an OpenSSH anchor: ssh-keygen reads the line we make.
    let ssh = d.path().join("ci_ed25519.pub");
    std::fs::write(&ssh, openssh_line(&std::fs::read_to_string(&pk).unwrap())).unwrap();
    let fp = ok(Command::new("ssh-keygen").arg("-lf").arg(&ssh));
    assert!(fp.contains("(ED25519)"), "{fp}");
    let out = flash()
        .args(["verify", "--allow-non-removable", "--trust"])
        .arg(&ssh)
        .arg(&img)
        .arg(&c.lo.dev)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("signed by ci.example-1"), "{err}");
    assert!(err.contains("(version 25.05.fixture)"), "{err}");
}

/// The OpenSSH public key line of a Nix public key (`NAME:BASE64`).
fn openssh_line(nix: &str) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let raw = b64.decode(nix.trim().split_once(':').unwrap().1).unwrap();
    let mut blob = Vec::new();
    for field in [b"ssh-ed25519".as_slice(), &raw] {
        blob.extend((field.len() as u32).to_be_bytes());
        blob.extend(field);
    }
    format!("ssh-ed25519 {} ci@example\n", b64.encode(blob))
}

#[test]
fn every_bad_signature_or_key_is_refused_before_the_first_byte() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let (_, other_pk) = nix_keys_named(d.path(), "other.example-1");
    let (_, pk, img, b, c) = two_signed(d.path());
    let trust = [os("--trust"), os(&pk)];
    let sig = with(&img, ".sig");
    let good = std::fs::read(&sig).unwrap();
    // A signature by a key not trusted.
    refused_before_writing(
        &img,
        &c,
        &[os("--trust"), os(&other_pk)],
        &[
            "disk.img.sig",
            "signed by \"ci.example-1\", which is not a trusted key",
        ],
    );
    // Another image's signature (of its manifest).
    std::fs::copy(with(&b, ".sig"), &sig).unwrap();
    refused_before_writing(&img, &c, &trust, &["disk.img.sig: not a signature of"]);
    std::fs::write(&sig, &good).unwrap();
    // The manifest edited after signing (still a valid manifest).
    let m = with(&img, ".layout.json");
    let text = std::fs::read_to_string(&m).unwrap();
    std::fs::write(&m, text.replacen("\"version\": 1", "\"version\":  1", 1)).unwrap();
    refused_before_writing(
        &img,
        &c,
        &trust,
        &["not a signature of", "disk.img.layout.json"],
    );
    std::fs::write(&m, &text).unwrap();
    // An IMAGE.sig that is not a signature.
    std::fs::write(&sig, "{\"signature\": true}\n").unwrap();
    refused_before_writing(
        &img,
        &c,
        &trust,
        &["disk.img.sig: not a signature (one line NAME:BASE64"],
    );
    std::fs::write(&sig, &good).unwrap();
    // And the good one, to show the refusals were the signature's doing.
    assert!(flash_to(&img, &c, &trust).status.success());
}

#[test]
fn an_image_that_is_not_the_signed_one_or_a_bad_key_file_is_refused_before_the_first_byte() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let (sk, pk, img, b, c) = two_signed(d.path());
    let trust = [os("--trust"), os(&pk)];
    // No signature at all: refused, unless --allow-unsigned says so.
    let unsigned = d.path().join("unsigned.img");
    ok(forge_image_of(&system("x86_64"))
        .args(["--format", "raw-efi", "--seed", "a", "-o"])
        .arg(&unsigned));
    refused_before_writing(
        &unsigned,
        &c,
        &trust,
        &["unsigned.img: not signed", "--allow-unsigned"],
    );
    let allowed = [os("--trust"), os(&pk), os("--allow-unsigned")];
    let out = flash_to(&unsigned, &c, &allowed);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // …but a signature that is there must verify, even then.
    std::fs::write(
        with(&unsigned, ".sig"),
        std::fs::read(with(&b, ".sig")).unwrap(),
    )
    .unwrap();
    let out = flash_to(&unsigned, &c, &allowed);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = card(d.path(), len(&img));
    // A truncated image.
    let short = d.path().join("short.img");
    std::fs::copy(&img, &short).unwrap();
    for s in [".sig", ".layout.json", ".bmap"] {
        std::fs::copy(with(&img, s), with(&short, s)).unwrap();
    }
    ok(Command::new("truncate").args(["-s", "-1M"]).arg(&short));
    refused_before_writing(&short, &c, &trust, &["short.img", "bytes"]);
    // A key file in the wrong format (the secret key): the format wanted named.
    refused_before_writing(
        &img,
        &c,
        &[os("--trust"), os(&sk)],
        &[
            "--trust",
            "ci.example-1.sk: not a Nix public key, NAME:BASE64 of 32 bytes",
            "OpenSSH",
        ],
    );
    // A .zst swapped for another image's, beside this one's signed sidecars.
    let zst = d.path().join("swapped.img.zst");
    ok(Command::new("zstd").args(["-q", "-o"]).arg(&zst).arg(&b));
    for s in [".sig", ".layout.json"] {
        std::fs::copy(with(&img, s), with(&zst, s)).unwrap();
    }
    std::fs::copy(with(&img, ".bmap"), d.path().join("swapped.img.bmap")).unwrap();
    refused_before_writing(
        &zst,
        &c,
        &trust,
        &["swapped.img.zst is not the image its signed manifest"],
    );
    assert!(flash_to(&img, &c, &trust).status.success());
}

/// Flip the byte at `at` of `file`.
fn flip(file: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[!b[0]], at).unwrap();
}

/// `bytes A..B do not match` in flash's error: (A, B).
fn range_named(err: &str) -> (u64, u64) {
    let at = err.find("bytes ").expect(err) + 6;
    let (a, rest) = err[at..].split_once("..").expect(err);
    let b: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    (a.parse().unwrap(), b.parse().unwrap())
}

#[test]
fn a_changed_byte_stops_flash_before_its_range_reaches_the_card() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let (sk, pk) = nix_keys_named(d.path(), "ci.example-1");
    let trust = [os("--trust"), os(&pk)];
    // Raw: one byte of the root filesystem (past the first MiB) changed.
    let img = signed(d.path(), "disk.img", "a", &sk);
    let c = card(d.path(), len(&img));
    let at = root_offset(&img) + 1024 + 100; // in the ext4 superblock
    flip(&img, at);
    let out = flash_to(&img, &c, &trust);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let line = the_error(&err);
    assert!(
        line.contains("do not match the checksum") && line.contains("nothing bootable was left"),
        "{line}"
    );
    assert!(
        line.contains("disk.img.layout.json"),
        "the signed BLAKE3: {line}"
    );
    let (a, b) = range_named(line);
    assert!(a <= at && at < b, "the range named holds byte {at}: {line}");
    assert!(no_table_left(&c.backing), "no table left");
    assert!(
        still_stale(&c.backing, a, b - a),
        "no byte of bytes {a}..{b} reached the card"
    );
    // zstd: signed raw, then compressed (its sidecars keep the raw
    // image's names, which flash falls back to); intact, it is written.
    let raw = signed(d.path(), "z.img", "z", &sk);
    let zst = with(&raw, ".zst");
    ok(Command::new("zstd")
        .args(["-q", "--no-check", "-o"])
        .arg(&zst)
        .arg(&raw));
    let c = card(d.path(), len(&raw));
    let out = flash_to(&zst, &c, &trust);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.contains("signed by ci.example-1"),
        "{err}"
    );
    // One byte changed inside a frame (no zstd checksum, so the signed
    // range hash is what notices).
    flip(&zst, len(&zst) * 3 / 4);
    let out = flash_to(&zst, &c, &trust);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(the_error(&err).contains("z.img.zst"), "{err}");
    assert!(no_table_left(&c.backing), "no table left");
}

/// BLAKE3 (hex) of `len` bytes of `file` at `off`, as b3sum computes it.
fn b3sum_at(file: &Path, off: u64, len: u64) -> String {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let mut bytes = vec![0u8; len as usize];
    std::fs::File::open(file)
        .unwrap()
        .read_exact_at(&mut bytes, off)
        .unwrap();
    let mut child = Command::new("b3sum")
        .arg("--no-names")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("b3sum (scripts/deps.sh installs it)");
    child.stdin.take().unwrap().write_all(&bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The manifest beside `img`, edited by `edit`, then signed again by `sk`
/// (`forge sign --key` signs whatever manifest is beside the image).
fn resigned(img: &Path, sk: &Path, edit: impl FnOnce(&mut Value)) {
    let m = with(img, ".layout.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&m).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&m, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    ok(forge().arg("sign").arg(img).arg("--key").arg(sk));
}

#[test]
fn the_signed_manifest_holds_the_image_sha256_and_each_range_blake3_which_flash_checks() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let (sk, pk) = nix_keys_named(d.path(), "ci.example-1");
    let trust = [os("--trust"), os(&pk)];
    // With --json, the manifest also holds the whole image's SHA-256.
    let img = d.path().join("disk.img");
    ok(forge_image_of(&system("x86_64"))
        .args(["--format", "raw-efi", "--seed", "a", "--json", "--sign"])
        .arg(&sk)
        .arg("-o")
        .arg(&img));
    let m: Value =
        serde_json::from_slice(&std::fs::read(with(&img, ".layout.json")).unwrap()).unwrap();
    assert_eq!(m["system_version"], "25.05.fixture");
    // The whole image's SHA-256, as sha256sum prints it.
    let sum = ok(Command::new("sha256sum").arg(&img));
    assert_eq!(m["image_sha256"], sum.split_whitespace().next().unwrap());
    // The bmap's ranges, each with the BLAKE3 b3sum gives its bytes.
    let bmap =
        formats::bmap::parse(&std::fs::read_to_string(with(&img, ".bmap")).unwrap()).unwrap();
    let ranges = m["ranges"].as_array().unwrap();
    let listed: Vec<(u64, u64)> = ranges
        .iter()
        .map(|r| (r["offset"].as_u64().unwrap(), r["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(listed, bmap.byte_ranges());
    for r in ranges {
        let (off, len) = (r["offset"].as_u64().unwrap(), r["length"].as_u64().unwrap());
        assert_eq!(r["blake3"], b3sum_at(&img, off, len), "bytes {off}..+{len}");
    }
    // A range's BLAKE3 that is not its bytes' (the bmap's SHA-256 still
    // is), signed: flash stops before that range reaches the card, naming
    // the manifest, so the BLAKE3 is what it checked.
    let k = listed.iter().position(|r| r.0 >= 1 << 20).unwrap();
    let (a, b) = (listed[k].0, listed[k].0 + listed[k].1);
    let good = std::fs::read(with(&img, ".layout.json")).unwrap();
    resigned(&img, &sk, |v| {
        v["ranges"][k]["blake3"] = Value::from(b3sum_at(&img, a, 1));
    });
    let c = card(d.path(), len(&img));
    let out = flash_to(&img, &c, &trust);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let line = the_error(&err);
    assert!(
        line.contains(&format!("bytes {a}..{b} do not match the checksum in"))
            && line.contains("disk.img.layout.json"),
        "{line}"
    );
    assert!(no_table_left(&c.backing), "no table left");
    assert!(
        still_stale(&c.backing, a, b - a),
        "bytes {a}..{b} unwritten"
    );
    // Ranges that are not the bmap's: refused before the first byte.
    std::fs::write(with(&img, ".layout.json"), &good).unwrap();
    resigned(&img, &sk, |v| {
        v["ranges"].as_array_mut().unwrap().remove(k);
    });
    let c = card(d.path(), len(&img));
    refused_before_writing(
        &img,
        &c,
        &trust,
        &["disk.img.layout.json: the signed manifest's ranges are not its bmap's"],
    );
    // The good manifest, signed again: written.
    std::fs::write(with(&img, ".layout.json"), &good).unwrap();
    ok(forge().arg("sign").arg(&img).arg("--key").arg(&sk));
    assert!(flash_to(&img, &c, &trust).status.success());
}
