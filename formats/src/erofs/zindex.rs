//! The map from a compressed file's 4 KiB logical clusters to its
//! extents, in EROFS's compact form (the `COMPRESSED_COMPACT` layout with
//! 2-byte packs, what mkfs.erofs writes by default; Linux reads it since
//! 5.3), after the inode and an 8-byte map header.
//!
//! Each logical cluster has one index: HEAD (an extent starts in it, at
//! `clusterofs`; PLAIN when that extent is stored raw) or NONHEAD (no
//! extent starts in it: the clusters back to the head of the one it is
//! in). Indexes are bit-packed in packs that end with a 4-byte block
//! address: two 16-bit indexes in 8 bytes, or sixteen 14-bit ones in 32.
//! A reader finds a head's block by counting the heads before it in its
//! pack (one block per extent) on from that address, so a pack's address
//! is the block before its first head's. A pack's last NONHEAD holds the
//! distance on to the next head instead (its distance back is the
//! previous index's plus one). The packs start 8 bytes past a 32-byte
//! boundary (the inode is 32-byte aligned, 32 or 64 bytes long, then the
//! header): six 4-byte indexes reach the boundary, whole 2-byte packs
//! follow, and 4-byte packs hold the rest.

use super::compress::{Extent, EXTENT_MAX_IN};
use super::BS;

const PLAIN: u16 = 0;
const HEAD: u16 = 1;
const NONHEAD: u16 = 2;
/// `h_advise`: the 2-byte packs are used.
const COMPACTED_2B: u16 = 1;
const HEADER: usize = 8;
/// Indexes in 4-byte packs before the first 2-byte pack.
const INITIAL: u64 = 6;
/// An index's value bits (its type above them).
const LOBITS: u32 = 12;
/// Bit 11 of a NONHEAD's value means a block count (big pclusters, which
/// forge does not make), so distances stay below it.
const D_MAX: u16 = (1 << 11) - 1;
// No extent is long enough for a distance to reach D_MAX.
const _: () = assert!(EXTENT_MAX_IN as u64 / BS < D_MAX as u64);

/// One logical cluster's index, as a reader sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Index {
    ty: u16,
    /// HEAD, PLAIN: where the extent starts in the cluster; NONHEAD: the
    /// clusters back to its head.
    lo: u16,
    /// NONHEAD: the clusters on to the next head.
    d1: u16,
    /// HEAD, PLAIN: the extent's block.
    blk: u32,
}

/// Every logical cluster's index, for `extents` whose blocks start at
/// `blkaddr` (every extent but the last ends past its head's cluster:
/// compression takes more than a block's input, a raw block a whole
/// one, a segment's last one ends on a cluster). A file that ends inside a cluster an extent entered gets a
/// last PLAIN index there (at the file's end), as erofs-utils writes it.
fn indexes(extents: &[Extent], blkaddr: u64) -> Vec<Index> {
    let mut out = Vec::new();
    let mut ofs = 0u64;
    let mut blk = blkaddr as u32;
    for e in extents {
        let ty = if e.raw { PLAIN } else { HEAD };
        out.push(Index {
            ty,
            lo: ofs as u16,
            d1: 0,
            blk,
        });
        let end = ofs + e.len as u64;
        let inner = (end / BS).saturating_sub(1) as u16;
        for d0 in 1..=inner {
            let d1 = inner + 1 - d0;
            out.push(Index {
                ty: NONHEAD,
                lo: d0,
                d1,
                blk: 0,
            });
        }
        // Only a file's last extent ends in the cluster it starts in.
        ofs = if end >= BS { end % BS } else { 0 };
        blk += 1;
    }
    if ofs > 0 {
        out.push(Index {
            ty: PLAIN,
            lo: ofs as u16,
            d1: 0,
            blk,
        });
    }
    out
}

/// How many indexes go in 4-byte packs first, in 2-byte packs, and in
/// 4-byte packs last.
fn parts(total: u64) -> (u64, u64, u64) {
    let first = total.min(INITIAL);
    let two = (total - first) / 16 * 16;
    (first, two, total - first - two)
}

/// The bytes of a compressed file's map header and indexes.
pub(crate) fn len(size: u64) -> u64 {
    let (a, b, c) = parts(size.div_ceil(BS));
    HEADER as u64 + a.next_multiple_of(2) * 4 + b * 2 + c.next_multiple_of(2) * 4
}

/// A pack of `vcnt` indexes (the last ones absent at the file's end).
fn pack(out: &mut Vec<u8>, ix: &[Index], vcnt: usize, base: u32) {
    let bytes = if vcnt == 2 { 8 } else { 32 };
    let bits = (bytes * 8 - 32) / vcnt;
    let start = out.len();
    out.resize(start + bytes, 0);
    for (i, x) in ix.iter().enumerate() {
        let lo = match x.ty {
            NONHEAD if i + 1 == vcnt => x.d1.min(D_MAX),
            _ => x.lo,
        };
        let v = (x.ty as u32) << LOBITS | lo as u32;
        for b in (0..bits).filter(|b| v >> b & 1 == 1) {
            let p = i * bits + b;
            out[start + p / 8] |= 1 << (p % 8);
        }
    }
    out[start + bytes - 4..start + bytes].copy_from_slice(&base.to_le_bytes());
}

/// The bytes after a compressed inode of `size` bytes: the map header
/// (LZ4, 4 KiB logical clusters, 2-byte packs), then the packs.
pub(crate) fn index_bytes(extents: &[Extent], size: u64, blkaddr: u64) -> Vec<u8> {
    let ix = indexes(extents, blkaddr);
    debug_assert_eq!(ix.len() as u64, size.div_ceil(BS));
    let end_blk = (blkaddr + extents.len() as u64) as u32;
    let mut out = vec![0u8; HEADER];
    out[4..6].copy_from_slice(&COMPACTED_2B.to_le_bytes());
    let (a, b, _) = parts(ix.len() as u64);
    let mut at = 0;
    while at < ix.len() {
        let vcnt = if (at as u64) >= a && ((at as u64) < a + b) {
            16
        } else {
            2
        };
        let these = &ix[at..(at + vcnt).min(ix.len())];
        let next = ix[at..].iter().find(|x| x.ty != NONHEAD);
        let base = next.map_or(end_blk, |x| x.blk).wrapping_sub(1);
        pack(&mut out, these, vcnt, base);
        at += vcnt;
    }
    debug_assert_eq!(out.len() as u64, len(size));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lcluster `lcn` read back as the kernel's `z_erofs_load_compact_lcluster`
    /// reads it (positions from the packs' start, which is 8 past 32).
    fn read(packs: &[u8], total: u64, lcn: u64) -> (u16, u16, u32) {
        let (a, b, _) = parts(total);
        let (pos, shift) = if lcn < a {
            (lcn * 4, 2)
        } else if lcn < a + b {
            (a * 4 + (lcn - a) * 2, 1)
        } else {
            (a * 4 + b * 2 + (lcn - a - b) * 4, 2)
        };
        let vcnt = if shift == 2 { 2 } else { 16 };
        let pack_len = vcnt << shift;
        // Packs are aligned in the filesystem: 4-byte ones to 8, 2-byte
        // ones to 32; the stream starts 8 bytes past a 32-byte boundary.
        let abs = pos + 8;
        let base = (abs / pack_len * pack_len - 8) as usize;
        let bits = ((pack_len - 4) * 8 / vcnt) as usize;
        let i = ((abs % pack_len) >> shift) as usize;
        let p = &packs[base..base + pack_len as usize];
        let get = |i: usize| {
            let mut v = 0u32;
            for b in 0..bits {
                let q = i * bits + b;
                v |= ((p[q / 8] >> (q % 8) & 1) as u32) << b;
            }
            ((v >> LOBITS) as u16, (v & 0xfff) as u16)
        };
        let (ty, lo) = get(i);
        if ty == NONHEAD {
            if i + 1 == vcnt as usize {
                let (pty, plo) = get(i - 1);
                return (ty, if pty == NONHEAD { plo + 1 } else { 1 }, 0);
            }
            return (ty, lo, 0);
        }
        let mut nblk = 1;
        let mut j = i as i64;
        while j > 0 {
            j -= 1;
            let (t, l) = get(j as usize);
            if t == NONHEAD {
                j -= l as i64;
            }
            if j >= 0 {
                nblk += 1;
            }
        }
        let addr = u32::from_le_bytes(p[p.len() - 4..].try_into().unwrap());
        (ty, lo, addr + nblk)
    }

    fn e(len: u32, raw: bool) -> Extent {
        Extent { len, raw }
    }

    #[test]
    fn one_index_per_logical_cluster_heads_where_extents_start() {
        // 5000 + 9000 + 2000 = 16000 bytes: 4 clusters.
        let ix = indexes(&[e(5000, false), e(9000, false), e(2000, true)], 100);
        let h = |ty, lo, blk| Index { ty, lo, d1: 0, blk };
        assert_eq!(
            ix,
            [
                h(HEAD, 0, 100),
                h(HEAD, 904, 101),
                Index {
                    ty: NONHEAD,
                    lo: 1,
                    d1: 1,
                    blk: 0
                },
                h(PLAIN, 1712, 102),
            ]
        );
        // A file ending inside a cluster its last extent entered.
        let ix = indexes(&[e(6000, false)], 7);
        assert_eq!(ix, [h(HEAD, 0, 7), h(PLAIN, 1904, 8)]);
    }

    #[test]
    fn every_cluster_reads_back_as_the_kernel_reads_it() {
        // Files of many lengths: extents of 1 to 40 clusters, some raw,
        // so every part (initial, 2-byte, end) and pack position is hit.
        let mut seed = 7u64;
        for files in 0..200 {
            // As compression makes them: a compressed extent takes more
            // than a block's input, a raw one a block or what ends its
            // segment's cluster; the last one anything.
            let (mut ext, mut ofs) = (Vec::new(), 0);
            let n = files % 37 + 1;
            for k in 0..n {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let r = seed >> 33;
                let raw = seed >> 7 & 3 == 0;
                let len = match (k + 1 == n, raw) {
                    (true, _) => r % (40 * BS) + 1,
                    (false, true) if r & 1 == 0 => BS - ofs,
                    (false, true) => BS,
                    (false, false) => BS + 1 + r % (40 * BS),
                };
                ofs = (ofs + len) % BS;
                ext.push(e(len as u32, raw));
            }
            let size: u64 = ext.iter().map(|x| x.len as u64).sum();
            let bytes = index_bytes(&ext, size, 1000);
            assert_eq!(bytes.len() as u64, len(size));
            assert_eq!(u16::from_le_bytes([bytes[4], bytes[5]]), COMPACTED_2B);
            let ix = indexes(&ext, 1000);
            let total = size.div_ceil(BS);
            for (lcn, want) in ix.iter().enumerate() {
                let (ty, lo, blk) = read(&bytes[HEADER..], total, lcn as u64);
                assert_eq!((ty, lo), (want.ty, want.lo), "file {files} lcn {lcn}");
                if ty != NONHEAD {
                    assert_eq!(blk, want.blk, "file {files} lcn {lcn}");
                }
            }
        }
    }

    #[test]
    fn compact_indexes_take_about_two_bytes_a_cluster() {
        assert_eq!(len(BS), 8 + 8);
        assert_eq!(len(6 * BS), 8 + 24);
        assert_eq!(len(22 * BS), 8 + 24 + 32);
        assert_eq!(len(23 * BS), 8 + 24 + 32 + 8);
        assert_eq!(len(1 << 30), 8 + 24 + 262_128 * 2 + 40);
    }
}
