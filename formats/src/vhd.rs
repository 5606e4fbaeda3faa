//! VHD (Virtual PC / Hyper-V / Azure / AWS import): the 512-byte footer,
//! and for a dynamic disk its header and block allocation table. Fields
//! are as `qemu-img convert -O vpc -o force_size` writes them (creator
//! `qem2`, so readers take the exact size from the footer), except the
//! timestamp and UUID, which the caller derives from its inputs.
//!
//! Fixed: the raw bytes, then the footer. Dynamic: a copy of the footer,
//! the dynamic header, the table (one entry per 2 MiB block, 0xFFFFFFFF
//! for a block not stored), each stored block as a sector bitmap (all
//! present) and its 2 MiB, then the footer.

pub const FOOTER: u64 = 512;
/// Dynamic disks' block size.
pub const BLOCK: u64 = 2 << 20;
/// The sector bitmap before each stored block (4096 bits, one sector).
pub const BITMAP: u64 = 512;
const DYN_HEADER: u64 = 1024;
/// The table's offset in a dynamic disk: after the footer copy and header.
pub const TABLE_AT: u64 = FOOTER + DYN_HEADER;
/// The largest size readers accept (qemu: fewer than 65535 × 255 × 255 sectors).
pub const MAX_SIZE: u64 = (65535 * 255 * 255 - 1) * 512;
/// 2000-01-01T00:00:00Z, VHD's epoch.
const EPOCH_2000: u32 = 946_684_800;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Type {
    Fixed,
    Dynamic,
}

#[derive(Debug, thiserror::Error)]
pub enum VhdError {
    #[error("a VHD's size must be a whole number of MiB (Azure refuses others): {0} bytes is not")]
    NotWholeMiB(u64),
    #[error("{0} bytes is larger than a VHD can describe ({MAX_SIZE} bytes)")]
    TooLarge(u64),
}

/// Seconds since 2000 of a Unix time (0 before).
pub fn timestamp(unix: u32) -> u32 {
    unix.saturating_sub(EPOCH_2000)
}

fn checksum(b: &[u8]) -> u32 {
    !b.iter().fold(0u32, |s, &x| s.wrapping_add(x as u32))
}

/// Whether `size` can be a VHD's virtual size.
pub fn check_size(size: u64) -> Result<(), VhdError> {
    if !size.is_multiple_of(1 << 20) {
        return Err(VhdError::NotWholeMiB(size));
    }
    if size > MAX_SIZE {
        return Err(VhdError::TooLarge(size));
    }
    Ok(())
}

/// The footer of a `size`-byte disk.
pub fn footer(ty: Type, size: u64, unix_time: u32, uuid: [u8; 16]) -> [u8; 512] {
    let mut f = [0u8; 512];
    f[0..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes()); // features: reserved bit
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    let data_offset = match ty {
        Type::Fixed => u64::MAX,
        Type::Dynamic => FOOTER,
    };
    f[16..24].copy_from_slice(&data_offset.to_be_bytes());
    f[24..28].copy_from_slice(&timestamp(unix_time).to_be_bytes());
    f[28..32].copy_from_slice(b"qem2");
    f[32..36].copy_from_slice(&0x0005_0003u32.to_be_bytes());
    f[36..40].copy_from_slice(b"Wi2k");
    f[40..48].copy_from_slice(&size.to_be_bytes());
    f[48..56].copy_from_slice(&size.to_be_bytes());
    // With the exact size in the footer the geometry is the maximum, as
    // qemu's force_size writes it.
    f[56..58].copy_from_slice(&65535u16.to_be_bytes());
    f[58] = 16;
    f[59] = 255;
    let t: u32 = match ty {
        Type::Fixed => 2,
        Type::Dynamic => 3,
    };
    f[60..64].copy_from_slice(&t.to_be_bytes());
    f[68..84].copy_from_slice(&uuid);
    let c = checksum(&f);
    f[64..68].copy_from_slice(&c.to_be_bytes());
    f
}

/// Entries in a dynamic disk's table for `size` bytes.
pub fn table_entries(size: u64) -> u64 {
    size.div_ceil(BLOCK)
}

/// The table's length on disk (whole sectors).
pub fn table_len(size: u64) -> u64 {
    (table_entries(size) * 4).next_multiple_of(512)
}

/// A dynamic disk's header (1024 bytes, after the footer copy).
pub fn dynamic_header(size: u64) -> Vec<u8> {
    let mut h = vec![0u8; DYN_HEADER as usize];
    h[0..8].copy_from_slice(b"cxsparse");
    h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    h[16..24].copy_from_slice(&TABLE_AT.to_be_bytes());
    h[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    h[28..32].copy_from_slice(&(table_entries(size) as u32).to_be_bytes());
    h[32..36].copy_from_slice(&(BLOCK as u32).to_be_bytes());
    let c = checksum(&h);
    h[36..40].copy_from_slice(&c.to_be_bytes());
    h
}

/// The table: for each block, the sector its bitmap starts at, or none.
pub fn table(size: u64, sectors: &[Option<u32>]) -> Vec<u8> {
    let mut t = vec![0xFFu8; table_len(size) as usize];
    for (i, s) in sectors.iter().enumerate() {
        if let Some(s) = s {
            t[i * 4..i * 4 + 4].copy_from_slice(&s.to_be_bytes());
        }
    }
    t
}

/// A VHD footer's facts, read back (None: not a VHD footer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footer {
    pub ty: Option<Type>,
    pub size: u64,
    pub data_offset: u64,
}

pub fn parse_footer(b: &[u8]) -> Option<Footer> {
    if b.len() < 512 || &b[0..8] != b"conectix" {
        return None;
    }
    let u64at = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    let ty = match u32::from_be_bytes(b[60..64].try_into().expect("4 bytes")) {
        2 => Some(Type::Fixed),
        3 => Some(Type::Dynamic),
        _ => None,
    };
    Some(Footer {
        ty,
        size: u64at(48),
        data_offset: u64at(16),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footer_checksums_and_reads_back() {
        let f = footer(Type::Fixed, 64 << 20, EPOCH_2000 + 5, [7; 16]);
        let mut z = f;
        z[64..68].fill(0);
        assert_eq!(checksum(&z).to_be_bytes(), f[64..68]);
        let p = parse_footer(&f).unwrap();
        assert_eq!(
            (p.ty, p.size, p.data_offset),
            (Some(Type::Fixed), 64 << 20, u64::MAX)
        );
        assert_eq!(&f[24..28], &5u32.to_be_bytes());
        assert!(check_size((64 << 20) + 512).is_err());
        assert!(check_size(MAX_SIZE + (1 << 20)).is_err());
    }
}
