//! VHDX (MS-VHDX 1.0: Hyper-V Generation 2 disks), dynamic, written in
//! one pass. The file's metadata takes its first 4 MiB, at fixed places:
//!
//! | offset  | what                                                   |
//! |---------|--------------------------------------------------------|
//! | 0       | file identifier (`vhdxfile`, the creator in UTF-16)    |
//! | 64 KiB  | header 1, 128 KiB header 2 (CRC-32C each)              |
//! | 192 KiB | region table, 256 KiB its copy (BAT, metadata)         |
//! | 1 MiB   | the log (1 MiB, empty: the headers' log GUID is zero)  |
//! | 2 MiB   | metadata: block size, disk size, disk ID, sector sizes |
//! | 3 MiB   | the block allocation table (BAT), whole MiB            |
//!
//! then the payload blocks that hold anything but zeros, each at a whole
//! MiB, in image order. A block not stored reads as zeros. Sector bitmap
//! entries (one after every `CHUNK_RATIO` payload entries) are for
//! differencing disks and stay "not present".

use crate::gpt;
use crate::seed;

/// Payload block size: 2 MiB, as forge's dynamic VHDs (Microsoft
/// recommends 1 MiB for Linux guests; Hyper-V's default is 32 MiB).
pub const BLOCK: u64 = 2 << 20;
const MIB: u64 = 1 << 20;
const LOGICAL_SECTOR: u32 = 512;
const PHYSICAL_SECTOR: u32 = 4096;
/// Payload entries per sector bitmap entry: 2^23 × logical sector / block.
pub const CHUNK_RATIO: u64 = (1 << 23) * LOGICAL_SECTOR as u64 / BLOCK;
const LOG_AT: u64 = MIB;
const METADATA_AT: u64 = 2 * MIB;
/// Where the BAT starts.
pub const BAT_AT: u64 = 3 * MIB;
/// The largest virtual size (64 TiB).
pub const MAX_SIZE: u64 = 64 << 40;

const BAT_GUID: &str = "2dc27766-f623-4200-9d64-115e9bfd4a08";
const METADATA_GUID: &str = "8b7ca206-4790-4b9a-b8fe-575f050f886e";
const FILE_PARAMETERS: &str = "caa16737-fa36-4d43-b3b6-33f0aa44e76b";
const VIRTUAL_DISK_SIZE: &str = "2fa54224-cd1b-4876-b211-5dbed83bf4b8";
const VIRTUAL_DISK_ID: &str = "beca12ab-b2e6-4523-93ef-c309e000c746";
const LOGICAL_SECTOR_SIZE: &str = "8141bf1d-a96f-4709-ba47-f233a8faab5f";
const PHYSICAL_SECTOR_SIZE: &str = "cda348c7-445d-4471-9cc9-e9885251c556";

/// A BAT entry's state: the block is in the file, whole.
const FULLY_PRESENT: u64 = 6;

#[derive(Debug, thiserror::Error)]
pub enum VhdxError {
    #[error("a VHDX's size must be a whole number of 512-byte sectors: {0} bytes is not")]
    NotWholeSectors(u64),
    #[error("{0} bytes is larger than a VHDX can describe ({MAX_SIZE} bytes)")]
    TooLarge(u64),
}

/// Whether `size` can be a VHDX's virtual size.
pub fn check_size(size: u64) -> Result<(), VhdxError> {
    if !size.is_multiple_of(LOGICAL_SECTOR as u64) || size == 0 {
        return Err(VhdxError::NotWholeSectors(size));
    }
    if size > MAX_SIZE {
        return Err(VhdxError::TooLarge(size));
    }
    Ok(())
}

/// Payload blocks of a `size`-byte disk.
pub fn blocks(size: u64) -> u64 {
    size.div_ceil(BLOCK)
}

/// The BAT's entry count: payload entries with a sector bitmap entry
/// after every `CHUNK_RATIO` of them (none after the last).
pub fn bat_entries(size: u64) -> u64 {
    let n = blocks(size);
    n + n.saturating_sub(1) / CHUNK_RATIO
}

/// The BAT's length in the file (whole MiB).
pub fn bat_len(size: u64) -> u64 {
    (bat_entries(size) * 8).next_multiple_of(MIB)
}

/// Where the first payload block may go.
pub fn data_at(size: u64) -> u64 {
    BAT_AT + bat_len(size)
}

fn guid(text: &str) -> [u8; 16] {
    gpt::to_disk(&seed::parse_uuid(text).expect("a well-formed GUID"))
}

fn checksummed(mut b: Vec<u8>) -> Vec<u8> {
    b[4..8].fill(0);
    let c = crc32c::crc32c(&b);
    b[4..8].copy_from_slice(&c.to_le_bytes());
    b
}

/// Everything before the BAT (4 MiB less the BAT's), for a `size`-byte
/// disk whose file and disk IDs come from `uuid` (the seed's).
pub fn head(size: u64, uuid: [u8; 16]) -> Vec<u8> {
    let mut h = vec![0u8; BAT_AT as usize];
    h[..8].copy_from_slice(b"vhdxfile");
    for (i, c) in "nixforge".encode_utf16().enumerate() {
        h[8 + 2 * i..10 + 2 * i].copy_from_slice(&c.to_le_bytes());
    }
    let id = |n: u8| {
        let mut u = uuid;
        u[0] ^= n;
        gpt::to_disk(&u)
    };
    for (n, at) in [(1u64, 64 << 10), (2, 128 << 10)] {
        let mut x = vec![0u8; 4096];
        x[..4].copy_from_slice(b"head");
        x[8..16].copy_from_slice(&n.to_le_bytes());
        x[16..32].copy_from_slice(&id(1)); // file write GUID
        x[32..48].copy_from_slice(&id(2)); // data write GUID
                                           // log GUID (48..64): zero, nothing to replay
        x[66..68].copy_from_slice(&1u16.to_le_bytes()); // version
        x[68..72].copy_from_slice(&(MIB as u32).to_le_bytes());
        x[72..80].copy_from_slice(&LOG_AT.to_le_bytes());
        h[at..at + 4096].copy_from_slice(&checksummed(x));
    }
    let regions = region_table(size);
    h[192 << 10..256 << 10].copy_from_slice(&regions);
    h[256 << 10..320 << 10].copy_from_slice(&regions);
    let m = METADATA_AT as usize;
    h[m..m + MIB as usize].copy_from_slice(&metadata(size, id(3)));
    h
}

fn region_table(size: u64) -> Vec<u8> {
    let mut r = vec![0u8; 64 << 10];
    r[..4].copy_from_slice(b"regi");
    r[8..12].copy_from_slice(&2u32.to_le_bytes());
    let entries = [
        (BAT_GUID, BAT_AT, bat_len(size)),
        (METADATA_GUID, METADATA_AT, MIB),
    ];
    for (i, (g, at, len)) in entries.iter().enumerate() {
        let e = 16 + 32 * i;
        r[e..e + 16].copy_from_slice(&guid(g));
        r[e + 16..e + 24].copy_from_slice(&at.to_le_bytes());
        r[e + 24..e + 28].copy_from_slice(&(*len as u32).to_le_bytes());
        r[e + 28..e + 32].copy_from_slice(&1u32.to_le_bytes()); // required
    }
    checksummed(r)
}

/// The metadata region: its table, then the items from 64 KiB on.
fn metadata(size: u64, disk_id: [u8; 16]) -> Vec<u8> {
    const REQUIRED: u32 = 4;
    const VIRTUAL_DISK: u32 = 2;
    let mut file_parameters = (BLOCK as u32).to_le_bytes().to_vec();
    file_parameters.extend_from_slice(&0u32.to_le_bytes()); // no parent, blocks not kept
    let items: [(&str, Vec<u8>, u32); 5] = [
        (FILE_PARAMETERS, file_parameters, REQUIRED),
        (
            VIRTUAL_DISK_SIZE,
            size.to_le_bytes().to_vec(),
            REQUIRED | VIRTUAL_DISK,
        ),
        (VIRTUAL_DISK_ID, disk_id.to_vec(), REQUIRED | VIRTUAL_DISK),
        (
            LOGICAL_SECTOR_SIZE,
            LOGICAL_SECTOR.to_le_bytes().to_vec(),
            REQUIRED | VIRTUAL_DISK,
        ),
        (
            PHYSICAL_SECTOR_SIZE,
            PHYSICAL_SECTOR.to_le_bytes().to_vec(),
            REQUIRED | VIRTUAL_DISK,
        ),
    ];
    let mut m = vec![0u8; MIB as usize];
    m[..8].copy_from_slice(b"metadata");
    m[10..12].copy_from_slice(&(items.len() as u16).to_le_bytes());
    let mut at = 64 << 10;
    for (i, (g, bytes, flags)) in items.iter().enumerate() {
        let e = 32 + 32 * i;
        m[e..e + 16].copy_from_slice(&guid(g));
        m[e + 16..e + 20].copy_from_slice(&(at as u32).to_le_bytes());
        m[e + 20..e + 24].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
        m[e + 24..e + 28].copy_from_slice(&flags.to_le_bytes());
        m[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    }
    m
}

/// The BAT: for each payload block, the byte offset it is stored at
/// (a whole MiB), or none.
pub fn bat(size: u64, stored: &[Option<u64>]) -> Vec<u8> {
    let mut t = vec![0u8; bat_len(size) as usize];
    for (i, at) in stored.iter().enumerate() {
        if let Some(at) = at {
            debug_assert!(at.is_multiple_of(MIB));
            let e = (i as u64 + i as u64 / CHUNK_RATIO) as usize * 8;
            t[e..e + 8].copy_from_slice(&((at / MIB) << 20 | FULLY_PRESENT).to_le_bytes());
        }
    }
    t
}

/// A VHDX read back: its size, and where each payload block is stored.
#[derive(Debug)]
pub struct Parsed {
    pub size: u64,
    pub block: u64,
    pub bat_at: u64,
}

/// The facts [`head`] wrote, read from a file's first 4 MiB (None: not a
/// VHDX forge reads: another block size, a differencing disk, a log to
/// replay, a checksum that does not match, a table or item that points
/// outside its region, a size past [`MAX_SIZE`]).
pub fn parse(h: &[u8]) -> Option<Parsed> {
    let le32 = |b: &[u8], o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
    let le64 = |b: &[u8], o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
    let valid =
        |b: &[u8], sig: &[u8]| b.starts_with(sig) && checksummed(b.to_vec())[4..8] == b[4..8];
    if h.len() < BAT_AT as usize || !h.starts_with(b"vhdxfile") {
        return None;
    }
    let header = [64usize << 10, 128 << 10]
        .into_iter()
        .map(|at| &h[at..at + 4096])
        .filter(|x| valid(x, b"head"))
        .max_by_key(|x| le64(x, 8))?;
    if header[48..64].iter().any(|&b| b != 0) {
        return None; // a log to replay
    }
    let regions = [192usize << 10, 256 << 10]
        .into_iter()
        .map(|at| &h[at..at + (64 << 10)])
        .find(|r| valid(r, b"regi"))?;
    let region = |g: &str| le64(entry(regions, 16, le32(regions, 8)? as usize, g)?, 16);
    let (bat_at, meta_at) = (region(BAT_GUID)?, region(METADATA_GUID)? as usize);
    let m = h.get(meta_at..meta_at.checked_add(MIB as usize)?)?;
    let count = u16::from_le_bytes([m[10], m[11]]) as usize;
    let item = |g: &str| Some(le32(entry(m, 32, count, g)?, 16)? as usize);
    let params = item(FILE_PARAMETERS)?;
    let block = le32(m, params)? as u64;
    // The spec's block sizes: a power of two from 1 to 256 MiB.
    if le32(m, params + 4)? & 2 != 0
        || !block.is_power_of_two()
        || !(MIB..=256 * MIB).contains(&block)
    {
        return None;
    }
    let size = le64(m, item(VIRTUAL_DISK_SIZE)?)?;
    check_size(size).ok()?;
    Some(Parsed {
        size,
        block,
        bat_at,
    })
}

/// The first of `count` 32-byte entries from byte `first` of `table`
/// (those inside it) that starts with the GUID `g`.
fn entry<'t>(table: &'t [u8], first: usize, count: usize, g: &str) -> Option<&'t [u8]> {
    (0..count)
        .map(|i| first + 32 * i)
        .map_while(|e| table.get(e..e + 32))
        .find(|e| e[..16] == guid(g))
}

impl Parsed {
    /// The BAT's entries to read: (payload block, byte offset of its entry).
    pub fn entries(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        (0..self.size.div_ceil(self.block)).map(move |i| (i, self.entry_at(i)))
    }

    fn entry_at(&self, i: u64) -> u64 {
        let ratio = (1u64 << 23) * LOGICAL_SECTOR as u64 / self.block;
        self.bat_at.saturating_add((i + i / ratio) * 8)
    }

    /// Where the last payload entry ends: the file must reach it.
    pub fn bat_end(&self) -> u64 {
        self.entry_at(self.size.div_ceil(self.block) - 1)
            .saturating_add(8)
    }
}

/// Where a BAT entry's block is stored, if it is (fully present).
pub fn stored_at(entry: u64) -> Option<u64> {
    (entry & 7 == FULLY_PRESENT).then_some((entry >> 20) * MIB)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_reads_back_and_the_bat_places_sector_bitmaps() {
        let size = 10 << 30;
        let h = head(size, [9; 16]);
        let p = parse(&h).unwrap();
        assert_eq!((p.size, p.block, p.bat_at), (size, BLOCK, BAT_AT));
        // 5120 blocks: two sector bitmap entries among them.
        assert_eq!(bat_entries(size), 5120 + 2);
        let mut stored = vec![None; 5120];
        stored[2048] = Some(5 * MIB);
        let t = bat(size, &stored);
        let e = p.entries().nth(2048).unwrap().1 - BAT_AT;
        assert_eq!(e, (2048 + 1) * 8);
        let v = u64::from_le_bytes(t[e as usize..e as usize + 8].try_into().unwrap());
        assert_eq!(stored_at(v), Some(5 * MIB));
        let mut bad = h.clone();
        bad[(64 << 10) + 100] ^= 1;
        bad[(128 << 10) + 100] ^= 1;
        assert!(parse(&bad).is_none(), "both headers' checksums fail");
        assert!(check_size(size + 1).is_err() && check_size(MAX_SIZE + 512).is_err());
    }

    /// The head with the region tables' and metadata's numbers set at
    /// random (the tables' checksums made right again, most times, so the
    /// reader gets past them), or any byte: `parse` answers, never panics.
    #[test]
    fn mutated_heads_never_panic_the_reader() {
        let base = head(10 << 30, [9; 16]);
        let (regions, meta) = (192usize << 10, METADATA_AT as usize);
        crate::fuzz::run("vhdx::parse", 300, |r| {
            let mut h = base.clone();
            for _ in 0..1 + r.below(4) {
                let at = match r.below(3) {
                    0 => regions + 8 + r.below(16 + 32 * 3),
                    1 => meta + 8 + r.below(32 + 32 * 6),
                    _ => r.below(h.len()),
                };
                let v = match r.below(2) {
                    0 => r.word().to_le_bytes(),
                    _ => [0xFF; 8],
                };
                let n = (1 + r.below(8)).min(h.len() - at);
                h[at..at + n].copy_from_slice(&v[..n]);
            }
            if r.below(4) != 0 {
                let fixed = checksummed(h[regions..regions + (64 << 10)].to_vec());
                h[regions..regions + (64 << 10)].copy_from_slice(&fixed);
            }
            if let Some(p) = parse(&h) {
                assert!(
                    p.size <= MAX_SIZE && p.block >= MIB,
                    "{:?}",
                    (p.size, p.block)
                );
            }
        });
    }
}
