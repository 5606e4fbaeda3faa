//! `forge inspect`: read any disk image (raw, compressed, a VM disk, or a
//! block device; see `unpack/`)
//! back — partition table, partitions, filesystem types, labels and UUIDs
//! — and, for our images, the boot entries (systemd-boot on an ESP,
//! extlinux on an ext4 root). What does not add up (an image shorter than
//! its table, a layout manifest of another image beside it) is a warning.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::image::VERITY_SIG_NAME;
use crate::layout::report::type_name;
use crate::layout::{BootEntry, Disk, Fs, Part, Role, MANIFEST_VERSION};
use formats::{fat, gpt, seed};

/// `forge inspect`'s answer: the image's name and the disk it holds.
#[derive(Serialize)]
pub struct Report {
    pub image: String,
    /// What is wrong with the image (e.g. shorter than its table says).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    #[serde(flatten)]
    pub disk: Disk,
    /// `--verify`: the dm-verity root checked whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified: Option<crate::verity_check::Verified>,
    /// `IMAGE.sig`: the key it names, and with `--trust`, checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<crate::sign::manifest::Signature>,
    /// A/B root slots (`forge image --slots 2`, updated by sysupdate).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub slots: Vec<Slot>,
}

/// An A/B root slot: its partition, the version in it, and that
/// version's boot entry with boot counting's state.
#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct Slot {
    pub partition: u32,
    /// None: an empty slot (`_empty`).
    pub version: Option<String>,
    /// The UKI in the ESP's EFI/Linux/ booting it, or its type 1 entry.
    pub entry: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tries_left: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tries_done: Option<u32>,
    /// `good` (no counter left), `on trial`, `bad` (no tries left),
    /// `no entry` or `empty`.
    pub state: String,
}

/// The root partitions named as A/B slots, with their entries' state.
fn slots_of(parts: &[Part]) -> Vec<Slot> {
    use crate::image::slots;
    // (version, tries left and done, the entry's path)
    type Entry<'a> = (String, Option<(u32, u32)>, &'a str);
    let entries: Vec<Entry> = parts
        .iter()
        .flat_map(|p| &p.boot_entries)
        .filter(|e| e.loader == "uki" || e.file.starts_with("/loader/entries/"))
        .filter_map(|e| {
            let name = e.file.rsplit('/').next()?;
            let (v, tries) = slots::parse_entry(name)?;
            Some((v, tries, e.file.as_str()))
        })
        .collect();
    let slot = |p: &Part| {
        let version = match p.name.as_str() {
            slots::EMPTY => None,
            n => Some(n.strip_prefix(slots::PREFIX)?.to_string()),
        };
        let entry = entries.iter().find(|e| Some(&e.0) == version.as_ref());
        let state = match (&version, entry.map(|e| e.1)) {
            (None, _) => "empty",
            (Some(_), None) => "no entry",
            (Some(_), Some(None)) => "good",
            (Some(_), Some(Some((0, _)))) => "bad",
            (Some(_), Some(Some(_))) => "on trial",
        };
        Some(Slot {
            partition: p.number,
            entry: entry.map(|e| e.2.to_string()),
            tries_left: entry.and_then(|e| e.1).map(|t| t.0),
            tries_done: entry.and_then(|e| e.1).map(|t| t.1),
            version,
            state: state.into(),
        })
    };
    parts
        .iter()
        .filter(|p| p.role == Some(Role::Root))
        .filter_map(slot)
        .collect()
}

/// The role our layouts give a partition of this type (or, on an MBR,
/// of this filesystem).
fn role(p: &Part) -> Option<Role> {
    let label = p.filesystem.as_ref().map(|f| f.label.as_str());
    match (p.type_name.as_str(), label) {
        ("esp", _) => Some(Role::Esp),
        ("root-x86-64" | "root-arm64", _) => Some(Role::Root),
        ("var", _) => Some(Role::State),
        ("root-x86-64-verity" | "root-arm64-verity", _) => Some(Role::RootVerity),
        ("root-x86-64-verity-sig" | "root-arm64-verity-sig", _) => Some(Role::RootVeritySig),
        ("linux-reserved", _) if p.name == VERITY_SIG_NAME => Some(Role::RootVeritySig),
        ("fat32-lba", Some("FIRMWARE")) => Some(Role::Firmware),
        ("linux", Some("state")) => Some(Role::State),
        // A card with --verity: the firmware partition is the bootable one.
        ("linux", Some("NIXOS_SD")) => Some(Role::Root),
        ("linux", _) if p.filesystem.as_ref().is_some_and(|f| f.kind == "verity") => {
            Some(Role::RootVerity)
        }
        ("linux", _) if p.bootable => Some(Role::Root),
        _ => None,
    }
}

/// What each partition holds (its filesystem, boot entries, role; an MBR
/// partition's name from its label), and the root's hash device if one
/// is there. Boot entries that cannot be read are a warning.
fn read_parts(
    f: &mut File,
    parts: &mut [Part],
    table: &str,
    warnings: &mut Vec<String>,
) -> Option<formats::verity::Found> {
    let mut verity = None;
    for p in parts.iter_mut() {
        p.filesystem = filesystem(f, p.offset).ok().flatten();
        if p.filesystem.is_none() {
            if let Some(found) = verity_at(f, p) {
                p.filesystem = Some(Fs {
                    kind: "verity".into(),
                    label: "verity".into(),
                    uuid: formats::seed::format_uuid(&found.params.uuid),
                    size: Some(formats::verity::hash_size(found.data_blocks)),
                });
                verity = Some(found);
            }
        }
        let entries = match p.filesystem.as_ref().map(|fs| fs.kind.as_str()) {
            Some("vfat") => systemd_boot_entries(f, p.offset).map_err(Into::into),
            Some("ext4") => extlinux_entries(f, p.offset),
            _ => Ok(Vec::new()),
        };
        p.boot_entries = entries.unwrap_or_else(|e| {
            warnings.push(format!(
                "partition {}: its boot entries cannot be read: {e:#}",
                p.number
            ));
            Vec::new()
        });
        if table == "mbr" {
            p.name = p
                .filesystem
                .as_ref()
                .map(|f| f.label.clone())
                .unwrap_or_default();
        }
        p.role = role(p);
    }
    verity
}

/// A dm-verity hash device at the start of `p` (a root-verity partition).
fn verity_at(f: &mut File, p: &Part) -> Option<formats::verity::Found> {
    let head = read_at(f, p.offset, 2 * formats::verity::BLOCK).ok()?;
    formats::verity::read(&head)
}

/// The ranges of the bmap beside the image (`bmap`, its bytes if any, of
/// an image of this `size`) with the BLAKE3 of the image's bytes there,
/// as a layout manifest lists them. A bmap inspect cannot read, or of an image of
/// another size (a truncated one, which inspect warns of), says nothing.
fn ranges_beside(
    path: &Path,
    bmap: Option<&[u8]>,
    f: &File,
    size: u64,
) -> Result<Option<Vec<formats::manifest::Range>>> {
    let bpath = crate::image::bmap_path_for(path);
    let Some(Ok(text)) = bmap.map(std::str::from_utf8) else {
        return Ok(None);
    };
    let Ok(bmap) = formats::bmap::parse(text) else {
        return Ok(None);
    };
    if bmap.image_size != size {
        return Ok(None);
    }
    // Hashed as forge image hashes them (both hashes, every core).
    let pieces = formats::bmap::hash(f, size, &bmap.byte_ranges())
        .with_context(|| format!("reading the bytes {} maps", bpath.display()))?;
    Ok(Some(formats::manifest::ranges_of(size, &pieces)))
}

/// `n` bytes at `off` of `f` (forge inspect, forge sign, --verify).
pub(crate) fn read_at(f: &mut File, off: u64, n: usize) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    f.seek(SeekFrom::Start(off))?;
    f.read_exact(&mut b)?;
    Ok(b)
}

pub fn inspect(path: &Path) -> Result<Report> {
    let what = || path.display().to_string();
    let (mut f, size) = crate::unpack::open(path).with_context(what)?;
    let first = read_at(&mut f, 0, size.min(crate::layout::ALIGN) as usize).with_context(what)?;
    let found = formats::table::probe(&first)
        .with_context(|| format!("{}: its partition table", path.display()))?;
    let Some(found) = found else {
        bail!("{}: no partition table (not a disk image)", path.display());
    };
    let mut warnings = Vec::new();
    if found.reach > size {
        warnings.push(format!(
            "the image is {size} bytes, but its partition table reaches byte {} ({}): truncated?",
            found.reach, found.what
        ));
    }
    let gpt = match found.kind {
        formats::table::Kind::Gpt(ss) => gpt_table(&mut f, ss as u64, size).with_context(what)?,
        formats::table::Kind::Mbr => None,
    };
    let mbr = match (&gpt, size >= 512) {
        (None, true) => mbr_table(&read_at(&mut f, 0, 512).with_context(what)?),
        _ => None,
    };
    let (table, sector, disk_id, mut parts) =
        gpt.or(mbr)
            .unwrap_or(("none", 512, String::new(), Vec::new()));
    let verity = read_parts(&mut f, &mut parts, table, &mut warnings);
    let head_sha256 = Some(crate::layout::report::head_sha256(&first));
    let toplevel = toplevel_of(&parts);
    match formats::manifest::read_beside(path) {
        Err(e) => warnings.push(e.to_string()),
        Ok(Some(m)) => {
            if let Err(what) = m.matches(size, &first) {
                warnings.push(format!(
                    "{} describes another image ({what})",
                    formats::manifest::path_for(path).display()
                ));
            }
        }
        Ok(None) => {}
    }
    // Where a machine's identity goes, as forge's layouts put it: the
    // state filesystem's `identity/`.
    let identity = parts.iter().find(|p| p.role == Some(Role::State)).map(|p| {
        crate::layout::report::IdentityAt {
            partition: p.number,
            path: crate::layout::report::IDENTITY_PATH.into(),
        }
    });
    let slots = slots_of(&parts);
    // The bmap beside, read once: its SHA-256 and its ranges' BLAKE3.
    let bmap = std::fs::read(crate::image::bmap_path_for(path)).ok();
    Ok(Report {
        image: path.display().to_string(),
        warnings,
        disk: Disk {
            version: MANIFEST_VERSION,
            table: table.into(),
            sector_size: sector,
            disk_id,
            size,
            partitions: parts,
            identity,
            verity: verity.map(|v| v.manifest()),
            head_sha256,
            toplevel,
            // Inside the root filesystem, which inspect does not read.
            system_version: None,
            bmap_sha256: bmap.as_deref().map(formats::manifest::sha256_hex),
            iso: formats::iso9660::read(&mut f)
                .with_context(what)?
                .map(|v| formats::manifest::IsoVolume::from(&v)),
            // A pass over every byte: `sha256sum` of the raw image.
            image_sha256: None,
            ranges: ranges_beside(path, bmap.as_deref(), &f, size).with_context(what)?,
        },
        verified: None,
        signature: None,
        slots,
    })
}

/// The system the default boot entry starts (`init=/nix/store/…/init` in
/// its options or UKI command line; extlinux's first APPEND, the default
/// entry's, as forge writes it).
fn toplevel_of(parts: &[Part]) -> Option<String> {
    let entries: Vec<&BootEntry> = parts.iter().flat_map(|p| &p.boot_entries).collect();
    let default = entries
        .iter()
        .find(|e| e.file.ends_with("/loader.conf"))
        .and_then(|e| e.fields.iter().find(|(k, _)| k == "default"))
        .map(|(_, v)| v.as_str());
    let chosen: Vec<&BootEntry> = match default {
        Some(pattern) => crate::image::slots::default_entry(&entries, pattern)
            .into_iter()
            .collect(),
        None => entries,
    };
    chosen
        .iter()
        .flat_map(|e| &e.fields)
        .filter(|(k, _)| matches!(k.as_str(), "options" | "APPEND" | "cmdline"))
        .flat_map(|(_, v)| v.split_whitespace())
        .find_map(|w| w.strip_prefix("init=")?.strip_suffix("/init"))
        .map(str::to_string)
}

/// (table, sector size, disk id, partitions) as a table reads them.
type Table = (&'static str, u64, String, Vec<Part>);

/// A partition as a table entry describes it (the rest is read later).
fn part(number: usize, (offset, size): (u64, u64), type_id: String, guid: String) -> Part {
    Part {
        number: number as u32 + 1,
        role: None,
        offset,
        size,
        type_name: type_name(&type_id).into(),
        type_id,
        guid,
        name: String::new(),
        read_only: false,
        bootable: false,
        filesystem: None,
        sha256: None,
        boot_entries: Vec::new(),
    }
}

fn gpt_table(f: &mut File, ss: u64, size: u64) -> Result<Option<Table>> {
    let mut r = |o: u64, n: usize| read_at(f, o, n);
    let Some(g) = gpt::Gpt::parse(&mut r, ss, size)? else {
        return Ok(None);
    };
    let parts = g
        .partitions
        .iter()
        .enumerate()
        .map(|(i, p)| {
            // probe() checked that every range is valid and fits u64.
            let at = (p.first_lba * ss, (p.last_lba + 1 - p.first_lba) * ss);
            let t = seed::format_uuid(&p.type_guid);
            Part {
                name: p.name.clone(),
                read_only: p.attributes & gpt::ATTR_READ_ONLY != 0,
                ..part(i, at, t, seed::format_uuid(&p.guid))
            }
        })
        .collect();
    Ok(Some(("gpt", ss, seed::format_uuid(&g.disk_guid), parts)))
}

fn mbr_table(sector: &[u8]) -> Option<Table> {
    let m = formats::mbr::parse(sector)?;
    let disk_id = format!("{:08x}", m.signature);
    let parts = m
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.kind != 0 && e.sectors != 0)
        .map(|(i, e)| {
            let at = (u64::from(e.first_lba) * 512, u64::from(e.sectors) * 512);
            let guid = format!("{disk_id}-{:02x}", i + 1);
            Part {
                bootable: e.bootable,
                ..part(i, at, format!("{:02x}", e.kind), guid)
            }
        })
        .collect();
    Some(("mbr", 512, disk_id, parts))
}

fn filesystem(f: &mut File, off: u64) -> std::io::Result<Option<Fs>> {
    let sb = read_at(f, off, 2048)?;
    if sb[1024 + 0x38..1024 + 0x3A] == [0x53, 0xEF] {
        let s = &sb[1024..];
        let uuid: [u8; 16] = s[0x68..0x78].try_into().expect("16 bytes");
        let label = String::from_utf8_lossy(&s[0x78..0x88])
            .trim_end_matches('\0')
            .to_string();
        // s_blocks_count (its high half only with the 64bit feature) in
        // blocks of 1024 << s_log_block_size.
        let le32 = |o: usize| u32::from_le_bytes(s[o..o + 4].try_into().expect("4 bytes")) as u64;
        let hi = if le32(0x60) & 0x80 != 0 {
            le32(0x150)
        } else {
            0
        };
        let block = 1024u64.checked_shl(le32(0x18) as u32).unwrap_or(0);
        let size = (hi << 32 | le32(0x04)).checked_mul(block);
        return Ok(Some(Fs {
            kind: "ext4".into(),
            label,
            uuid: seed::format_uuid(&uuid),
            size,
        }));
    }
    if sb[1024..1028] == formats::erofs::MAGIC.to_le_bytes() {
        let s = &sb[1024..];
        let uuid: [u8; 16] = s[48..64].try_into().expect("16 bytes");
        let label = String::from_utf8_lossy(&s[64..80])
            .trim_end_matches('\0')
            .to_string();
        let blocks = u32::from_le_bytes(s[36..40].try_into().expect("4 bytes")) as u64;
        return Ok(Some(Fs {
            kind: "erofs".into(),
            label,
            uuid: seed::format_uuid(&uuid),
            size: 1u64
                .checked_shl(s[12] as u32)
                .and_then(|b| blocks.checked_mul(b)),
        }));
    }
    if &sb[82..87] == b"FAT32" && sb[510..512] == [0x55, 0xAA] {
        let label = String::from_utf8_lossy(&sb[71..82]).trim_end().to_string();
        let id = u32::from_le_bytes([sb[67], sb[68], sb[69], sb[70]]);
        // BPB_TotSec32 sectors of BPB_BytsPerSec.
        let sectors = u32::from_le_bytes([sb[32], sb[33], sb[34], sb[35]]) as u64;
        let bytes = u16::from_le_bytes([sb[11], sb[12]]) as u64;
        return Ok(Some(Fs {
            kind: "vfat".into(),
            label,
            uuid: formats::fat::format_volume_id(id),
            size: Some(sectors * bytes),
        }));
    }
    Ok(None)
}

fn parse_conf(loader: &str, file: String, text: &str) -> BootEntry {
    let fields = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| match l.split_once(char::is_whitespace) {
            Some((k, v)) => (k.to_string(), v.trim().to_string()),
            None => (l.to_string(), String::new()),
        })
        .collect();
    BootEntry {
        loader: loader.into(),
        file,
        fields,
    }
}

fn systemd_boot_entries(f: &File, off: u64) -> std::io::Result<Vec<BootEntry>> {
    let mut v = fat::read::Volume::open(f.try_clone()?, off)?;
    let mut out = Vec::new();
    if let Some(conf) = v.read("/loader/loader.conf")? {
        out.push(parse_conf(
            "systemd-boot",
            "/loader/loader.conf".into(),
            &String::from_utf8_lossy(&conf),
        ));
    }
    let mut names: Vec<String> = v
        .list("/loader/entries")?
        .unwrap_or_default()
        .into_iter()
        .filter(|e| !e.is_dir && e.name.ends_with(".conf"))
        .map(|e| e.name)
        .collect();
    names.sort();
    for n in names {
        let p = format!("/loader/entries/{n}");
        if let Some(t) = v.read(&p)? {
            out.push(parse_conf("systemd-boot", p, &String::from_utf8_lossy(&t)));
        }
    }
    let mut programs = Vec::new();
    for d in v
        .list("/EFI")?
        .unwrap_or_default()
        .into_iter()
        .filter(|d| d.is_dir)
    {
        for e in v.list(&format!("/EFI/{}", d.name))?.unwrap_or_default() {
            if !e.is_dir && e.name.to_ascii_lowercase().ends_with(".efi") {
                programs.push(format!("/EFI/{}/{}", d.name, e.name));
            }
        }
    }
    programs.sort();
    for p in programs {
        if let Some(bytes) = v.read(&p)? {
            out.extend(efi_program(p, &bytes));
        }
    }
    Ok(out)
}

/// An EFI program on the ESP: whether it is signed (and by whom, and
/// whether the signature holds); for a Unified Kernel Image (`.linux`),
/// its sections, command line and OS. None for what is not a PE image.
fn efi_program(file: String, bytes: &[u8]) -> Option<BootEntry> {
    use formats::sign::authenticode;
    let sections = formats::pe::sections(bytes).ok()?;
    let signed = match authenticode::signature(bytes) {
        Ok(None) => "no".to_string(),
        Ok(Some(s)) if s.good() => format!("yes, by {}", s.signer),
        Ok(Some(s)) if !s.valid => format!("INVALID signature (claims {})", s.signer),
        Ok(Some(s)) => format!("INVALID: the image changed since {} signed it", s.signer),
        Err(e) => format!("unreadable ({e})"),
    };
    let text = |name: &str| {
        let s = sections.iter().find(|s| s.0 == name)?;
        Some(
            String::from_utf8_lossy(&s.1)
                .trim_end_matches(['\0', '\n'])
                .to_string(),
        )
    };
    let uki = sections.iter().any(|s| s.0 == ".linux");
    let mut fields = vec![("signed".to_string(), signed)];
    if uki {
        let names: Vec<&str> = sections.iter().map(|s| s.0.as_str()).collect();
        fields.push(("sections".into(), names.join(" ")));
        if let Some(c) = text(".cmdline") {
            fields.push(("cmdline".into(), c));
        }
        let os = text(".osrel").and_then(|o| {
            o.lines().find_map(|l| {
                l.strip_prefix("PRETTY_NAME=")
                    .map(|v| v.trim_matches('"').to_string())
            })
        });
        fields.extend(os.map(|o| ("os".to_string(), o)));
    }
    Some(BootEntry {
        loader: if uki { "uki" } else { "efi" }.into(),
        file,
        fields,
    })
}

/// A filesystem at byte `off` of an image, for ext4-view.
pub(crate) struct Region {
    pub f: File,
    pub off: u64,
}

impl ext4_view::Ext4Read for Region {
    fn read(
        &mut self,
        start: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.f.seek(SeekFrom::Start(self.off + start))?;
        self.f.read_exact(dst)?;
        Ok(())
    }
}

fn extlinux_entries(f: &File, off: u64) -> Result<Vec<BootEntry>> {
    let fs = ext4_view::Ext4::load(Box::new(Region {
        f: f.try_clone()?,
        off,
    }))?;
    let conf = "/boot/extlinux/extlinux.conf";
    match fs.read(conf) {
        Ok(b) => Ok(vec![parse_conf(
            "extlinux",
            conf.into(),
            &String::from_utf8_lossy(&b),
        )]),
        Err(_) => Ok(Vec::new()),
    }
}

/// Human-readable form.
/// A hybrid ISO's volume: its id and files, the one El Torito boots named.
fn iso_line(v: &formats::manifest::IsoVolume) -> String {
    let mut s = format!("  ISO 9660 volume {}:", v.volume_id);
    for f in &v.files {
        let boot = v.efi_boot.as_ref() == Some(&f.name);
        s.push_str(&format!(
            " {} ({} bytes at {}{})",
            f.name,
            f.size,
            f.offset,
            if boot { ", El Torito EFI" } else { "" }
        ));
    }
    s.push('\n');
    s
}

/// One row per partition, and under it what its boot entries say; the
/// columns as wide as their longest entry (`root-x86-64-verity-sig`).
fn partition_rows(parts: &[Part]) -> String {
    let mut s = String::new();
    let width = |of: fn(&Part) -> usize, least| parts.iter().map(of).fold(least, usize::max);
    let (ty_w, name_w) = (
        width(|p| p.type_name.len(), 14),
        width(|p| p.name.len(), 10),
    );
    for p in parts {
        let fs = p
            .filesystem
            .as_ref()
            .map(|f| format!("{} label={:?} uuid={}", f.kind, f.label, f.uuid))
            .unwrap_or_else(|| "no known filesystem".into());
        s.push_str(&format!(
            "  {} {:ty_w$} at {:>12} size {:>12} {:name_w$} {}{}{}\n",
            p.number,
            p.type_name,
            p.offset,
            p.size,
            p.name,
            fs,
            if p.read_only { " read-only" } else { "" },
            if p.bootable { " bootable" } else { "" },
        ));
        for e in &p.boot_entries {
            s.push_str(&format!("      {} {}\n", e.loader, e.file));
            for (k, v) in &e.fields {
                s.push_str(&format!("        {k} {v}\n"));
            }
        }
    }
    s
}

pub fn render(r: &Report) -> String {
    let mut s = format!(
        "{}: {} bytes, {} table, {}-byte sectors, disk {}\n",
        r.image, r.disk.size, r.disk.table, r.disk.sector_size, r.disk.disk_id
    );
    for w in &r.warnings {
        s.push_str(&format!("warning: {w}\n"));
    }
    if let Some(t) = &r.disk.toplevel {
        s.push_str(&format!("  the default boot entry starts {t}\n"));
    }
    if let Some(v) = &r.disk.iso {
        s.push_str(&iso_line(v));
    }
    s.push_str(&partition_rows(&r.disk.partitions));
    if !r.slots.is_empty() {
        s.push_str("A/B slots:\n");
    }
    for slot in &r.slots {
        let what = match (&slot.version, &slot.entry) {
            (None, _) => "empty".to_string(),
            (Some(v), None) => format!("version {v}, no boot entry"),
            (Some(v), Some(e)) => format!("version {v}, {e}"),
        };
        let tries = match (slot.tries_left, slot.tries_done) {
            (Some(l), Some(d)) => format!(" ({l} tries left, {d} done)"),
            _ => String::new(),
        };
        let state = match slot.entry {
            Some(_) => format!(": {}{tries}", slot.state),
            None => String::new(),
        };
        s.push_str(&format!("  partition {}: {what}{state}\n", slot.partition));
    }
    if let Some(sig) = &r.signature {
        let state = match sig.verified {
            Some(true) => "verified with a trusted key",
            _ => "not checked (give --trust PUBKEY)",
        };
        s.push_str(&format!(
            "manifest signature: {} by {}: {state}\n",
            sig.file.display(),
            sig.key
        ));
    }
    if let Some(v) = &r.verified {
        s.push_str(&format!(
            "verity: root hash {} verified over {} data blocks{}\n",
            v.root_hash,
            v.data_blocks,
            v.signed_by
                .as_ref()
                .map(|w| format!(", signed by {w}"))
                .unwrap_or_default()
        ));
    }
    s
}
