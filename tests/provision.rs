//! Provisioning at the bench (issue 17): per-device identities, a state
//! partition grown to each device's end, the fake-capacity probe; judged
//! by sgdisk, sfdisk, e2fsck, debugfs, ssh-keygen and QEMU, on loop
//! devices (and a FUSE-backed file for the fake card).

use nixforge_tests::flashing::*;
use nixforge_tests::*;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// An identity directory: a hostname, a Wi-Fi file (0600) and a script
/// (0755) in a sub-directory.
fn identity(root: &Path, name: &str) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(d.join("bin")).unwrap();
    std::fs::write(d.join("hostname"), format!("{name}\n")).unwrap();
    let wifi = d.join("wpa_supplicant.conf");
    std::fs::write(
        &wifi,
        format!("network={{ssid=\"bench\" psk=\"{name}-secret\"}}\n"),
    )
    .unwrap();
    std::fs::set_permissions(&wifi, std::fs::Permissions::from_mode(0o600)).unwrap();
    let s = d.join("bin/first-boot");
    std::fs::write(&s, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn debugfs(part: &str, req: &str) -> String {
    ok(Command::new("debugfs").args(["-R", req, part]))
}

/// Partition `n`'s (start, size) in bytes, as sfdisk reads the table.
fn partition(dev: &str, n: usize) -> (u64, u64) {
    let j: Value = serde_json::from_str(&ok(Command::new("sfdisk").args(["--json", dev]))).unwrap();
    let p = &j["partitiontable"]["partitions"][n - 1];
    let ss = j["partitiontable"]["sectorsize"].as_u64().unwrap_or(512);
    (
        p["start"].as_u64().unwrap() * ss,
        p["size"].as_u64().unwrap() * ss,
    )
}

/// The bytes of the device's partitions other than state equal the
/// image's (where the image maps them: its bmap ranges).
fn others_match_the_image(dev: &str, img: &Path, state_start: u64) {
    let bmap = std::fs::read_to_string(format!("{}.bmap", img.display())).unwrap();
    let mut n = 0;
    for line in bmap.lines().filter(|l| l.contains("<Range")) {
        let r = line
            .split('>')
            .nth(1)
            .unwrap()
            .split('<')
            .next()
            .unwrap()
            .trim();
        let (a, b) = r.split_once('-').unwrap_or((r, r));
        let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
        let (off, len) = (a * 4096, (b - a + 1) * 4096);
        if off >= 1 << 20 && off + len <= state_start {
            let cmp = Command::new("cmp")
                .arg(format!("--ignore-initial={off}:{off}"))
                .arg(format!("--bytes={len}"))
                .arg(img)
                .arg(dev)
                .status()
                .unwrap();
            assert!(
                cmp.success(),
                "{dev} differs from {} in {off}+{len}",
                img.display()
            );
            n += 1;
        }
    }
    assert!(n > 0, "no range compared");
}

fn flash_json(args: &[&str]) -> Vec<Value> {
    let out = ok(flash()
        .args(args)
        .args(["--yes", "--allow-non-removable", "--json"]));
    serde_json::from_str::<Vec<Value>>(&out).unwrap()
}

/// The checks both layouts share: the state partition ends at the device's
/// last whole MiB before any backup table, its ext4 spans it, and
/// /var/identity holds exactly the identity's files with their modes.
fn judge_state(lo: &Loop, n: usize, table_end: u64, dev_size: u64, name: &str) {
    let (start, size) = partition(&lo.dev, n);
    assert_eq!(start + size, table_end / (1 << 20) * (1 << 20), "{name}");
    assert!(
        dev_size - (start + size) < (2 << 20),
        "{name}: fills the device"
    );
    let parts = lo.partitions();
    let state = &parts[n - 1];
    ok(Command::new("e2fsck").arg("-fn").arg(state));
    let sb = ok(Command::new("dumpe2fs").arg("-h").arg(state));
    let blocks: u64 = sb
        .lines()
        .find_map(|l| l.strip_prefix("Block count:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        blocks * 4096,
        size,
        "{name}: the filesystem spans the partition"
    );
    let ls = debugfs(state, "ls -p /identity");
    let mut names: Vec<&str> = ls
        .lines()
        .filter_map(|l| l.split('/').nth(5))
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "bin",
            "hostname",
            "machine-id",
            "ssh_host_ed25519_key",
            "ssh_host_ed25519_key.pub",
            "wpa_supplicant.conf"
        ],
        "{name}: {ls}"
    );
    assert_eq!(
        debugfs(state, "cat /identity/hostname"),
        format!("{name}\n")
    );
    let mode = |p: &str| {
        let s = debugfs(state, &format!("stat {p}"));
        s.split("Mode:")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(mode("/identity/wpa_supplicant.conf"), "0600");
    assert_eq!(mode("/identity/bin/first-boot"), "0755");
    assert_eq!(mode("/identity/ssh_host_ed25519_key"), "0600");
    assert!(debugfs(state, "cat /identity/wpa_supplicant.conf").contains(&format!("{name}-secret")));
}

#[test]
fn two_gpt_devices_of_different_sizes_each_get_their_identity_and_a_state_partition_to_their_end() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let img = raw_efi(d.path(), 512);
    let ids = d.path().join("ids");
    let (a, b) = (identity(&ids, "bench-a"), identity(&ids, "bench-b"));
    let (_fa, la) = sparse_device(d.path(), "a", 1200 << 20);
    let (_fb, lb) = sparse_device(d.path(), "b", 2 << 30);
    let reports = flash_json(&[
        img.to_str().unwrap(),
        &la.dev,
        &lb.dev,
        "--identities",
        ids.to_str().unwrap(),
        "--fill",
        "--probe",
        "--generate-host-keys",
    ]);
    for (r, (lo, dir, name, size)) in reports.iter().zip([
        (&la, &a, "bench-a", 1200u64 << 20),
        (&lb, &b, "bench-b", 2 << 30),
    ]) {
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["identity"], dir.to_str().unwrap());
        assert_eq!(r["size"], size);
        let v = ok(Command::new("sgdisk").arg("-v").arg(&lo.dev));
        assert!(v.contains("No problems found"), "{v}");
        // The backup GPT at the device's end: the last usable LBA is near it.
        let p = ok(Command::new("sgdisk").arg("-p").arg(&lo.dev));
        assert!(
            p.contains(&format!("last usable sector is {}", size / 512 - 34)),
            "{p}"
        );
        judge_state(lo, 3, size - 33 * 512, size, name);
        // The host key the report names is the one on the device.
        let parts = lo.partitions();
        let pubkey = debugfs(&parts[2], "cat /identity/ssh_host_ed25519_key.pub");
        // Its comment names the machine (the identity's hostname file).
        assert!(
            pubkey.trim_end().ends_with(&format!(" root@{name}")),
            "{pubkey}"
        );
        let kf = d.path().join(format!("{name}.pub"));
        std::fs::write(&kf, &pubkey).unwrap();
        let fp = ok(Command::new("ssh-keygen").arg("-lf").arg(&kf));
        assert!(
            fp.contains(r["host_key"]["fingerprint"].as_str().unwrap()),
            "{fp}"
        );
        let (state_start, _) = partition(&lo.dev, 3);
        others_match_the_image(&lo.dev, &img, state_start);
        ok(Command::new("fsck.fat").arg("-n").arg(&parts[0]));
        ok(Command::new("e2fsck").arg("-fn").arg(&parts[1]));
    }
    // Each device's machine-id is its own.
    let mid = |lo: &Loop| debugfs(&lo.partitions()[2], "cat /identity/machine-id");
    assert_ne!(mid(&la), mid(&lb));
}

#[test]
fn an_sd_image_gets_its_identity_and_its_mbr_state_partition_fills_the_card() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let img = sd_image(d.path(), "sd.img");
    let id = identity(d.path(), "pi-7");
    let (_f, lo) = sparse_device(d.path(), "card", 1 << 30);
    // The identity named for its device (DEV=DIR).
    let reports = flash_json(&[
        img.to_str().unwrap(),
        &lo.dev,
        "--identity",
        &format!("{}={}", lo.dev, id.display()),
        "--fill",
        "--probe",
        "--generate-host-keys",
    ]);
    assert_eq!(reports[0]["ok"], true, "{:?}", reports);
    ok(Command::new("sfdisk").arg("-V").arg(&lo.dev));
    judge_state(&lo, 3, 1 << 30, 1 << 30, "pi-7");
    let (state_start, _) = partition(&lo.dev, 3);
    others_match_the_image(&lo.dev, &img, state_start);
    // flash verify agrees, leaving out the card's own state partition
    // (its MBR entry checked as --fill writes it).
    let (code, out) = verify(&img, &lo.dev, &["--except-state"]);
    assert_eq!(code, 0, "{out}");
    let (code, _) = verify(&img, &lo.dev, &[]);
    assert_eq!(code, 3);
}

#[test]
fn a_flashed_device_boots_and_stage_one_reads_the_hostname_from_var_identity() {
    let d = tempfile::tempdir().unwrap();
    let img = raw_efi(d.path(), 512);
    let id = identity(d.path(), "booted-from-card");
    let bytes = d.path().join("card.img");
    {
        let _g = privileged();
        let (f, lo) = sparse_device(d.path(), "card", 1536 << 20);
        flash_json(&[
            img.to_str().unwrap(),
            &lo.dev,
            "--identity",
            id.to_str().unwrap(),
            "--fill",
        ]);
        drop(lo);
        std::fs::rename(f, &bytes).unwrap();
    }
    let b = boot("x86_64", &bytes, 512, std::time::Duration::from_secs(240));
    let m = b.marker.unwrap_or_else(|| panic!("no marker:\n{}", b.log));
    assert!(m.contains("hostname=booted-from-card"), "{m}");
}

/// The journal superblock's first transaction number, as dumpe2fs reads it.
fn journal_sequence(part: &str) -> u32 {
    let h = ok(Command::new("dumpe2fs").arg("-h").arg(part));
    let v = h
        .lines()
        .find_map(|l| l.strip_prefix("Journal sequence:"))
        .unwrap_or_else(|| panic!("no journal sequence:\n{h}"));
    u32::from_str_radix(v.trim().trim_start_matches("0x"), 16).unwrap()
}

/// debugfs's journal writer: one transaction per (block, contents).
fn journal_write(dir: &Path, part: &str, txs: &[(u64, &[u8])]) {
    let mut cmds = String::from("jo\n");
    for (i, (block, bytes)) in txs.iter().enumerate() {
        let f = dir.join(format!("tx{i}"));
        std::fs::write(&f, bytes).unwrap();
        cmds += &format!("jw -b {block} {}\n", f.display());
    }
    cmds += "jc\n";
    let f = dir.join("cmds");
    std::fs::write(&f, cmds).unwrap();
    // debugfs -f reports a failed command on stderr (exit 0): stderr
    // must hold its version banner and nothing else.
    let out = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&f)
        .arg(part)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.lines().all(|l| l.starts_with("debugfs ")),
        "{err}"
    );
}

/// A device's state filesystem keeps the card's old bytes in its journal
/// (only the journal's superblock is written). Here those old bytes are
/// the worst case: the journal of this same image and identity flashed
/// before, holding a transaction that would zero the identity directory.
/// A crash of the new filesystem right after its first commit must not
/// replay it, which the kernel's recovery decides by sequence number.
#[test]
fn a_stale_journal_left_by_an_earlier_flash_is_never_replayed() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let img = raw_efi(d.path(), 512);
    let id = identity(d.path(), "again");
    std::fs::write(id.join("machine-id"), "0123456789abcdef0123456789abcdef\n").unwrap();
    let (_f, lo) = sparse_device(d.path(), "card", 1200 << 20);
    let args = [
        img.to_str().unwrap(),
        &lo.dev,
        "--identity",
        id.to_str().unwrap(),
        "--fill",
    ];
    flash_json(&args);
    let state = lo.partitions()[2].clone();
    let old = journal_sequence(&state);
    let dir: u64 = debugfs(&state, "blocks /identity").trim().parse().unwrap();
    let block = |part: &str| -> Vec<u8> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(part).unwrap();
        f.seek(SeekFrom::Start(dir * 4096)).unwrap();
        let mut b = vec![0u8; 4096];
        f.read_exact(&mut b).unwrap();
        b
    };
    // The old life: a harmless transaction, then a harmful one.
    let good = block(&state);
    journal_write(d.path(), &state, &[(dir, &good), (dir, &[0u8; 4096])]);
    let log = debugfs(&state, "logdump");
    assert!(
        log.contains(&format!(
            "Found expected sequence {}, type 1 (descriptor block) at block 4",
            old.wrapping_add(1)
        )),
        "{log}"
    );
    // Control: replayed, that journal does wreck this filesystem.
    ok(Command::new("debugfs").args(["-w", "-R", "jr"]).arg(&state));
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&state)
        .output()
        .unwrap();
    assert!(!fsck.status.success(), "the stale journal is harmless?");

    // Flashed again, same image, same identity: only the sequence differs.
    flash_json(&args);
    let state = lo.partitions()[2].clone();
    let new = journal_sequence(&state);
    assert!(
        new != old && new != old.wrapping_add(1),
        "{new:#x} vs {old:#x}"
    );
    ok(Command::new("e2fsck").arg("-fn").arg(&state));
    assert_eq!(block(&state), good);
    // A crash after the first commit: recovery must stop where it ends.
    journal_write(d.path(), &state, &[(dir, &good)]);
    let log = debugfs(&state, "logdump");
    assert!(
        log.contains(&format!(
            "Found expected sequence {new}, type 2 (commit block) at block 3"
        )),
        "{log}"
    );
    let stale = format!(
        "Found sequence {} (not {}) at block 4: end of journal.",
        old.wrapping_add(1),
        new.wrapping_add(1)
    );
    assert!(log.contains(&stale), "{log}");
    // The kernel replays it on mount; the identity is whole.
    let mnt = d.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    ok(Command::new("mount")
        .args(["-t", "ext4"])
        .arg(&state)
        .arg(&mnt));
    let host = std::fs::read_to_string(mnt.join("identity/hostname"));
    let names = std::fs::read_dir(mnt.join("identity")).map(|r| r.count());
    ok(Command::new("umount").arg(&mnt));
    assert_eq!(host.unwrap(), "again\n");
    assert_eq!(
        names.unwrap(),
        4,
        "hostname, machine-id, wpa_supplicant.conf, bin"
    );
    ok(Command::new("e2fsck").arg("-fn").arg(&state));
}

/// `flash verify` of a device, its exit code and output.
fn verify(img: &Path, dev: &str, extra: &[&str]) -> (i32, String) {
    let out = flash()
        .arg("verify")
        .arg(img)
        .arg(dev)
        .arg("--allow-non-removable")
        .args(extra)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// One byte of a device replaced (synced), returning the old one.
fn poke(dev: &str, off: u64, byte: u8) -> u8 {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .unwrap();
    let mut old = [0u8];
    f.seek(SeekFrom::Start(off)).unwrap();
    f.read_exact(&mut old).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    f.write_all(&[byte]).unwrap();
    f.sync_all().unwrap();
    old[0]
}

/// A provisioned (or booted) device differs from its image in the state
/// partition by design: `flash verify --except-state` compares the rest,
/// and the table against what --fill writes for the partition's size.
#[test]
fn verify_except_state_compares_all_but_the_devices_own_state_partition() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let img = raw_efi(d.path(), 512);
    let id = identity(d.path(), "checked");
    let (_f, lo) = sparse_device(d.path(), "card", 1200 << 20);
    let i = img.to_str().unwrap();
    // The identity alone: the image's table, its state partition replaced.
    flash_json(&[i, &lo.dev, "--identity", id.to_str().unwrap()]);
    let (code, out) = verify(&img, &lo.dev, &[]);
    assert_eq!(code, 3, "the state partition differs: {out}");
    let (code, out) = verify(&img, &lo.dev, &["--except-state"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("except its state partition"), "{out}");
    // Grown to the end: the table is checked as --fill writes it.
    flash_json(&[i, &lo.dev, "--identity", id.to_str().unwrap(), "--fill"]);
    let (code, out) = verify(&img, &lo.dev, &["--except-state"]);
    assert_eq!(code, 0, "{out}");
    let (state, size) = partition(&lo.dev, 3);
    assert!(
        out.contains(&format!("({size} bytes, the device's own)")),
        "{out}"
    );
    // A byte of the root filesystem (its superblock) is still compared...
    let (root, _) = partition(&lo.dev, 2);
    let at = root + 1024 + 120;
    let old = poke(&lo.dev, at, 0x5A ^ 0xFF);
    let (code, out) = verify(&img, &lo.dev, &["--except-state"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains(&format!("byte {at} ")), "{out}");
    poke(&lo.dev, at, old);
    // A byte of the state partition is the device's own.
    poke(&lo.dev, state + (8 << 20), 0x77);
    let (code, out) = verify(&img, &lo.dev, &["--except-state"]);
    assert_eq!(code, 0, "{out}");
    // The table is still compared: the state partition's entry renamed
    // (a valid GPT, CRCs right) differs from what --fill writes...
    ok(Command::new("sgdisk")
        .args(["-c", "3:renamed"])
        .arg(&lo.dev));
    let (code, out) = verify(&img, &lo.dev, &["--except-state"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("the first difference"), "{out}");
    // ...and an entry array that fails its CRC is named as such.
    poke(&lo.dev, 1024 + 2 * 128 + 56, b'X');
    let (code, out) = verify(&img, &lo.dev, &["--except-state"]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("entry array CRC mismatch"), "{out}");
    // An image without a state partition cannot say which one to leave out.
    let no_state = d.path().join("no-state.img");
    ok(forge_image_of(&system("x86_64"))
        .args(["--format", "raw-efi", "--state-size", "none", "-o"])
        .arg(&no_state));
    let (code, out) = verify(&no_state, &lo.dev, &["--except-state"]);
    assert_ne!(code, 0);
    assert!(out.contains("has no state partition"), "{out}");
    assert_eq!(out.trim().lines().count(), 1, "{out}");
}

/// Bytes of a device, hashed.
fn hash_dev(dev: &str) -> String {
    sha256_file(Path::new(dev))
}

#[test]
fn bad_provisioning_input_is_one_line_and_writes_nothing() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let img = raw_efi(d.path(), 512);
    // Just large enough for the image, with old data at both ends.
    let size = (std::fs::metadata(&img).unwrap().len() + (8 << 20)) / (1 << 20) * (1 << 20);
    let (_fa, la) = sparse_device(d.path(), "a", size);
    let (_fb, lb) = sparse_device(d.path(), "b", size);
    sh(&format!(
        "dd if=/dev/urandom of={0} bs=1M count=4 status=none && \
         dd if=/dev/urandom of={0} bs=1M count=4 seek={1} status=none",
        la.dev,
        size / (1 << 20) - 4
    ));
    let before = (hash_dev(&la.dev), hash_dev(&lb.dev));
    let outside = d.path().join("secret");
    std::fs::write(&outside, "not yours").unwrap();
    let escaping = identity(d.path(), "escaping");
    std::os::unix::fs::symlink(&outside, escaping.join("stolen")).unwrap();
    let three = d.path().join("three");
    for n in ["x", "y", "z"] {
        identity(&three, n);
    }
    let one = identity(d.path(), "one");
    let no_state = d.path().join("no-state.img");
    ok(forge_image_of(&system("x86_64"))
        .args(["--format", "raw-efi", "--state-size", "none", "-o"])
        .arg(&no_state));
    let i = img.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![i, &la.dev, "--identity", "/nonexistent/identity"],
            "/nonexistent/identity",
        ),
        (
            vec![i, &la.dev, "--identity", escaping.to_str().unwrap()],
            "leading outside the identity directory",
        ),
        (
            vec![i, &la.dev, &lb.dev, "--identities", three.to_str().unwrap()],
            "3 identities for 2 devices",
        ),
        (
            vec![i, &la.dev, &lb.dev, "--identity", one.to_str().unwrap()],
            "--same-identity",
        ),
        (
            vec![no_state.to_str().unwrap(), &la.dev, "--fill"],
            "no state partition",
        ),
        (
            vec![i, &la.dev, "--identity", "/dev/loop-none=/tmp"],
            "none of the devices given",
        ),
    ];
    for (args, want) in cases {
        let out = flash()
            .args(&args)
            .args(["--yes", "--allow-non-removable"])
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {e}");
        assert!(the_error(&e).contains(want), "{args:?}: {e}");
        assert_eq!(
            (hash_dev(&la.dev), hash_dev(&lb.dev)),
            before,
            "{args:?}: zero bytes written"
        );
    }
}

/// A fake card mounted through FUSE (tests/tools/fakecard.py), on a loop
/// device; unmounted on drop.
struct FakeCard {
    mnt: PathBuf,
    child: std::process::Child,
}

impl Drop for FakeCard {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// tests/tools/fakecard.py serving `card` of `size` bytes from `backing`,
/// mounted under `dir`, once its file is there.
fn fake_card(dir: &Path, backing: &Path, size: u64, extra: &[&str]) -> FakeCard {
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let child = Command::new("/usr/bin/python3")
        .arg(workspace().join("tests/tools/fakecard.py"))
        .arg(&mnt)
        .arg(backing)
        .arg(size.to_string())
        .args(extra)
        .spawn()
        .expect("python3 with fusepy (scripts/deps.sh installs python3-fusepy)");
    let card = FakeCard { mnt, child };
    for _ in 0..100 {
        if card.mnt.join("card").exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    card
}

#[test]
fn a_card_that_dies_mid_probe_exits_4_saying_its_samples_are_lost() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let img = raw_efi(d.path(), 512);
    let backing = d.path().join("backing");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let card = fake_card(d.path(), &backing, 1 << 30, &["dies-after-sync"]);
    let lo = Loop::attach(&card.mnt.join("card"), &[]);
    let out = flash()
        .arg(&img)
        .arg(&lo.dev)
        .args(["--probe", "--yes", "--allow-non-removable"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{e}");
    assert!(the_error(&e).contains("restoring the probed block"), "{e}");
    drop(lo);
    drop(card);
}

#[test]
fn a_fake_card_whose_upper_half_is_its_lower_half_is_refused_and_left_as_it_was() {
    let _g = privileged();
    let d = tempfile::tempdir().unwrap();
    let img = raw_efi(d.path(), 512);
    let backing = d.path().join("backing");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    // Old contents the probe must put back.
    sh(&format!(
        "dd if=/dev/urandom of={0} bs=1M count=2 conv=notrunc status=none && \
         dd if=/dev/urandom of={0} bs=1M count=2 seek=300 conv=notrunc status=none",
        backing.display()
    ));
    let card = fake_card(d.path(), &backing, 1 << 30, &[]);
    let mnt = card.mnt.clone();
    let before = sha256_file(&backing);
    {
        let lo = Loop::attach(&mnt.join("card"), &[]);
        let out = flash()
            .arg(&img)
            .arg(&lo.dev)
            .args(["--probe", "--yes", "--allow-non-removable"])
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{e}");
        let line = the_error(&e);
        assert!(
            line.contains("real capacity")
                && line.contains("fake capacity")
                && line.contains("was found at byte"),
            "{line}"
        );
    }
    assert_eq!(
        sha256_file(&backing),
        before,
        "the card's bytes are as before"
    );
    drop(card);
}

#[test]
fn a_pi_card_flashed_with_an_identity_boots_on_qemus_raspi3b_and_reads_it() {
    let sys = system("aarch64");
    let d = tempfile::tempdir().unwrap();
    // Debian's Pi U-Boot as the firmware partition's kernel= file, put
    // there under the name config.txt starts, as the README's flake does
    // with nixpkgs' ubootRaspberryPi3_64bit (which holds u-boot.bin).
    let uboot = fixtures().join("aarch64/u-boot-rpi.bin");
    let img = d.path().join("sd.img");
    ok(forge_image_of(&sys)
        .args(["--format", "sd-aarch64", "--firmware"])
        .arg(format!("u-boot-rpi3.bin={}", uboot.display()))
        .arg("-o")
        .arg(&img));
    let id = identity(d.path(), "pi-on-the-bench");
    // A 1 GiB card (QEMU's SD wants a power of two), read back as a file.
    let card = d.path().join("card.img");
    {
        let _g = privileged();
        let (f, lo) = sparse_device(d.path(), "card", 1 << 30);
        let r = flash_json(&[
            img.to_str().unwrap(),
            &lo.dev,
            "--identity",
            id.to_str().unwrap(),
            "--fill",
        ]);
        assert_eq!(r[0]["ok"], true, "{r:?}");
        drop(lo);
        std::fs::rename(f, &card).unwrap();
    }
    let dtbs = std::fs::read_link(sys.physical(&format!("{}/dtbs", sys.toplevel))).unwrap();
    let dtb = sys
        .physical(dtbs.to_str().unwrap())
        .join("broadcom/bcm2837-rpi-3-b.dtb");
    let b = boot_raspi3b(&card, &uboot, &dtb, std::time::Duration::from_secs(300));
    let m = b.marker.unwrap_or_else(|| panic!("no marker:\n{}", b.log));
    assert!(m.starts_with("NIXFORGE-BOOT-OK"), "{m}");
    assert!(m.contains("table=mbr") && m.contains("var=rw"), "{m}");
    assert!(m.contains("hostname=pi-on-the-bench"), "{m}");
    assert!(b.log.contains("mmcblk0"), "root and /var from the SD card");
}
