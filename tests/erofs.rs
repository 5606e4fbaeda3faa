//! The EROFS writer (issue 30), uncompressed and LZ4/LZ4HC, judged by
//! `fsck.erofs --extract` of the whole image, `dump.erofs`, and the
//! kernel's own EROFS (file-backed mounts).

use crate::ext4::{compare_stat, random_tree, EPOCH};
use nixforge_tests::*;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

fn forge_erofs(src: &Path, out: &Path, extra: &[&str]) {
    ok(forge()
        .env("SOURCE_DATE_EPOCH", EPOCH.to_string())
        .arg("erofs")
        .arg(src)
        .arg("-o")
        .arg(out)
        .args(extra));
}

/// fsck.erofs checks the image and extracts all of it into a directory
/// equal to `src`; the kernel mounts it and agrees on every entry.
fn judged(src: &Path, img: &Path) -> usize {
    ok(Command::new("fsck.erofs").arg(img));
    let x = img.with_extension("x");
    ok(Command::new("fsck.erofs")
        .arg(format!("--extract={}", x.display()))
        .arg(img));
    diff_tree(src, &x, &[]);
    let m = Mounted::of("erofs", img, 0, "ro");
    diff_tree(src, m.path(), &[]);
    compare_stat(src, m.path(), 0)
}

#[test]
fn random_trees_pass_fsck_erofs_and_the_kernel_agrees() {
    let _g = privileged();
    for seed in 1..=4u64 {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::create_dir(&src).unwrap();
        random_tree(&src, seed);
        let img = d.path().join("fs.img");
        forge_erofs(&src, &img, &["--label", "random"]);
        let n = judged(&src, &img);
        assert!(n > 60, "seed {seed}: only {n} entries compared");
        let dump = ok(Command::new("dump.erofs").arg(&img));
        assert!(dump.contains("0xE0F5E1E2"), "{dump}");
    }
}

/// Files LZ4 shrinks and files it cannot, of sizes around the block, the
/// 4 MiB compression segment and past it.
fn compressible_tree(src: &Path) {
    let d = src.join("data");
    fs::create_dir_all(&d).unwrap();
    let text = |n: usize| -> Vec<u8> {
        let words: [&[u8]; 5] = [b"nix ", b"store ", b"erofs\n", b"lz4 ", b"/nix/store/abc "];
        (0..)
            .flat_map(|i: usize| words[(i * 7 + i / 3) % 5].iter().copied())
            .take(n)
            .collect()
    };
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng as u8
            })
            .collect()
    };
    for n in [4095, 4096, 4097, 8191, 8192, 8193, 65536 + 17, 1 << 20] {
        fs::write(d.join(format!("text-{n}")), text(n)).unwrap();
    }
    fs::write(d.join("zeros-9M"), vec![0u8; 9 << 20]).unwrap();
    fs::write(d.join("noise"), noise(300_000)).unwrap();
    let mut mixed = noise(50_000);
    mixed.extend(vec![0u8; (4 << 20) - 1000]);
    mixed.extend(text(700_000));
    mixed.extend(noise(5000));
    fs::write(d.join("mixed"), mixed).unwrap();
}

#[test]
fn compressed_images_extract_and_mount_whole_for_every_level_and_thread_count() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    compressible_tree(&src);
    let mut sizes = Vec::new();
    for algo in ["none", "lz4", "lz4hc", "lz4hc,12"] {
        let img = d.path().join(format!("{algo}.img"));
        forge_erofs(&src, &img, &["--compression", algo]);
        judged(&src, &img);
        let dump = ok(Command::new("dump.erofs").arg(&img));
        assert_eq!(dump.contains("0padding"), algo != "none", "{algo}: {dump}");
        sizes.push(fs::metadata(&img).unwrap().len());
    }
    assert!(sizes[1] < sizes[0] / 3, "lz4 shrinks it: {sizes:?}");
    assert!(sizes[2] <= sizes[1], "lz4hc no larger than lz4: {sizes:?}");
    // Compressed on every core, the same bytes on one.
    let one = d.path().join("one-thread.img");
    ok(forge()
        .env("SOURCE_DATE_EPOCH", EPOCH.to_string())
        .env("RAYON_NUM_THREADS", "1")
        .arg("erofs")
        .arg(&src)
        .arg("-o")
        .arg(&one));
    assert_eq!(
        fs::read(&one).unwrap(),
        fs::read(d.path().join("lz4hc.img")).unwrap()
    );
    let e = fails(
        forge()
            .arg("erofs")
            .arg(&src)
            .arg("-o")
            .arg(&one)
            .args(["--compression", "zstd"]),
    );
    assert!(e.contains("expected none, lz4 or lz4hc[,LEVEL]"), "{e}");
}

#[test]
fn hidden_style_trees_long_names_big_directories_every_symlink_length() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    let many = src.join("many");
    fs::create_dir_all(&many).unwrap();
    for i in 0..5000 {
        fs::write(
            many.join(format!("entry-{i:05}-{}", "x".repeat(i % 40))),
            i.to_string(),
        )
        .unwrap();
    }
    fs::write(src.join("n".repeat(255)), "longest name").unwrap();
    fs::write(src.join("empty"), "").unwrap();
    fs::write(src.join("one-block"), vec![1u8; 4096]).unwrap();
    fs::write(src.join("one-block-and-one"), vec![2u8; 4097]).unwrap();
    fs::File::create(src.join("zeros"))
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    let links = src.join("links");
    fs::create_dir(&links).unwrap();
    for len in (1..=4095)
        .step_by(7)
        .chain([4030, 4031, 4032, 4063, 4064, 4065, 4095])
    {
        let target: String = (0..len)
            .map(|i| if i % 50 == 49 { '/' } else { 't' })
            .collect();
        let name = format!("l{len:04}");
        if !links.join(&name).exists() {
            symlink(target, links.join(name)).unwrap();
        }
    }
    for (i, name) in ["-dash", "+plus", "!bang", "~tilde"].iter().enumerate() {
        fs::write(src.join(name), i.to_string()).unwrap();
    }
    fs::hard_link(src.join("one-block"), src.join("many/hard")).unwrap();
    let img = d.path().join("fs.img");
    forge_erofs(&src, &img, &[]);
    let n = judged(&src, &img);
    assert!(n > 5600, "{n} entries compared");
    // The same tree, the same bytes.
    let again = d.path().join("again.img");
    forge_erofs(&src, &again, &[]);
    assert_eq!(sha256_file(&img), sha256_file(&again));
}

#[test]
fn the_fixture_closure_reads_back_whole_and_bad_input_is_one_line() {
    let _g = privileged();
    let sys = system("x86_64");
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("store.img");
    let store = sys.root.join("nix/store");
    forge_erofs(&store, &img, &["--owner", "0:0", "--label", "nix-store"]);
    ok(Command::new("fsck.erofs").arg(&img));
    let m = Mounted::of("erofs", &img, 0, "ro");
    diff_tree(&store, m.path(), &[]);
    let dump = ok(Command::new("dump.erofs").arg(&img));
    assert!(dump.contains("Filesystem inode count"), "{dump}");
    drop(m);
    let err = fails(
        forge()
            .arg("erofs")
            .arg(&store)
            .args(["--label", "seventeen-bytes-x", "-o"])
            .arg(d.path().join("bad.img")),
    );
    assert!(the_error(&err).contains("longer than 16 bytes"), "{err}");
    let err = fails(
        forge()
            .arg("erofs")
            .arg(&img)
            .arg("-o")
            .arg(d.path().join("bad.img")),
    );
    assert!(
        the_error(&err).contains("store.img: not a directory"),
        "{err}"
    );
    assert!(!d.path().join("bad.img").exists(), "no partial output");
}

/// The root partition of `img` (its manifest's), cut out into `dir`.
fn root_of(img: &Path, dir: &Path) -> (std::path::PathBuf, serde_json::Value) {
    let m: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(with(img, ".layout.json")).unwrap()).unwrap();
    let p = m["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["role"] == "root")
        .unwrap()
        .clone();
    let bytes = fs::read(img).unwrap();
    let (off, size) = (p["offset"].as_u64().unwrap(), p["size"].as_u64().unwrap());
    let out = dir.join("root.erofs");
    fs::write(&out, &bytes[off as usize..(off + size) as usize]).unwrap();
    (out, p)
}

#[test]
fn raw_efi_with_an_erofs_root_and_verity_boots_under_ovmf() {
    let sys = system("x86_64");
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("e.img");
    let build = |out: &Path| {
        ok(forge_image_of(&sys)
            .args([
                "--format",
                "raw-efi",
                "--root-fs",
                "erofs",
                "--verity",
                "-o",
            ])
            .arg(out));
    };
    build(&img);
    let again = d.path().join("again.img");
    build(&again);
    assert_eq!(
        sha256_file(&img),
        sha256_file(&again),
        "same input, same bytes"
    );
    let (root, part) = root_of(&img, d.path());
    assert_eq!(part["filesystem"]["kind"], "erofs", "{part}");
    ok(Command::new("fsck.erofs").arg(&root));
    let b = boot("x86_64", &img, 512, std::time::Duration::from_secs(180));
    assert_eq!(
        b.marker.as_deref(),
        Some("NIXFORGE-BOOT-OK root=ro var=rw table=gpt init=found verity=on read=ok rootfs=erofs"),
        "serial log:\n{}",
        b.log
    );
}

#[test]
fn an_erofs_root_is_read_only_and_sized_by_its_content() {
    let sys = system("x86_64");
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("x.img");
    for (extra, want) in [
        (
            &["--root-mode", "rw"][..],
            "--root-fs erofs is read-only: not with --root-mode rw",
        ),
        (
            &["--root-size", "1G"][..],
            "an EROFS root is as large as its content",
        ),
        (
            &["--root-slack", "10%"][..],
            "an EROFS root is as large as its content",
        ),
    ] {
        let err = fails(
            forge_image_of(&sys)
                .args(["--format", "raw-efi", "--root-fs", "erofs"])
                .args(extra)
                .arg("-o")
                .arg(&out),
        );
        assert!(the_error(&err).contains(want), "{err}");
        assert!(!out.exists(), "nothing written");
    }
}
