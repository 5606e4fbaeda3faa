//! A small FAT12/16/32 reader for `forge inspect`: volume facts, directory
//! listings (long names included) and whole files, from any `Read + Seek`.

use std::io::{self, Read, Seek, SeekFrom};

pub struct Volume<R: Read + Seek> {
    r: R,
    base: u64,
    sector: u64,
    spc: u64,
    data_start: u64,
    fat_start: u64,
    root_cluster: u32,
    pub label: String,
    pub volume_id: u32,
    pub fat_type: &'static str,
    /// The boot sector's sector size, total size and hidden sectors (what
    /// re-planning the same volume takes).
    pub sector_size: u32,
    pub total_bytes: u64,
    pub hidden_sectors: u32,
}

pub struct DirEntry {
    pub name: String,
    pub is_dir: bool,
    pub cluster: u32,
    pub size: u32,
    /// The DOS (date, time) it was last written.
    pub written: (u16, u16),
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

impl<R: Read + Seek> Volume<R> {
    /// Open the FAT32 volume at byte `base` of `r`.
    pub fn open(mut r: R, base: u64) -> io::Result<Self> {
        let mut b = [0u8; 512];
        r.seek(SeekFrom::Start(base))?;
        r.read_exact(&mut b)?;
        if b[510..512] != [0x55, 0xAA] || &b[82..87] != b"FAT32" {
            return Err(bad("not a FAT32 volume"));
        }
        let u16at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as u64;
        let u32at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let sector = u16at(11);
        let spc = b[13] as u64;
        let reserved = u16at(14);
        let fats = b[16] as u64;
        let fat_sectors = u32at(36) as u64;
        // The sizes FAT allows: directory entries then tile every cluster.
        if !(512..=4096).contains(&sector) || !sector.is_power_of_two() || !spc.is_power_of_two() {
            return Err(bad(&format!(
                "FAT boot sector with a sector size of {sector} or {spc} sectors a cluster"
            )));
        }
        Ok(Volume {
            base,
            sector,
            spc,
            fat_start: reserved * sector,
            data_start: (reserved + fats * fat_sectors) * sector,
            root_cluster: u32at(44),
            label: String::from_utf8_lossy(&b[71..82]).trim_end().to_string(),
            volume_id: u32at(67),
            fat_type: "FAT32",
            sector_size: sector as u32,
            total_bytes: u32at(32) as u64 * sector,
            hidden_sectors: u32at(28),
            r,
        })
    }

    fn next(&mut self, c: u32) -> io::Result<u32> {
        let mut e = [0u8; 4];
        self.r
            .seek(SeekFrom::Start(self.base + self.fat_start + c as u64 * 4))?;
        self.r.read_exact(&mut e)?;
        Ok(u32::from_le_bytes(e) & 0x0FFF_FFFF)
    }

    /// The clusters from `first` on, up to `limit` bytes. A cluster met
    /// twice is an error (a loop would read on forever): so what is read
    /// is bounded by the volume's bytes.
    fn chain(&mut self, first: u32, limit: Option<u64>) -> io::Result<Vec<u8>> {
        let cb = self.sector * self.spc;
        let mut out = Vec::new();
        let mut c = first;
        let mut seen = std::collections::HashSet::new();
        while (2..0x0FFF_FFF7).contains(&c) {
            if !seen.insert(c) {
                return Err(bad(&format!("FAT cluster chain loops (at cluster {c})")));
            }
            let mut buf = vec![0u8; cb as usize];
            self.r.seek(SeekFrom::Start(
                self.base + self.data_start + (c as u64 - 2) * cb,
            ))?;
            self.r.read_exact(&mut buf)?;
            out.extend_from_slice(&buf);
            if limit.is_some_and(|l| out.len() as u64 >= l) {
                break;
            }
            c = self.next(c)?;
        }
        if let Some(l) = limit {
            out.truncate(l as usize);
        }
        Ok(out)
    }

    fn list_cluster(&mut self, first: u32) -> io::Result<Vec<DirEntry>> {
        let raw = self.chain(first, None)?;
        let mut out = Vec::new();
        let mut lfn: Vec<(u8, Vec<u16>)> = Vec::new();
        for e in raw.chunks(32) {
            if e[0] == 0 {
                break;
            }
            if e[0] == 0xE5 {
                lfn.clear();
                continue;
            }
            if e[11] == 0x0F {
                let units: Vec<u16> = [1usize, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30]
                    .iter()
                    .map(|&o| u16::from_le_bytes([e[o], e[o + 1]]))
                    .collect();
                lfn.push((e[0] & 0x1F, units));
                continue;
            }
            if e[11] & 0x08 != 0 {
                lfn.clear();
                continue; // volume label
            }
            let name = if lfn.is_empty() {
                let case = e[12];
                let part = |s: &[u8], lower: bool| {
                    let t = String::from_utf8_lossy(s).trim_end().to_string();
                    if lower {
                        t.to_lowercase()
                    } else {
                        t
                    }
                };
                let base = part(&e[0..8], case & 0x08 != 0);
                let ext = part(&e[8..11], case & 0x10 != 0);
                if ext.is_empty() {
                    base
                } else {
                    format!("{base}.{ext}")
                }
            } else {
                lfn.sort_by_key(|l| l.0);
                let units: Vec<u16> = lfn
                    .iter()
                    .flat_map(|l| l.1.iter().copied())
                    .take_while(|&u| u != 0 && u != 0xFFFF)
                    .collect();
                String::from_utf16_lossy(&units)
            };
            lfn.clear();
            let cluster = ((u16::from_le_bytes([e[20], e[21]]) as u32) << 16)
                | u16::from_le_bytes([e[26], e[27]]) as u32;
            if name == "." || name == ".." {
                continue;
            }
            out.push(DirEntry {
                name,
                is_dir: e[11] & 0x10 != 0,
                cluster,
                size: u32::from_le_bytes([e[28], e[29], e[30], e[31]]),
                written: (
                    u16::from_le_bytes([e[24], e[25]]),
                    u16::from_le_bytes([e[22], e[23]]),
                ),
            });
        }
        Ok(out)
    }

    fn find(&mut self, path: &str) -> io::Result<Option<DirEntry>> {
        let mut cur = DirEntry {
            name: "/".into(),
            is_dir: true,
            cluster: self.root_cluster,
            size: 0,
            written: (0, 0),
        };
        for comp in path.split('/').filter(|c| !c.is_empty()) {
            if !cur.is_dir {
                return Ok(None);
            }
            let cluster = cur.cluster;
            match self
                .list_cluster(cluster)?
                .into_iter()
                .find(|e| e.name.eq_ignore_ascii_case(comp))
            {
                Some(e) => cur = e,
                None => return Ok(None),
            }
        }
        Ok(Some(cur))
    }

    /// Entries of the directory at `path` (None if it does not exist).
    pub fn list(&mut self, path: &str) -> io::Result<Option<Vec<DirEntry>>> {
        match self.find(path)? {
            Some(d) if d.is_dir => Ok(Some(self.list_cluster(d.cluster)?)),
            _ => Ok(None),
        }
    }

    /// The bytes of the file at `path` (None if it does not exist).
    pub fn read(&mut self, path: &str) -> io::Result<Option<Vec<u8>>> {
        match self.find(path)? {
            Some(f) if !f.is_dir => {
                if f.size == 0 {
                    return Ok(Some(Vec::new()));
                }
                Ok(Some(self.chain(f.cluster, Some(f.size as u64))?))
            }
            _ => Ok(None),
        }
    }
}
