//! Shared helpers for the end-to-end tests: where the fixtures and binaries
//! are, running commands with clear failure messages, loop devices that
//! clean up on drop.
//!
//! These tests run the real judges (nix-store, e2fsck, the kernel's ext4…).
//! They need `make fixtures` (run by `make test`); without it they fail and
//! say so rather than pass vacuously.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

pub mod flashing;
pub mod servers;
pub use servers::*;

/// The fixture directory made by `make fixtures`.
pub fn fixtures() -> PathBuf {
    let d = std::env::var_os("NIXFORGE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("build/fixtures"));
    assert!(
        d.join(".stamp").exists(),
        "fixtures missing at {}: run `make fixtures` (or `make test`)",
        d.display()
    );
    d
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A workspace binary: from `NIXFORGE_BIN_DIR` (the Makefile points it at
/// the release build), else beside the test executable's profile.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("NIXFORGE_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().unwrap();
            exe.parent().unwrap().parent().unwrap().to_path_buf()
        });
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

pub fn forge() -> Command {
    tool("forge")
}

/// A workspace binary, run with every signal at its default action: a
/// test run started as a background job (where SIGINT arrives ignored)
/// still sees forge and flash stop on the SIGINT the tests send them.
pub fn tool(name: &str) -> Command {
    let mut c = Command::new("env");
    c.arg("--default-signal").arg(bin(name));
    c
}

/// `forge image SYSTEM --root ROOT` of a fixture system; the caller adds
/// the format, output and options.
pub fn forge_image_of(sys: &System) -> Command {
    let mut c = forge();
    c.arg("image").arg(&sys.result).arg("--root").arg(&sys.root);
    c
}

/// A hard-linked copy of a fixture store without its database: replace
/// a file (remove, then write) rather than write into it, which would
/// change the fixture's.
pub fn store_copy(sys: &System) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("nix")).unwrap();
    ok(Command::new("cp")
        .arg("-al")
        .arg(sys.root.join("nix/store"))
        .arg(d.path().join("nix/")));
    d
}

/// The bytes of section `name` of the PE file `pe` (objcopy's), by way
/// of a file in `dir`.
pub fn pe_section(pe: &Path, name: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!("section{name}"));
    ok(Command::new("objcopy")
        .args(["-O", "binary", &format!("--only-section={name}")])
        .arg(pe)
        .arg(&out));
    std::fs::read(&out).unwrap()
}

/// A JSON array of strings, as strings.
pub fn json_strs(v: &serde_json::Value) -> Vec<&str> {
    let a = v.as_array().unwrap_or_else(|| panic!("not an array: {v}"));
    a.iter().map(|s| s.as_str().unwrap()).collect()
}

/// A [`store_copy`] of `sys` whose bootspec names a device tree (a Pi's,
/// beside the kernel), where NixOS's systemd-boot extension names it; and
/// that device tree's file.
pub fn store_with_devicetree(sys: &System) -> (tempfile::TempDir, PathBuf) {
    let copy = store_copy(sys);
    let in_copy = |p: &str| copy.path().join(p.trim_start_matches('/'));
    let spec_file = in_copy(&format!("{}/boot.json", sys.toplevel));
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&spec_file).unwrap()).unwrap();
    let kernel = spec["org.nixos.bootspec.v1"]["kernel"].as_str().unwrap();
    let dtb = format!(
        "{}/dtbs/rpi-3-b.dtb",
        Path::new(kernel).parent().unwrap().display()
    );
    let src = fixtures().join("aarch64/inputs/kernel/dtbs/broadcom/bcm2837-rpi-3-b.dtb");
    std::fs::create_dir_all(in_copy(&dtb).parent().unwrap()).unwrap();
    std::fs::copy(&src, in_copy(&dtb)).unwrap();
    spec["org.nixos.systemd-boot"]["devicetree"] = serde_json::json!(dtb);
    // Replaced, not written into: the copy's files are the fixture's.
    std::fs::remove_file(&spec_file).unwrap();
    std::fs::write(&spec_file, spec.to_string()).unwrap();
    (copy, src)
}

/// Debian 12's EFI stub (systemd-boot-efi); the fixture system has none.
pub const STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

/// A raw-efi image of the x86_64 fixture with a UKI per entry (`--uki`,
/// Debian's stub) at `img`, and its layout (`--json`).
pub fn uki_image(img: &Path, extra: &[&str]) -> serde_json::Value {
    uki_image_with(forge_image_of(&system("x86_64")), img, extra)
}

/// The same, of the system `forge` (`forge image SYSTEM --root …`) names.
pub fn uki_image_with(mut forge: Command, img: &Path, extra: &[&str]) -> serde_json::Value {
    let out = ok(forge
        .args([
            "--format",
            "raw-efi",
            "--uki",
            "--uki-stub",
            STUB,
            "--json",
            "-o",
        ])
        .arg(img)
        .args(extra));
    serde_json::from_str(&out).unwrap()
}

/// A fixture system: its store root and toplevel.
pub struct System {
    pub arch: &'static str,
    pub root: PathBuf,
    pub result: PathBuf,
    pub toplevel: String,
}

pub fn system(arch: &'static str) -> System {
    let d = fixtures().join(arch);
    let result = d.join("result");
    let toplevel = std::fs::read_link(&result)
        .unwrap_or_else(|e| panic!("{}: {e}", result.display()))
        .to_string_lossy()
        .into_owned();
    System {
        arch,
        root: d.join("store"),
        result,
        toplevel,
    }
}

impl System {
    pub fn physical(&self, logical: &str) -> PathBuf {
        self.root.join(logical.trim_start_matches('/'))
    }
    /// `nix-store --store ROOT ARGS…`, stdout as text; panics on failure.
    pub fn nix_store(&self, args: &[&str]) -> String {
        ok(Command::new("nix-store")
            .arg("--store")
            .arg(&self.root)
            .args(args))
    }
}

/// A directory `name` in `dir` holding `files` (name, text): an identity.
pub fn dir_with(dir: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(&p).unwrap();
    for (f, t) in files {
        std::fs::write(p.join(f), t).unwrap();
    }
    p
}

/// Run, require success, return stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run, require failure, return stderr.
pub fn fails(cmd: &mut Command) -> String {
    let out: Output = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        !out.status.success(),
        "{cmd:?} unexpectedly succeeded:\nstdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The partitions' roles in a layout manifest (or `--json`), in order.
pub fn roles(layout: &serde_json::Value) -> Vec<String> {
    layout["partitions"]
        .as_array()
        .expect("a partitions array")
        .iter()
        .map(|p| p["role"].as_str().expect("a role").to_string())
        .collect()
}

/// The one error line of a failed run's stderr: exactly one line starts
/// with `error:`, it is the last, and every other line is progress
/// (`forge: [..]` stages) or a `warning:`.
pub fn the_error(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    let errors = lines.iter().filter(|l| l.starts_with("error:")).count();
    assert_eq!(errors, 1, "want exactly one error line:\n{stderr}");
    let last = lines.last().copied().unwrap_or_default();
    assert!(
        last.starts_with("error:"),
        "the error is not the last line:\n{stderr}"
    );
    for l in &lines[..lines.len() - 1] {
        assert!(
            l.starts_with("forge: [") || l.starts_with("warning:") || l.starts_with("flash: "),
            "not one line of error output:\n{stderr}"
        );
    }
    last
}

/// `diff -r --no-dereference a b`, clean except for the special files diff
/// cannot compare (it reports those even when they agree; their type and
/// device numbers are compared by the callers' stat checks).
pub fn diff_tree(a: &Path, b: &Path, exclude: &[&str]) {
    let mut cmd = Command::new("diff");
    cmd.args(["-r", "--no-dereference"]);
    for x in exclude {
        cmd.args(["-x", x]);
    }
    let out = cmd.arg(a).arg(b).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let real: Vec<&str> = text
        .lines()
        .filter(|l| {
            !(l.starts_with("File ")
                && [
                    "character special file",
                    "block special file",
                    "fifo",
                    "socket",
                ]
                .iter()
                .any(|k| {
                    l.ends_with(&format!("is a {k}"))
                        && l.contains(&format!("is a {k} while file "))
                }))
        })
        .collect();
    assert!(
        real.is_empty() && out.status.code().unwrap_or(2) < 2,
        "diff -r {} {}:\n{}\n{}",
        a.display(),
        b.display(),
        real.join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `nix-store --store STORE --load-db < registration`, then `--verify
/// --check-contents`; returns verify's output (status, stderr).
pub fn load_db_and_verify(store: &Path, registration: &[u8]) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("nix-store")
        .arg("--store")
        .arg(store)
        .arg("--load-db")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(registration).unwrap();
    assert!(
        child.wait().unwrap().success(),
        "nix-store --load-db into {}",
        store.display()
    );
    let v = Command::new("nix-store")
        .arg("--store")
        .arg(store)
        .args(["--verify", "--check-contents"])
        .output()
        .unwrap();
    (
        v.status.success(),
        String::from_utf8_lossy(&v.stderr).into_owned(),
    )
}

pub fn sh(script: &str) -> String {
    ok(Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(script))
}

pub fn sha256_file(p: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    std::io::copy(&mut f, &mut h).unwrap();
    format!("{:x}", h.finalize())
}

/// Files in `dir` (non-recursive), for "nothing left behind" checks.
pub fn dir_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Tests that use loop devices and mounts run side by side: each has its
/// own devices (`losetup -f` retries a device another took first) and
/// mount points. A test that watches for devices to appear holds
/// `exclusive()`, which waits for every holder of this one.
pub fn privileged() -> RwLockReadGuard<'static, ()> {
    DEVICES.read().unwrap_or_else(|e| e.into_inner())
}

/// No other test's loop devices come or go while this is held.
pub fn exclusive() -> RwLockWriteGuard<'static, ()> {
    DEVICES.write().unwrap_or_else(|e| e.into_inner())
}

static DEVICES: RwLock<()> = RwLock::new(());

/// A loop mount of a filesystem image, undone on drop.
pub struct Mounted {
    pub dir: tempfile::TempDir,
}

impl Mounted {
    pub fn ext4(image: &Path, offset: u64, opts: &str) -> Mounted {
        Mounted::of("ext4", image, offset, opts)
    }
    /// `fs` (ext4, erofs) at byte `offset` of `image`.
    pub fn of(fs: &str, image: &Path, offset: u64, opts: &str) -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        ok(Command::new("mount")
            .args(["-t", fs, "-o"])
            .arg(format!("loop,offset={offset},{opts}"))
            .arg(image)
            .arg(dir.path()));
        Mounted { dir }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// A loop device over a file, detached (with its partition nodes) on drop.
pub struct Loop {
    pub dev: String,
}

impl Loop {
    pub fn attach(file: &Path, extra: &[&str]) -> Loop {
        let dev = ok(Command::new("losetup")
            .args(["-f", "--show"])
            .args(extra)
            .arg(file))
        .trim()
        .to_string();
        // Partition nodes a detached loop device of the same number left
        // (BLKPG partitions can outlive losetup -d here).
        let _ = Command::new("partx").args(["-d", &dev]).output();
        Loop { dev }
    }
    /// Partition nodes via BLKPG (this kernel has no partition parsers).
    pub fn partitions(&self) -> Vec<String> {
        let _ = Command::new("partx").args(["-a", &self.dev]).output();
        let mut v = Vec::new();
        for n in 1..=8 {
            let p = format!("{}p{n}", self.dev);
            if Path::new(&p).exists() {
                v.push(p);
            }
        }
        v
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("partx").args(["-d", &self.dev]).output();
        let _ = Command::new("losetup").args(["-d", &self.dev]).output();
    }
}

/// How a boot ended.
pub struct Boot {
    pub marker: Option<String>,
    pub log: String,
}

/// Boot `image` (a private copy is made) under QEMU and wait for the
/// fixture's marker line; stop early on a panic, a firmware shell, a
/// U-Boot prompt or the timeout.
pub fn boot(arch: &str, image: &Path, sector: u32, timeout: std::time::Duration) -> Boot {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    ok(Command::new("cp")
        .arg("--sparse=always")
        .arg(image)
        .arg(&disk));
    // QEMU's name for the container, from the image's name.
    let format = match image.extension().and_then(|e| e.to_str()) {
        Some("qcow2") => "qcow2",
        Some("vhd") => "vpc",
        Some("vhdx") => "vhdx",
        Some("vmdk") => "vmdk",
        _ => "raw",
    };
    boot_disks(arch, &[(disk, format, false)], sector, timeout)
}

/// Boot `disks` (file, QEMU format, read-only), in place, as virtio disks
/// vda, vdb, …; the serial log and the marker line.
pub fn boot_disks(
    arch: &str,
    disks: &[(PathBuf, &str, bool)],
    sector: u32,
    timeout: std::time::Duration,
) -> Boot {
    boot_with(arch, disks, sector, timeout, false)
}

/// Boot the ISO `image` under OVMF from a CD-ROM drive (it is read-only:
/// no copy).
pub fn boot_cd(image: &Path, timeout: std::time::Duration) -> Boot {
    boot_with(
        "x86_64",
        &[(image.to_path_buf(), "cdrom", true)],
        512,
        timeout,
        false,
    )
}

/// Boot `image` (a private copy) under OVMF with Secure Boot enforcing:
/// Debian's snakeoil firmware, whose db trusts `SNAKEOIL_CERT`.
pub fn boot_secure(image: &Path, timeout: std::time::Duration) -> Boot {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    std::fs::copy(image, &disk).unwrap();
    boot_with("x86_64", &[(disk, "raw", false)], 512, timeout, true)
}

/// The certificate Debian's snakeoil OVMF trusts, and its key (encrypted
/// with the password `snakeoil`).
pub const SNAKEOIL_CERT: &str = "/usr/share/ovmf/PkKek-1-snakeoil.pem";
pub const SNAKEOIL_KEY: &str = "/usr/share/ovmf/PkKek-1-snakeoil.key";

/// The snakeoil key decrypted into `dir` (forge takes unencrypted keys).
pub fn snakeoil_key(dir: &Path) -> PathBuf {
    let key = dir.join("snakeoil.key");
    ok(Command::new("openssl")
        .args([
            "pkey",
            "-passin",
            "pass:snakeoil",
            "-in",
            SNAKEOIL_KEY,
            "-out",
        ])
        .arg(&key));
    key
}

/// A Nix key pair named `name` made by Nix itself, into `dir`: (secret
/// key file, public key file).
pub fn nix_keys_named(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (sk, pk) = (
        dir.join(format!("{name}.sk")),
        dir.join(format!("{name}.pk")),
    );
    ok(Command::new("nix-store")
        .args(["--generate-binary-cache-key", name])
        .arg(&sk)
        .arg(&pk));
    (sk, pk)
}

/// `p` with `suffix` appended (a sidecar's name).
pub fn with(p: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}{suffix}", p.display()))
}

fn boot_with(
    arch: &str,
    disks: &[(PathBuf, &str, bool)],
    sector: u32,
    timeout: std::time::Duration,
    secure: bool,
) -> Boot {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let mut cmd = if arch == "x86_64" {
        let (code, vars_src, machine) = match secure {
            true => (
                "OVMF_CODE_4M.snakeoil.fd",
                "OVMF_VARS_4M.snakeoil.fd",
                "q35,smm=on",
            ),
            false => ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd", "q35"),
        };
        let vars = dir.path().join("vars.fd");
        std::fs::copy(format!("/usr/share/OVMF/{vars_src}"), &vars).unwrap();
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-accel", "tcg", "-machine", machine, "-m", "512"]);
        if secure {
            c.args(["-global", "driver=cfi.pflash01,property=secure,value=on"]);
        }
        c.arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/{code}"
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                vars.display()
            ));
        c
    } else {
        let mut c = Command::new("qemu-system-aarch64");
        c.args([
            "-M",
            "virt",
            "-cpu",
            "cortex-a57",
            "-accel",
            "tcg",
            "-m",
            "1024",
        ])
        .args(["-bios", "/usr/lib/u-boot/qemu_arm64/u-boot.bin"]);
        c
    };
    disk_args(&mut cmd, disks, sector);
    cmd.args(["-nic", "none", "-display", "none", "-no-reboot", "-serial"])
        .arg(format!("file:{}", log.display()));
    watch(cmd, &log, timeout)
}

/// A Raspberry Pi 3 B as QEMU's raspi3b emulates it: Debian's Pi build of
/// U-Boot as the kernel (the firmware's part), the board's DTB, `card` on
/// the SD controller (its size a power of two). The PL011 UART (U-Boot's
/// and the kernel's console) is the log.
pub fn boot_raspi3b(card: &Path, uboot: &Path, dtb: &Path, timeout: std::time::Duration) -> Boot {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let mut cmd = Command::new("qemu-system-aarch64");
    cmd.args(["-M", "raspi3b", "-kernel"])
        .arg(uboot)
        .arg("-dtb")
        .arg(dtb)
        .arg("-drive")
        .arg(format!("if=sd,format=raw,file={}", card.display()))
        .args(["-display", "none", "-no-reboot", "-serial"])
        .arg(format!("file:{}", log.display()))
        .args(["-serial", "null"]);
    watch(cmd, &log, timeout)
}

/// QEMU's arguments for `disks`: virtio disks with `sector`-byte
/// sectors, or (format "cdrom") a CD-ROM drive on virtio-scsi.
fn disk_args(cmd: &mut Command, disks: &[(PathBuf, &str, bool)], sector: u32) {
    for (i, (file, format, ro)) in disks.iter().enumerate() {
        if *format == "cdrom" {
            // A CD-ROM drive (virtio-scsi): 2048-byte sectors, read-only.
            cmd.args(["-device", &format!("virtio-scsi-pci,id=scsi{i}")])
                .arg("-drive")
                .arg(format!(
                    "if=none,id=d{i},media=cdrom,format=raw,readonly=on,file={}",
                    file.display()
                ))
                .args(["-device", &format!("scsi-cd,drive=d{i},bus=scsi{i}.0")]);
            continue;
        }
        cmd.arg("-drive")
            .arg(format!(
                "if=none,id=d{i},format={format},file={}{}{}",
                file.display(),
                if *ro { ",readonly=on" } else { "" },
                // A streamOptimized VMDK is for importing: QEMU (like
                // VMware) does not rewrite its compressed grains in place,
                // so the guest's writes go to a temporary overlay.
                if *format == "vmdk" {
                    ",snapshot=on"
                } else {
                    ""
                }
            ))
            .arg("-device")
            .arg(format!(
                "virtio-blk-pci,drive=d{i},logical_block_size={sector},physical_block_size={sector}"
            ));
    }
}

/// Run QEMU until the fixture's marker line, a panic, a firmware shell or
/// U-Boot prompt, its exit or the timeout.
fn watch(mut cmd: Command, log: &Path, timeout: std::time::Duration) -> Boot {
    let err = log.with_extension("stderr");
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap());
    let mut child = cmd.spawn().expect("starting qemu");
    let start = std::time::Instant::now();
    let text = || String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let exited = child.try_wait().unwrap().is_some();
        let t = text();
        // A whole line: the serial console writes the marker a few bytes
        // at a time, and a read between them would see only its start.
        let marker = t
            .split_inclusive('\n')
            .find(|l| l.contains("NIXFORGE-BOOT-") && (l.ends_with('\n') || exited))
            .map(|l| l.trim().to_string());
        let stuck = t.contains("Kernel panic") || t.contains("Shell> ") || t.contains("\n=> ");
        // Secure Boot refusing an image (OVMF's boot manager, systemd-boot).
        let refused = t.contains("Access Denied") || t.contains("Security Violation");
        if marker.is_some() || stuck || refused || exited || start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let qemu = std::fs::read_to_string(&err).unwrap_or_default();
            let log = if qemu.is_empty() {
                t
            } else {
                format!("{t}\nqemu: {qemu}")
            };
            return Boot { marker, log };
        }
    }
}

/// A copy of a fixture store: with or without its Nix database; hard links
/// (cheap) or real copies (safe to chmod).
pub fn copy_store(sys: &System, with_db: bool, hardlink: bool) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let flag = if hardlink { "-al" } else { "-a" };
    std::fs::create_dir_all(d.path().join("nix/var/nix")).unwrap();
    ok(Command::new("cp")
        .arg(flag)
        .arg(sys.root.join("nix/store"))
        .arg(d.path().join("nix/")));
    if with_db {
        // The database and schema files only: tests running `nix-store` on
        // the fixture store at the same time make and remove its -wal and
        // -shm files.
        let db = d.path().join("nix/var/nix/db");
        std::fs::create_dir_all(&db).unwrap();
        for f in ["db.sqlite", "schema"] {
            std::fs::copy(sys.root.join("nix/var/nix/db").join(f), db.join(f)).unwrap();
        }
    }
    d
}

/// Start a forge command held at its first stage line containing `at`
/// (`NIXFORGE_FORGE_PAUSE`), once it says it paused: to interrupt it at a
/// known moment.
pub fn spawn_paused(cmd: &mut Command, at: &str) -> std::process::Child {
    use std::io::{BufRead, BufReader};
    let mut child = cmd
        .env("NIXFORGE_FORGE_PAUSE", at)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    for line in err.lines().map_while(Result::ok) {
        let paused = line.contains("forge: paused");
        seen.push(line);
        if paused {
            return child;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("never paused at {at:?}: {seen:?}");
}

/// `openssl pkeyutl -verify` of `sig` (NAME:BASE64) over `message` with the
/// Nix public key `pk` (NAME:BASE64 of the raw 32 bytes).
pub fn openssl_verifies(dir: &Path, pk: &str, message: &Path, sig: &str) -> bool {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let raw = b64.decode(pk.trim().split_once(':').unwrap().1).unwrap();
    let mut der = vec![
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    der.extend(raw);
    let pem = dir.join("pub.pem");
    let text = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        b64.encode(der)
    );
    std::fs::write(&pem, text).unwrap();
    let bin = dir.join("sig.bin");
    std::fs::write(
        &bin,
        b64.decode(sig.trim().split_once(':').unwrap().1).unwrap(),
    )
    .unwrap();
    Command::new("openssl")
        .args(["pkeyutl", "-verify", "-pubin", "-rawin", "-inkey"])
        .arg(&pem)
        .arg("-in")
        .arg(message)
        .arg("-sigfile")
        .arg(&bin)
        .output()
        .unwrap()
        .status
        .success()
}

/// A detached tmux session running `cmd` in a 200×50 terminal, killed
/// on drop.
pub struct Tmux(String);

impl Tmux {
    pub fn start(name: &str, cmd: &str) -> Tmux {
        ok(Command::new("tmux").args([
            "new-session",
            "-d",
            "-s",
            name,
            "-x",
            "200",
            "-y",
            "50",
            cmd,
        ]));
        Tmux(name.to_string())
    }
    /// The visible screen, as text.
    pub fn screen(&self) -> String {
        ok(Command::new("tmux").args(["capture-pane", "-p", "-t", &self.0]))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .output();
    }
}
