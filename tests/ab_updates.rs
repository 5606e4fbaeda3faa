//! A/B updates (issue 27): `forge image --slots 2` lays out two root
//! slots as systemd-sysupdate finds them, `forge update` writes a
//! version's artefacts and transfer definitions, and systemd-sysupdate 254
//! (Debian's backports build, unpacked by `make tools`) installs them.

use nixforge_tests::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The fixture's image or update arguments: raw-efi, UKIs, `extra`.
pub(crate) fn slots_cmd(verb: &str, extra: &[&str]) -> Command {
    let sys = system("x86_64");
    let mut c = forge();
    c.arg(verb).arg(&sys.result).arg("--root").arg(&sys.root);
    c.args(["--uki", "--uki-stub", STUB]).args(extra);
    c
}

pub(crate) fn json(cmd: &mut Command) -> Value {
    serde_json::from_str(&ok(cmd)).unwrap()
}

/// Where `make tools` unpacked systemd 254 (its binaries in lib/systemd/,
/// its shared library in [`SYSTEMD_LIBS`]).
pub(crate) fn systemd_tools() -> PathBuf {
    let dir = std::env::var_os("NIXFORGE_SYSTEMD_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| fixtures().parent().unwrap().join("tools/systemd"));
    let bin = dir.join("lib/systemd/systemd-sysupdate");
    assert!(bin.exists(), "{}: run make tools", bin.display());
    dir
}

pub(crate) const SYSTEMD_LIBS: &str = "usr/lib/x86_64-linux-gnu/systemd";

/// systemd-sysupdate 254, unpacked beside the system's systemd.
pub(crate) fn sysupdate(defs: &Path) -> Command {
    let dir = systemd_tools();
    let mut c = Command::new(dir.join("lib/systemd/systemd-sysupdate"));
    c.env("LD_LIBRARY_PATH", dir.join(SYSTEMD_LIBS));
    c.arg(format!("--definitions={}", defs.display()));
    c.arg("--no-pager");
    c
}

/// The partitions of a disk image as sfdisk reads them: (name, uuid,
/// start byte, size in bytes).
pub(crate) fn gpt(img: &Path) -> Vec<(String, String, u64, u64)> {
    let v: Value =
        serde_json::from_str(&ok(Command::new("sfdisk").arg("--json").arg(img))).unwrap();
    v["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let name = p["name"].as_str().unwrap_or("").to_string();
            let uuid = p["uuid"].as_str().unwrap().to_lowercase();
            (
                name,
                uuid,
                p["start"].as_u64().unwrap() * 512,
                p["size"].as_u64().unwrap() * 512,
            )
        })
        .collect()
}

/// `len` bytes of `img` at `off`, as a file.
pub(crate) fn extract(img: &Path, off: u64, len: u64, to: &Path) {
    let b = std::fs::read(img).unwrap();
    std::fs::write(to, &b[off as usize..(off + len) as usize]).unwrap();
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// The ESP's directories that boot files go to: UKIs; type 1 entries and
/// the kernels and initrds they name.
pub(crate) const ESP_DIRS: [&str; 3] = ["EFI/Linux", "EFI/nixos", "loader/entries"];

/// The definitions `forge update --source` wrote, pointed at a disk image
/// and a copy of its ESP instead of the running system's (`Path=auto`,
/// the [`ESP_DIRS`] under `$BOOT`); nothing else changed.
pub(crate) fn definitions_for(publ: &Path, img: &Path, esp: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(publ.join("sysupdate.d")).unwrap() {
        let e = e.unwrap();
        let text = std::fs::read_to_string(e.path()).unwrap();
        assert!(
            text.contains("Path=auto") || text.contains("PathRelativeTo=boot"),
            "{text}"
        );
        let mut text = text.replace("Path=auto", &format!("Path={}", img.display()));
        for dir in ESP_DIRS {
            text = text.replace(
                &format!("Path=/{dir}\nPathRelativeTo=boot"),
                &format!("Path={}/{dir}", esp.display()),
            );
        }
        std::fs::write(to.join(e.file_name()), text).unwrap();
    }
}

/// The GPT names of `img`'s partitions.
pub(crate) fn names(img: &Path) -> Vec<String> {
    gpt(img).into_iter().map(|p| p.0).collect()
}

/// The options of a version-1 image with two slots.
pub(crate) const VERSION_1: [&str; 6] = ["--slots", "2", "--version", "1", "--seed", "one"];

/// A version-1 image with two slots at `img`, checked: the slots' names,
/// sizes and room, the empty slot without a filesystem, inspect's view.
fn version_1_image(img: &Path, verity: bool) {
    let v: &[&str] = if verity { &["--verity"] } else { &[] };
    let mut c = slots_cmd("image", v);
    let layout = json(c.args(VERSION_1).args(["--json", "-o"]).arg(img));
    let parts = gpt(img);
    let r = json(forge().args(["inspect", "--json"]).arg(img));
    let want = json!([
        {"partition": 2, "version": "1", "entry": "/EFI/Linux/nixos_1+3.efi",
         "tries_left": 3, "tries_done": 0, "state": "on trial"},
        {"partition": 2 + 1 + verity as u32, "version": null, "entry": null, "state": "empty"},
    ]);
    assert_eq!(r["slots"], want);
    // The system the default entry (`nixos_*`, a glob) starts.
    assert_eq!(r["toplevel"], system("x86_64").toplevel, "{r}");
    let want: &[&str] = match verity {
        true => &["ESP", "nixos_1", "nixos_1", "_empty", "_empty", "state"],
        false => &["ESP", "nixos_1", "_empty", "state"],
    };
    assert_eq!(names(img), want, "verity {verity}");
    let n = if verity { 2 } else { 1 };
    for k in 1..=n {
        assert_eq!(parts[k].3, parts[k + n].3, "slot B is as large as slot A");
        assert!(
            layout["partitions"][k + n]["filesystem"].is_null(),
            "{layout}"
        );
    }
    // The slot leaves room: the root filesystem is smaller than it.
    let fs_size = layout["partitions"][1]["filesystem"]["size"]
        .as_u64()
        .unwrap();
    assert!(
        parts[1].3 >= fs_size + fs_size / 4,
        "{fs_size} in {}",
        parts[1].3
    );
}

/// After sysupdate installed version 2 (`report`, forge update's): the
/// second slot holds its artefacts' bytes, judged by veritysetup or
/// e2fsck, and the ESP directory its UKI with three tries.
fn version_2_installed(d: &Path, img: &Path, report: &Value, verity: bool) {
    let after = gpt(img);
    let n = if verity { 2 } else { 1 };
    let v = ok(Command::new("sgdisk").arg("-v").arg(img));
    assert!(v.contains("No problems found"), "{v}");
    let arts = report["artefacts"].as_array().unwrap();
    let art = |suffix: &str| {
        arts.iter()
            .find(|a| a["name"].as_str().unwrap().ends_with(suffix))
            .unwrap_or_else(|| panic!("no {suffix} in {report}"))
    };
    let root = art(".root.raw");
    let b_root = d.join("b-root");
    extract(img, after[1 + n].2, root["size"].as_u64().unwrap(), &b_root);
    assert_eq!(sha256_file(&b_root), root["sha256"].as_str().unwrap());
    let uki = std::fs::read(d.join("esp/EFI/Linux/nixos_2+3-0.efi")).unwrap();
    assert_eq!(uki, std::fs::read(d.join("pub/nixos_2.efi")).unwrap());
    if !verity {
        assert!(contains(&uki, "root=PARTLABEL=nixos_2"));
        ok(Command::new("e2fsck").arg("-fn").arg(&b_root));
        return;
    }
    let hash = report["verity"]["root_hash"].as_str().unwrap();
    assert!(contains(&uki, &format!("roothash={hash}")));
    // sysupdate took the GUIDs from the names: the root hash's halves.
    let hex = |u: &str| u.replace('-', "");
    assert_eq!(hex(&after[1 + n].1), hash[..32]);
    assert_eq!(hex(&after[2 + n].1), hash[32..]);
    // systemd's own generator, given the installed UKI's command line,
    // opens these two partitions as the volume `root` (the NixOS module
    // mounts /dev/mapper/root).
    let cmdline = pe_section(&d.join("pub/nixos_2.efi"), ".cmdline", d);
    let by = |u: &str| format!("'/dev/disk/by-partuuid/{u}'");
    assert_eq!(
        verity_generator(std::str::from_utf8(&cmdline).unwrap(), d),
        format!(
            "attach 'root' {} {} '{hash}' ''",
            by(&after[1 + n].1),
            by(&after[2 + n].1)
        )
    );
    let b_hash = d.join("b-hash");
    let vsize = art(".verity.raw")["size"].as_u64().unwrap();
    extract(img, after[2 + n].2, vsize, &b_hash);
    ok(Command::new("veritysetup")
        .arg("verify")
        .arg(&b_root)
        .arg(&b_hash)
        .arg(hash));
}

/// What Debian's systemd-veritysetup-generator, run as in an initrd whose
/// kernel command line is `cmdline`, has systemd-veritysetup do: the
/// arguments of its `attach`.
pub(crate) fn verity_generator(cmdline: &str, d: &Path) -> String {
    let out = d.join("generated");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    ok(
        Command::new("/lib/systemd/system-generators/systemd-veritysetup-generator")
            .env("SYSTEMD_IN_INITRD", "1")
            .env("SYSTEMD_PROC_CMDLINE", cmdline.trim_end_matches('\0'))
            .args([&out, &out, &out]),
    );
    let unit = std::fs::read_to_string(out.join("systemd-veritysetup@root.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap_or_else(|| panic!("no ExecStart in {unit}"));
    exec.split_once(' ').unwrap().1.to_string()
}

#[test]
fn sysupdate_installs_version_2_into_the_empty_slot_of_a_version_1_image() {
    for verity in [true, false] {
        install_version_2(verity, None);
    }
}

#[test]
fn sysupdate_installs_xz_artefacts_whose_bytes_are_the_raw_ones() {
    install_version_2(true, Some("xz"));
}

/// Version 2's artefacts (`--compress c`) published, listed and installed
/// by sysupdate into a version-1 image, and the slot judged.
fn install_version_2(verity: bool, compress: Option<&str>) {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    version_1_image(&img, verity);
    let mut v: Vec<&str> = if verity { vec!["--verity"] } else { vec![] };
    v.extend(["--version", "2", "--seed", "two", "--json"]);
    let publ = d.path().join("pub");
    let mut publish = slots_cmd("update", &v);
    publish.args(["--source"]).arg(&publ).arg("-o").arg(&publ);
    // The raw artefacts' report: what the slot must hold.
    let report = match compress {
        None => json(&mut publish),
        Some(c) => {
            let packed = json(publish.args(["--compress", c]));
            let raw = json(slots_cmd("update", &v).arg("-o").arg(d.path().join("raw")));
            compressed_like(&publ, &packed, &raw, c);
            raw
        }
    };
    let esp = d.path().join("esp");
    crate::ab_boots::pull_esp(&img, gpt(&img)[0].2, &esp);
    let defs = d.path().join("defs");
    definitions_for(&publ, &img, &esp, &defs);

    let list = ok(sysupdate(&defs).arg("list"));
    let row = |ver: &str| {
        list.lines()
            .find(|l| l.split_whitespace().any(|w| w == ver))
            .unwrap_or_else(|| panic!("no version {ver}:\n{list}"))
            .to_string()
    };
    assert!(row("2").contains("candidate"), "{list}");
    assert!(row("1").contains("current"), "{list}");
    ok(sysupdate(&defs).arg("update"));
    let want: &[&str] = match verity {
        true => &["ESP", "nixos_1", "nixos_1", "nixos_2", "nixos_2", "state"],
        false => &["ESP", "nixos_1", "nixos_2", "state"],
    };
    assert_eq!(names(&img), want, "verity {verity}");
    version_2_installed(d.path(), &img, &report, verity);
}

/// systemd-sysupdate (as [`sysupdate`]) in a mount namespace of its own
/// whose /etc/systemd holds only `keyring`, as import-pubring.gpg: the
/// keyring systemd-pull gives gpg to check a SHA256SUMS.gpg, installed
/// without touching the host's /etc.
fn sysupdate_trusting(defs: &Path, keyring: &Path, etc: &Path) -> Command {
    let _ = std::fs::remove_dir_all(etc);
    std::fs::create_dir_all(etc).unwrap();
    std::fs::copy(keyring, etc.join("import-pubring.gpg")).unwrap();
    let inner = sysupdate(defs);
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$0" /etc/systemd && exec "$@""#)
        .arg(etc)
        .arg(inner.get_program())
        .args(inner.get_args());
    for (k, v) in inner.get_envs() {
        if let Some(v) = v {
            c.env(k, v);
        }
    }
    c
}

/// `forge update --sign KEY` also signs SHA256SUMS as systemd-sysupdate
/// checks it (SHA256SUMS.gpg, OpenPGP, by the same Ed25519 key) and
/// writes the key a machine trusts (import-pubring.gpg); its definitions
/// say Verify=yes. gpg and gpgv verify it (and refuse an edited list).
/// sysupdate fetching over HTTP (url-file: systemd-pull and gpg check the
/// signature) refuses version 2 when the machine trusts another key or
/// SHA256SUMS was changed, the empty slot untouched, and installs it when
/// the list is the signed one and the machine holds the key.
#[test]
fn sysupdate_over_http_installs_only_what_the_machines_key_signed() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    version_1_image(&img, false);
    let publ = d.path().join("pub");
    std::fs::create_dir_all(&publ).unwrap();
    let server = HttpServer::start(&publ, &[]);
    let url = server.url("");
    let (sk, _) = nix_keys_named(d.path(), "updates.example-1");
    let (other, _) = nix_keys_named(d.path(), "other.example-1");
    let signed = ["--version", "2", "--seed", "two", "--json", "--sign"];
    let report = json(
        slots_cmd("update", &signed)
            .arg(&sk)
            .args(["--source", &url, "-o"])
            .arg(&publ),
    );
    for (k, f) in [
        ("signature", "SHA256SUMS.sig"),
        ("openpgp_signature", "SHA256SUMS.gpg"),
        ("keyring", "import-pubring.gpg"),
    ] {
        assert_eq!(report[k], json!(publ.join(f)), "{report}");
    }
    let theirs = d.path().join("theirs");
    ok(slots_cmd("update", &signed)
        .arg(&other)
        .arg("-o")
        .arg(&theirs));
    // The bytes are the key's and the inputs': made again, the same.
    let again = d.path().join("again");
    ok(slots_cmd("update", &signed).arg(&sk).arg("-o").arg(&again));
    for f in ["SHA256SUMS.gpg", "import-pubring.gpg"] {
        assert_eq!(
            std::fs::read(publ.join(f)).unwrap(),
            std::fs::read(again.join(f)).unwrap(),
            "{f}"
        );
    }
    let gpg_dir = tempfile::tempdir().unwrap();
    let gpgv = |ring: &Path, sums: &Path| {
        Command::new("gpgv")
            .arg("--homedir")
            .arg(gpg_dir.path())
            .arg("--keyring")
            .arg(ring)
            .arg(publ.join("SHA256SUMS.gpg"))
            .arg(sums)
            .output()
            .unwrap()
    };
    let (ring, sums) = (publ.join("import-pubring.gpg"), publ.join("SHA256SUMS"));
    let good = gpgv(&ring, &sums);
    let said = String::from_utf8_lossy(&good.stderr).to_string();
    assert!(
        good.status.success() && said.contains("updates.example-1"),
        "{said}"
    );
    assert!(!gpgv(&theirs.join("import-pubring.gpg"), &sums)
        .status
        .success());
    let list = std::fs::read_to_string(&sums).unwrap();
    let edited = d.path().join("edited");
    std::fs::write(&edited, list.replace("nixos_2.efi", "nixos_2.EFI")).unwrap();
    assert!(!gpgv(&ring, &edited).status.success());
    ok(Command::new("gpg")
        .arg("--homedir")
        .arg(gpg_dir.path())
        .args(["--batch", "--no-default-keyring", "--keyring"])
        .arg(&ring)
        .arg("--verify")
        .arg(publ.join("SHA256SUMS.gpg"))
        .arg(&sums));

    let esp = d.path().join("esp");
    crate::ab_boots::pull_esp(&img, gpt(&img)[0].2, &esp);
    let defs = d.path().join("defs");
    definitions_for(&publ, &img, &esp, &defs);
    for f in dir_entries(&defs) {
        let text = std::fs::read_to_string(defs.join(&f)).unwrap();
        assert!(
            text.contains("Verify=yes") && text.contains("Type=url-file"),
            "{f}: {text}"
        );
    }
    let etc = d.path().join("etc-systemd");
    let empty = || names(&img).contains(&"_empty".to_string());
    // Another key trusted: refused, nothing written.
    let e =
        fails(sysupdate_trusting(&defs, &theirs.join("import-pubring.gpg"), &etc).arg("update"));
    assert!(
        empty() && e.contains("Signature verification failed"),
        "{e}"
    );
    // The list changed after signing: refused.
    std::fs::write(&sums, list.replace("nixos_2.efi", "nixos_2.EFI")).unwrap();
    let e = fails(sysupdate_trusting(&defs, &ring, &etc).arg("update"));
    assert!(
        empty() && e.contains("Signature verification failed"),
        "{e}"
    );
    // The signed list, the machine holding the key: installed.
    std::fs::write(&sums, &list).unwrap();
    ok(sysupdate_trusting(&defs, &ring, &etc).arg("update"));
    assert_eq!(names(&img), ["ESP", "nixos_1", "nixos_2", "state"]);
    version_2_installed(d.path(), &img, &report, false);
    assert!(server.log().contains("SHA256SUMS.gpg"), "{}", server.log());
}

/// `packed` (forge update --compress `c`'s report, in `publ`) lists
/// compressed partition artefacts whose size and SHA-256 are the files'
/// (as SHA256SUMS has them) and which decompress, by the real tool, to
/// the uncompressed run's (`raw`); the UKI stays as it is.
fn compressed_like(publ: &Path, packed: &Value, raw: &Value, c: &str) {
    let sums = std::fs::read_to_string(publ.join("SHA256SUMS")).unwrap();
    let (packed, raw) = (
        packed["artefacts"].as_array().unwrap(),
        raw["artefacts"].as_array().unwrap(),
    );
    assert_eq!(packed.len(), raw.len());
    for (p, r) in packed.iter().zip(raw) {
        let (pn, rn) = (p["name"].as_str().unwrap(), r["name"].as_str().unwrap());
        let file = publ.join(pn);
        assert_eq!(p["sha256"], sha256_file(&file), "{pn}");
        assert_eq!(p["size"], std::fs::metadata(&file).unwrap().len(), "{pn}");
        assert!(
            sums.contains(&format!("{}  {pn}\n", p["sha256"].as_str().unwrap())),
            "{sums}"
        );
        if pn == rn {
            assert!(pn.ends_with(".efi"), "{pn}");
            assert_eq!(p["sha256"], r["sha256"]);
            continue;
        }
        assert_eq!(pn, format!("{rn}.{c}"));
        let tool = if c == "zst" { "zstd" } else { "xz" };
        let out = Command::new(tool)
            .args(["-dc"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(out.status.success(), "{tool} -dc {pn}");
        let got = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&out.stdout));
        assert_eq!(got, r["sha256"].as_str().unwrap(), "{pn} decompressed");
    }
}

#[test]
fn an_update_root_is_the_slot_of_an_image_of_that_version_and_sums_keep_other_versions() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("v2.img");
    let base = ["--verity", "--version", "2", "--seed", "two"];
    let layout = json(
        slots_cmd("image", &base)
            .args(["--slots", "2", "--json", "-o"])
            .arg(&img),
    );
    let publ = d.path().join("pub");
    let report = json(
        slots_cmd("update", &base)
            .arg("--json")
            .arg("-o")
            .arg(&publ),
    );
    let root = &report["artefacts"][0];
    assert!(
        root["name"].as_str().unwrap().ends_with(".root.raw"),
        "{report}"
    );
    let slot = &layout["partitions"][1];
    let slot_fs = d.path().join("slot");
    extract(
        &img,
        slot["offset"].as_u64().unwrap(),
        root["size"].as_u64().unwrap(),
        &slot_fs,
    );
    assert_eq!(sha256_file(&slot_fs), root["sha256"].as_str().unwrap());
    assert_eq!(layout["verity"], report["verity"]);

    // Made twice, the same bytes; a second version published beside it
    // keeps the first in SHA256SUMS.
    let again = d.path().join("again");
    ok(slots_cmd("update", &base).arg("-o").arg(&again));
    let sums = std::fs::read_to_string(publ.join("SHA256SUMS")).unwrap();
    assert_eq!(
        sums,
        std::fs::read_to_string(again.join("SHA256SUMS")).unwrap()
    );
    ok(
        slots_cmd("update", &["--verity", "--version", "3", "--seed", "three"])
            .arg("-o")
            .arg(&publ),
    );
    let both = std::fs::read_to_string(publ.join("SHA256SUMS")).unwrap();
    for line in sums.lines() {
        assert!(both.contains(line), "{line} lost:\n{both}");
    }
    assert_eq!(
        both.lines().filter(|l| l.contains("nixos_3")).count(),
        3,
        "{both}"
    );
    for line in both.lines() {
        let (hash, name) = line.split_once("  ").unwrap();
        assert_eq!(sha256_file(&publ.join(name)), hash, "{name}");
    }
    // Version 3 made again with other GUIDs: its earlier files go.
    let v3 = |d: &Path| {
        let mut v: Vec<String> = dir_entries(d)
            .into_iter()
            .filter(|n| n.starts_with("nixos_3"))
            .collect();
        v.sort();
        v
    };
    let before = v3(&publ);
    ok(slots_cmd(
        "update",
        &["--verity", "--version", "3", "--seed", "three-b"],
    )
    .arg("-o")
    .arg(&publ));
    let after = v3(&publ);
    assert_eq!(after.len(), 3, "{after:?}");
    assert_ne!(before, after);
    let sums3 = std::fs::read_to_string(publ.join("SHA256SUMS")).unwrap();
    let listed: Vec<&str> = sums3
        .lines()
        .filter_map(|l| l.split_once("  "))
        .map(|x| x.1)
        .filter(|n| n.starts_with("nixos_3"))
        .collect();
    assert_eq!(listed, after, "{sums3}");
    // With --sign, SHA256SUMS.sig: the Nix key's Ed25519 signature of it
    // (and the OpenPGP one: sysupdate_over_http_… below).
    let (sk, pk) = nix_keys_named(d.path(), "updates.example-1");
    ok(slots_cmd(
        "update",
        &["--verity", "--version", "3", "--seed", "three", "--sign"],
    )
    .arg(&sk)
    .arg("-o")
    .arg(&publ));
    let pk = std::fs::read_to_string(pk).unwrap();
    let sig = std::fs::read_to_string(publ.join("SHA256SUMS.sig")).unwrap();
    assert!(sig.starts_with("updates.example-1:"), "{sig}");
    let sums = publ.join("SHA256SUMS");
    assert!(openssl_verifies(d.path(), &pk, &sums, &sig));
    std::fs::write(&sums, both.replace("nixos_3", "nixos_4")).unwrap();
    assert!(!openssl_verifies(d.path(), &pk, &sums, &sig));
    // Published again unsigned, the old signatures and key go.
    for f in ["SHA256SUMS.gpg", "import-pubring.gpg"] {
        assert!(publ.join(f).exists(), "{f}");
    }
    ok(
        slots_cmd("update", &["--verity", "--version", "3", "--seed", "three"])
            .arg("-o")
            .arg(&publ),
    );
    for f in ["SHA256SUMS.sig", "SHA256SUMS.gpg", "import-pubring.gpg"] {
        assert!(!publ.join(f).exists(), "{f}");
    }
}

#[test]
fn type_1_slots_carry_the_devicetree_and_sysupdate_installs_the_next_versions() {
    let sys = system("x86_64");
    let (copy, dtb) = store_with_devicetree(&sys);
    let forge_on = |verb: &str| {
        let mut c = forge();
        c.arg(verb)
            .arg(&sys.toplevel)
            .arg("--root")
            .arg(copy.path());
        c
    };
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    ok(forge_on("image")
        .args(["--slots", "2", "--version", "1", "--seed", "one", "-o"])
        .arg(&img));
    let esp = d.path().join("esp");
    crate::ab_boots::pull_esp(&img, gpt(&img)[0].2, &esp);
    let dtb = std::fs::read(&dtb).unwrap();
    let entry =
        |name: &str| std::fs::read_to_string(esp.join("loader/entries").join(name)).unwrap();
    assert!(
        entry("nixos_1+3.conf").contains("\ndevicetree /EFI/nixos/nixos_1.dtb\n"),
        "{}",
        entry("nixos_1+3.conf")
    );
    assert_eq!(
        std::fs::read(esp.join("EFI/nixos/nixos_1.dtb")).unwrap(),
        dtb
    );

    // Version 2's devicetree is published and installed beside version
    // 1's, the entry naming it, by systemd-sysupdate 254.
    let publ = d.path().join("pub");
    ok(forge_on("update")
        .args(["--version", "2", "--seed", "two", "--source"])
        .arg(&publ)
        .arg("-o")
        .arg(&publ));
    assert_eq!(std::fs::read(publ.join("nixos_2.dtb")).unwrap(), dtb);
    let defs = d.path().join("defs");
    definitions_for(&publ, &img, &esp, &defs);
    assert!(defs.join("61-nixos-devicetree.conf").exists());
    ok(sysupdate(&defs).arg("update"));
    assert_eq!(
        dir_entries(&esp.join("EFI/nixos")),
        [
            "nixos_1.dtb",
            "nixos_1.initrd",
            "nixos_1.linux",
            "nixos_2.dtb",
            "nixos_2.initrd",
            "nixos_2.linux"
        ]
    );
    assert_eq!(
        std::fs::read(esp.join("EFI/nixos/nixos_2.dtb")).unwrap(),
        dtb
    );
    let e = entry("nixos_2+3-0.conf");
    assert!(e.contains("\ndevicetree /EFI/nixos/nixos_2.dtb\n"), "{e}");
}

#[test]
fn slot_images_refuse_what_they_cannot_hold_and_write_nothing() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("x.img");
    let cases: &[(&[&str], &str)] = &[
        (&["--slots", "2", "--version", "1_2"], "'_' is not allowed"),
        (&["--slots", "2", "--version", "1+2"], "'+' is not allowed"),
        (&["--slots", "2", "--root-size", "4M"], "too small"),
        (&["--slots", "3"], "--slots 3"),
        (&["--version", "2"], "goes with --slots 2"),
    ];
    for (args, want) in cases {
        let e = fails(slots_cmd("image", args).arg("-o").arg(&out));
        assert!(the_error(&e).contains(want), "{args:?}: {e}");
    }
    let arm = system("aarch64");
    let e = fails(
        forge_image_of(&arm)
            .args(["--format", "sd-aarch64", "--slots", "2", "-o"])
            .arg(&out),
    );
    assert!(
        the_error(&e).contains("not laid out for A/B updates yet"),
        "{e}"
    );
    let publ = d.path().join("pub");
    let e = fails(
        slots_cmd("update", &["--version", "a b"])
            .arg("-o")
            .arg(&publ),
    );
    assert!(the_error(&e).contains("' ' is not allowed"), "{e}");
    // zstd artefacts: systemd-import reads zstd only from systemd 258.
    let e = fails(
        slots_cmd("update", &["--version", "2", "--compress", "zst"])
            .arg("-o")
            .arg(&publ),
    );
    assert!(
        the_error(&e).contains("--compress zst: systemd-sysupdate installs through systemd-import, which decompresses zstd only from systemd 258"),
        "{e}"
    );
    // A disk container's options do nothing to partition images.
    for (args, flag) in [
        (&["--compression", "deflate"][..], "--compression"),
        (&["--vhd-type", "fixed"][..], "--vhd-type"),
    ] {
        let e = fails(
            slots_cmd("update", &[&["--version", "2"][..], args].concat())
                .arg("-o")
                .arg(&publ),
        );
        assert!(
            the_error(&e).starts_with(&format!(
                "error: {flag}: forge update writes partition images, not a disk container"
            )),
            "{e}"
        );
    }
    assert_eq!(dir_entries(d.path()), Vec::<String>::new());

    // Without --version, the system's nixos-version names the slot.
    let layout = json(slots_cmd("image", &["--slots", "2", "--json", "-o"]).arg(&out));
    assert_eq!(layout["partitions"][1]["name"], "nixos_25.05.fixture");
}
