//! GUID Partition Table: protective MBR, primary header and entry array,
//! backup array and header at the end of the disk (UEFI spec, ch. 5).
//! GUIDs are given in their textual (big-endian) byte order and stored in
//! GPT's mixed-endian form.

pub const ENTRIES: usize = 128;
pub const ENTRY_SIZE: usize = 128;
const ARRAY_BYTES: u64 = (ENTRIES * ENTRY_SIZE) as u64;

/// Discoverable Partitions Specification type GUIDs.
pub mod types {
    pub const ESP: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
    pub const ROOT_X86_64: &str = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709";
    pub const ROOT_AARCH64: &str = "b921b045-1df0-41c3-af44-4c6f280d3fae";
    /// Discoverable Partitions: the root's dm-verity hash partition.
    pub const ROOT_VERITY_X86_64: &str = "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5";
    pub const ROOT_VERITY_AARCH64: &str = "df3300ce-d69f-4c92-978c-9bfb0f38d820";
    /// Discoverable Partitions: the root hash's signature (JSON).
    pub const ROOT_VERITY_SIG_X86_64: &str = "41092b05-9fc8-4523-994f-2def0408b176";
    pub const ROOT_VERITY_SIG_AARCH64: &str = "6db69de6-29f4-4758-a7a5-962190f00ce3";
    /// "Linux reserved": where `forge sign` puts the root hash's signature
    /// (the slot an unsigned `--verity` image keeps; retyped when signed).
    pub const LINUX_RESERVED: &str = "8da63339-0007-60c0-c436-083ac8230908";
    pub const VAR: &str = "4d21b016-b534-45c2-a9fb-5c16e091fd1d";
}

/// Attribute bit 60: read-only (Discoverable Partitions Specification).
pub const ATTR_READ_ONLY: u64 = 1 << 60;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    pub type_guid: [u8; 16],
    pub guid: [u8; 16],
    pub first_lba: u64,
    pub last_lba: u64,
    pub attributes: u64,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gpt {
    pub sector: u64,
    pub disk_sectors: u64,
    pub disk_guid: [u8; 16],
    pub partitions: Vec<Partition>,
}

/// The fields of a GPT header that say where things are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub my_lba: u64,
    /// The other header: the backup's LBA in a primary header.
    pub alternate_lba: u64,
    pub first_usable: u64,
    pub last_usable: u64,
    pub entries_lba: u64,
    pub entries: u32,
    pub entry_size: u32,
    pub array_crc: u32,
}

impl Header {
    /// A header sector: `None` without the signature; an error when its
    /// CRC or sizes are wrong. Never panics, whatever the bytes.
    pub fn parse(h: &[u8], sector: u64) -> Result<Option<Header>, GptError> {
        if h.len() < 92 || &h[0..8] != b"EFI PART" {
            return Ok(None);
        }
        let bad = |problem: String| GptError::Bad {
            offset: sector,
            problem,
        };
        let u64at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
        let u32at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes"));
        let hsize = u32at(12) as usize;
        if !(92..=h.len()).contains(&hsize) {
            return Err(bad(format!("header size {hsize} is not 92..{}", h.len())));
        }
        let mut hc = h[..hsize].to_vec();
        hc[16..20].fill(0);
        if crc32fast::hash(&hc) != u32at(16) {
            return Err(bad("header CRC mismatch".into()));
        }
        let (entries, entry_size) = (u32at(80), u32at(84));
        // The spec: 128 × 2^n bytes per entry; no real table is larger
        // than 1024 entries of 4 KiB.
        if entry_size < 128 || !entry_size.is_power_of_two() || entry_size > 4096 || entries > 1024
        {
            return Err(bad(format!(
                "unsupported entry array ({entries} entries of {entry_size} bytes)"
            )));
        }
        Ok(Some(Header {
            my_lba: u64at(24),
            alternate_lba: u64at(32),
            first_usable: u64at(40),
            last_usable: u64at(48),
            entries_lba: u64at(72),
            entries,
            entry_size,
            array_crc: u32at(88),
        }))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GptError {
    #[error("no GPT header at byte {0} (signature missing)")]
    NoHeader(u64),
    #[error("GPT header at byte {offset}: {problem}")]
    Bad { offset: u64, problem: String },
}

/// Textual-order GUID to GPT's on-disk (mixed-endian) order.
pub fn to_disk(g: &[u8; 16]) -> [u8; 16] {
    let mut d = *g;
    d[0..4].reverse();
    d[4..6].reverse();
    d[6..8].reverse();
    d
}

/// Its own inverse.
pub fn from_disk(d: &[u8; 16]) -> [u8; 16] {
    to_disk(d)
}

impl Gpt {
    pub fn array_sectors(&self) -> u64 {
        ARRAY_BYTES.div_ceil(self.sector)
    }
    pub fn first_usable(&self) -> u64 {
        2 + self.array_sectors()
    }
    pub fn last_usable(&self) -> u64 {
        self.disk_sectors - 2 - self.array_sectors()
    }

    fn array(&self) -> Vec<u8> {
        let mut a = vec![0u8; ARRAY_BYTES as usize];
        for (i, p) in self.partitions.iter().enumerate() {
            let e = &mut a[i * ENTRY_SIZE..(i + 1) * ENTRY_SIZE];
            e[0..16].copy_from_slice(&to_disk(&p.type_guid));
            e[16..32].copy_from_slice(&to_disk(&p.guid));
            e[32..40].copy_from_slice(&p.first_lba.to_le_bytes());
            e[40..48].copy_from_slice(&p.last_lba.to_le_bytes());
            e[48..56].copy_from_slice(&p.attributes.to_le_bytes());
            for (k, u) in p.name.encode_utf16().take(36).enumerate() {
                e[56 + 2 * k..58 + 2 * k].copy_from_slice(&u.to_le_bytes());
            }
        }
        a
    }

    fn header(&self, primary: bool, array_crc: u32) -> Vec<u8> {
        let last = self.disk_sectors - 1;
        let (me, other, entries) = if primary {
            (1, last, 2)
        } else {
            (last, 1, last - self.array_sectors())
        };
        let mut h = vec![0u8; self.sector as usize];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&me.to_le_bytes());
        h[32..40].copy_from_slice(&other.to_le_bytes());
        h[40..48].copy_from_slice(&self.first_usable().to_le_bytes());
        h[48..56].copy_from_slice(&self.last_usable().to_le_bytes());
        h[56..72].copy_from_slice(&to_disk(&self.disk_guid));
        h[72..80].copy_from_slice(&entries.to_le_bytes());
        h[80..84].copy_from_slice(&(ENTRIES as u32).to_le_bytes());
        h[84..88].copy_from_slice(&(ENTRY_SIZE as u32).to_le_bytes());
        h[88..92].copy_from_slice(&array_crc.to_le_bytes());
        let crc = crc32fast::hash(&h[..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// The protective MBR: one 0xEE partition over the whole disk.
    fn pmbr(&self) -> Vec<u8> {
        let mut m = vec![0u8; self.sector as usize];
        let e = &mut m[446..462];
        e[1..4].copy_from_slice(&[0x00, 0x02, 0x00]);
        e[4] = 0xEE;
        e[5..8].copy_from_slice(&[0xFF, 0xFF, 0xFF]);
        e[8..12].copy_from_slice(&1u32.to_le_bytes());
        let size = (self.disk_sectors - 1).min(u32::MAX as u64) as u32;
        e[12..16].copy_from_slice(&size.to_le_bytes());
        m[510] = 0x55;
        m[511] = 0xAA;
        m
    }

    /// Bytes from offset 0: PMBR, primary header, entry array.
    pub fn primary(&self) -> Vec<u8> {
        let array = self.array();
        let crc = crc32fast::hash(&array);
        let mut out = self.pmbr();
        out.extend(self.header(true, crc));
        out.extend(&array);
        out.resize((self.first_usable() * self.sector) as usize, 0);
        out
    }

    /// (byte offset, bytes) of the backup entry array and header.
    pub fn backup(&self) -> (u64, Vec<u8>) {
        let array = self.array();
        let crc = crc32fast::hash(&array);
        let mut out = array;
        out.resize((self.array_sectors() * self.sector) as usize, 0);
        out.extend(self.header(false, crc));
        let at = (self.disk_sectors - 1 - self.array_sectors()) * self.sector;
        (at, out)
    }

    /// Parse the primary GPT of a disk image (`read_at(offset, len)`).
    /// Arbitrary bytes give an error or `None`, never a panic.
    pub fn parse(
        read_at: &mut dyn FnMut(u64, usize) -> std::io::Result<Vec<u8>>,
        sector: u64,
        disk_bytes: u64,
    ) -> Result<Option<Gpt>, GptError> {
        let h = read_at(sector, sector as usize).map_err(|e| GptError::Bad {
            offset: sector,
            problem: e.to_string(),
        })?;
        let Some(hd) = Header::parse(&h, sector)? else {
            return Ok(None);
        };
        let bad = |problem: String| GptError::Bad {
            offset: sector,
            problem,
        };
        let (n, size) = (hd.entries as usize, hd.entry_size as usize);
        let at = hd.entries_lba.checked_mul(sector).ok_or_else(|| {
            bad(format!(
                "entry array at LBA {} is past any disk",
                hd.entries_lba
            ))
        })?;
        let arr = read_at(at, n * size).map_err(|e| bad(e.to_string()))?;
        if arr.len() != n * size || crc32fast::hash(&arr) != hd.array_crc {
            return Err(bad("entry array CRC mismatch".into()));
        }
        let h = &h[..];
        let mut disk_guid = [0u8; 16];
        disk_guid.copy_from_slice(&h[56..72]);
        let mut partitions = Vec::new();
        for (i, e) in arr.chunks(size).enumerate() {
            if e[0..16].iter().all(|&b| b == 0) {
                continue;
            }
            let lba = |o: usize| u64::from_le_bytes(e[o..o + 8].try_into().expect("8 bytes"));
            let (first, last) = (lba(32), lba(40));
            // Every reader takes (last + 1 - first) * sector as the size.
            if last < first
                || last
                    .checked_add(1)
                    .and_then(|l| l.checked_mul(sector))
                    .is_none()
            {
                return Err(bad(format!(
                    "partition {}: LBAs {first}..={last} are not a valid range",
                    i + 1
                )));
            }
            let g = |o: usize| from_disk(e[o..o + 16].try_into().expect("16 bytes"));
            let units: Vec<u16> = e[56..128]
                .chunks(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&u| u != 0)
                .collect();
            partitions.push(Partition {
                type_guid: g(0),
                guid: g(16),
                first_lba: first,
                last_lba: last,
                attributes: u64::from_le_bytes(e[48..56].try_into().expect("8 bytes")),
                name: String::from_utf16_lossy(&units),
            });
        }
        Ok(Some(Gpt {
            sector,
            disk_sectors: disk_bytes / sector,
            disk_guid: from_disk(&disk_guid),
            partitions,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for sector in [512u64, 4096] {
            let g = Gpt {
                sector,
                disk_sectors: (64 << 20) / sector,
                disk_guid: crate::seed::uuid("t", "disk"),
                partitions: vec![Partition {
                    type_guid: crate::seed::parse_uuid(types::ESP).unwrap(),
                    guid: crate::seed::uuid("t", "p1"),
                    first_lba: (1 << 20) / sector,
                    last_lba: (33 << 20) / sector - 1,
                    attributes: ATTR_READ_ONLY,
                    name: "ESP".into(),
                }],
            };
            let mut disk = vec![0u8; 64 << 20];
            let p = g.primary();
            disk[..p.len()].copy_from_slice(&p);
            let (at, b) = g.backup();
            disk[at as usize..at as usize + b.len()].copy_from_slice(&b);
            assert_eq!(at as usize + b.len(), disk.len());
            let mut read = |o: u64, n: usize| Ok(disk[o as usize..o as usize + n].to_vec());
            let back = Gpt::parse(&mut read, sector, 64 << 20).unwrap().unwrap();
            assert_eq!(back, g);
            // An entry that ends before it starts, or whose end in bytes
            // is past any number: every reader would compute its size.
            for last in [g.partitions[0].first_lba - 1, u64::MAX / sector] {
                let mut bad = g.clone();
                bad.partitions[0].last_lba = last;
                let mut read = |o: u64, n: usize| {
                    let mut disk = bad.primary();
                    disk.resize(o as usize + n, 0);
                    Ok(disk[o as usize..].to_vec())
                };
                let e = Gpt::parse(&mut read, sector, 64 << 20).unwrap_err();
                assert!(
                    e.to_string().contains("partition 1: LBAs")
                        && e.to_string().contains("not a valid range"),
                    "{e}"
                );
            }
        }
    }

    #[test]
    fn esp_type_on_disk_is_mixed_endian() {
        let t = crate::seed::parse_uuid(types::ESP).unwrap();
        assert_eq!(to_disk(&t)[..4], [0x28, 0x73, 0x2a, 0xc1]);
    }
}
