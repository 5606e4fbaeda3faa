//! `forge image --format raw-efi` (issue 4): booted under OVMF, judged by
//! sgdisk, fsck.fat, e2fsck, bmaptool and nix-store.

use nixforge_tests::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

struct Image {
    _dir: tempfile::TempDir,
    img: PathBuf,
    layout: Value,
}

fn forge_image(sys: &System, sector: u32, extra: &[&str]) -> Image {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let out = ok(forge_image_of(sys)
        .args([
            "--format",
            "raw-efi",
            "--json",
            "--sector-size",
            &sector.to_string(),
        ])
        .arg("-o")
        .arg(&img)
        .args(extra));
    Image {
        layout: serde_json::from_str(&out).unwrap(),
        img,
        _dir: dir,
    }
}

impl Image {
    fn part(&self, n: usize) -> (u64, u64) {
        let p = &self.layout["partitions"][n - 1];
        (p["offset"].as_u64().unwrap(), p["size"].as_u64().unwrap())
    }
    /// Copy partition `n` out to its own file.
    fn extract(&self, n: usize, to: &Path) {
        let (off, size) = self.part(n);
        sh(&format!(
            "dd if={} of={} bs=1M skip={} count={} status=none conv=sparse",
            self.img.display(),
            to.display(),
            off >> 20,
            size >> 20
        ));
    }
    fn mtools(&self) -> String {
        format!("{}@@{}", self.img.display(), self.part(1).0)
    }
}

/// Forge the x86_64 fixture at `sector` bytes per sector and boot it.
fn boots_with(sector: u32) {
    let sys = system("x86_64");
    let im = forge_image(&sys, sector, &[]);
    let b = boot("x86_64", &im.img, sector, Duration::from_secs(180));
    assert_eq!(
        b.marker.as_deref(),
        Some("NIXFORGE-BOOT-OK root=ro var=rw table=gpt init=found"),
        "serial log ({sector}-byte sectors):\n{}",
        b.log
    );
}

// The default raw-efi image with 512-byte sectors boots in `demo.rs`
// (`make demo`: the same image, the same marker line), so it is not
// booted a second time here.

#[test]
fn raw_efi_boots_with_4096_byte_sectors() {
    boots_with(4096);
}

#[test]
fn tables_and_filesystems_pass_their_judges() {
    let sys = system("x86_64");
    let _g = privileged();
    for sector in [512u32, 4096] {
        let im = forge_image(&sys, sector, &[]);
        // sgdisk takes files for 512-byte disks: read through a loop
        // device with the image's logical sector size.
        let lo = Loop::attach(&im.img, &["-b", &sector.to_string()]);
        let v = ok(Command::new("sgdisk").arg("-v").arg(&lo.dev));
        assert!(
            v.contains("No problems found") && !v.contains("Creating new GPT"),
            "sgdisk -v ({sector}):\n{v}"
        );
        let info = ok(Command::new("sgdisk").args(["-i", "2"]).arg(&lo.dev));
        assert!(info.contains("Attribute flags: 1000000000000000"), "{info}");
        assert!(
            info.contains("4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"),
            "{info}"
        );
        drop(lo);
        let d = tempfile::tempdir().unwrap();
        for (n, judge) in [(1, "fsck.fat"), (2, "e2fsck"), (3, "e2fsck")] {
            let f = d.path().join(format!("p{n}"));
            im.extract(n, &f);
            ok(Command::new(judge)
                .arg(if judge == "e2fsck" { "-fn" } else { "-n" })
                .arg(&f));
        }
        let parts = im.layout["partitions"].as_array().unwrap();
        assert_eq!(parts[0]["type_id"], "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
        assert_eq!(parts[1]["type_id"], "4f68bce3-e8cd-4db1-96e7-fbcaf984b709");
        assert_eq!(parts[2]["type_id"], "4d21b016-b534-45c2-a9fb-5c16e091fd1d");
        assert_eq!(parts[1]["read_only"], true);
        for p in parts {
            assert_eq!(
                p["offset"].as_u64().unwrap() % (1 << 20),
                0,
                "1 MiB alignment"
            );
        }
    }
}

#[test]
fn esp_holds_the_closure_bytes_and_nixos_entries() {
    let sys = system("x86_64");
    let im = forge_image(&sys, 512, &[]);
    let d = tempfile::tempdir().unwrap();
    let get = |esp_path: &str| {
        let to = d.path().join("out");
        let _ = std::fs::remove_file(&to);
        ok(Command::new("mcopy")
            .arg("-i")
            .arg(im.mtools())
            .arg(format!("::{esp_path}"))
            .arg(&to));
        std::fs::read(&to).unwrap()
    };
    let boot: Value = serde_json::from_slice(
        &std::fs::read(sys.physical(&format!("{}/boot.json", sys.toplevel))).unwrap(),
    )
    .unwrap();
    let v1 = &boot["org.nixos.bootspec.v1"];
    let kernel = v1["kernel"].as_str().unwrap();
    let initrd = v1["initrd"].as_str().unwrap();
    let sd = std::fs::read_link(sys.physical(&format!("{}/systemd", sys.toplevel))).unwrap();
    let sd_efi = std::fs::read(sys.physical(&format!(
        "{}/lib/systemd/boot/efi/systemd-bootx64.efi",
        sd.display()
    )))
    .unwrap();
    assert!(get("/EFI/BOOT/BOOTX64.EFI") == sd_efi);
    assert!(get("/EFI/systemd/systemd-bootx64.efi") == sd_efi);
    let efi_name = |p: &str| {
        let rest = p.trim_start_matches("/nix/store/");
        rest.replacen('/', "-", 1) + ".efi"
    };
    assert!(
        get(&format!("/EFI/nixos/{}", efi_name(kernel)))
            == std::fs::read(sys.physical(kernel)).unwrap()
    );
    assert!(
        get(&format!("/EFI/nixos/{}", efi_name(initrd)))
            == std::fs::read(sys.physical(initrd)).unwrap()
    );
    // loader.conf and the entries, parsed as systemd-boot reads them.
    let conf = String::from_utf8(get("/loader/loader.conf")).unwrap();
    let kv = |text: &str, key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(' ')))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no {key} in:\n{text}"))
    };
    assert_eq!(kv(&conf, "default"), "nixos-generation-1.conf");
    assert_eq!(kv(&conf, "editor"), "0");
    let entry = String::from_utf8(get("/loader/entries/nixos-generation-1.conf")).unwrap();
    assert_eq!(kv(&entry, "title"), "NixOS");
    assert_eq!(kv(&entry, "sort-key"), "nixos");
    assert_eq!(
        kv(&entry, "linux"),
        format!("/EFI/nixos/{}", efi_name(kernel))
    );
    assert_eq!(
        kv(&entry, "initrd"),
        format!("/EFI/nixos/{}", efi_name(initrd))
    );
    let params: Vec<&str> = v1["kernelParams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(
        kv(&entry, "options"),
        format!("init={} {}", v1["init"].as_str().unwrap(), params.join(" "))
    );
    assert!(kv(&entry, "version").starts_with(&format!(
        "Generation 1 {}, built on ",
        v1["label"].as_str().unwrap()
    )));
    // The specialisation gets its own entry.
    let rescue = String::from_utf8(get(
        "/loader/entries/nixos-generation-1-specialisation-rescue.conf",
    ))
    .unwrap();
    assert_eq!(kv(&rescue, "title"), "NixOS (rescue)");
    assert!(kv(&rescue, "options").contains("nixforge.specialisation=rescue"));
}

#[test]
fn bmap_copy_onto_stale_data_gives_clean_filesystems() {
    let _g = privileged();
    let sys = system("x86_64");
    let im = forge_image(&sys, 512, &[]);
    let bmap = PathBuf::from(format!("{}.bmap", im.img.display()));
    let size = std::fs::metadata(&im.img).unwrap().len();
    let d = tempfile::tempdir().unwrap();
    let target = d.path().join("target");
    // A "device" full of old data: every byte 0xFF.
    sh(&format!(
        "head -c {size} /dev/zero | tr '\\000' '\\377' > {}",
        target.display()
    ));
    let lo = Loop::attach(&target, &[]);
    ok(Command::new("bmaptool")
        .args(["copy", "--bmap"])
        .arg(&bmap)
        .arg(&im.img)
        .arg(&lo.dev));
    let v = ok(Command::new("sgdisk").arg("-v").arg(&lo.dev));
    assert!(v.contains("No problems found"), "{v}");
    let parts = lo.partitions();
    assert_eq!(parts.len(), 3, "partx found {parts:?}");
    ok(Command::new("fsck.fat").arg("-n").arg(&parts[0]));
    ok(Command::new("e2fsck").arg("-fn").arg(&parts[1]));
    ok(Command::new("e2fsck").arg("-fn").arg(&parts[2]));
    // And the mapped ranges really left stale bytes elsewhere (the test can fail).
    let unmapped_ff = sh(&format!(
        "dd if={} bs=1M skip={} count=1 status=none | tr -d '\\377' | wc -c",
        lo.dev,
        (im.part(1).0 >> 20) + 300
    ));
    assert_eq!(
        unmapped_ff.trim(),
        "0",
        "an unmapped MiB in the ESP should still hold 0xFF"
    );
}

fn load_and_verify(store: &Path, reg: &[u8], sys: &System) {
    let (ok_, err) = load_db_and_verify(store, reg);
    assert!(
        ok_ && !err.contains("modified") && !err.contains("error"),
        "{err}"
    );
    let q = ok(Command::new("nix-store")
        .arg("--store")
        .arg(store)
        .args(["-qR", &sys.toplevel]));
    assert_eq!(
        q.lines().count(),
        sys.nix_store(&["-qR", &sys.toplevel]).lines().count()
    );
}

#[test]
fn the_root_holds_a_nix_database_that_nix_uses_as_it_is() {
    let _g = privileged();
    let sys = system("x86_64");
    let d = tempfile::tempdir().unwrap();
    let im = forge_image(&sys, 512, &["--root-mode", "rw"]);
    let root = d.path().join("root.img");
    im.extract(2, &root);
    let db = |img: &Path| {
        Command::new("debugfs")
            .args(["-R", "cat /nix/var/nix/db/db.sqlite"])
            .arg(img)
            .output()
            .unwrap()
            .stdout
    };
    let first = db(&root);
    assert!(
        first.starts_with(b"SQLite format 3\0"),
        "a database in the root"
    );
    {
        // Mounted read-write by the kernel; no `nix-store --load-db`.
        let m = Mounted::ext4(&root, 0, "rw");
        let store = format!("local?root={}", m.path().display());
        let nix = |args: &[&str]| {
            ok(Command::new("nix-store")
                .args(["--store", &store])
                .args(args))
        };
        nix(&["--verify", "--check-contents"]);
        let ours = nix(&["-qR", &sys.toplevel]);
        let theirs = sys.nix_store(&["-qR", &sys.toplevel]);
        let sorted = |s: &str| {
            let mut v: Vec<String> = s.lines().map(String::from).collect();
            v.sort();
            v
        };
        assert_eq!(
            sorted(&ours),
            sorted(&theirs),
            "the closure, as Nix reads it"
        );
        for p in sorted(&theirs) {
            for q in ["--hash", "--size", "--references"] {
                assert_eq!(
                    sorted(&nix(&["-q", q, &p])),
                    sorted(&sys.nix_store(&["-q", q, &p])),
                    "{q} {p}"
                );
            }
        }
    }
    ok(Command::new("e2fsck").arg("-fn").arg(&root));
    // Built again: the same database, byte for byte.
    let again = forge_image(&sys, 512, &["--root-mode", "rw"]);
    let root2 = d.path().join("root2.img");
    again.extract(2, &root2);
    assert!(db(&root2) == first, "deterministic");
}

#[test]
fn the_image_does_not_depend_on_how_the_closure_was_found() {
    // The fixture store has a Nix database (derivers known); its copy has
    // none (references found by scanning). Same image, byte for byte.
    let sys = system("x86_64");
    let with_db = forge_image(&sys, 512, &[]);
    let copy = store_copy(&sys);
    let d = tempfile::tempdir().unwrap();
    let scanned = d.path().join("disk.img");
    ok(forge()
        .arg("image")
        .arg(&sys.toplevel)
        .arg("--root")
        .arg(copy.path())
        .args(["--format", "raw-efi", "-o"])
        .arg(&scanned));
    assert_eq!(sha256_file(&scanned), sha256_file(&with_db.img));
    // And from closure-info (registration and store-paths, as nixpkgs'
    // closureInfo writes them), reading each file once.
    let info = d.path().join("closure-info");
    std::fs::create_dir(&info).unwrap();
    let reg = ok(forge()
        .arg("closure")
        .arg(&sys.toplevel)
        .arg("--root")
        .arg(&sys.root)
        .arg("--registration"));
    std::fs::write(info.join("registration"), &reg).unwrap();
    let listed = sys.nix_store(&["-qR", &sys.toplevel]);
    std::fs::write(info.join("store-paths"), listed).unwrap();
    let from_info = d.path().join("info.img");
    ok(forge()
        .arg("image")
        .arg(&sys.toplevel)
        .arg("--root")
        .arg(copy.path())
        .arg("--closure-info")
        .arg(&info)
        .args(["--format", "raw-efi", "-o"])
        .arg(&from_info));
    assert_eq!(sha256_file(&from_info), sha256_file(&with_db.img));
}

#[test]
fn registration_loads_into_the_root_and_verifies() {
    let _g = privileged();
    let sys = system("x86_64");
    let d = tempfile::tempdir().unwrap();
    // Read-only root (full, no slack): load into a copy of its contents.
    let im = forge_image(&sys, 512, &[]);
    let root = d.path().join("root.img");
    im.extract(2, &root);
    {
        let m = Mounted::ext4(&root, 0, "ro");
        let reg = std::fs::read(m.path().join("nix-path-registration")).unwrap();
        let copy = d.path().join("copy");
        ok(Command::new("cp").arg("-a").arg(m.path()).arg(&copy));
        load_and_verify(&copy, &reg, &sys);
        assert_eq!(
            std::fs::read_link(m.path().join("nix/var/nix/profiles/system")).unwrap(),
            Path::new("system-1-link")
        );
        assert_eq!(
            std::fs::read_link(m.path().join("nix/var/nix/profiles/system-1-link")).unwrap(),
            Path::new(&sys.toplevel)
        );
        for dir in [
            "boot", "dev", "etc", "home", "proc", "root", "run", "sys", "tmp", "var",
        ] {
            assert!(m.path().join(dir).is_dir(), "/{dir}");
        }
    }
    // Writable root: the database goes into the root itself.
    let im = forge_image(&sys, 512, &["--root-mode", "rw"]);
    assert_eq!(im.layout["partitions"][1]["read_only"], false);
    let root = d.path().join("root-rw.img");
    im.extract(2, &root);
    {
        let m = Mounted::ext4(&root, 0, "rw");
        let reg = std::fs::read(m.path().join("nix-path-registration")).unwrap();
        load_and_verify(m.path(), &reg, &sys);
    }
    ok(Command::new("e2fsck").arg("-fn").arg(&root));
}

#[test]
fn same_input_gives_the_same_image_and_bmap() {
    let sys = system("x86_64");
    let a = forge_image(&sys, 512, &[]);
    let b = forge_image(&sys, 512, &[]);
    assert_eq!(sha256_file(&a.img), sha256_file(&b.img));
    let bm = |i: &Image| sha256_file(Path::new(&format!("{}.bmap", i.img.display())));
    assert_eq!(bm(&a), bm(&b));
    let c = forge_image(&sys, 512, &["--seed", "other"]);
    assert_ne!(
        sha256_file(&a.img),
        sha256_file(&c.img),
        "the seed must matter"
    );
}

/// Where the output's filesystem refuses O_DIRECT (ramfs does), the image
/// goes through the page cache instead: the same image and bmap.
#[test]
fn output_where_o_direct_is_refused_is_the_same_image() {
    use std::os::unix::fs::OpenOptionsExt;
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let sys = system("x86_64");
    let a = forge_image(&sys, 512, &[]);
    let dir = tempfile::tempdir().unwrap();
    sh(&format!("mount -t ramfs ramfs {}", dir.path().display()));
    let _mounted = Unmount(dir.path().to_owned());
    let probe = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .custom_flags(libc::O_DIRECT)
        .open(dir.path().join("probe"));
    assert_eq!(
        probe.err().and_then(|e| e.raw_os_error()),
        Some(libc::EINVAL),
        "ramfs must refuse O_DIRECT for this test to mean anything"
    );
    let img = dir.path().join("disk.img");
    ok(forge_image_of(&sys)
        .args(["--format", "raw-efi", "-o"])
        .arg(&img));
    assert_eq!(sha256_file(&img), sha256_file(&a.img));
    let bm = |i: &Path| sha256_file(Path::new(&format!("{}.bmap", i.display())));
    assert_eq!(bm(&img), bm(&a.img));
}

/// Outputs get the mode any other new file gets (0666 less the umask),
/// not the temporary file's 0600.
#[test]
fn outputs_are_created_with_the_umask_mode() {
    use std::os::unix::fs::PermissionsExt;
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let umask = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .map(|m| u32::from_str_radix(m.trim(), 8).unwrap())
        .unwrap();
    let sys = system("x86_64");
    let a = forge_image(&sys, 512, &[]);
    let bmap = PathBuf::from(format!("{}.bmap", a.img.display()));
    for f in [&a.img, &bmap] {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666 & !umask, "{}", f.display());
    }
}

// ---- bad input ----

fn image_err(sys_path: &Path, root: &Path, out_dir: &Path, extra: &[&str]) -> String {
    let e = fails(
        forge()
            .arg("image")
            .arg(sys_path)
            .arg("--root")
            .arg(root)
            .args(["--format", "raw-efi", "-o"])
            .arg(out_dir.join("disk.img"))
            .args(extra),
    );
    assert!(
        dir_entries(out_dir).is_empty(),
        "left behind: {:?}",
        dir_entries(out_dir)
    );
    e
}

#[test]
fn closure_without_systemd_boot_is_refused() {
    let sys = system("x86_64");
    let copy = store_copy(&sys);
    let top = copy.path().join(sys.toplevel.trim_start_matches('/'));
    let sd = std::fs::read_link(top.join("systemd")).unwrap();
    // Every toplevel (the system and its specialisation) links systemd.
    sh(&format!(
        "rm -f {}/nix/store/*-nixos-system-*/systemd",
        copy.path().display()
    ));
    ok(Command::new("rm")
        .arg("-rf")
        .arg(copy.path().join(sd.strip_prefix("/").unwrap())));
    let out = tempfile::tempdir().unwrap();
    let e = image_err(Path::new(&sys.toplevel), copy.path(), out.path(), &[]);
    let e = the_error(&e);
    assert!(
        e.contains("no systemd-boot") && e.contains("lib/systemd/boot/efi/systemd-bootx64.efi"),
        "{e}"
    );
}

#[test]
fn kernel_that_is_not_an_efi_stub_is_refused() {
    let sys = system("x86_64");
    let copy = store_copy(&sys);
    let boot: Value = serde_json::from_slice(
        &std::fs::read(sys.physical(&format!("{}/boot.json", sys.toplevel))).unwrap(),
    )
    .unwrap();
    let kernel = boot["org.nixos.bootspec.v1"]["kernel"]
        .as_str()
        .unwrap()
        .to_string();
    let k = copy.path().join(kernel.trim_start_matches('/'));
    std::fs::remove_file(&k).unwrap();
    std::fs::write(&k, vec![0x7fu8; 4096]).unwrap();
    let out = tempfile::tempdir().unwrap();
    let e = image_err(Path::new(&sys.toplevel), copy.path(), out.path(), &[]);
    let e = the_error(&e);
    assert!(e.contains(&kernel) && e.contains("not an EFI-stub"), "{e}");
}

#[test]
fn fixed_sizes_too_small_say_what_is_needed() {
    let sys = system("x86_64");
    let out = tempfile::tempdir().unwrap();
    let e = image_err(&sys.result, &sys.root, out.path(), &["--root-size", "2M"]);
    assert!(
        the_error(&e).contains("2097152-byte filesystem is too small")
            && e.contains("bytes are needed"),
        "{e}"
    );
    let e = image_err(&sys.result, &sys.root, out.path(), &["--esp-size", "16M"]);
    assert!(
        the_error(&e).contains("too small for FAT32") && e.contains("at least"),
        "{e}"
    );
    let e = image_err(&sys.result, &sys.root, out.path(), &["--state-size", "1M"]);
    assert!(
        the_error(&e).contains("1048576-byte filesystem is too small") && e.contains("state"),
        "{e}"
    );
}

#[test]
fn disk_size_makes_the_state_partition_and_filesystem_fill_the_disk() {
    let sys = system("x86_64");
    let im = forge_image(&sys, 512, &["--disk-size", "1G"]);
    assert_eq!(std::fs::metadata(&im.img).unwrap().len(), 1 << 30);
    assert_eq!(im.layout["size"], 1u64 << 30);
    let (off, size) = im.part(3);
    // The backup GPT keeps the last MiB.
    assert_eq!(off + size, (1 << 30) - (1 << 20));
    assert_eq!(im.layout["partitions"][2]["filesystem"]["size"], size);
    let v = ok(Command::new("sgdisk").arg("-v").arg(&im.img));
    assert!(v.contains("No problems found"), "{v}");
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("state");
    im.extract(3, &f);
    ok(Command::new("e2fsck").arg("-fn").arg(&f));
    let blocks = ok(Command::new("dumpe2fs").arg("-h").arg(&f));
    assert!(
        blocks.contains(&format!("Block count:              {}", size / 4096)),
        "{blocks}"
    );

    let out = tempfile::tempdir().unwrap();
    let e = image_err(&sys.result, &sys.root, out.path(), &["--disk-size", "64M"]);
    let e = the_error(&e);
    assert!(
        e.contains("--disk-size") && e.contains("the disk size is 67108864"),
        "{e}"
    );
}

#[test]
fn unwritable_output_directory_and_unknown_format_are_refused() {
    let sys = system("x86_64");
    let e = fails(forge_image_of(&sys).args([
        "--format",
        "raw-efi",
        "-o",
        "/nonexistent/dir/disk.img",
    ]));
    assert!(the_error(&e).contains("/nonexistent/dir"), "{e}");
    let out = tempfile::tempdir().unwrap();
    let e = fails(
        forge()
            .arg("image")
            .arg(&sys.result)
            .args(["--format", "qcow9", "-o"])
            .arg(out.path().join("x.img")),
    );
    assert!(e.contains("qcow9") && e.contains("raw-efi"), "{e}");
    assert!(dir_entries(out.path()).is_empty());
    // A directory that exists but cannot be written (as nobody).
    sh(&format!(
        "chmod 755 {0}; mkdir {0}/ro; chmod 555 {0}/ro",
        out.path().display()
    ));
    let e = fails(
        Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(bin("forge"))
            .arg("image")
            .arg(&sys.result)
            .arg("--root")
            .arg(&sys.root)
            .args(["--format", "raw-efi", "-o"])
            .arg(out.path().join("ro/disk.img")),
    );
    assert!(
        the_error(&e).contains(&format!("{}/ro", out.path().display())),
        "{e}"
    );
    assert!(dir_entries(&out.path().join("ro")).is_empty());
}

/// One description of a disk: the manifest beside the image holds the
/// same disk as `--json` prints, and `forge inspect` reads the same
/// partitions back from the bytes (sha256 is hashed only for --json;
/// inspect cannot know the filesystems' own sizes).
#[test]
fn the_layout_manifest_is_the_json_report_and_inspect_reads_it_back() {
    let sys = system("x86_64");
    let im = forge_image(&sys, 512, &[]);
    let path = im.img.with_file_name("disk.img.layout.json");
    assert_eq!(im.layout["manifest"], path.to_str().unwrap());
    let m: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for k in [
        "version",
        "table",
        "sector_size",
        "disk_id",
        "size",
        "partitions",
        "identity",
    ] {
        assert_eq!(m[k], im.layout[k], "{k}");
    }
    assert_eq!(m["version"], 1);
    assert_eq!(m["identity"]["partition"], 3);
    assert_eq!(m["identity"]["path"], "identity");
    assert_eq!(roles(&m), ["esp", "root", "state"]);
    let mut r: Value =
        serde_json::from_str(&ok(forge().arg("inspect").arg(&im.img).arg("--json"))).unwrap();
    let mut want = m.clone();
    for p in want["partitions"].as_array_mut().unwrap() {
        let p = p.as_object_mut().unwrap();
        p.remove("sha256");
    }
    for p in r["partitions"].as_array_mut().unwrap() {
        p.as_object_mut().unwrap().remove("boot_entries");
    }
    // Filesystem sizes (from the superblocks) and the identity too.
    for k in [
        "table",
        "sector_size",
        "disk_id",
        "size",
        "partitions",
        "identity",
    ] {
        assert_eq!(r[k], want[k], "{k}");
    }
}

#[test]
fn inspect_reads_back_layout_and_entries_as_blkid_sees_them() {
    let sys = system("x86_64");
    let im = forge_image(&sys, 512, &[]);
    let r: Value =
        serde_json::from_str(&ok(forge().arg("inspect").arg(&im.img).arg("--json"))).unwrap();
    assert_eq!(r["table"], "gpt");
    assert_eq!(r["disk_id"], im.layout["disk_id"]);
    let parts = r["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 3);
    for (p, want) in parts
        .iter()
        .zip(im.layout["partitions"].as_array().unwrap())
    {
        assert_eq!(p["offset"], want["offset"]);
        assert_eq!(p["size"], want["size"]);
        assert_eq!(p["guid"], want["guid"]);
        assert_eq!(p["read_only"], want["read_only"]);
        // blkid, probing the partition on its own, agrees on label and UUID.
        let probe = ok(Command::new("blkid")
            .args(["-p", "-o", "export", "-O", &want["offset"].to_string()])
            .arg(&im.img));
        let field = |k: &str| {
            probe
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or("")
                .to_string()
        };
        assert_eq!(
            field("LABEL"),
            p["filesystem"]["label"].as_str().unwrap(),
            "{probe}"
        );
        assert_eq!(
            field("UUID").to_lowercase(),
            p["filesystem"]["uuid"].as_str().unwrap().to_lowercase(),
            "{probe}"
        );
        assert_eq!(
            field("TYPE"),
            p["filesystem"]["kind"].as_str().unwrap(),
            "{probe}"
        );
    }
    let entries = parts[0]["boot_entries"].as_array().unwrap();
    let files: Vec<&str> = entries
        .iter()
        .map(|e| e["file"].as_str().unwrap())
        .collect();
    assert_eq!(
        files[..3],
        [
            "/loader/loader.conf",
            "/loader/entries/nixos-generation-1-specialisation-rescue.conf",
            "/loader/entries/nixos-generation-1.conf",
        ]
    );
    // Then every EFI program: systemd-boot unsigned, and the fixture's
    // Debian kernel with Debian's own Authenticode signature, which forge's
    // reader checks (its digest and RSA signature) as firmware does.
    for e in &entries[3..] {
        assert_eq!(e["loader"], "efi", "{e}");
        let signed = e["fields"][0][1].as_str().unwrap();
        match e["file"].as_str().unwrap() {
            "/EFI/BOOT/BOOTX64.EFI" | "/EFI/systemd/systemd-bootx64.efi" => {
                assert_eq!(signed, "no", "{e}")
            }
            _ => assert!(
                signed.starts_with("yes, by CN=Debian Secure Boot Signer"),
                "{e}"
            ),
        }
    }
    assert_eq!(files.len(), 6, "{files:?}");
    let text = ok(forge().arg("inspect").arg(&im.img));
    assert!(
        text.contains("root-x86-64") && text.contains("read-only") && text.contains("title NixOS"),
        "{text}"
    );
    let starts = format!("the default boot entry starts {}\n", sys.toplevel);
    assert!(text.contains(&starts), "{text}");
}
