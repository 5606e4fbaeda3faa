//! The filesystem trees of an image, described (never copied): the root
//! holding the closure, and the ESP laid out as NixOS's systemd-boot
//! builder lays it out, so `nixos-rebuild` and `bootctl` accept it later.

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

use formats::tree::{Fragment, Kind, Node, NodeId, Owner, Tree, ROOT};

use crate::closure::{self, store, BootSpec, Closure, Store};

/// Empty top-level directories a NixOS stage 2 needs and cannot create on
/// a read-only root, with their modes.
const MOUNT_POINTS: &[(&str, u16)] = &[
    ("/bin", 0o755),
    ("/boot", 0o755),
    ("/dev", 0o755),
    ("/etc", 0o755),
    ("/home", 0o755),
    ("/mnt", 0o755),
    ("/proc", 0o555),
    ("/root", 0o700),
    ("/run", 0o755),
    ("/srv", 0o755),
    ("/sys", 0o555),
    ("/tmp", 0o1777),
    ("/usr", 0o755),
    ("/var", 0o755),
];

/// nixpkgs' ids.gids.nixbld: NixOS keeps /nix/store root:nixbld 1775.
const NIXBLD_GID: u32 = 30000;

/// A path's NAR size, from the tree just read (the closure took the
/// recorded one unchecked: `closure::Options::sizes_later`), held to the
/// size `db` records, as the closure step would have held it.
fn size_check(f: &Fragment, host: &Path, p: &closure::PathInfo, db: &Path) -> Result<()> {
    let (tree, top) = f.parts();
    let computed = formats::nar::tree_size(tree, top, host)?;
    if computed != p.nar_size {
        return Err(closure::ClosureError::SizeMismatch {
            path: p.path.clone(),
            computed,
            recorded: p.nar_size,
            db: db.to_owned(),
        }
        .into());
    }
    Ok(())
}

/// The root filesystem: the closure in /nix/store, its registration, the
/// system profile links and the mount points.
pub fn root_tree(store: &Store, closure: &Closure, epoch: u32) -> Result<Tree> {
    let mut t = Tree::new(0o755);
    let sd = t.mkdir_p(b"/nix/store", 0o755)?;
    let n = &mut t.nodes[sd];
    (n.perm, n.gid) = (0o1775, NIXBLD_GID);
    let owner = Owner {
        force: Some((0, 0)),
    };
    let read = |p: &closure::PathInfo| {
        let host = store.physical(&p.path);
        let f = Tree::read_host(&host, owner)
            .with_context(|| format!("adding {} to the root filesystem", p.path))?;
        if let Some(db) = &closure.sizes_unchecked {
            size_check(&f, &host, p, db)?;
        }
        Ok(f)
    };
    let fragments: Vec<Result<Fragment>> = closure.paths.par_iter().map(read).collect();
    for (p, f) in closure.paths.iter().zip(fragments) {
        t.graft(sd, store::base_name(&p.path).as_bytes(), f?)?;
    }
    t.insert(
        ROOT,
        b"nix-path-registration",
        Node::bytes(closure.registration_for_image(), 0o444),
    )?;
    // A Nix database the closure's Nix opens as it is: the booted system
    // needs no first-boot `nix-store --load-db`.
    crate::nixdb::add_to(&mut t, &closure.paths, epoch)?;
    let profiles = t.mkdir_p(b"/nix/var/nix/profiles", 0o755)?;
    t.insert(profiles, b"system-1-link", Node::symlink(&closure.toplevel))?;
    t.insert(profiles, b"system", Node::symlink("system-1-link"))?;
    for (dir, perm) in MOUNT_POINTS {
        t.mkdir_p(dir.as_bytes(), *perm)?;
        if let Some(id) = lookup(&t, dir.as_bytes()) {
            t.nodes[id].perm = *perm;
        }
    }
    // As nixpkgs' make-disk-image: the marker stage 1 looks for.
    let etc = t.mkdir_p(b"/etc", 0o755)?;
    t.insert(etc, b"NIXOS", Node::bytes(Vec::new(), 0o644))?;
    Ok(t)
}

pub fn lookup(t: &Tree, path: &[u8]) -> Option<NodeId> {
    let mut cur = ROOT;
    for c in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
        match &t.nodes[cur].kind {
            Kind::Dir { children } => cur = *children.get(c)?,
            _ => return None,
        }
    }
    Some(cur)
}

/// Architecture facts for the ESP.
pub struct EfiArch {
    pub boot_name: &'static str,
    pub systemd_boot: &'static str,
}

pub fn efi_arch(system: &str) -> Option<EfiArch> {
    match system {
        "x86_64-linux" => Some(EfiArch {
            boot_name: "BOOTX64.EFI",
            systemd_boot: "systemd-bootx64.efi",
        }),
        "aarch64-linux" => Some(EfiArch {
            boot_name: "BOOTAA64.EFI",
            systemd_boot: "systemd-bootaa64.efi",
        }),
        _ => None,
    }
}

/// Find systemd-boot in the closure: the toplevel's `systemd` link first,
/// then every store path.
pub fn find_systemd_boot(store: &Store, closure: &Closure, arch: &EfiArch) -> Result<PathBuf> {
    let rel = format!("lib/systemd/boot/efi/{}", arch.systemd_boot);
    let link = store.physical(&format!("{}/systemd", closure.toplevel));
    let mut candidates = Vec::new();
    if let Ok(t) = std::fs::read_link(&link) {
        candidates.push(t.to_string_lossy().into_owned());
    }
    candidates.extend(closure.paths.iter().map(|p| p.path.clone()));
    for c in candidates {
        let p = store.physical(&format!("{c}/{rel}"));
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "no systemd-boot in the closure of {}: looked for {rel} under {}/systemd and every store path of the closure",
        closure.toplevel,
        closure.toplevel
    )
}

/// The kernel must be an EFI executable (PE with an EFI stub) for
/// systemd-boot to start it.
pub fn check_efi_stub(path: &std::path::Path, logical: &str) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let mut head = [0u8; 64];
    let ok = f.read_exact(&mut head).is_ok() && &head[..2] == b"MZ" && {
        let pe = u32::from_le_bytes([head[60], head[61], head[62], head[63]]) as u64;
        let mut sig = [0u8; 4];
        f.seek(SeekFrom::Start(pe)).is_ok() && f.read_exact(&mut sig).is_ok() && &sig == b"PE\0\0"
    };
    if !ok {
        bail!("{logical}: kernel is not an EFI-stub PE executable (no MZ/PE header); systemd-boot cannot start it");
    }
    Ok(())
}

/// NixOS's name for a store file copied to the ESP: `<hash>-<name>-<file>.efi`.
pub fn efi_name(store_file: &str) -> String {
    let rest = store_file
        .trim_start_matches(store::STORE_DIR)
        .trim_start_matches('/');
    let mut parts = rest.splitn(2, '/');
    let dir = parts.next().unwrap_or_default();
    match parts.next() {
        Some(file) => format!("{dir}-{}.efi", file.replace('/', "-")),
        None => format!("{dir}.efi"),
    }
}

/// `YYYY-MM-DD` of a Unix time, for the entry's "built on".
pub fn date(epoch: u32) -> String {
    let (y, m, d, _) = formats::time::civil(epoch as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// One systemd-boot entry.
pub struct Entry {
    pub file: String,
    pub text: String,
}

/// A boot entry's kernel command line: `init=`, the bootspec's
/// parameters, then `extra` (`roothash=`).
pub fn command_line(spec: &BootSpec, extra: &[String]) -> String {
    let params: Vec<&str> = spec
        .kernel_params
        .iter()
        .chain(extra)
        .map(String::as_str)
        .collect();
    format!("init={} {}", spec.init, params.join(" "))
}

/// The entries for generation 1 and its specialisations, as NixOS writes them.
/// `extra`: kernel parameters added to every entry (`roothash=`).
pub fn boot_entries(closure: &Closure, epoch: u32, extra: &[String]) -> Vec<Entry> {
    let boot = &closure.bootspec;
    let sort_key = boot.sort_key.clone().unwrap_or_else(|| "nixos".into());
    let entry = |spec: &BootSpec, special: Option<&str>| {
        let mut text = format!(
            "title NixOS{}\nsort-key {sort_key}\nversion Generation 1 {}, built on {}\nlinux /EFI/nixos/{}\n",
            special.map(|s| format!(" ({s})")).unwrap_or_default(),
            spec.label,
            date(epoch),
            efi_name(&spec.kernel),
        );
        if let Some(i) = &spec.initrd {
            text.push_str(&format!("initrd /EFI/nixos/{}\n", efi_name(i)));
        }
        text.push_str(&format!("options {}\n", command_line(spec, extra)));
        if let Some(dt) = &spec.devicetree {
            text.push_str(&format!("devicetree /EFI/nixos/{}\n", efi_name(dt)));
        }
        let file = match special {
            Some(s) => format!("nixos-generation-1-specialisation-{s}.conf"),
            None => "nixos-generation-1.conf".to_string(),
        };
        Entry { file, text }
    };
    let mut v = vec![entry(&boot.spec, None)];
    for (name, b) in &boot.specialisations {
        v.push(entry(&b.spec, Some(name)));
    }
    v
}

/// What goes on the ESP besides systemd-boot.
pub struct EspOptions<'a> {
    pub epoch: u32,
    /// systemd-boot's menu timeout.
    pub timeout: u32,
    /// Kernel parameters every entry gets (`roothash=`).
    pub extra: Vec<String>,
    /// `--uki`: the EFI stub each entry's Unified Kernel Image is made of.
    pub uki_stub: Option<std::path::PathBuf>,
    /// `--secure-boot-key`: systemd-boot and the UKIs signed with it.
    pub secure_boot: Option<&'a formats::sign::Signer>,
    /// `--slots 2`: the installed version, whose one entry (a UKI or a
    /// type 1 entry) is named for sysupdate and boot counting
    /// (`image::slots::BootFile`).
    pub version: Option<String>,
}

/// A PE file for the ESP, signed when Secure Boot keys are given.
fn efi_file(bytes: Vec<u8>, what: &str, signer: Option<&formats::sign::Signer>) -> Result<Vec<u8>> {
    match signer {
        Some(s) => formats::sign::authenticode::sign(&bytes, s)
            .with_context(|| format!("signing {what} (--secure-boot-key)")),
        None => Ok(bytes),
    }
}

/// The ESP: systemd-boot under both its names, loader.conf, and the
/// entries with every kernel, initrd and devicetree they name; or, with
/// a UKI stub, one Unified Kernel Image per entry in `EFI/Linux/`.
pub fn esp_tree(
    store: &Store,
    closure: &Closure,
    systemd_boot: &std::path::Path,
    arch: &EfiArch,
    o: &EspOptions,
) -> Result<Tree> {
    let mut t = Tree::new(0o755);
    let owner = Owner::default();
    let boot = t.mkdir_p(b"/EFI/BOOT", 0o755)?;
    let sdir = t.mkdir_p(b"/EFI/systemd", 0o755)?;
    if let Some(signer) = o.secure_boot {
        let bytes = std::fs::read(systemd_boot)
            .with_context(|| format!("reading {}", systemd_boot.display()))?;
        let signed = efi_file(bytes, &systemd_boot.display().to_string(), Some(signer))?;
        t.insert(
            boot,
            arch.boot_name.as_bytes(),
            Node::bytes(signed.clone(), 0o644),
        )?;
        t.insert(
            sdir,
            arch.systemd_boot.as_bytes(),
            Node::bytes(signed, 0o644),
        )?;
    } else {
        t.add_host(boot, arch.boot_name.as_bytes(), systemd_boot, owner)?;
        t.add_host(sdir, arch.systemd_boot.as_bytes(), systemd_boot, owner)?;
    }
    let default = match &o.uki_stub {
        Some(stub) => {
            let linux = t.mkdir_p(b"/EFI/Linux", 0o755)?;
            let ukis = super::uki::ukis(stub, store, closure, &o.extra, o.version.as_deref())?;
            for (name, bytes) in ukis {
                let bytes = efi_file(bytes, &format!("EFI/Linux/{name}"), o.secure_boot)?;
                t.insert(linux, name.as_bytes(), Node::bytes(bytes, 0o644))?;
            }
            // The newest version not found bad (boot counting sorts those last).
            match o.version {
                Some(_) => "nixos_*",
                None => "nixos-generation-1.efi",
            }
        }
        None => match &o.version {
            Some(v) => {
                type1_slot_entry(&mut t, store, closure, o, v)?;
                "nixos_*"
            }
            None => {
                type1_entries(&mut t, store, closure, o)?;
                "nixos-generation-1.conf"
            }
        },
    };
    let loader = t.mkdir_p(b"/loader", 0o755)?;
    let conf = format!(
        "timeout {}\ndefault {default}\neditor 0\nconsole-mode keep\n",
        o.timeout
    );
    t.insert(loader, b"loader.conf", Node::bytes(conf, 0o644))?;
    Ok(t)
}

/// Type 1 entries (`loader/entries/*.conf`) and the kernels, initrds and
/// devicetrees they name, under `EFI/nixos/`.
fn type1_entries(t: &mut Tree, store: &Store, closure: &Closure, o: &EspOptions) -> Result<()> {
    let owner = Owner::default();
    let nixos = t.mkdir_p(b"/EFI/nixos", 0o755)?;
    let loader = t.mkdir_p(b"/loader", 0o755)?;
    let entries_dir = t.mkdir_p(b"/loader/entries", 0o755)?;
    let mut specs = vec![&closure.bootspec.spec];
    specs.extend(closure.bootspec.specialisations.values().map(|b| &b.spec));
    for spec in specs {
        let files = [
            Some(&spec.kernel),
            spec.initrd.as_ref(),
            spec.devicetree.as_ref(),
        ];
        for f in files.into_iter().flatten() {
            let name = efi_name(f);
            if lookup(t, format!("/EFI/nixos/{name}").as_bytes()).is_none() {
                let phys = store.physical(f);
                t.add_host(nixos, name.as_bytes(), &phys, owner)
                    .with_context(|| format!("adding {f} to the ESP"))?;
            }
        }
    }
    // bootctl install writes this marker (boot loader spec "type1" entries).
    t.insert(loader, b"entries.srel", Node::bytes("type1\n", 0o644))?;
    for e in boot_entries(closure, o.epoch, &o.extra) {
        t.insert(entries_dir, e.file.as_bytes(), Node::bytes(e.text, 0o644))?;
    }
    Ok(())
}

/// `--slots 2` without `--uki`: the installed version's type 1 entry,
/// named for sysupdate with its boot tries and ordered by its version
/// (systemd-boot's `default nixos_*` takes the newest not found bad), and
/// the kernel, initrd and devicetree it names, under names of that version
/// (an update installs the next version's beside them).
fn type1_slot_entry(
    t: &mut Tree,
    store: &Store,
    closure: &Closure,
    o: &EspOptions,
    version: &str,
) -> Result<()> {
    use super::slots::{DTB, ENTRY, INITRD, LINUX};
    let spec = &closure.bootspec.spec;
    let mut text = format!("title NixOS\nsort-key nixos\nversion {version}\n");
    for (key, f, file) in [
        ("linux", &LINUX, Some(&spec.kernel)),
        ("initrd", &INITRD, spec.initrd.as_ref()),
        ("devicetree", &DTB, spec.devicetree.as_ref()),
    ] {
        let Some(file) = file else { continue };
        let dir = t.mkdir_p(f.dir.as_bytes(), 0o755)?;
        let name = f.name(version, None);
        t.add_host(
            dir,
            name.as_bytes(),
            &store.physical(file),
            Owner::default(),
        )
        .with_context(|| format!("adding {file} to the ESP"))?;
        text.push_str(&format!("{key} {}/{name}\n", f.dir));
    }
    text.push_str(&format!("options {}\n", command_line(spec, &o.extra)));
    let loader = t.mkdir_p(b"/loader", 0o755)?;
    t.insert(loader, b"entries.srel", Node::bytes("type1\n", 0o644))?;
    let entries = t.mkdir_p(ENTRY.dir.as_bytes(), 0o755)?;
    let name = ENTRY.name(version, Some(super::slots::TRIES));
    t.insert(entries, name.as_bytes(), Node::bytes(text, 0o644))?;
    Ok(())
}

/// NixOS's generic-extlinux-compatible name for a store file or directory
/// copied to /boot/nixos: the store path without `/nix/store/`, `/` → `-`.
pub fn extlinux_name(p: &str) -> String {
    p.trim_start_matches(store::STORE_DIR)
        .trim_start_matches('/')
        .replace('/', "-")
}

/// `YYYY-MM-DD HH:MM` of a Unix time.
fn date_time(epoch: u32) -> String {
    let (_, _, _, s) = formats::time::civil(epoch as i64);
    format!("{} {:02}:{:02}", date(epoch), s / 3600, (s % 3600) / 60)
}

/// /boot/extlinux/extlinux.conf and the kernels, initrds and device trees
/// it names under /boot/nixos, as NixOS's extlinux-conf-builder writes them
/// (a `default` entry, generation 1, and one entry per specialisation).
pub fn extlinux(
    t: &mut Tree,
    store: &Store,
    closure: &Closure,
    epoch: u32,
    timeout: u32,
    extra: &[String],
) -> Result<()> {
    let nixos = t.mkdir_p(b"/boot/nixos", 0o755)?;
    let extl = t.mkdir_p(b"/boot/extlinux", 0o755)?;
    let owner = Owner {
        force: Some((0, 0)),
    };
    let copy = |t: &mut Tree, logical: &str| -> Result<String> {
        let name = extlinux_name(logical);
        if lookup(t, format!("/boot/nixos/{name}").as_bytes()).is_none() {
            t.add_host(nixos, name.as_bytes(), &store.physical(logical), owner)
                .with_context(|| format!("adding {logical} to /boot/nixos"))?;
        }
        Ok(format!("../nixos/{name}"))
    };
    // In tenths of a second. U-Boot reads 0 as "wait forever"; NixOS writes
    // -10 for "boot now", which U-Boot 2023.01 (Debian 12's) also waits on,
    // so "now" is 0.1 s here.
    let tenths = if timeout == 0 { 1 } else { timeout as u64 * 10 };
    let mut conf = format!(
        "# Generated file, all changes will be lost on nixos-rebuild!\n\n\
         # Change this to e.g. nixos-42 to temporarily boot to an older configuration.\n\
         DEFAULT nixos-default\n\nMENU TITLE ------------------------------------------------------------\n\
         TIMEOUT {tenths}\n"
    );
    let entry = |t: &mut Tree, spec: &BootSpec, tag: &str, menu: &str| -> Result<String> {
        let mut e = format!(
            "\nLABEL nixos-{tag}\n  MENU LABEL {menu}\n  LINUX {}\n",
            copy(t, &spec.kernel)?
        );
        if let Some(i) = &spec.initrd {
            e.push_str(&format!("  INITRD {}\n", copy(t, i)?));
        }
        e.push_str(&format!("  APPEND {}\n", command_line(spec, extra)));
        let dtbs = store.physical(&format!("{}/dtbs", spec.toplevel));
        if let Ok(target) = std::fs::read_link(&dtbs) {
            e.push_str(&format!(
                "  FDTDIR {}\n",
                copy(t, &target.to_string_lossy())?
            ));
        }
        Ok(e)
    };
    let version = closure
        .nixos_version(store)
        .unwrap_or_else(|| closure.bootspec.spec.label.clone());
    let main = &closure.bootspec.spec;
    conf.push_str(&entry(t, main, "default", "NixOS - Default")?);
    conf.push_str(&entry(
        t,
        main,
        "1",
        &format!("NixOS - Configuration 1 ({} - {version})", date_time(epoch)),
    )?);
    for (name, b) in &closure.bootspec.specialisations {
        conf.push_str(&entry(
            t,
            &b.spec,
            &format!("1-specialisation-{name}"),
            &format!("NixOS - Configuration 1 ({name})"),
        )?);
    }
    t.insert(extl, b"extlinux.conf", Node::bytes(conf, 0o644))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn efi_names_follow_nixos() {
        assert_eq!(
            efi_name("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-linux-6.1/bzImage"),
            "0123456789abcdfghijklmnpqrsvwxyz-linux-6.1-bzImage.efi"
        );
        assert_eq!(
            efi_name("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-initrd"),
            "0123456789abcdfghijklmnpqrsvwxyz-initrd.efi"
        );
    }

    #[test]
    fn dates() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(1_700_000_000), "2023-11-14");
        assert_eq!(date(951_782_400), "2000-02-29");
    }
}
