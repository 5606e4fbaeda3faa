//! VMDK, streamOptimized (VMware's Virtual Disk Format 1.1: what OVA
//! packages hold and VMware, VirtualBox and `qemu-img` import). One
//! monolithic sparse extent whose grains (64 KiB) are zlib-compressed and
//! written in order, each behind a grain marker:
//!
//! | sector | what                                                    |
//! |--------|---------------------------------------------------------|
//! | 0      | header; the grain directory's offset "at the end"       |
//! | 1      | the embedded descriptor (20 sectors)                    |
//! | 128    | grains (marker: LBA, length; zlib data; sector padding),|
//! |        | each grain table (marker, 512 entries) after its grains |
//! | …      | grain directory marker and directory, footer marker,    |
//! |        | footer (the header with the directory's offset), end   |
//!
//! Grains of zeros and grains nothing wrote are not stored (their table
//! entry is 0: they read as zeros); a table whose grains are all absent
//! is not stored either (its directory entry is 0).

/// A grain: 128 sectors.
pub const GRAIN: u64 = 64 << 10;
pub const SECTOR: u64 = 512;
/// Grain table entries (each table covers 32 MiB).
pub const GT_ENTRIES: u64 = 512;
/// Bytes a grain table covers.
pub const GT_SPAN: u64 = GRAIN * GT_ENTRIES;
const DESCRIPTOR_SECTORS: u64 = 20;
/// Where the first grain goes.
pub const DATA_AT: u64 = 128 * SECTOR;
const MAGIC: &[u8; 4] = b"KDMV";
const GD_AT_END: u64 = u64::MAX;
/// Flags: newline detection, compressed grains, markers.
const FLAGS: u32 = 1 | 1 << 16 | 1 << 17;
const DEFLATE: u16 = 1;
pub const MARKER_EOS: u32 = 0;
pub const MARKER_GT: u32 = 1;
pub const MARKER_GD: u32 = 2;
pub const MARKER_FOOTER: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum VmdkError {
    #[error("a VMDK's size must be a whole number of 512-byte sectors: {0} bytes is not")]
    NotWholeSectors(u64),
}

pub fn check_size(size: u64) -> Result<(), VmdkError> {
    if size == 0 || !size.is_multiple_of(SECTOR) {
        return Err(VmdkError::NotWholeSectors(size));
    }
    Ok(())
}

/// Grain tables of a `size`-byte disk (grain directory entries).
pub fn tables(size: u64) -> u64 {
    size.div_ceil(GT_SPAN)
}

/// The header (`gd` None: at the end, as the stream's first sector has
/// it; Some: the footer's, with the directory's sector).
pub fn header(size: u64, gd: Option<u64>) -> [u8; 512] {
    let mut h = [0u8; 512];
    let mut put = |o: usize, b: &[u8]| h[o..o + b.len()].copy_from_slice(b);
    put(0, MAGIC);
    put(4, &3u32.to_le_bytes());
    put(8, &FLAGS.to_le_bytes());
    put(12, &(size / SECTOR).to_le_bytes());
    put(20, &(GRAIN / SECTOR).to_le_bytes());
    put(28, &1u64.to_le_bytes());
    put(36, &DESCRIPTOR_SECTORS.to_le_bytes());
    put(44, &(GT_ENTRIES as u32).to_le_bytes());
    put(56, &gd.unwrap_or(GD_AT_END).to_le_bytes());
    put(64, &(DATA_AT / SECTOR).to_le_bytes());
    put(73, b"\n \r\n");
    put(77, &DEFLATE.to_le_bytes());
    h
}

/// The embedded descriptor (its 20 sectors), naming the file `name`.
pub fn descriptor(size: u64, name: &str, cid: u32) -> Vec<u8> {
    let sectors = size / SECTOR;
    // The ATA geometry (16 heads, 63 sectors), as qemu writes it.
    let cylinders = (sectors / (16 * 63)).min(65535);
    let name = name.replace('"', "_");
    let text = format!(
        "# Disk DescriptorFile\nversion=1\nCID={cid:08x}\nparentCID=ffffffff\n\
         createType=\"streamOptimized\"\n\n# Extent description\nRW {sectors} SPARSE \"{name}\"\n\n\
         # The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\n\
         ddb.geometry.cylinders = \"{cylinders}\"\nddb.geometry.heads = \"16\"\n\
         ddb.geometry.sectors = \"63\"\nddb.adapterType = \"ide\"\n"
    );
    let mut d = text.into_bytes();
    d.resize((DESCRIPTOR_SECTORS * SECTOR) as usize, 0);
    d
}

/// A metadata marker (a sector): `val` sectors of `kind` follow.
pub fn marker(val: u64, kind: u32) -> [u8; 512] {
    let mut m = [0u8; 512];
    m[..8].copy_from_slice(&val.to_le_bytes());
    m[12..16].copy_from_slice(&kind.to_le_bytes());
    m
}

/// A grain's marker: its first sector and compressed length.
pub fn grain_marker(lba: u64, len: u32) -> [u8; 12] {
    let mut m = [0u8; 12];
    m[..8].copy_from_slice(&lba.to_le_bytes());
    m[8..].copy_from_slice(&len.to_le_bytes());
    m
}

/// A table or directory of `u32` sector offsets, padded to whole sectors.
pub fn sectors_table(entries: &[u32]) -> Vec<u8> {
    let mut t: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    t.resize((t.len() as u64).next_multiple_of(SECTOR) as usize, 0);
    t
}

/// The end of the stream: the directory (marker and entries), the footer
/// (marker and header), the end-of-stream marker; `at` is its byte offset.
pub fn tail(size: u64, directory: &[u32], at: u64) -> Vec<u8> {
    let gd = sectors_table(directory);
    let mut t = marker(gd.len() as u64 / SECTOR, MARKER_GD).to_vec();
    let gd_sector = at / SECTOR + 1;
    t.extend_from_slice(&gd);
    t.extend_from_slice(&marker(1, MARKER_FOOTER));
    t.extend_from_slice(&header(size, Some(gd_sector)));
    t.extend_from_slice(&marker(0, MARKER_EOS));
    t
}

/// A streamOptimized VMDK read back: its size and directory's sector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    pub size: u64,
    pub gd: u64,
}

/// The footer's facts, from the file's last 1536 bytes (None: not a
/// streamOptimized VMDK as forge writes them).
pub fn parse_tail(t: &[u8]) -> Option<Parsed> {
    let le64 = |o: usize| u64::from_le_bytes(t[o..o + 8].try_into().expect("8"));
    let le32 = |o: usize| u32::from_le_bytes(t[o..o + 4].try_into().expect("4"));
    if t.len() != 1536 || le32(12) != MARKER_FOOTER || &t[512..516] != MAGIC {
        return None;
    }
    if le32(512 + 44) as u64 != GT_ENTRIES || le64(512 + 20) != GRAIN / SECTOR {
        return None;
    }
    Some(Parsed {
        size: le64(512 + 12).checked_mul(SECTOR)?,
        gd: le64(512 + 56),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_points_at_its_directory_and_reads_back() {
        let size = 100 << 20;
        assert_eq!(tables(size), 4);
        let t = tail(size, &[200, 0, 0, 300], 4096);
        let n = t.len();
        let p = parse_tail(&t[n - 1536..]).unwrap();
        assert_eq!(p, Parsed { size, gd: 9 });
        assert_eq!(&t[512..520], &[200, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&header(size, None)[56..64], &[0xFF; 8]);
        let d = descriptor(size, "a\"b.vmdk", 0xabc);
        let text = String::from_utf8_lossy(&d);
        assert!(text.contains("RW 204800 SPARSE \"a_b.vmdk\"") && text.contains("CID=00000abc"));
        assert!(check_size(size + 1).is_err());
    }
}
