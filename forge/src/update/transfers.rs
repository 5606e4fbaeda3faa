//! systemd-sysupdate transfer definitions (`sysupdate.d/*.conf`) for the
//! artefacts `forge update` writes: where sysupdate finds each version's
//! files (a URL or a directory) and where it installs them (the A/B
//! partitions `forge image --slots 2` lays out, the UKI into the ESP's
//! `EFI/Linux/`, or the type 1 entry and its kernel and initrd, with boot
//! counting). The NixOS module generates the same.

use crate::image::slots::{self, BootFile, PREFIX, TRIES};

/// Where the artefacts are published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// An HTTP(S) directory holding them and `SHA256SUMS` (`url-file`).
    Url(String),
    /// A local directory (`regular-file`).
    Dir(std::path::PathBuf),
}

impl Source {
    /// `http://…`/`https://…` is a URL; anything else a directory.
    pub fn parse(s: &str) -> Source {
        match s.starts_with("http://") || s.starts_with("https://") {
            true => Source::Url(s.trim_end_matches('/').to_string()),
            false => Source::Dir(s.into()),
        }
    }

    fn section(&self, pattern: &str) -> String {
        let (ty, path) = match self {
            Source::Url(u) => ("url-file", u.clone()),
            Source::Dir(d) => ("regular-file", d.display().to_string()),
        };
        format!("[Source]\nType={ty}\nPath={path}\nMatchPattern={pattern}\n")
    }
}

/// A partition artefact: its file suffix and the partition type sysupdate
/// installs it into.
pub struct PartitionKind {
    pub suffix: &'static str,
    pub partition_type: &'static str,
}

/// The root filesystem, its hash tree and the hash's signature.
pub const ROOT: PartitionKind = PartitionKind {
    suffix: "root.raw",
    partition_type: "root",
};
pub const VERITY: PartitionKind = PartitionKind {
    suffix: "verity.raw",
    partition_type: "root-verity",
};
pub const VERITY_SIG: PartitionKind = PartitionKind {
    suffix: "verity-sig.raw",
    partition_type: "root-verity-sig",
};

/// How partition artefacts are compressed (`forge update --compress`):
/// sysupdate's import decompresses xz by its magic (zstd only from
/// systemd 258, so `forge update` refuses it for now).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compress {
    Zst,
    Xz,
}

impl Compress {
    pub const NAMES: [&'static str; 2] = ["zst", "xz"];

    pub fn from_name(s: &str) -> Option<Compress> {
        match s {
            "zst" => Some(Compress::Zst),
            "xz" => Some(Compress::Xz),
            _ => None,
        }
    }

    /// The file name's suffix.
    pub fn suffix(self) -> &'static str {
        match self {
            Compress::Zst => ".zst",
            Compress::Xz => ".xz",
        }
    }
}

/// A compressed artefact's suffix, or none.
fn ext(c: Option<Compress>) -> &'static str {
    c.map_or("", Compress::suffix)
}

/// The artefact file of `kind` for `version`; with verity the partition's
/// GUID is in the name (`_@u`: sysupdate gives the partition it), as the
/// root hash decides it and the kernel finds the root by it.
pub fn artefact(
    version: &str,
    kind: &PartitionKind,
    uuid: Option<&str>,
    c: Option<Compress>,
) -> String {
    let e = ext(c);
    match uuid {
        Some(u) => format!("{PREFIX}{version}_{u}.{}{e}", kind.suffix),
        None => format!("{PREFIX}{version}.{}{e}", kind.suffix),
    }
}

/// The version an artefact file of ours is for (None: not one of ours).
pub fn version_of(name: &str) -> Option<&str> {
    let stem = name.strip_prefix(PREFIX)?;
    let stem = Compress::NAMES
        .iter()
        .find_map(|c| stem.strip_suffix(c)?.strip_suffix('.'))
        .unwrap_or(stem);
    let boot = [
        &slots::UKI,
        &slots::LINUX,
        &slots::INITRD,
        &slots::DTB,
        &slots::ENTRY,
    ];
    let parts = [ROOT.suffix, VERITY.suffix, VERITY_SIG.suffix].map(|s| (".", s));
    let stem = boot
        .iter()
        .map(|f| ("", f.suffix))
        .chain(parts)
        .find_map(|(dot, s)| stem.strip_suffix(s)?.strip_suffix(dot))?;
    stem.split('_').next()
}

/// The head every definition shares: the running version is never
/// replaced (`%A`, the booted image's IMAGE_VERSION); with `verify`
/// (`forge update --sign`) sysupdate takes only a SHA256SUMS whose
/// SHA256SUMS.gpg a key in the machine's import-pubring.gpg made.
fn transfer(what: &str, verify: bool) -> String {
    let v = if verify { "yes" } else { "no" };
    format!("# Made by forge update: {what}.\n[Transfer]\nProtectVersion=%A\nVerify={v}\n\n")
}

/// The definition installing `kind` artefacts (compressed as `c`) into
/// their A/B partitions (`uuid`: their names carry the partition GUID).
pub fn partition(
    source: &Source,
    kind: &PartitionKind,
    uuid: bool,
    c: Option<Compress>,
    verify: bool,
) -> String {
    let u = if uuid { "_@u" } else { "" };
    format!(
        "{}{}\n[Target]\nType=partition\nPath=auto\nMatchPattern={PREFIX}@v\nMatchPartitionType={}\nReadOnly=1\nInstancesMax=2\n",
        transfer(
            &format!("the {} partition of each version", kind.partition_type),
            verify
        ),
        source.section(&format!("{PREFIX}@v{u}.{}{}", kind.suffix, ext(c))),
        kind.partition_type,
    )
}

/// The definition installing each version's boot file `f` (its UKI, or
/// its type 1 entry, kernel or initrd) into the ESP; the entry with
/// [`TRIES`] boot tries.
pub fn boot_file(source: &Source, f: &BootFile, verify: bool) -> String {
    let x = f.suffix;
    let (patterns, tries) = match f.counted {
        true => (
            format!("{PREFIX}@v+@l-@d{x} {PREFIX}@v+@l{x} {PREFIX}@v{x}"),
            format!("TriesLeft={TRIES}\nTriesDone=0\n"),
        ),
        false => (format!("{PREFIX}@v{x}"), String::new()),
    };
    format!(
        "{}{}\n[Target]\nType=regular-file\nPath={}\nPathRelativeTo=boot\nMatchPattern={patterns}\nMode=0444\n{tries}InstancesMax=2\n",
        transfer(&format!("each version's {}", f.what), verify),
        source.section(&format!("{PREFIX}@v{x}")),
        f.dir,
    )
}

/// Every definition, by file name, in the order sysupdate applies them
/// (the partitions before the `boot` files, the entry last).
pub fn all(
    source: &Source,
    verity: bool,
    signed: bool,
    c: Option<Compress>,
    verify: bool,
    boot: &[&BootFile],
) -> Vec<(String, String)> {
    let mut v = vec![(
        "50-nixos-root.conf".to_string(),
        partition(source, &ROOT, verity, c, verify),
    )];
    if verity {
        v.push((
            "51-nixos-verity.conf".into(),
            partition(source, &VERITY, true, c, verify),
        ));
    }
    if signed {
        v.push((
            "52-nixos-verity-sig.conf".into(),
            partition(source, &VERITY_SIG, false, c, verify),
        ));
    }
    for f in boot {
        v.push((format!("{}.conf", f.transfer), boot_file(source, f, verify)));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_name_the_slots_and_entries_forge_image_makes() {
        let s = Source::parse("https://updates.example/nixos/");
        assert_eq!(s, Source::Url("https://updates.example/nixos".into()));
        let root = partition(&s, &ROOT, false, None, false);
        assert!(root.contains("Type=url-file\nPath=https://updates.example/nixos\nMatchPattern=nixos_@v.root.raw\n"), "{root}");
        let verity = partition(&s, &VERITY, true, None, true);
        assert!(
            verity.contains("MatchPattern=nixos_@v_@u.verity.raw\n"),
            "{verity}"
        );
        assert!(
            verity.contains("MatchPartitionType=root-verity\n"),
            "{verity}"
        );
        assert!(
            root.contains("MatchPattern=nixos_@v\nMatchPartitionType=root\n"),
            "{root}"
        );
        let e = boot_file(&Source::parse("/srv/u"), &slots::UKI, false);
        assert!(
            e.contains("Type=regular-file\nPath=/srv/u\nMatchPattern=nixos_@v.efi\n"),
            "{e}"
        );
        assert!(e.contains("TriesLeft=3\n"), "{e}");
        let k = boot_file(&s, &slots::LINUX, false);
        assert!(k.contains("Path=/EFI/nixos\nPathRelativeTo=boot\nMatchPattern=nixos_@v.linux\nMode=0444\nInstancesMax=2\n"), "{k}");
        let c = boot_file(&s, &slots::ENTRY, false);
        assert!(c.contains("Path=/loader/entries\nPathRelativeTo=boot\nMatchPattern=nixos_@v+@l-@d.conf nixos_@v+@l.conf nixos_@v.conf\n"), "{c}");
        let type1: Vec<_> = all(
            &s,
            false,
            false,
            None,
            false,
            &slots::boot_files(false, true, false),
        )
        .into_iter()
        .map(|x| x.0)
        .collect();
        assert_eq!(
            type1,
            [
                "50-nixos-root.conf",
                "60-nixos-linux.conf",
                "61-nixos-initrd.conf",
                "62-nixos-entry.conf"
            ]
        );
        assert!(e.contains("Verify=no\n") && verity.contains("Verify=yes\n"));
        let names: Vec<_> = all(&s, true, false, None, false, &[&slots::UKI])
            .into_iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(
            names,
            [
                "50-nixos-root.conf",
                "51-nixos-verity.conf",
                "60-nixos-uki.conf"
            ]
        );
        assert_eq!(artefact("2", &VERITY, None, None), "nixos_2.verity.raw");
        let xz = partition(&s, &ROOT, true, Some(Compress::Xz), false);
        assert!(
            xz.contains("MatchPattern=nixos_@v_@u.root.raw.xz\n"),
            "{xz}"
        );
        assert_eq!(
            artefact("2", &ROOT, Some("8eb5-1"), Some(Compress::Zst)),
            "nixos_2_8eb5-1.root.raw.zst"
        );
        assert_eq!(version_of("nixos_25.05_8eb5-1.root.raw.zst"), Some("25.05"));
        assert_eq!(version_of("nixos_3.verity.raw.xz"), Some("3"));
        assert_eq!(version_of("nixos_25.05_8eb5-1.root.raw"), Some("25.05"));
        assert_eq!(version_of("nixos_25.05.efi"), Some("25.05"));
        assert_eq!(version_of("nixos_2.verity-sig.raw"), Some("2"));
        assert_eq!(version_of("nixos_2.1.linux"), Some("2.1"));
        assert_eq!(version_of("nixos_2.initrd"), Some("2"));
        assert_eq!(version_of("nixos_2.dtb"), Some("2"));
        assert_eq!(version_of("nixos_2.conf"), Some("2"));
        assert_eq!(version_of("SHA256SUMS"), None);
        assert_eq!(version_of("nixos_2.img"), None);
        assert_eq!(
            artefact("2", &ROOT, Some("8eb5-1"), None),
            "nixos_2_8eb5-1.root.raw"
        );
    }
}
