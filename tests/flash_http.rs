//! flash from a URL and from stdin (issue 28), against a file server on
//! 127.0.0.1 (tests/tools/httpserve.py): a `.img.zst` and its bmap
//! fetched from beside it land as the image, also when the download
//! drops mid-file and is resumed with a `Range` request; a server without
//! ranges is read again from the start while nothing is written, and a
//! drop after the first write ends in wiped tables, exit 1. An image
//! piped to `flash -` needs its size (`--size` or a bmap).

use nixforge_tests::flashing::*;
use nixforge_tests::*;
use std::path::{Path, PathBuf};
use std::process::Output;

/// A zeroed card of `size` bytes (its backing file).
fn card(dir: &Path, size: u64) -> PathBuf {
    let backing = dir.join("card");
    let _ = std::fs::remove_file(&backing);
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(size)
        .unwrap();
    backing
}

/// `flash SRC` onto the card (its stdin from `stdin`).
fn flash_to(card: &Path, src: &str, extra: &[&str], stdin: Option<&Path>) -> Output {
    flash_to_with(card, src, extra, stdin, &[])
}

/// `flash_to` with `env` set for flash.
fn flash_to_with(
    card: &Path,
    src: &str,
    extra: &[&str],
    stdin: Option<&Path>,
    env: &[(&str, &Path)],
) -> Output {
    let lo = Loop::attach(card, &[]);
    let mut cmd = flash();
    cmd.envs(env.iter().copied());
    cmd.arg(src)
        .arg(&lo.dev)
        .args(["--yes", "--allow-non-removable"])
        .args(extra);
    if let Some(f) = stdin {
        cmd.stdin(std::fs::File::open(f).unwrap());
    }
    let out = cmd.output().unwrap();
    drop(lo);
    out
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_zst_image_and_its_bmap_flash_from_a_url_and_a_dropped_download_resumes_with_range() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let img = small_raw_efi(d.path());
    let size = len(&img);
    sh(&format!(
        "zstd -q -3 -T2 -c {} > {}",
        img.display(),
        d.path().join("disk.img.zst").display()
    ));
    let sum = sha256_file(&img);
    // The first GET of the .zst drops after 3 MiB (past the first MiB,
    // so the write has begun); flash resumes it at that byte.
    let s = HttpServer::start(d.path(), &["--ranges", "--drop-at", &(3 << 20).to_string()]);
    let card = card(d.path(), size);
    let o = flash_to(&card, &s.url("disk.img.zst"), &["--sha256", &sum], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(sha256_file(&card), sum);
    let log = s.log();
    assert!(log.contains("GET /disk.img.bmap None 200"), "{log}");
    assert!(log.contains("DROP /disk.img.zst at 3145728"), "{log}");
    assert!(
        log.contains("GET /disk.img.zst bytes=3145728- 206"),
        "resumed where it dropped: {log}"
    );
    // The raw image by its bmap: the long gaps between mapped ranges are
    // skipped with Range requests, not downloaded.
    let zero = card.with_file_name("zero-card");
    std::fs::File::create(&zero).unwrap().set_len(size).unwrap();
    let o = flash_to(&zero, &s.url("disk.img"), &[], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(sha256_file(&zero), sum);
    let skips = s
        .log()
        .lines()
        .filter(|l| l.starts_with("GET /disk.img bytes=") && !l.contains("bytes=3145728-"))
        .count();
    assert!(skips > 0, "no gap skipped: {}", s.log());
    // A wrong --sha256 of a stream is found as it is written: exit 1,
    // the card's table (the image's, from the flash above) wiped.
    let o = flash_to(
        &card,
        &s.url("disk.img.zst"),
        &["--sha256", &"0".repeat(64)],
        None,
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("SHA-256 is") && err.contains(&s.url("disk.img.zst")),
        "{err}"
    );
    assert!(no_table_left(&card), "{err}");
    // A missing image is one line naming it, nothing written.
    let before = sha256_file(&card);
    let o = flash_to(&card, &s.url("gone.img"), &[], None);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("gone.img") && err.contains("404"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(sha256_file(&card), before);
}

/// A certificate authority and a certificate for 127.0.0.1 it signed
/// (openssl): (CA certificate, server certificate, server key).
fn tls_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (ca, cert, key) = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    sh(&format!(
        "cd {d} && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
           -keyout ca.key -out ca.pem -days 2 -subj /CN=nixforge-test-ca 2>/dev/null && \
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout key.pem \
           -out cert.csr -subj /CN=127.0.0.1 2>/dev/null && \
         printf 'subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' > ext && \
         openssl x509 -req -in cert.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
           -days 2 -extfile ext -out cert.pem 2>/dev/null",
        d = dir.display()
    ));
    (ca, cert, key)
}

#[test]
fn https_flashes_with_a_certificate_the_system_trusts_and_refuses_one_it_does_not() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let img = small_raw_efi(d.path());
    let size = len(&img);
    let tls = d.path().join("tls");
    std::fs::create_dir(&tls).unwrap();
    let (ca, cert, key) = tls_files(&tls);
    let s = HttpServer::start(
        d.path(),
        &[
            "--ranges",
            "--tls",
            cert.to_str().unwrap(),
            key.to_str().unwrap(),
        ],
    );
    let card = card(d.path(), size);
    stale_file(&card, size);
    let before = sha256_file(&card);
    // The test CA is in no store flash reads: refused before the first
    // byte, one line naming the URL.
    let o = flash_to(&card, &s.url("disk.img"), &[], None);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&s.url("disk.img")) && err.contains("certificate"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(sha256_file(&card), before, "refused, yet written");
    // Trusted as the system's CA file (SSL_CERT_FILE, as OpenSSL reads
    // it): the image's mapped ranges by its bmap, over TLS, land on a
    // zeroed card as the image. A query (a download token) stays on the
    // sidecars' URLs, after their names.
    let card = self::card(d.path(), size);
    let o = flash_to_with(
        &card,
        &s.url("disk.img?token=t1"),
        &["--sha256", &sha256_file(&img)],
        None,
        &[("SSL_CERT_FILE", &ca)],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(sha256_file(&card), sha256_file(&img));
    let log = s.log();
    assert!(
        log.contains("GET /disk.img.bmap?token=t1 None 200"),
        "{log}"
    );
}

#[test]
fn a_server_without_ranges_is_read_again_before_the_first_write_and_fails_cleanly_after() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let img = small_raw_efi(d.path());
    let size = len(&img);
    // Dropped inside the first MiB, read while nothing is written: the
    // download starts over and the card gets the image.
    let early = HttpServer::start(d.path(), &["--drop-at", &(512 << 10).to_string()]);
    let card = card(d.path(), size);
    let o = flash_to(&card, &early.url("disk.img"), &["--no-bmap"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(sha256_file(&card), sha256_file(&img));
    assert_eq!(
        early.log().matches("GET /disk.img None 200").count(),
        2,
        "{}",
        early.log()
    );
    // Dropped at 16 MiB, after writing began: no range to resume with, so
    // the write fails with its tables wiped (exit 1): the image's, there
    // from the flash above.
    let late = HttpServer::start(d.path(), &["--drop-at", &(16 << 20).to_string()]);
    let o = flash_to(&card, &late.url("disk.img"), &[], None);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("Range") && err.contains("16777216"), "{err}");
    assert!(no_table_left(&card), "{err}");
}

#[test]
fn an_image_on_stdin_needs_its_size_and_lands_whole() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let img = small_raw_efi(d.path());
    let size = len(&img);
    let xz = d.path().join("piped.xz");
    sh(&format!(
        "xz -0 -T2 -c {} > {}",
        img.display(),
        xz.display()
    ));
    let card = card(d.path(), size);
    stale_file(&card, size);
    let before = sha256_file(&card);
    // No bmap beside stdin and no --size: refused, nothing written.
    let o = flash_to(&card, "-", &[], Some(&xz));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("stdin") && err.contains("--size"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // A --size other than the bmap's: refused.
    let bmap = d.path().join("disk.img.bmap");
    let b = bmap.to_str().unwrap();
    let o = flash_to(&card, "-", &["--bmap", b, "--size", "1M"], Some(&xz));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--size"), "{err}");
    assert_eq!(sha256_file(&card), before, "refused, yet written");
    // With --size: every byte, the image; with the bmap: its ranges.
    let o = flash_to(&card, "-", &["--size", &size.to_string()], Some(&xz));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(sha256_file(&card), sha256_file(&img));
    let o = flash_to(
        &card,
        "-",
        &["--bmap", b, "--sha256", &sha256_file(&img)],
        Some(&xz),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(sha256_file(&card), sha256_file(&img));
}
