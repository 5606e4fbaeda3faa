//! Our FAT32 writer (the EFI System Partition and the Raspberry Pi
//! firmware partition), a layout compiler like the ext4 writer.
//!
//! crates.io's fatfs 0.3.6 writes directories `fsck.fat` rejects and picks
//! FAT16 for small volumes, so this is ours: always FAT32 (the cluster size
//! is chosen so the cluster count is a FAT32 one, or the size is refused),
//! sorted entries, fixed timestamps, volume ID from the caller: same input,
//! same bytes.

mod names;
pub mod read;

use std::collections::HashSet;
use std::io::SeekFrom;
use std::path::PathBuf;

use crate::sink::Sink;
use crate::tree::{Content, Kind, NodeId, Tree, ROOT};

/// Fewer clusters than this and every reader takes the volume for FAT16.
const MIN_FAT32_CLUSTERS: u64 = 65525;
const MAX_FAT32_CLUSTERS: u64 = 0x0FFF_FFF5;
const EOC: u32 = 0x0FFF_FFFF;
const RESERVED_SECTORS: u64 = 32;

#[derive(Clone, Debug)]
pub struct Options {
    /// Volume size in bytes.
    pub size: u64,
    /// Logical sector size of the disk (512 or 4096).
    pub sector_size: u32,
    /// Up to 11 bytes.
    pub label: String,
    pub volume_id: u32,
    pub epoch: u32,
    /// Sectors before the volume on its disk (BPB_HiddSec).
    pub hidden_sectors: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum FatError {
    #[error("a {size}-byte volume is too small for FAT32 with {sector}-byte sectors: at least {needed} bytes are needed")]
    TooSmallForFat32 { size: u64, sector: u32, needed: u64 },
    #[error("a {size}-byte FAT32 volume is too small for this content: {needed} bytes are needed")]
    TooSmall { size: u64, needed: u64 },
    #[error("{path}: FAT cannot hold {what}")]
    Unsupported { path: PathBuf, what: &'static str },
    #[error(
        "{path}: name is not valid on FAT (UTF-8, at most 255 characters, none of \"*/:<>?\\|)"
    )]
    BadName { path: PathBuf },
    #[error("{path}: {first:?} and {second:?} are one name on FAT (names are case-insensitive)")]
    CaseClash {
        path: PathBuf,
        first: String,
        second: String,
    },
    #[error("label {0:?}: FAT labels are at most 11 ASCII characters")]
    Label(String),
    #[error("writing the FAT volume at byte {offset}: {err}")]
    Write { offset: u64, err: std::io::Error },
}

struct Geometry {
    sector: u64,
    sectors_per_cluster: u64,
    reserved: u64,
    fat_sectors: u64,
    clusters: u64,
    total_sectors: u64,
}

impl Geometry {
    fn cluster_bytes(&self) -> u64 {
        self.sector * self.sectors_per_cluster
    }
    fn data_start(&self) -> u64 {
        (self.reserved + 2 * self.fat_sectors) * self.sector
    }
    fn cluster_offset(&self, c: u32) -> u64 {
        self.data_start() + (c as u64 - 2) * self.cluster_bytes()
    }
}

fn geometry(size: u64, sector: u64, cluster: u64) -> Option<Geometry> {
    let total = size / sector;
    let spc = cluster / sector;
    let mut fat = 1;
    loop {
        // Pad the reserved area so the data region is cluster-aligned.
        let mut reserved = RESERVED_SECTORS.max(7);
        while !((reserved + 2 * fat) * sector).is_multiple_of(cluster) {
            reserved += 1;
        }
        let data = total.checked_sub(reserved + 2 * fat)?;
        let clusters = data / spc;
        let need = ((clusters + 2) * 4).div_ceil(sector);
        if need <= fat {
            return Some(Geometry {
                sector,
                sectors_per_cluster: spc,
                reserved,
                fat_sectors: fat,
                clusters,
                total_sectors: total,
            });
        }
        fat = need;
    }
}

/// The largest cluster (≤ 4 KiB) that still gives a FAT32 cluster count.
fn choose(size: u64, sector: u32) -> Result<Geometry, FatError> {
    let sector = sector as u64;
    for cluster in [4096u64, 2048, 1024, 512] {
        if cluster < sector {
            continue;
        }
        if let Some(g) = geometry(size, sector, cluster) {
            if (MIN_FAT32_CLUSTERS + 16..MAX_FAT32_CLUSTERS).contains(&g.clusters) {
                return Ok(g);
            }
        }
    }
    let cluster = sector.max(512);
    let needed = (MIN_FAT32_CLUSTERS + 16) * cluster
        + 2 * (((MIN_FAT32_CLUSTERS + 18) * 4).div_ceil(sector) + RESERVED_SECTORS) * sector;
    Err(FatError::TooSmallForFat32 {
        size,
        sector: sector as u32,
        needed: needed.next_multiple_of(1 << 20),
    })
}

/// One directory entry as it will be written.
struct Entry {
    lfn: Vec<[u8; 32]>,
    short: [u8; 11],
    case: u8,
    node: NodeId,
}

struct DirPlan {
    node: NodeId,
    parent_cluster: u32,
    entries: Vec<Entry>,
    first: u32,
    clusters: u32,
}

pub struct Plan<'t> {
    tree: &'t Tree,
    opts: Options,
    g: Geometry,
    dirs: Vec<DirPlan>,
    /// node → (first cluster, cluster count)
    alloc: Vec<(u32, u32)>,
    used_clusters: u64,
}

pub fn plan<'t>(tree: &'t Tree, opts: &Options) -> Result<Plan<'t>, FatError> {
    if opts.label.len() > 11 || !opts.label.is_ascii() {
        return Err(FatError::Label(opts.label.clone()));
    }
    let g = choose(opts.size, opts.sector_size)?;
    let cb = g.cluster_bytes();
    let mut alloc = vec![(0u32, 0u32); tree.nodes.len()];
    let mut next: u64 = 2;
    let mut dirs = Vec::new();
    // Breadth-first from the root: each directory, then its files, get
    // clusters in order, so the volume is written front to back.
    let mut queue = std::collections::VecDeque::from([(ROOT, 0u32)]);
    while let Some((id, parent_cluster)) = queue.pop_front() {
        let Kind::Dir { children } = &tree.nodes[id].kind else {
            unreachable!("queued directories only")
        };
        let entries = entries_of(tree, id, children)?;
        let slots: u64 = entries.iter().map(|e| 1 + e.lfn.len() as u64).sum::<u64>()
            + if id == ROOT { 1 } else { 2 };
        let clusters = (slots * 32).div_ceil(cb).max(1) as u32;
        let first = next as u32;
        next += clusters as u64;
        alloc[id] = (first, clusters);
        let mut files = Vec::new();
        for e in &entries {
            match &tree.nodes[e.node].kind {
                Kind::Dir { .. } => queue.push_back((e.node, first)),
                Kind::File { size, .. } if *size > 0 => {
                    files.push((e.node, size.div_ceil(cb) as u32))
                }
                _ => {}
            }
        }
        for (node, n) in files {
            if alloc[node].1 == 0 {
                alloc[node] = (next as u32, n);
                next += n as u64;
            }
        }
        dirs.push(DirPlan {
            node: id,
            parent_cluster: if parent_cluster == alloc[ROOT].0 {
                0
            } else {
                parent_cluster
            },
            entries,
            first,
            clusters,
        });
    }
    let used = next - 2;
    if used > g.clusters {
        let needed = g.data_start() + used * cb + (used * 4).div_ceil(g.sector) * g.sector * 2;
        return Err(FatError::TooSmall {
            size: opts.size,
            needed: needed.next_multiple_of(1 << 20),
        });
    }
    Ok(Plan {
        tree,
        opts: opts.clone(),
        g,
        dirs,
        alloc,
        used_clusters: used,
    })
}

/// The directory `id`'s entries, in name order: each name checked (valid,
/// no two that differ only in case, nothing FAT cannot hold), with its
/// short name (an alias and long-name entries where it needs them).
fn entries_of(
    tree: &Tree,
    id: NodeId,
    children: &std::collections::BTreeMap<Vec<u8>, NodeId>,
) -> Result<Vec<Entry>, FatError> {
    let mut taken = HashSet::new();
    let mut folded: std::collections::HashMap<String, &str> = Default::default();
    let mut entries = Vec::new();
    for (name, &cid) in children {
        let path = || tree.path_of(cid);
        let name = std::str::from_utf8(name).map_err(|_| FatError::BadName { path: path() })?;
        if !names::valid_long(name) {
            return Err(FatError::BadName { path: path() });
        }
        if let Some(first) = folded.insert(name.to_uppercase(), name) {
            return Err(FatError::CaseClash {
                path: tree.path_of(id),
                first: first.into(),
                second: name.into(),
            });
        }
        match &tree.nodes[cid].kind {
            Kind::Dir { .. } | Kind::File { .. } => {}
            Kind::Symlink { .. } => {
                return Err(FatError::Unsupported {
                    path: path(),
                    what: "symbolic links",
                })
            }
            _ => {
                return Err(FatError::Unsupported {
                    path: path(),
                    what: "device nodes, fifos or sockets",
                })
            }
        }
        let (short, case, lfn) = match names::plain_short(name) {
            Some((s, case)) if taken.insert(s) => (s, case, Vec::new()),
            _ => {
                let s = names::alias(name, &mut taken);
                (s, 0, names::lfn_entries(name, &s))
            }
        };
        entries.push(Entry {
            lfn,
            short,
            case,
            node: cid,
        });
    }
    Ok(entries)
}

/// DOS date and time of a Unix time (clamped to 1980…2107).
fn dos_time(epoch: u32) -> (u16, u16) {
    let secs = (epoch as i64).clamp(315_532_800, 4_354_819_199);
    let (y, m, d, rem) = crate::time::civil(secs);
    let date = ((((y - 1980) as u32) << 9) | (m << 5) | d) as u16;
    let time = (((rem / 3600) << 11) | (((rem % 3600) / 60) << 5) | ((rem % 60) / 2)) as u16;
    (date, time)
}

/// A Unix time whose DOS date and time are `(date, time)`: what
/// [`dos_time`] makes of it, read back (to plan a volume again as it was).
pub fn unix_time(date: u16, time: u16) -> u32 {
    let (y, m, d) = (
        1980 + (date >> 9) as i64,
        ((date >> 5) & 15) as i64,
        (date & 31) as i64,
    );
    // Howard Hinnant's days-from-civil.
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let secs = (time >> 11) as i64 * 3600 + ((time >> 5) & 63) as i64 * 60 + (time & 31) as i64 * 2;
    (days * 86_400 + secs) as u32
}

/// Written bytes: the volume size and the ranges whose content matters.
pub use crate::ext4::Written;

impl Plan<'_> {
    pub fn size_bytes(&self) -> u64 {
        self.g.total_sectors * self.g.sector
    }

    pub fn cluster_bytes(&self) -> u64 {
        self.g.cluster_bytes()
    }

    fn dirent(&self, short: &[u8; 11], attr: u8, case: u8, cluster: u32, size: u32) -> [u8; 32] {
        let (date, time) = dos_time(self.opts.epoch);
        let mut e = [0u8; 32];
        e[..11].copy_from_slice(short);
        e[11] = attr;
        e[12] = case;
        e[14..16].copy_from_slice(&time.to_le_bytes());
        e[16..18].copy_from_slice(&date.to_le_bytes());
        e[18..20].copy_from_slice(&date.to_le_bytes());
        e[20..22].copy_from_slice(&((cluster >> 16) as u16).to_le_bytes());
        e[22..24].copy_from_slice(&time.to_le_bytes());
        e[24..26].copy_from_slice(&date.to_le_bytes());
        e[26..28].copy_from_slice(&(cluster as u16).to_le_bytes());
        e[28..32].copy_from_slice(&size.to_le_bytes());
        e
    }

    fn boot_sector(&self) -> Vec<u8> {
        let g = &self.g;
        let ss = g.sector as usize;
        let mut b = vec![0u8; ss];
        b[0..3].copy_from_slice(&[0xEB, 0x58, 0x90]);
        b[3..11].copy_from_slice(b"NIXFORGE");
        b[11..13].copy_from_slice(&(g.sector as u16).to_le_bytes());
        b[13] = g.sectors_per_cluster as u8;
        b[14..16].copy_from_slice(&(g.reserved as u16).to_le_bytes());
        b[16] = 2;
        b[21] = 0xF8;
        b[24..26].copy_from_slice(&32u16.to_le_bytes());
        b[26..28].copy_from_slice(&64u16.to_le_bytes());
        b[28..32].copy_from_slice(&self.opts.hidden_sectors.to_le_bytes());
        b[32..36].copy_from_slice(&(g.total_sectors as u32).to_le_bytes());
        b[36..40].copy_from_slice(&(g.fat_sectors as u32).to_le_bytes());
        b[44..48].copy_from_slice(&2u32.to_le_bytes()); // root cluster
        b[48..50].copy_from_slice(&1u16.to_le_bytes()); // FSInfo sector
        b[50..52].copy_from_slice(&6u16.to_le_bytes()); // backup boot sector
        b[64] = 0x80;
        b[66] = 0x29;
        b[67..71].copy_from_slice(&self.opts.volume_id.to_le_bytes());
        b[71..82].copy_from_slice(&self.label11());
        b[82..90].copy_from_slice(b"FAT32   ");
        // Not bootable as a legacy boot sector: a stub that halts.
        b[90..93].copy_from_slice(&[0xF4, 0xEB, 0xFD]);
        b[510] = 0x55;
        b[511] = 0xAA;
        b[ss - 2] = 0x55;
        b[ss - 1] = 0xAA;
        b
    }

    fn label11(&self) -> [u8; 11] {
        let mut l = [b' '; 11];
        let src = if self.opts.label.is_empty() {
            "NO NAME"
        } else {
            &self.opts.label
        };
        for (i, c) in src.bytes().take(11).enumerate() {
            l[i] = c.to_ascii_uppercase();
        }
        l
    }

    fn fsinfo(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.g.sector as usize];
        b[0..4].copy_from_slice(&0x4161_5252u32.to_le_bytes());
        b[484..488].copy_from_slice(&0x6141_7272u32.to_le_bytes());
        let free = self.g.clusters - self.used_clusters;
        b[488..492].copy_from_slice(&(free as u32).to_le_bytes());
        b[492..496].copy_from_slice(&((2 + self.used_clusters) as u32).to_le_bytes());
        b[508..512].copy_from_slice(&0xAA55_0000u32.to_le_bytes());
        b
    }

    fn fat(&self) -> Vec<u8> {
        let g = &self.g;
        let mut fat = vec![0u8; (g.fat_sectors * g.sector) as usize];
        let mut put = |c: u32, v: u32| {
            fat[c as usize * 4..c as usize * 4 + 4].copy_from_slice(&v.to_le_bytes());
        };
        put(0, 0x0FFF_FFF8);
        put(1, EOC);
        for &(first, n) in &self.alloc {
            for k in 0..n {
                let c = first + k;
                put(c, if k + 1 == n { EOC } else { c + 1 });
            }
        }
        fat
    }

    fn dir_bytes(&self, d: &DirPlan) -> Vec<u8> {
        let mut out = Vec::with_capacity((d.clusters as u64 * self.g.cluster_bytes()) as usize);
        if d.node == ROOT {
            out.extend_from_slice(&self.dirent(&self.label11(), 0x08, 0, 0, 0));
        } else {
            out.extend_from_slice(&self.dirent(b".          ", 0x10, 0, d.first, 0));
            out.extend_from_slice(&self.dirent(b"..         ", 0x10, 0, d.parent_cluster, 0));
        }
        for e in &d.entries {
            for l in &e.lfn {
                out.extend_from_slice(l);
            }
            let (first, _) = self.alloc[e.node];
            let (attr, size) = match &self.tree.nodes[e.node].kind {
                Kind::Dir { .. } => (0x10, 0),
                Kind::File { size, .. } => (0x20, *size as u32),
                _ => unreachable!("checked in plan"),
            };
            out.extend_from_slice(&self.dirent(&e.short, attr, e.case, first, size));
        }
        out.resize((d.clusters as u64 * self.g.cluster_bytes()) as usize, 0);
        out
    }

    /// The byte ranges (relative to the volume's start) that `write`
    /// writes, known before writing: the reserved area, both FATs, every
    /// directory's clusters and every file's. Sorted and merged.
    pub fn mapped(&self) -> Vec<(u64, u64)> {
        let g = &self.g;
        let cb = g.cluster_bytes();
        let mut r = vec![(0, (g.reserved + 2 * g.fat_sectors) * g.sector)];
        for d in &self.dirs {
            r.push((g.cluster_offset(d.first), d.clusters as u64 * cb));
        }
        for (node, &(first, n)) in self.alloc.iter().enumerate() {
            if let (true, Kind::File { size, .. }) = (n > 0, &self.tree.nodes[node].kind) {
                r.push((g.cluster_offset(first), size.div_ceil(cb) * cb));
            }
        }
        crate::ranges::merge(r)
    }

    /// Write the volume into `out` at byte `base`, in ascending order.
    pub fn write<W: Sink + ?Sized>(&self, out: &mut W, base: u64) -> Result<Written, FatError> {
        let g = &self.g;
        let mut o = Out {
            w: out,
            base,
            mapped: Vec::new(),
        };
        // Reserved area: boot sector, FSInfo, their backups at 6 and 7.
        let ss = g.sector as usize;
        let mut reserved = vec![0u8; (g.reserved * g.sector) as usize];
        let bs = self.boot_sector();
        let fsi = self.fsinfo();
        for at in [0, 6] {
            reserved[at * ss..(at + 1) * ss].copy_from_slice(&bs);
            reserved[(at + 1) * ss..(at + 2) * ss].copy_from_slice(&fsi);
            // Sector 2 (and 8) carry only the boot signature.
            reserved[(at + 2) * ss + 510] = 0x55;
            reserved[(at + 2) * ss + 511] = 0xAA;
        }
        o.bytes(0, &reserved)?;
        let fat = self.fat();
        o.bytes(g.reserved * g.sector, &fat)?;
        o.bytes((g.reserved + g.fat_sectors) * g.sector, &fat)?;
        drop(fat);
        // Directories and files in cluster order.
        let mut items: Vec<(u32, Option<usize>, NodeId)> = self
            .dirs
            .iter()
            .enumerate()
            .map(|(i, d)| (d.first, Some(i), d.node))
            .collect();
        for (node, &(first, n)) in self.alloc.iter().enumerate() {
            if n > 0 && matches!(self.tree.nodes[node].kind, Kind::File { .. }) {
                items.push((first, None, node));
            }
        }
        items.sort();
        let cb = g.cluster_bytes();
        for (first, dir, node) in items {
            let off = g.cluster_offset(first);
            if let Some(i) = dir {
                o.bytes(off, &self.dir_bytes(&self.dirs[i]))?;
                continue;
            }
            let Kind::File { size, content } = &self.tree.nodes[node].kind else {
                continue;
            };
            let padded = size.div_ceil(cb) * cb;
            match content {
                Content::Bytes(b) => {
                    let mut v = b.to_vec();
                    v.resize(padded as usize, 0);
                    o.bytes(off, &v)?;
                }
                Content::Host { path, .. } => o.host(off, path, *size, padded)?,
            }
        }
        o.w.flush()
            .map_err(|err| FatError::Write { offset: base, err })?;
        Ok(Written {
            size: self.size_bytes(),
            mapped: o.mapped,
        })
    }
}

/// The sink, the volume's offset in it, and what was written (relative).
struct Out<'w, W: Sink + ?Sized> {
    w: &'w mut W,
    base: u64,
    mapped: Vec<(u64, u64)>,
}

impl<W: Sink + ?Sized> Out<'_, W> {
    fn seek(&mut self, off: u64, len: u64) -> Result<(), FatError> {
        let offset = self.base + off;
        self.w
            .seek(SeekFrom::Start(offset))
            .map_err(|err| FatError::Write { offset, err })?;
        match self.mapped.last_mut() {
            Some(m) if m.0 + m.1 == off => m.1 += len,
            _ => self.mapped.push((off, len)),
        }
        Ok(())
    }

    fn bytes(&mut self, off: u64, data: &[u8]) -> Result<(), FatError> {
        self.seek(off, data.len() as u64)?;
        let offset = self.base + off;
        self.w
            .write_all(data)
            .map_err(|err| FatError::Write { offset, err })
    }

    /// A host file of `size` bytes, zero-padded to `span`.
    fn host(
        &mut self,
        off: u64,
        path: &std::path::Path,
        size: u64,
        span: u64,
    ) -> Result<(), FatError> {
        self.seek(off, span)?;
        let offset = self.base + off;
        self.w
            .put_host(path, 0, size, span, size)
            .map_err(|err| FatError::Write { offset, err })
    }
}

/// A volume serial as blkid and /dev/disk/by-uuid show it.
pub fn format_volume_id(id: u32) -> String {
    format!("{:04X}-{:04X}", id >> 16, id & 0xFFFF)
}

/// The volume serial derived from the seed and the volume's label.
pub fn volume_id(seed: &str, label: &str) -> u32 {
    let d = crate::seed::derive(seed, &format!("fat:{label}:volume-id"));
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

#[cfg(test)]
mod tests;
