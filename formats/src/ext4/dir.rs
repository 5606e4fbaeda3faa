//! Directory blocks: linear (one block) or hashed (htree, one or two index
//! levels), each leaf ending in the metadata_csum tail entry.

use super::csum;
use super::hash::half_md4;
use super::BS;

pub const FT_REG: u8 = 1;
pub const FT_DIR: u8 = 2;
pub const FT_CHR: u8 = 3;
pub const FT_BLK: u8 = 4;
pub const FT_FIFO: u8 = 5;
pub const FT_SOCK: u8 = 6;
pub const FT_LNK: u8 = 7;

const TAIL: usize = 12;
/// Usable bytes of a leaf block (the csum tail takes 12).
const LEAF_SPACE: usize = BS - TAIL;
const ROOT_LIMIT: usize = (BS - 32 - 8) / 8;
const NODE_LIMIT: usize = (BS - 8 - 8) / 8;

#[derive(Clone, Debug)]
pub struct Entry {
    pub name: Vec<u8>,
    pub ino: u32,
    pub ftype: u8,
}

pub fn rec_len(name_len: usize) -> usize {
    (8 + name_len + 3) & !3
}

/// How a directory is laid out: how many blocks, hashed or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub blocks: u32,
    pub htree_levels: u8, // 0: linear; 1 or 2: hashed
}

/// A directory's entries in leaf order plus where each leaf starts.
pub struct Packed {
    /// (first entry index, hash of first entry) per leaf.
    leaves: Vec<(usize, u32)>,
    entries: Vec<Entry>,
}

/// Bytes "." and ".." take in a linear first block.
const DOTS: usize = 24;

pub fn shape(entries: &[Entry], hash_seed: &[u32; 4], min_blocks: u32) -> (Shape, Packed) {
    let total: usize = entries.iter().map(|e| rec_len(e.name.len())).sum();
    if DOTS + total <= LEAF_SPACE {
        let mut e = entries.to_vec();
        e.sort_by(|a, b| a.name.cmp(&b.name));
        return (
            Shape {
                blocks: min_blocks.max(1),
                htree_levels: 0,
            },
            Packed {
                leaves: vec![(0, 0)],
                entries: e,
            },
        );
    }
    let mut hashed: Vec<(u32, u32, Entry)> = entries
        .iter()
        .map(|e| {
            let (h, m) = half_md4(&e.name, hash_seed);
            (h, m, e.clone())
        })
        .collect();
    hashed.sort_by(|a, b| (a.0, a.1, &a.2.name).cmp(&(b.0, b.1, &b.2.name)));
    let mut leaves = vec![(0usize, 0u32)];
    let mut used = 0;
    let mut i = 0;
    while i < hashed.len() {
        let r = rec_len(hashed[i].2.name.len());
        if used + r > LEAF_SPACE {
            // Never split a run of equal hashes: move the split back to
            // the run's start when the run began in this leaf.
            let mut split = i;
            let leaf_start = leaves.last().map(|l| l.0).unwrap_or(0);
            while split > leaf_start + 1 && hashed[split - 1].0 == hashed[i].0 {
                split -= 1;
            }
            if hashed[split - 1].0 == hashed[split].0 {
                split = i; // the run fills a whole leaf: continuation bit below
            }
            leaves.push((split, hashed[split].0));
            used = hashed[split..=i]
                .iter()
                .map(|e| rec_len(e.2.name.len()))
                .sum();
        } else {
            used += r;
        }
        i += 1;
    }
    // A leaf that starts inside a run of equal hashes carries the
    // collision bit, telling lookups to continue from the previous leaf.
    for leaf in leaves.iter_mut().skip(1) {
        if hashed[leaf.0 - 1].0 == hashed[leaf.0].0 {
            leaf.1 |= 1;
        }
    }
    let nleaves = leaves.len();
    let levels = if nleaves <= ROOT_LIMIT { 1 } else { 2 };
    let nodes = if levels == 2 {
        nleaves.div_ceil(NODE_LIMIT)
    } else {
        0
    };
    (
        Shape {
            blocks: (1 + nodes + nleaves) as u32,
            htree_levels: levels,
        },
        Packed {
            leaves,
            entries: hashed.into_iter().map(|e| e.2).collect(),
        },
    )
}

fn put_dirent(b: &mut [u8], off: usize, ino: u32, rec: usize, name: &[u8], ft: u8) {
    b[off..off + 4].copy_from_slice(&ino.to_le_bytes());
    b[off + 4..off + 6].copy_from_slice(&(rec as u16).to_le_bytes());
    b[off + 6] = name.len() as u8;
    b[off + 7] = ft;
    b[off + 8..off + 8 + name.len()].copy_from_slice(name);
}

fn leaf_tail(b: &mut [u8], seed: u32) {
    let t = BS - TAIL;
    b[t..BS].fill(0);
    b[t + 4..t + 6].copy_from_slice(&(TAIL as u16).to_le_bytes());
    b[t + 7] = 0xDE;
    let c = csum::crc(seed, &b[..t]);
    b[t + 8..t + 12].copy_from_slice(&c.to_le_bytes());
}

/// Fill `block` with `entries` (after `start` bytes already used), the last
/// entry stretched to the tail; an empty block gets one unused entry.
fn fill_leaf(block: &mut [u8], start: usize, entries: &[Entry], last_dot: Option<usize>) {
    let mut off = start;
    let mut last = last_dot;
    for e in entries {
        let r = rec_len(e.name.len());
        put_dirent(block, off, e.ino, r, &e.name, e.ftype);
        last = Some(off);
        off += r;
    }
    match last {
        Some(l) => {
            let r = LEAF_SPACE - l;
            block[l + 4..l + 6].copy_from_slice(&(r as u16).to_le_bytes());
        }
        None => put_dirent(block, 0, 0, LEAF_SPACE, b"", 0),
    }
}

/// Encode all blocks of a directory. `csum_seed` is the inode's seed.
pub fn encode(
    shape: Shape,
    packed: &Packed,
    self_ino: u32,
    parent_ino: u32,
    csum_seed: u32,
) -> Vec<u8> {
    let mut out = vec![0u8; shape.blocks as usize * BS];
    if shape.htree_levels == 0 {
        let b = &mut out[..BS];
        put_dirent(b, 0, self_ino, 12, b".", FT_DIR);
        put_dirent(b, 12, parent_ino, 12, b"..", FT_DIR);
        fill_leaf(b, DOTS, &packed.entries, Some(12));
        leaf_tail(b, csum_seed);
        for k in 1..shape.blocks as usize {
            let b = &mut out[k * BS..(k + 1) * BS];
            fill_leaf(b, 0, &[], None);
            leaf_tail(b, csum_seed);
        }
        return out;
    }
    let nleaves = packed.leaves.len();
    let nodes = shape.blocks as usize - 1 - nleaves;
    let first_leaf = 1 + nodes;
    for (k, &(start, _)) in packed.leaves.iter().enumerate() {
        let end = packed
            .leaves
            .get(k + 1)
            .map(|l| l.0)
            .unwrap_or(packed.entries.len());
        let b = &mut out[(first_leaf + k) * BS..(first_leaf + k + 1) * BS];
        fill_leaf(b, 0, &packed.entries[start..end], None);
        leaf_tail(b, csum_seed);
    }
    // Root block: "." and ".." (which spans the rest), then dx_root_info.
    {
        let b = &mut out[..BS];
        put_dirent(b, 0, self_ino, 12, b".", FT_DIR);
        put_dirent(b, 12, parent_ino, BS - 12, b"..", FT_DIR);
        b[24..28].fill(0); // reserved_zero
        b[28] = 1; // hash version: half_md4 (unsigned per superblock flag)
        b[29] = 8; // info length
        b[30] = shape.htree_levels - 1;
        b[31] = 0;
    }
    if shape.htree_levels == 1 {
        let targets: Vec<(u32, u32)> = packed
            .leaves
            .iter()
            .enumerate()
            .map(|(k, l)| (l.1, (first_leaf + k) as u32))
            .collect();
        put_dx(&mut out[..BS], 32, ROOT_LIMIT, &targets, csum_seed);
    } else {
        let mut root_targets = Vec::new();
        for n in 0..nodes {
            let lo = n * NODE_LIMIT;
            let hi = ((n + 1) * NODE_LIMIT).min(nleaves);
            let targets: Vec<(u32, u32)> = (lo..hi)
                .map(|k| (packed.leaves[k].1, (first_leaf + k) as u32))
                .collect();
            root_targets.push((packed.leaves[lo].1, (1 + n) as u32));
            let b = &mut out[(1 + n) * BS..(2 + n) * BS];
            put_dirent(b, 0, 0, BS, b"", 0);
            put_dx(b, 8, NODE_LIMIT, &targets, csum_seed);
        }
        put_dx(&mut out[..BS], 32, ROOT_LIMIT, &root_targets, csum_seed);
    }
    out
}

/// Write a dx count/limit header and entries at `off`, then the dx tail.
/// The first entry's hash is implicit (its slot holds limit and count).
fn put_dx(b: &mut [u8], off: usize, limit: usize, targets: &[(u32, u32)], seed: u32) {
    b[off..off + 2].copy_from_slice(&(limit as u16).to_le_bytes());
    b[off + 2..off + 4].copy_from_slice(&(targets.len() as u16).to_le_bytes());
    b[off + 4..off + 8].copy_from_slice(&targets[0].1.to_le_bytes());
    for (i, &(hash, blk)) in targets.iter().enumerate().skip(1) {
        let p = off + i * 8;
        b[p..p + 4].copy_from_slice(&hash.to_le_bytes());
        b[p + 4..p + 8].copy_from_slice(&blk.to_le_bytes());
    }
    let tail = off + limit * 8;
    b[tail..tail + 8].fill(0);
    let size = off + targets.len() * 8;
    let mut c = csum::crc(seed, &b[..size]);
    c = csum::crc(c, &b[tail..tail + 4]);
    c = csum::crc(c, &[0u8; 4]);
    b[tail + 4..tail + 8].copy_from_slice(&c.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(n: usize) -> Vec<Entry> {
        (0..n)
            .map(|i| Entry {
                name: format!("entry-number-{i:06}").into_bytes(),
                ino: 100 + i as u32,
                ftype: FT_REG,
            })
            .collect()
    }

    #[test]
    fn small_dirs_are_linear_large_ones_hashed() {
        let seed = [1, 2, 3, 4];
        assert_eq!(shape(&entries(0), &seed, 1).0.htree_levels, 0);
        assert_eq!(shape(&entries(145), &seed, 1).0.htree_levels, 0);
        assert_eq!(shape(&entries(200), &seed, 1).0.htree_levels, 1);
        let (s, p) = shape(&entries(100_000), &seed, 1);
        assert_eq!(s.htree_levels, 2);
        let bytes = encode(s, &p, 12, 2, 0);
        assert_eq!(bytes.len(), s.blocks as usize * BS);
    }

    #[test]
    fn leaves_are_in_hash_order_and_full() {
        let seed = [9, 9, 9, 9];
        let (s, p) = shape(&entries(10_000), &seed, 1);
        let hashes: Vec<u32> = p
            .entries
            .iter()
            .map(|e| half_md4(&e.name, &seed).0)
            .collect();
        assert!(hashes.windows(2).all(|w| w[0] <= w[1]));
        // 10k names of 19 bytes (rec_len 28): 145 per leaf, so ~69 leaves.
        assert!(s.blocks < 75, "{s:?}");
    }
}
