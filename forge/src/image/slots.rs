//! A/B slots (`--slots 2`), laid out and named the way systemd-sysupdate
//! finds them: the installed slot's partitions (root, and with `--verity`
//! its hash and signature) carry the GPT name `nixos_VERSION`, the other
//! slot's the same types named `_empty`, holding nothing, as large as the
//! first. The boot entry is a UKI named `nixos_VERSION+3.efi`, or without
//! `--uki` a type 1 entry `loader/entries/nixos_VERSION+3.conf` naming the
//! version's kernel and initrd: three tries for systemd-boot's boot
//! counting before it falls back.
//!
//! A slot's filesystem is sized to its content, so `forge update` makes the
//! same bytes without knowing the disk; the slot around it (`--root-size`,
//! by default the filesystem plus 25 %) leaves room for later versions.

use anyhow::{bail, Result};

use crate::closure::{Closure, Store};
use formats::glob::glob;

use crate::layout::{BootEntry, Filesystem, Partition, SizePolicy, ALIGN};

/// The GPT name of a slot no version has been installed in.
pub const EMPTY: &str = "_empty";
/// Boot counting: the tries a new version's entry starts with.
pub const TRIES: u32 = 3;
/// The name every slot's partitions and entries start with.
pub const PREFIX: &str = "nixos_";
/// A GPT partition name holds 36 UTF-16 units.
const MAX_VERSION: usize = 36 - PREFIX.len();

/// The GPT name of a slot holding `version`.
pub fn slot_name(version: &str) -> String {
    format!("{PREFIX}{version}")
}

/// A file on the ESP that boots a version, as `forge update` publishes it
/// (`nixos_VERSION` and its suffix) and systemd-sysupdate installs it: a
/// UKI, or a type 1 entry and the kernel and initrd it names. The entry
/// itself is `counted`: on the ESP its name carries the tries left
/// (`nixos_2+3.efi`), which systemd-boot counts down and a good boot drops.
#[derive(Debug, PartialEq, Eq)]
pub struct BootFile {
    /// Its directory on the ESP.
    pub dir: &'static str,
    /// What follows `nixos_VERSION` in its name.
    pub suffix: &'static str,
    pub counted: bool,
    /// What it is, for people.
    pub what: &'static str,
    /// The name of the transfer definition installing it (the entry's
    /// sorts after the files it names: sysupdate installs in that order).
    pub transfer: &'static str,
}

pub const UKI: BootFile = BootFile {
    dir: "/EFI/Linux",
    suffix: ".efi",
    counted: true,
    what: "Unified Kernel Image",
    transfer: "60-nixos-uki",
};
pub const LINUX: BootFile = BootFile {
    dir: "/EFI/nixos",
    suffix: ".linux",
    counted: false,
    what: "kernel",
    transfer: "60-nixos-linux",
};
pub const INITRD: BootFile = BootFile {
    dir: "/EFI/nixos",
    suffix: ".initrd",
    counted: false,
    what: "initrd",
    transfer: "61-nixos-initrd",
};
pub const DTB: BootFile = BootFile {
    dir: "/EFI/nixos",
    suffix: ".dtb",
    counted: false,
    what: "devicetree",
    transfer: "61-nixos-devicetree",
};
pub const ENTRY: BootFile = BootFile {
    dir: "/loader/entries",
    suffix: ".conf",
    counted: true,
    what: "type 1 boot entry",
    transfer: "62-nixos-entry",
};

impl BootFile {
    /// Its name for `version`: as published (`tries: None`; sysupdate
    /// adds them as it installs, `TriesLeft=`), or on the ESP with `tries`.
    pub fn name(&self, version: &str, tries: Option<u32>) -> String {
        match tries.filter(|_| self.counted) {
            Some(n) => format!("{PREFIX}{version}+{n}{}", self.suffix),
            None => format!("{PREFIX}{version}{}", self.suffix),
        }
    }

    /// Its path on the ESP in a new image: counted ones with [`TRIES`].
    pub fn on_esp(&self, version: &str) -> String {
        format!("{}/{}", self.dir, self.name(version, Some(TRIES)))
    }
}

/// The files that boot a version: its UKI (`--uki`), else a type 1 entry,
/// the kernel, and the initrd and devicetree when the system has them;
/// the entry last.
pub fn boot_files(uki: bool, initrd: bool, devicetree: bool) -> Vec<&'static BootFile> {
    if uki {
        return vec![&UKI];
    }
    let mut v = vec![&LINUX];
    v.extend(initrd.then_some(&INITRD));
    v.extend(devicetree.then_some(&DTB));
    v.push(&ENTRY);
    v
}

/// What an ESP entry's file name says (`nixos_V.efi`, `nixos_V+L.efi`,
/// `nixos_V+L-D.conf`: a UKI or a type 1 entry): the version, and the
/// tries left and done while boot counting goes on (None: marked good, or
/// never counted).
pub fn parse_entry(file: &str) -> Option<(String, Option<(u32, u32)>)> {
    let stem = file.strip_prefix(PREFIX)?;
    let stem = [&UKI, &ENTRY]
        .iter()
        .find_map(|f| stem.strip_suffix(f.suffix))?;
    match split_counter(stem) {
        (version, _) if version.contains('+') => None,
        (version, tries) => Some((version.to_string(), tries)),
    }
}

/// A file name's stem and its boot counter (`STEM+LEFT` or
/// `STEM+LEFT-DONE`: tries left and done), if it has one.
fn split_counter(stem: &str) -> (&str, Option<(u32, u32)>) {
    let counted = stem.rsplit_once('+').and_then(|(s, c)| {
        let (left, done) = c.split_once('-').unwrap_or((c, "0"));
        Some((s, (left.parse().ok()?, done.parse().ok()?)))
    });
    match counted {
        Some((s, tries)) => (s, Some(tries)),
        None => (stem, None),
    }
}

/// A version sysupdate can order and our names keep unambiguous:
/// letters, digits and `.~^-`, starting with a letter or digit; no `_`
/// (it ends the names' fixed part) and no `+` (it starts the tries).
pub fn check_version(v: &str) -> Result<()> {
    let ok = |c: char| c.is_ascii_alphanumeric() || ".~^-".contains(c);
    if v.is_empty() || !v.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        bail!("--version {v:?}: a version starts with a letter or digit");
    }
    if let Some(c) = v.chars().find(|&c| !ok(c)) {
        bail!("--version {v:?}: {c:?} is not allowed (letters, digits and . ~ ^ - only: `_` separates the name from the version, `+` starts the boot tries)");
    }
    if v.len() > MAX_VERSION {
        bail!("--version {v:?}: longer than {MAX_VERSION} characters (a GPT partition name holds 36, `{PREFIX}` included)");
    }
    Ok(())
}

/// Two versions in the order systemd orders them (the UAPI Version Format
/// Specification: sysupdate's newest, systemd-boot's menu): segments of
/// digits compare as numbers and beat letters; `~` sorts before anything,
/// even the end (`2~rc1` < `2`); `-`, `^` and `.` each start a segment
/// that sorts below one that does not; a longer version is newer.
pub fn version_order(a: &str, b: &str) -> std::cmp::Ordering {
    let valid = |c: &u8| c.is_ascii_alphanumeric() || b"~-^.".contains(c);
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        a = &a[a.iter().position(valid).unwrap_or(a.len())..];
        b = &b[b.iter().position(valid).unwrap_or(b.len())..];
        if let Some(o) = marker(&mut a, &mut b, b'~') {
            return o;
        }
        if a.is_empty() || b.is_empty() {
            return a.len().cmp(&b.len());
        }
        for m in *b"-^." {
            if let Some(o) = marker(&mut a, &mut b, m) {
                return o;
            }
        }
        let digits = |s: &[u8]| s.iter().take_while(|c| c.is_ascii_digit()).count();
        let (na, nb) = (digits(a), digits(b));
        let (order, la, lb) = if na > 0 || nb > 0 {
            let (ta, tb) = (no_zeros(&a[..na]), no_zeros(&b[..nb]));
            let o = (na > 0).cmp(&(nb > 0));
            (o.then(ta.len().cmp(&tb.len())).then(ta.cmp(tb)), na, nb)
        } else {
            let letters = |s: &[u8]| s.iter().take_while(|c| c.is_ascii_alphabetic()).count();
            let (la, lb) = (letters(a), letters(b));
            (a[..la].cmp(&b[..lb]), la, lb)
        };
        if order.is_ne() {
            return order;
        }
        // Equal segments (or none: a marker, taken next time round).
        (a, b) = (&a[la..], &b[lb..]);
    }
}

/// [`version_order`]'s marker rule: `m` starting one side only makes
/// that side the older; starting both, it is taken off both.
fn marker(a: &mut &[u8], b: &mut &[u8], m: u8) -> Option<std::cmp::Ordering> {
    match (a.first() == Some(&m), b.first() == Some(&m)) {
        (true, true) => {
            (*a, *b) = (&a[1..], &b[1..]);
            None
        }
        (false, false) => None,
        (am, bm) => Some(bm.cmp(&am)),
    }
}

fn no_zeros(digits: &[u8]) -> &[u8] {
    &digits[digits.iter().take_while(|&&c| c == b'0').count()..]
}

/// `--version`, else the system's `nixos-version` file; checked.
pub fn version_of(given: Option<&str>, store: &Store, c: &Closure) -> Result<String> {
    let v = match given {
        Some(v) => v.to_string(),
        None => {
            let file = format!("{}/nixos-version", c.toplevel);
            match std::fs::read_to_string(store.physical(&file)) {
                Ok(s) => s.trim().to_string(),
                Err(e) => bail!("--slots 2 needs a version: {file}: {e}; give --version"),
            }
        }
    };
    check_version(&v)?;
    Ok(v)
}

/// The size of a slot holding a filesystem of `fs` bytes: `given`
/// (`--root-size`), which must hold it, else `fs` and a quarter, aligned.
pub fn slot_size(fs: u64, given: Option<u64>) -> Result<u64> {
    match given {
        Some(n) if n < fs.next_multiple_of(ALIGN) => bail!(
            "--root-size {n}: a slot is too small for this version's root filesystem ({fs} bytes); leave room for later versions too (the default is the filesystem and 25 %)"
        ),
        Some(n) => Ok(n.next_multiple_of(ALIGN)),
        None => Ok((fs + fs / 4).next_multiple_of(ALIGN)),
    }
}

/// The hash partition's slot for a root slot of `root_slot` bytes: the
/// hash tree of a filesystem filling it.
pub fn verity_slot_size(root_slot: u64, tree: u64) -> u64 {
    let blocks = root_slot / formats::verity::BLOCK as u64;
    formats::verity::hash_size(blocks)
        .max(tree)
        .next_multiple_of(ALIGN)
}

/// The installed slot's partitions as the empty second slot: the same
/// roles, types and sizes, named [`EMPTY`], holding nothing.
pub fn empty_twins<'t>(installed: &[Partition<'t>], sizes: &[u64]) -> Vec<Partition<'t>> {
    installed
        .iter()
        .zip(sizes)
        .map(|(p, &size)| Partition {
            role: p.role,
            ty: p.ty,
            name: EMPTY.into(),
            label: EMPTY.into(),
            read_only: false,
            bootable: false,
            start: None,
            size: SizePolicy::Fixed(size),
            fs: Filesystem::Empty,
            guid: None,
        })
        .collect()
}

/// The entry systemd-boot starts by default: the first, in its menu's
/// order, whose id (its file name without the boot counter,
/// `nixos_2+3.efi` → `nixos_2.efi`) matches loader.conf's `default` glob.
/// The menu puts entries with no tries left last, then sorts by id,
/// newest version first; so of two slots the newer boots, unless it has
/// failed.
pub fn default_entry<'e>(entries: &[&'e BootEntry], pattern: &str) -> Option<&'e BootEntry> {
    let id = |e: &BootEntry| {
        let name = e.file.rsplit('/').next().unwrap_or_default();
        let (stem, ext) = name.rsplit_once('.').unwrap_or((name, ""));
        let (stem, tries) = split_counter(stem);
        let failed = tries.is_some_and(|(left, _)| left == 0);
        (failed, format!("{stem}.{ext}").to_lowercase())
    };
    let pattern = pattern.to_lowercase();
    let mut menu: Vec<(bool, String, &BootEntry)> = entries
        .iter()
        .filter(|e| e.loader == "uki" || e.file.starts_with("/loader/entries/"))
        .map(|e| {
            let (failed, id) = id(e);
            (failed, id, *e)
        })
        .filter(|(_, id, _)| glob(&pattern, id))
        .collect();
    menu.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| version_order(&b.1, &a.1)));
    menu.first().map(|m| m.2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sysupdate_orders_and_names_keep_apart() {
        for v in ["1", "25.05.fixture", "2.0~rc1", "24.11-1", "A^b"] {
            check_version(v).unwrap();
        }
        for v in ["", "1_2", "1+3", "-1", ".1", "a b", "1/2", &"9".repeat(31)] {
            assert!(check_version(v).is_err(), "{v:?}");
        }
        assert_eq!(UKI.name("2", Some(3)), "nixos_2+3.efi");
        assert_eq!(UKI.name("2", None), "nixos_2.efi");
        assert_eq!(ENTRY.on_esp("2"), "/loader/entries/nixos_2+3.conf");
        assert_eq!(LINUX.on_esp("2"), "/EFI/nixos/nixos_2.linux");
        assert_eq!(
            parse_entry("nixos_2+1-2.conf"),
            Some(("2".into(), Some((1, 2))))
        );
        assert_eq!(parse_entry("nixos_2.linux"), None);
        assert_eq!(parse_entry("nixos_2.efi"), Some(("2".into(), None)));
        assert_eq!(
            parse_entry("nixos_2+3.efi"),
            Some(("2".into(), Some((3, 0))))
        );
        assert_eq!(
            parse_entry("nixos_2.1+0-3.efi"),
            Some(("2.1".into(), Some((0, 3))))
        );
        assert_eq!(parse_entry("nixos-generation-1.efi"), None);
    }

    #[test]
    fn the_default_entry_is_the_newest_match_not_found_bad() {
        let entry = |file: &str| BootEntry {
            loader: "uki".into(),
            file: format!("/EFI/Linux/{file}"),
            fields: Vec::new(),
        };
        let all = [
            entry("nixos_2+0-3.efi"),
            entry("nixos_1.efi"),
            entry("nixos_10+2-1.efi"),
            entry("other_99.efi"),
            entry("nixos_9.efi"),
        ];
        fn pick(of: &[&BootEntry], p: &str) -> Option<String> {
            default_entry(of, p).map(|e| e.file.clone())
        }
        let refs: Vec<&BootEntry> = all.iter().collect();
        // 10 is newer than 9 (numbers, not letters) and has tries left.
        assert_eq!(
            pick(&refs, "nixos_*"),
            Some("/EFI/Linux/nixos_10+2-1.efi".into())
        );
        // The counter is not part of the id; case does not matter.
        assert_eq!(
            pick(&refs, "NIXOS_2.efi"),
            Some("/EFI/Linux/nixos_2+0-3.efi".into())
        );
        // A failed entry is chosen only when nothing else matches.
        let bad_and_old = [&all[0], &all[1]];
        assert_eq!(
            pick(&bad_and_old, "nixos_?.efi"),
            Some("/EFI/Linux/nixos_1.efi".into())
        );
        assert_eq!(
            pick(&refs, "nixos_??.efi"),
            Some("/EFI/Linux/nixos_10+2-1.efi".into())
        );
        assert_eq!(pick(&refs, "nothing*"), None);
    }

    #[test]
    fn versions_order_as_systemd_orders_them() {
        use std::cmp::Ordering::*;
        // Each older than the next (the UAPI specification's examples
        // and sysupdate's everyday cases).
        let rising = [
            "1~rc1", "1", "1-2", "1.0", "1.1", "1.1^p1", "1.2", "1.10", "2~", "2", "2.0", "2a",
            "10", "25.05", "25.05.1", "25.11",
        ];
        for w in rising.windows(2) {
            assert_eq!(version_order(w[0], w[1]), Less, "{} < {}", w[0], w[1]);
            assert_eq!(version_order(w[1], w[0]), Greater, "{} > {}", w[1], w[0]);
        }
        for (a, b) in [("1", "1"), ("007", "7"), ("1.a", "1.a"), ("1_", "1")] {
            assert_eq!(version_order(a, b), Equal, "{a} = {b}");
        }
        assert_eq!(version_order("a", "1"), Less, "digits beat letters");
        assert_eq!(version_order("2.0", "2a"), Less, "a marker is older");
        assert_eq!(version_order("abc", "abd"), Less);
        assert_eq!(version_order("ab", "abc"), Less);
        assert_eq!(parse_entry("nixos_2+x.efi"), None);
    }

    #[test]
    fn a_slot_leaves_a_quarter_unless_given_and_refuses_less_than_its_filesystem() {
        assert_eq!(slot_size(100 << 20, None).unwrap(), 125 << 20);
        assert_eq!(slot_size(100 << 20, Some(300 << 20)).unwrap(), 300 << 20);
        let e = slot_size(100 << 20, Some(50 << 20))
            .unwrap_err()
            .to_string();
        assert!(e.contains("too small"), "{e}");
        assert!(verity_slot_size(1 << 30, 0) >= (1 << 30) / 128);
    }
}
