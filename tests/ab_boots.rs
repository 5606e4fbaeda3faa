//! A/B machines (issue 27) booted: disk images laid out by `forge image
//! --slots 2`, updated by systemd-sysupdate 254 from `forge update`'s
//! artefacts through a copy of their ESP, and booted under OVMF, where
//! systemd-boot counts each new version's tries and the fixture's stage 1
//! marks a good boot as systemd-bless-boot does.

use crate::ab_updates::{
    definitions_for, gpt, json, names, slots_cmd, sysupdate, ESP_DIRS, VERSION_1,
};
use nixforge_tests::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The files in the ESP directory `dir` of `image` (`IMG@@OFFSET`, as
/// mtools reads it) by their mtools paths; None when it has no `dir`.
fn esp_files(image: &str, dir: &str) -> Option<Vec<String>> {
    let out = Command::new("mdir")
        .args(["-b", "-i", image, &format!("::/{dir}/")])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let files = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.ends_with('/'));
    out.status
        .success()
        .then(|| files.map(str::to_string).collect())
}

/// The [`ESP_DIRS`] of `img`'s ESP (at byte `esp_at`) copied under
/// `esp` (emptied first), for systemd-sysupdate to see the boot files as
/// the machine left them.
pub(crate) fn pull_esp(img: &Path, esp_at: u64, esp: &Path) {
    let _ = std::fs::remove_dir_all(esp);
    let image = format!("{}@@{esp_at}", img.display());
    for dir in ESP_DIRS {
        let Some(files) = esp_files(&image, dir) else {
            continue;
        };
        std::fs::create_dir_all(esp.join(dir)).unwrap();
        for f in files {
            ok(Command::new("mcopy")
                .args(["-i", &image, &f])
                .arg(esp.join(dir)));
        }
    }
}

/// The reverse: each of those directories in the image made to hold
/// exactly `esp`'s files (what sysupdate installed and removed).
fn push_esp(esp: &Path, img: &Path, esp_at: u64) {
    let image = format!("{}@@{esp_at}", img.display());
    for dir in ESP_DIRS.iter().filter(|d| esp.join(d).is_dir()) {
        for f in esp_files(&image, dir).unwrap_or_default() {
            ok(Command::new("mdel").args(["-i", &image, &f]));
        }
        for e in std::fs::read_dir(esp.join(dir)).unwrap() {
            ok(Command::new("mcopy")
                .args(["-i", &image])
                .arg(e.unwrap().path())
                .arg(format!("::/{dir}/")));
        }
    }
}

/// The boot entries on `img`'s ESP: UKIs and type 1 entries, by name.
fn esp_entries(img: &Path, esp_at: u64) -> Vec<String> {
    let image = format!("{}@@{esp_at}", img.display());
    let mut v: Vec<String> = ["EFI/Linux", "loader/entries"]
        .iter()
        .flat_map(|d| esp_files(&image, d).unwrap_or_default())
        .filter_map(|l| Some(l.rsplit('/').next()?.to_string()))
        .collect();
    v.sort();
    v
}

/// A machine's disk image and the directories its updates go through.
struct Machine {
    img: PathBuf,
    esp_at: u64,
    d: tempfile::TempDir,
    /// The options its image was made with that shape an update's
    /// artefacts (`--uki`, `--verity`).
    shape: &'static [&'static str],
}

/// A UKI machine's shape: its stub, and a verity root.
const UKI_VERITY: &[&str] = &["--uki", "--uki-stub", STUB, "--verity"];

impl Machine {
    /// Publish `version` of `system` (a fixture result link) with forge
    /// update, and let systemd-sysupdate install it into the image.
    fn update(&self, system: &Path, version: &str) {
        let (esp, defs, publ) = (
            self.d.path().join("esp"),
            self.d.path().join("defs"),
            self.d.path().join("pub"),
        );
        let mut c = forge();
        c.arg("update")
            .arg(system)
            .arg("--root")
            .arg(system.parent().unwrap().join("store"));
        c.args(self.shape);
        c.args(["--version", version, "--seed", version]);
        ok(c.arg("--source").arg(&publ).arg("-o").arg(&publ));
        pull_esp(&self.img, self.esp_at, &esp);
        definitions_for(&publ, &self.img, &esp, &defs);
        ok(sysupdate(&defs).arg("update"));
        push_esp(&esp, &self.img, self.esp_at);
    }

    /// Boot it under OVMF; the stage 1's marker must say `want`.
    fn boot(&self, want: &str) {
        let disks = [(self.img.clone(), "raw", false)];
        let b = boot_disks("x86_64", &disks, 512, std::time::Duration::from_secs(240));
        let m = b.marker.unwrap_or_else(|| panic!("no marker:\n{}", b.log));
        assert!(m.contains(want), "want {want}: {m}\n{}", b.log);
    }

    fn entries(&self) -> Vec<String> {
        esp_entries(&self.img, self.esp_at)
    }
}

#[test]
fn an_updated_machine_boots_the_new_version_and_rolls_back_from_one_never_blessed() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    ok(slots_cmd("image", &["--verity"])
        .args(VERSION_1)
        .arg("-o")
        .arg(&img));
    let m = Machine {
        esp_at: gpt(&img)[0].2,
        img,
        d,
        shape: UKI_VERITY,
    };
    let fixture = fixtures().join("x86_64");
    m.update(&fixture.join("result"), "2");
    assert_eq!(m.entries(), ["nixos_1+3.efi", "nixos_2+3-0.efi"]);
    m.boot("verity=on read=ok version=2 blessed=yes boots=1");
    assert_eq!(m.entries(), ["nixos_1+3.efi", "nixos_2.efi"]);

    // Version 3's stage 1 never marks its boot good: three tries, then
    // systemd-boot falls back to version 2 by itself. /var keeps counting.
    m.update(&fixture.join("result-unblessed"), "3");
    assert_eq!(
        names(&m.img),
        ["ESP", "nixos_3", "nixos_3", "nixos_2", "nixos_2", "state"]
    );
    // inspect names the system systemd-boot would start: 3, on trial.
    let unblessed = std::fs::read_link(fixture.join("result-unblessed")).unwrap();
    let r = json(forge().args(["inspect", "--json"]).arg(&m.img));
    assert_eq!(r["toplevel"], unblessed.to_str().unwrap(), "{r}");
    for (boot, left) in [(2, 2), (3, 1), (4, 0)] {
        m.boot(&format!("version=3 blessed=no boots={boot}"));
        let want = format!("nixos_3+{left}-{}.efi", 3 - left);
        assert_eq!(m.entries(), ["nixos_2.efi", want.as_str()]);
    }
    m.boot("version=2 blessed=none boots=5");
    // forge inspect reads the same from the image alone.
    let r = json(forge().args(["inspect", "--json"]).arg(&m.img));
    let slot = |k: usize, field: &str| r["slots"][k][field].clone();
    assert_eq!(
        (slot(0, "version"), slot(0, "state")),
        (json!("3"), json!("bad")),
        "{r}"
    );
    assert_eq!(
        (slot(0, "tries_left"), slot(0, "tries_done")),
        (json!(0), json!(3))
    );
    assert_eq!(
        (slot(1, "version"), slot(1, "state")),
        (json!("2"), json!("good")),
        "{r}"
    );
    // Version 3 failed: the default entry is version 2's.
    assert_eq!(r["toplevel"], system("x86_64").toplevel, "{r}");
}

/// The files in a directory of the machine's ESP copy, by name.
fn esp_copy(m: &Machine, dir: &str) -> Vec<String> {
    dir_entries(&m.d.path().join("esp").join(dir))
}

#[test]
fn type_1_entries_are_updated_counted_and_blessed_as_ukis_are() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    let sys = system("x86_64");
    ok(forge_image_of(&sys).args(VERSION_1).arg("-o").arg(&img));
    let r = json(forge().args(["inspect", "--json"]).arg(&img));
    assert_eq!(
        r["slots"][0],
        json!({"partition": 2, "version": "1", "entry": "/loader/entries/nixos_1+3.conf",
               "tries_left": 3, "tries_done": 0, "state": "on trial"}),
        "{r}"
    );
    let m = Machine {
        esp_at: gpt(&img)[0].2,
        img,
        d,
        shape: &[],
    };
    let fixture = fixtures().join("x86_64");
    m.update(&fixture.join("result"), "2");
    assert_eq!(m.entries(), ["nixos_1+3.conf", "nixos_2+3-0.conf"]);
    assert_eq!(
        esp_copy(&m, "EFI/nixos"),
        [
            "nixos_1.initrd",
            "nixos_1.linux",
            "nixos_2.initrd",
            "nixos_2.linux"
        ]
    );
    // What sysupdate installed is what forge update published: the
    // system's own kernel, and an entry naming it and version 2's slot.
    let publ = m.d.path().join("pub");
    let installed = m.d.path().join("esp/EFI/nixos/nixos_2.linux");
    assert_eq!(
        sha256_file(&installed),
        sha256_file(&publ.join("nixos_2.linux"))
    );
    let top = sys.root.join(sys.toplevel.trim_start_matches('/'));
    let kernel = std::fs::read_link(top.join("kernel")).unwrap();
    let kernel = sys.root.join(kernel.strip_prefix("/").unwrap());
    assert_eq!(sha256_file(&installed), sha256_file(&kernel));
    let entry =
        std::fs::read_to_string(m.d.path().join("esp/loader/entries/nixos_2+3-0.conf")).unwrap();
    assert!(
        entry.contains(
            "\nversion 2\nlinux /EFI/nixos/nixos_2.linux\ninitrd /EFI/nixos/nixos_2.initrd\n"
        ),
        "{entry}"
    );
    assert!(entry.contains(" root=PARTLABEL=nixos_2"), "{entry}");
    m.boot("version=2 blessed=yes boots=1");
    assert_eq!(m.entries(), ["nixos_1+3.conf", "nixos_2.conf"]);

    // Version 3, never blessed: systemd-boot takes one of its tries;
    // sysupdate replaced version 1's kernel and initrd (two instances).
    m.update(&fixture.join("result-unblessed"), "3");
    assert_eq!(
        esp_copy(&m, "EFI/nixos"),
        [
            "nixos_2.initrd",
            "nixos_2.linux",
            "nixos_3.initrd",
            "nixos_3.linux"
        ]
    );
    m.boot("version=3 blessed=no boots=2");
    assert_eq!(m.entries(), ["nixos_2.conf", "nixos_3+2-1.conf"]);
}

/// Runs the shell command `cmd` as on a machine booted through systemd-boot
/// with boot counting: in mount and PID namespaces of its own, chrooted
/// into the host's directories (without a container manager's marker:
/// systemd-bless-boot refuses to work in a container), with an EFI
/// variable store holding only `LoaderBootCountPath` = `counted` (the
/// entry systemd-boot counted this boot by), and `esp` as its ESP at /efi
/// (the host's /boot and /efi left out: no XBOOTLDR partition).
fn on_a_counted_boot(root: &Path, counted: &str, esp: &Path, cmd: &str) -> String {
    let var = root.with_extension("var");
    let mut bytes = vec![7, 0, 0, 0]; // non-volatile, boot and runtime access
    bytes.extend(counted.encode_utf16().chain([0]).flat_map(u16::to_le_bytes));
    std::fs::write(&var, bytes).unwrap();
    std::fs::create_dir_all(root).unwrap();
    let setup = r#"set -eu
root=$1 var=$2
mount -t tmpfs tmpfs "$root"
for e in /*; do
  n=${e#/}
  if [ "$n" = proc ]; then mkdir "$root/proc"; mount -t proc proc "$root/proc"
  elif [ "$n" = boot ] || [ "$n" = efi ]; then :
  elif [ -L "$e" ]; then ln -s "$(readlink "$e")" "$root/$n"
  elif [ -d "$e" ]; then mkdir "$root/$n"; mount --rbind "$e" "$root/$n"
  fi
done
mkdir "$root/efi"
mount --bind "$3" "$root/efi"
mount -t tmpfs tmpfs "$root/sys/firmware"
mkdir -p "$root/sys/firmware/efi/efivars"
cp "$var" "$root/sys/firmware/efi/efivars/LoaderBootCountPath-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
exec chroot "$root" /bin/sh -c "$4""#;
    let tools = crate::ab_updates::systemd_tools();
    ok(Command::new("unshare")
        .args(["--mount", "--pid", "--fork", "bash", "-c", setup, "bash"])
        .arg(root)
        .arg(&var)
        .arg(esp)
        .arg(cmd)
        .env("SYSTEMD_ESP_PATH", "/efi")
        .env("SYSTEMD_RELAX_ESP_CHECKS", "1")
        .env(
            "LD_LIBRARY_PATH",
            tools.join(crate::ab_updates::SYSTEMD_LIBS),
        ))
}

#[test]
fn an_update_waits_until_the_running_version_is_marked_good() {
    // The NixOS module's guard, run with systemd 254's systemd-bless-boot.
    let settings = r#"{ enable = true; updates = { enable = true; url = "/srv/updates"; }; }"#;
    let got = crate::nix::module_config_of(settings, "", Some("1"));
    let unit = &got["systemd"]["services"]["systemd-sysupdate"];
    let tools = crate::ab_updates::systemd_tools();
    let condition = unit["serviceConfig"]["ExecCondition"]
        .as_str()
        .unwrap()
        .replace(crate::nix::SHELL, "/bin/bash")
        .replace(crate::nix::SYSTEMD, tools.to_str().unwrap());

    // A version-1 machine, version 2 published for it.
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    ok(slots_cmd("image", &VERSION_1).arg("-o").arg(&img));
    let publ = d.path().join("pub");
    let v2 = ["--version", "2", "--seed", "two", "--source"];
    ok(slots_cmd("update", &v2).arg(&publ).arg("-o").arg(&publ));
    let (esp, defs) = (d.path().join("esp"), d.path().join("defs"));
    pull_esp(&img, gpt(&img)[0].2, &esp);
    definitions_for(&publ, &img, &esp, &defs);
    // systemd-boot booted version 1 on trial: one try taken.
    let linux = esp.join("EFI/Linux");
    std::fs::rename(linux.join("nixos_1+3.efi"), linux.join("nixos_1+2-1.efi")).unwrap();
    let counted = r"\EFI\Linux\nixos_1+2-1.efi";
    // The unit: ExecCondition, then (if it passed) ExecStart.
    let sysupdate = format!(
        "{} --definitions={} --no-pager update",
        tools.join("lib/systemd/systemd-sysupdate").display(),
        defs.display()
    );
    let unit = format!("if {condition}; then {sysupdate}; else echo condition failed; fi");
    let before = sha256_file(&img);
    let root = d.path().join("root");
    let bless_boot = tools.join("lib/systemd/systemd-bless-boot");
    let status = format!("{} status", bless_boot.display());
    let out = on_a_counted_boot(&root, counted, &esp, &status);
    assert_eq!(out.trim(), "indeterminate");
    let out = on_a_counted_boot(&root, counted, &esp, &unit);
    assert!(out.contains("condition failed"), "{out}");
    assert_eq!(sha256_file(&img), before, "the other slot is untouched");
    assert_eq!(names(&img), ["ESP", "nixos_1", "_empty", "state"]);

    // systemd-bless-boot.service marks the boot good; now it updates.
    on_a_counted_boot(
        &root,
        counted,
        &esp,
        &format!("{} good", bless_boot.display()),
    );
    assert_eq!(dir_entries(&linux), ["nixos_1.efi"]);
    let out = on_a_counted_boot(&root, counted, &esp, &status);
    assert_eq!(out.trim(), "good");
    let out = on_a_counted_boot(&root, counted, &esp, &unit);
    assert!(!out.contains("condition failed"), "{out}");
    assert_eq!(names(&img), ["ESP", "nixos_1", "nixos_2", "state"]);
    assert_eq!(dir_entries(&linux), ["nixos_1.efi", "nixos_2+3-0.efi"]);
}
