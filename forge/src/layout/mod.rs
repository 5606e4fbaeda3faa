//! Disk layouts as data (in the spirit of systemd-repart's partition
//! definitions): a table kind and partitions, each with a role, a type, a
//! name, a label, attributes, a size policy and the filesystem plan it
//! holds. An image format is a [`Layout`] value; [`Layout::place`] decides
//! every offset (pure), [`Placed::write`] writes any layout in one
//! ascending pass, and [`Placed::report`] describes it (the manifest).

pub mod report;

use anyhow::{bail, Context, Result};
use std::io::SeekFrom;

use formats::{erofs, ext4, fat, gpt, iso9660, mbr, ranges, seed, verity};
pub use report::{BootEntry, Disk, Fs, IdentityAt, Part, Role, MANIFEST_VERSION};

/// Partitions start on 1 MiB boundaries.
pub const ALIGN: u64 = 1 << 20;

fn align(n: u64) -> u64 {
    n.next_multiple_of(ALIGN)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    Gpt,
    /// DOS partition table, 512-byte sectors only.
    Mbr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartType {
    /// A GPT type GUID.
    Gpt(&'static str),
    /// An MBR partition type byte.
    Mbr(u8),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizePolicy {
    /// Exactly this many bytes.
    Fixed(u64),
    /// The filesystem's planned size, rounded up to [`ALIGN`].
    Content,
    /// The rest of the disk when the layout has a disk size (the
    /// filesystem is re-planned to fill it, see [`Layout::fill`]); else
    /// like `Content`. Only the last partition may fill.
    Fill,
}

/// A planned filesystem, ready to be written at an offset.
pub enum Filesystem<'t> {
    Fat {
        plan: fat::Plan<'t>,
        volume_id: u32,
    },
    Ext4 {
        plan: ext4::Plan<'t>,
        uuid: [u8; 16],
    },
    /// A read-only root as EROFS (`--root-fs erofs`).
    Erofs {
        plan: erofs::Plan<'t>,
        uuid: [u8; 16],
    },
    /// A dm-verity hash device (superblock and tree), whole in memory.
    Verity {
        tree: std::sync::Arc<verity::Tree>,
    },
    /// A root-verity-sig partition's JSON (`--verity-key`), whole in memory.
    VeritySig {
        bytes: Vec<u8>,
    },
    /// Nothing: an A/B slot waiting for its first update (`--slots 2`).
    Empty,
}

impl Filesystem<'_> {
    pub fn size(&self) -> u64 {
        match self {
            Filesystem::Fat { plan, .. } => plan.size_bytes(),
            Filesystem::Ext4 { plan, .. } => plan.size_bytes(),
            Filesystem::Erofs { plan, .. } => plan.size_bytes(),
            Filesystem::Verity { .. } | Filesystem::VeritySig { .. } | Filesystem::Empty => {
                self.whole().map_or(0, |b| b.len() as u64)
            }
        }
    }
    /// The bytes of a partition made whole in memory (a hash tree, a
    /// signature).
    fn whole(&self) -> Option<&[u8]> {
        match self {
            Filesystem::Verity { tree } => Some(&tree.bytes),
            Filesystem::VeritySig { bytes } => Some(bytes),
            Filesystem::Empty => Some(&[]),
            _ => None,
        }
    }
    /// What it will write, relative to its start.
    pub fn mapped(&self) -> Vec<(u64, u64)> {
        match self {
            Filesystem::Fat { plan, .. } => plan.mapped(),
            Filesystem::Ext4 { plan, .. } => plan.mapped(),
            Filesystem::Erofs { plan, .. } => plan.mapped(),
            Filesystem::Verity { .. } | Filesystem::VeritySig { .. } | Filesystem::Empty => {
                match self.size() {
                    0 => Vec::new(),
                    n => vec![(0, n)],
                }
            }
        }
    }
    pub fn kind(&self) -> &'static str {
        match self {
            Filesystem::Fat { .. } => "vfat",
            Filesystem::Ext4 { .. } => "ext4",
            Filesystem::Erofs { .. } => "erofs",
            Filesystem::Verity { .. } => "verity",
            Filesystem::VeritySig { .. } => "verity-sig",
            Filesystem::Empty => "empty",
        }
    }
    pub fn uuid(&self) -> String {
        match self {
            Filesystem::Fat { volume_id, .. } => fat::format_volume_id(*volume_id),
            Filesystem::Ext4 { uuid, .. } | Filesystem::Erofs { uuid, .. } => {
                seed::format_uuid(uuid)
            }
            Filesystem::Verity { tree } => seed::format_uuid(&tree.params.uuid),
            Filesystem::VeritySig { .. } | Filesystem::Empty => String::new(),
        }
    }
    /// The dm-verity parameters, for a hash partition.
    pub fn verity(&self) -> Option<formats::manifest::Verity> {
        match self {
            Filesystem::Verity { tree } => Some(tree.found().manifest()),
            _ => None,
        }
    }
    /// The same filesystem planned at exactly `bytes`.
    fn resized(&self, bytes: u64) -> Result<Self> {
        match self {
            Filesystem::Ext4 { plan, uuid } => Ok(Filesystem::Ext4 {
                plan: plan.resized(bytes)?,
                uuid: *uuid,
            }),
            _ => bail!("only an ext4 partition can fill the disk"),
        }
    }
    /// Stream the filesystem into `sink` at `off` (also into a hasher,
    /// for `--verity`); what it wrote, relative to its start.
    pub fn stream(&self, sink: &mut dyn formats::sink::Sink, off: u64) -> Result<Vec<(u64, u64)>> {
        Ok(match self {
            Filesystem::Fat { plan, .. } => plan.write(sink, off).map(|w| w.mapped)?,
            Filesystem::Ext4 { plan, .. } => plan.write(sink, off).map(|w| w.mapped)?,
            Filesystem::Erofs { plan, .. } => plan.write(sink, off).map(|w| w.mapped)?,
            Filesystem::Verity { .. } | Filesystem::VeritySig { .. } | Filesystem::Empty => {
                sink.seek(SeekFrom::Start(off))?;
                sink.write_all(self.whole().unwrap_or_default())?;
                self.mapped()
            }
        })
    }
    /// Write at `off` of `out`; what it wrote must be what it planned.
    fn write(&self, out: &mut dyn Target, off: u64) -> Result<()> {
        self.write_to(out.sink(), off)
    }
    /// Write at `off` of `sink` (a partition alone, `forge update`); what
    /// it wrote must be what it planned.
    pub fn write_to(&self, sink: &mut dyn formats::sink::Sink, off: u64) -> Result<()> {
        let w = self.stream(sink, off)?;
        if ranges::merge(w) != self.mapped() {
            bail!(
                "internal: the {} filesystem wrote other blocks than it planned",
                self.kind()
            );
        }
        Ok(())
    }
}

/// What a placed layout is written into (the image assembler,
/// `assemble::ImageOut`): told the size and block map first, told
/// which ranges to hash (the partitions), then given the bytes in
/// ascending order through its `Sink`.
pub trait Target {
    fn begin(&mut self, size: u64, map: Vec<(u64, u64)>) -> std::io::Result<()>;
    fn watch(&mut self, off: u64, len: u64) -> std::io::Result<()>;
    fn sink(&mut self) -> &mut dyn formats::sink::Sink;
}

/// A partition as the layout declares it.
pub struct Partition<'t> {
    pub role: Role,
    pub ty: PartType,
    /// The GPT partition name (an A/B slot's carries its version).
    pub name: String,
    /// The filesystem's label.
    pub label: String,
    /// GPT attribute bit 60 (the root of a read-only image).
    pub read_only: bool,
    /// MBR active flag (U-Boot's distro boot scans only these).
    pub bootable: bool,
    /// The earliest byte it may start at (else right after the previous
    /// one, aligned).
    pub start: Option<u64>,
    pub size: SizePolicy,
    pub fs: Filesystem<'t>,
    /// Its GPT partition GUID, when something else decides it (verity:
    /// the root hash); else it derives from the seed, role and index.
    pub guid: Option<[u8; 16]>,
}

pub struct Layout<'t> {
    pub table: Table,
    pub sector_size: u32,
    /// Seed of the disk's and partitions' GUIDs (GPT) or signature (MBR).
    pub seed: String,
    pub partitions: Vec<Partition<'t>>,
    /// The whole disk's size, when the layout is made for one (else the
    /// partitions decide it); set by [`Layout::fill`].
    pub disk_size: Option<u64>,
    /// An ISO 9660 volume over the partitions too (`--format iso`).
    pub iso: Option<Iso>,
}

/// A hybrid ISO's volume: partitions that are also files of an ISO 9660
/// volume whose metadata follows the table in the first MiB, one of them
/// the El Torito EFI image, so the file boots as a CD and, written to a
/// disk, by its GPT.
pub struct Iso {
    pub volume_id: String,
    pub epoch: i64,
    /// (partition index, file name).
    pub files: Vec<(usize, String)>,
    /// The partition El Torito boots (the ESP).
    pub efi_boot: usize,
}

/// The partition table's bytes: at the start, and (GPT) the backup at the end.
struct TableBytes {
    head: Vec<u8>,
    tail: Option<(u64, Vec<u8>)>,
    disk_id: String,
    /// Per partition: its GUID (GPT) or PARTUUID (MBR).
    guids: Vec<String>,
}

/// A layout with every offset decided.
pub struct Placed<'l, 't> {
    pub layout: &'l Layout<'t>,
    /// (offset, size) of each partition.
    pub at: Vec<(u64, u64)>,
    pub size: u64,
    table: TableBytes,
}

impl<'t> Layout<'t> {
    /// `partitions` under `table`, as large as they need, no ISO volume.
    pub fn of(table: Table, sector_size: u32, seed: &str, partitions: Vec<Partition<'t>>) -> Self {
        Layout {
            table,
            sector_size,
            seed: seed.to_string(),
            partitions,
            disk_size: None,
            iso: None,
        }
    }

    /// Bytes the end of the disk keeps for the table: a GPT's backup.
    fn tail_reserve(&self) -> u64 {
        match self.table {
            Table::Gpt => ALIGN,
            Table::Mbr => 0,
        }
    }

    /// Make the layout exactly `disk_size` bytes: a [`SizePolicy::Fill`]
    /// partition (the last) gets, and its filesystem is re-planned to,
    /// everything the others leave before the table's tail.
    pub fn fill(&mut self, disk_size: u64) -> Result<()> {
        let ss = self.sector_size as u64;
        if !disk_size.is_multiple_of(ss) {
            bail!("the disk size, {disk_size} bytes, is not a whole number of {ss}-byte sectors");
        }
        self.disk_size = Some(disk_size);
        let Some(i) = self
            .partitions
            .iter()
            .position(|p| p.size == SizePolicy::Fill)
        else {
            return Ok(());
        };
        let start = {
            let placed = self.place()?;
            placed.at[i].0
        };
        let end = (disk_size.saturating_sub(self.tail_reserve()) / ALIGN) * ALIGN;
        let p = &mut self.partitions[i];
        if end <= start || end - start < p.fs.size() {
            bail!(
                "a {disk_size}-byte disk leaves the {} partition less than its {} bytes",
                p.label,
                p.fs.size()
            );
        }
        p.fs = p.fs.resized(end - start).with_context(|| {
            format!(
                "planning the {} filesystem at {} bytes",
                p.label,
                end - start
            )
        })?;
        Ok(())
    }

    /// What partition `i`'s GUID is derived from: its role and its index
    /// among the partitions of that role (`gpt:nixos` for the first root,
    /// `gpt:nixos:1` for a second one, as an A/B slot), never its name,
    /// which two slots may share.
    fn guid_purpose(&self, i: usize) -> String {
        let role = self.partitions[i].role;
        let k = self.partitions[..i]
            .iter()
            .filter(|p| p.role == role)
            .count();
        match k {
            0 => role.guid_word().to_string(),
            k => format!("{}:{k}", role.guid_word()),
        }
    }

    /// Decide every offset: partitions aligned, in order; a GPT keeps
    /// 1 MiB at the end for its backup. Pure.
    pub fn place(&self) -> Result<Placed<'_, 't>> {
        let ss = self.sector_size as u64;
        if self.table == Table::Mbr && ss != 512 {
            bail!("an MBR needs 512-byte sectors; --sector-size {ss} does not apply");
        }
        let last = self.partitions.len().saturating_sub(1);
        let mut at = Vec::new();
        let mut end = 0;
        for (i, p) in self.partitions.iter().enumerate() {
            let off = align(end.max(p.start.unwrap_or(ALIGN)));
            let size = match p.size {
                SizePolicy::Fixed(n) => n,
                SizePolicy::Fill if i != last => {
                    bail!(
                        "internal: the {} partition fills the disk but is not the last",
                        p.label
                    )
                }
                SizePolicy::Content | SizePolicy::Fill => align(p.fs.size()),
            };
            if p.fs.size() > size {
                bail!(
                    "the {} filesystem ({} bytes) does not fit its {size}-byte partition",
                    p.label,
                    p.fs.size()
                );
            }
            if size % ss != 0 {
                bail!("the {} partition's size, {size} bytes, is not a whole number of {ss}-byte sectors", p.label);
            }
            at.push((off, size));
            end = off + size;
        }
        let size = align(end) + self.tail_reserve();
        let size = match self.disk_size {
            Some(disk) if disk < size => {
                bail!("the partitions need {size} bytes; the disk size is {disk}")
            }
            Some(disk) => disk,
            None => size,
        };
        let mut table = match self.table {
            Table::Gpt => self.gpt(&at, size)?,
            Table::Mbr => self.mbr(&at)?,
        };
        if let Some(iso) = &self.iso {
            table.head = self.iso_head(iso, table.head, &at, size)?;
        }
        Ok(Placed {
            layout: self,
            at,
            size,
            table,
        })
    }

    fn gpt(&self, at: &[(u64, u64)], size: u64) -> Result<TableBytes> {
        let ss = self.sector_size as u64;
        let guid = |what: &str| seed::uuid(&self.seed, &format!("gpt:{what}"));
        let mut partitions = Vec::new();
        for (i, (p, &(off, len))) in self.partitions.iter().zip(at).enumerate() {
            let PartType::Gpt(ty) = p.ty else {
                bail!("internal: the {} partition has no GPT type", p.name);
            };
            partitions.push(gpt::Partition {
                type_guid: seed::parse_uuid(ty).context("internal: a GPT type GUID")?,
                guid: p.guid.unwrap_or_else(|| guid(&self.guid_purpose(i))),
                first_lba: off / ss,
                last_lba: (off + len) / ss - 1,
                attributes: if p.read_only { gpt::ATTR_READ_ONLY } else { 0 },
                name: p.name.to_string(),
            });
        }
        let g = gpt::Gpt {
            sector: ss,
            disk_sectors: size / ss,
            disk_guid: guid("disk"),
            partitions,
        };
        Ok(TableBytes {
            head: g.primary(),
            tail: Some(g.backup()),
            disk_id: seed::format_uuid(&g.disk_guid),
            guids: g
                .partitions
                .iter()
                .map(|p| seed::format_uuid(&p.guid))
                .collect(),
        })
    }

    /// The table's bytes, then the ISO volume's metadata at its 32 KiB.
    fn iso_head(
        &self,
        iso: &Iso,
        mut head: Vec<u8>,
        at: &[(u64, u64)],
        size: u64,
    ) -> Result<Vec<u8>> {
        if head.len() as u64 > iso9660::START {
            bail!("internal: the partition table reaches past the ISO's system area");
        }
        let file = |&(i, ref name): &(usize, String)| iso9660::File {
            name: name.clone(),
            start: at[i].0,
            len: at[i].1,
        };
        let v = iso9660::Volume {
            volume_id: iso.volume_id.clone(),
            epoch: iso.epoch,
            size,
            files: iso.files.iter().map(file).collect(),
            efi_boot: iso
                .files
                .iter()
                .position(|f| f.0 == iso.efi_boot)
                .context("internal: the El Torito partition is no ISO file")?,
        };
        head.resize(iso9660::START as usize, 0);
        head.extend(v.encode()?);
        Ok(head)
    }

    fn mbr(&self, at: &[(u64, u64)]) -> Result<TableBytes> {
        let lba = |b: u64| -> Result<u32> {
            u32::try_from(b / 512).context("image too large for an MBR (2 TiB)")
        };
        let mut parts = Vec::new();
        for (p, &(off, len)) in self.partitions.iter().zip(at) {
            let PartType::Mbr(kind) = p.ty else {
                bail!("internal: the {} partition has no MBR type", p.name);
            };
            parts.push(mbr::Partition {
                bootable: p.bootable,
                kind,
                first_lba: lba(off)?,
                sectors: lba(len)?,
            });
        }
        let signature = mbr_signature(&self.seed);
        Ok(TableBytes {
            head: mbr::encode(signature, &parts),
            tail: None,
            disk_id: format!("{signature:08x}"),
            guids: (1..=parts.len())
                .map(|n| mbr_partuuid(signature, n))
                .collect(),
        })
    }
}

impl Placed<'_, '_> {
    /// Every byte range the image's writes cover: the tables and each
    /// filesystem's map, known before a byte is written.
    pub fn mapped(&self) -> Vec<(u64, u64)> {
        let mut r = vec![(0, self.table.head.len() as u64)];
        for (p, &(off, _)) in self.layout.partitions.iter().zip(&self.at) {
            r.extend(ranges::shift(&p.fs.mapped(), off));
        }
        if let Some((off, b)) = &self.table.tail {
            r.push((*off, b.len() as u64));
        }
        ranges::merge(r)
    }

    /// Write the whole image in ascending order: the table, each
    /// filesystem, the backup table last. `stage` hears of each step.
    pub(crate) fn write(&self, out: &mut dyn Target, stage: &mut dyn FnMut(&str)) -> Result<()> {
        out.begin(self.size, self.mapped())
            .context("sizing the image")?;
        let write_at = |out: &mut dyn Target, off: u64, b: &[u8]| -> std::io::Result<()> {
            let s = out.sink();
            s.seek(SeekFrom::Start(off))?;
            s.write_all(b)
        };
        write_at(out, 0, &self.table.head).context("writing the partition table")?;
        for &(off, len) in &self.at {
            out.watch(off, len).context("hashing the partitions")?;
        }
        for (p, &(off, _)) in self.layout.partitions.iter().zip(&self.at) {
            p.fs.write(out, off)
                .with_context(|| format!("writing the {} partition at byte {off}", p.label))?;
            stage(&format!("wrote the {} partition", p.label));
        }
        if let Some((off, b)) = &self.table.tail {
            write_at(out, *off, b).context("writing the backup GPT")?;
        }
        Ok(())
    }
}

/// An MBR disk's signature, from the seed.
pub fn mbr_signature(seed: &str) -> u32 {
    let d = seed::derive(seed, "mbr:signature");
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

/// An MBR partition's PARTUUID, as Linux gives it:
/// `<disk signature>-<partition number>`, in hex.
pub fn mbr_partuuid(signature: u32, number: usize) -> String {
    format!("{signature:08x}-{number:02x}")
}

#[cfg(test)]
mod tests;
