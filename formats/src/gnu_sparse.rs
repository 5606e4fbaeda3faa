//! A sparse file in GNU tar's old format (`tar --format=oldgnu -S`, what
//! Google Compute Engine's image import reads): a header of type `S`
//! with GNU's magic, the file's real size and its first four data
//! regions (offset, length), extension blocks of 21 regions each after
//! it, then the regions' bytes one after another. A file ending in a
//! hole ends its map with an empty region at its end, as GNU tar writes.

use crate::tar::{self, BLOCK};

const IN_HEADER: usize = 4;
const PER_EXTENSION: usize = 21;

/// A numeric field: octal when it fits, else base-256 (GNU's extension).
fn number(field: &mut [u8], v: u64) {
    let digits = field.len() - 1;
    if v < 1 << (3 * digits) {
        let s = format!("{v:0digits$o}");
        field[..digits].copy_from_slice(s.as_bytes());
        field[digits] = 0;
    } else {
        field.fill(0);
        field[0] = 0x80;
        let n = field.len();
        field[n - 8..].copy_from_slice(&v.to_be_bytes());
    }
}

fn region(slot: &mut [u8], (at, len): (u64, u64)) {
    number(&mut slot[..12], at);
    number(&mut slot[12..24], len);
}

/// The map to store for a `size`-byte file whose data is `map` (sorted,
/// disjoint byte ranges): `map`, then `(size, 0)` when it ends before.
pub fn regions(size: u64, map: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut r = map.to_vec();
    if r.last().is_none_or(|&(a, l)| a + l < size) {
        r.push((size, 0));
    }
    r
}

/// The header and extension blocks of `name`, a `size`-byte file whose
/// data regions are `regions` (from [`regions`]).
pub fn header(name: &str, size: u64, regions: &[(u64, u64)], mtime: u64) -> Vec<u8> {
    let stored: u64 = regions.iter().map(|r| r.1).sum();
    let mut h = tar::file_header(name, 0, mtime);
    number(&mut h[124..136], stored);
    h[156] = b'S';
    h[257..265].copy_from_slice(b"ustar  \0");
    h[265..345].fill(0); // no user or group names, no device numbers
    number(&mut h[483..495], size);
    let (first, rest) = regions.split_at(regions.len().min(IN_HEADER));
    for (i, r) in first.iter().enumerate() {
        region(&mut h[386 + 24 * i..410 + 24 * i], *r);
    }
    h[482] = u8::from(!rest.is_empty());
    tar::checksum(&mut h);
    let mut out = h.to_vec();
    let blocks: Vec<&[(u64, u64)]> = rest.chunks(PER_EXTENSION).collect();
    for (k, regions) in blocks.iter().enumerate() {
        let mut e = [0u8; BLOCK];
        for (i, r) in regions.iter().enumerate() {
            region(&mut e[24 * i..24 * i + 24], *r);
        }
        e[504] = u8::from(k + 1 < blocks.len());
        out.extend_from_slice(&e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_past_four_go_into_extension_blocks_and_big_numbers_into_base_256() {
        let map: Vec<(u64, u64)> = (0..30).map(|i| (i * 8192, 4096)).collect();
        let r = regions(1 << 20, &map);
        assert_eq!(r.last(), Some(&(1 << 20, 0)));
        let h = header("disk.raw", 1 << 20, &r, 0);
        // 31 regions: 4 in the header, 21 and 6 in two extension blocks.
        assert_eq!(h.len(), 3 * BLOCK);
        assert_eq!((h[482], h[BLOCK + 504], h[2 * BLOCK + 504]), (1, 1, 0));
        assert_eq!(&h[124..136], b"00000360000\0"); // 30 × 4096 = 0o360000
        let mut f = [0u8; 12];
        number(&mut f, 10 << 30);
        assert_eq!(f[0], 0x80);
        assert_eq!(u64::from_be_bytes(f[4..].try_into().unwrap()), 10 << 30);
        assert!(regions(8192, &[(0, 8192)]) == vec![(0, 8192)]);
    }
}
