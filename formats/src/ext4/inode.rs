//! Inodes (256 bytes, 32 extra) and extent trees.

use super::csum;
use super::BS;

pub const INODE_SIZE: usize = 256;
pub const EXTRA_ISIZE: u16 = 32;

pub const S_IFIFO: u16 = 0o010000;
pub const S_IFCHR: u16 = 0o020000;
pub const S_IFDIR: u16 = 0o040000;
pub const S_IFBLK: u16 = 0o060000;
pub const S_IFREG: u16 = 0o100000;
pub const S_IFLNK: u16 = 0o120000;
pub const S_IFSOCK: u16 = 0o140000;

pub const FL_INDEX: u32 = 0x1000;
pub const FL_EXTENTS: u32 = 0x80000;

const EXT_MAGIC: u16 = 0xF30A;
/// Entries an extent block holds (12-byte header, 4-byte checksum tail).
pub const PER_BLOCK: usize = (BS - 12 - 4) / 12;
/// Longest initialized extent.
pub const MAX_EXTENT: u32 = 32768;

/// A run of blocks: logical start, physical start, length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub logical: u32,
    pub physical: u64,
    pub len: u32,
}

/// The extent tree of one inode: the 60-byte root for `i_block` and the
/// blocks below it (with the physical block each goes to).
pub struct ExtentTree {
    pub root: [u8; 60],
    pub blocks: Vec<(u64, Vec<u8>)>,
}

/// How many tree blocks `n` extents need (0 when they fit in the inode).
pub fn tree_blocks_needed(n: usize) -> usize {
    let mut total = 0;
    let mut level = n;
    while level > 4 {
        level = level.div_ceil(PER_BLOCK);
        total += level;
    }
    total
}

fn header(b: &mut [u8], entries: usize, max: usize, depth: u16) {
    b[0..2].copy_from_slice(&EXT_MAGIC.to_le_bytes());
    b[2..4].copy_from_slice(&(entries as u16).to_le_bytes());
    b[4..6].copy_from_slice(&(max as u16).to_le_bytes());
    b[6..8].copy_from_slice(&depth.to_le_bytes());
    b[8..12].fill(0);
}

fn leaf_entry(b: &mut [u8], e: &Extent) {
    b[0..4].copy_from_slice(&e.logical.to_le_bytes());
    b[4..6].copy_from_slice(&(e.len as u16).to_le_bytes());
    b[6..8].copy_from_slice(&((e.physical >> 32) as u16).to_le_bytes());
    b[8..12].copy_from_slice(&(e.physical as u32).to_le_bytes());
}

fn index_entry(b: &mut [u8], logical: u32, block: u64) {
    b[0..4].copy_from_slice(&logical.to_le_bytes());
    b[4..8].copy_from_slice(&(block as u32).to_le_bytes());
    b[8..10].copy_from_slice(&((block >> 32) as u16).to_le_bytes());
    b[10..12].fill(0);
}

/// Build the tree for `extents` (sorted by logical block), placing its
/// blocks at `tree_blocks` (exactly `tree_blocks_needed` of them).
pub fn build_tree(extents: &[Extent], tree_blocks: &[u64], inode_seed: u32) -> ExtentTree {
    let mut root = [0u8; 60];
    let mut blocks = Vec::new();
    // Level 0: the extents themselves; each level up indexes the one below.
    // `level` holds (first logical block, entry bytes writer) per node.
    let mut depth: u16 = 0;
    let mut items: Vec<(u32, Option<u64>, Option<Extent>)> = extents
        .iter()
        .map(|e| (e.logical, None, Some(*e)))
        .collect();
    let mut next_block = tree_blocks.iter();
    while items.len() > 4 {
        let mut up = Vec::new();
        for chunk in items.chunks(PER_BLOCK) {
            let pb = *next_block
                .next()
                .expect("tree_blocks_needed blocks were given");
            let mut b = vec![0u8; BS];
            header(&mut b, chunk.len(), PER_BLOCK, depth);
            for (i, it) in chunk.iter().enumerate() {
                let s = &mut b[12 + i * 12..24 + i * 12];
                match it {
                    (_, None, Some(e)) => leaf_entry(s, e),
                    (l, Some(child), None) => index_entry(s, *l, *child),
                    _ => unreachable!("an item is an extent or an index"),
                }
            }
            let tail = 12 + PER_BLOCK * 12;
            let c = csum::crc(inode_seed, &b[..tail]);
            b[tail..tail + 4].copy_from_slice(&c.to_le_bytes());
            up.push((chunk[0].0, Some(pb), None));
            blocks.push((pb, b));
        }
        items = up;
        depth += 1;
    }
    header(&mut root, items.len(), 4, depth);
    for (i, it) in items.iter().enumerate() {
        let s = &mut root[12 + i * 12..24 + i * 12];
        match it {
            (_, None, Some(e)) => leaf_entry(s, e),
            (l, Some(child), None) => index_entry(s, *l, *child),
            _ => unreachable!("an item is an extent or an index"),
        }
    }
    ExtentTree { root, blocks }
}

/// Fields of one inode, encoded by [`encode`].
pub struct Inode {
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub time: u32,
    pub links: u16,
    /// In 512-byte sectors.
    pub sectors: u64,
    pub flags: u32,
    pub block: [u8; 60],
}

pub fn encode(i: &Inode, ino: u32, fs_seed: u32) -> [u8; INODE_SIZE] {
    let mut b = [0u8; INODE_SIZE];
    let w16 = |b: &mut [u8], o: usize, v: u16| b[o..o + 2].copy_from_slice(&v.to_le_bytes());
    let w32 = |b: &mut [u8], o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_le_bytes());
    w16(&mut b, 0x00, i.mode);
    w16(&mut b, 0x02, i.uid as u16);
    w32(&mut b, 0x04, i.size as u32);
    w32(&mut b, 0x08, i.time); // atime
    w32(&mut b, 0x0C, i.time); // ctime
    w32(&mut b, 0x10, i.time); // mtime
    w16(&mut b, 0x18, i.gid as u16);
    w16(&mut b, 0x1A, i.links);
    w32(&mut b, 0x1C, i.sectors as u32);
    w32(&mut b, 0x20, i.flags);
    b[0x28..0x28 + 60].copy_from_slice(&i.block);
    w32(&mut b, 0x6C, (i.size >> 32) as u32);
    w16(&mut b, 0x74, (i.sectors >> 32) as u16);
    w16(&mut b, 0x78, (i.uid >> 16) as u16);
    w16(&mut b, 0x7A, (i.gid >> 16) as u16);
    w16(&mut b, 0x80, EXTRA_ISIZE);
    w32(&mut b, 0x90, i.time); // crtime
    set_checksum(&mut b, ino, fs_seed);
    b
}

/// Compute and store the inode checksum (generation is always 0 here).
pub fn set_checksum(b: &mut [u8; INODE_SIZE], ino: u32, fs_seed: u32) {
    b[0x7C..0x7E].fill(0);
    let has_hi = u16::from_le_bytes([b[0x80], b[0x81]]) >= 4;
    if has_hi {
        b[0x82..0x84].fill(0);
    }
    let c = csum::crc(csum::inode_seed(fs_seed, ino, 0), &b[..]);
    b[0x7C..0x7E].copy_from_slice(&(c as u16).to_le_bytes());
    if has_hi {
        b[0x82..0x84].copy_from_slice(&((c >> 16) as u16).to_le_bytes());
    }
}

/// `i_block` of a device inode (old encoding when it fits, new otherwise).
pub fn device_block(major: u32, minor: u32) -> [u8; 60] {
    let mut b = [0u8; 60];
    if major < 256 && minor < 256 {
        b[0..4].copy_from_slice(&((major << 8) | minor).to_le_bytes());
    } else {
        let v = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
        b[4..8].copy_from_slice(&v.to_le_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_sizes() {
        assert_eq!(tree_blocks_needed(0), 0);
        assert_eq!(tree_blocks_needed(4), 0);
        assert_eq!(tree_blocks_needed(5), 1);
        assert_eq!(tree_blocks_needed(340 * 4), 4);
        assert_eq!(tree_blocks_needed(340 * 4 + 1), 5 + 1);
    }

    #[test]
    fn depth_one_tree_indexes_leaves() {
        let ex: Vec<Extent> = (0..10)
            .map(|i| Extent {
                logical: i * 2,
                physical: 1000 + i as u64 * 2,
                len: 1,
            })
            .collect();
        let t = build_tree(&ex, &[77], 0);
        assert_eq!(t.blocks.len(), 1);
        assert_eq!(u16::from_le_bytes([t.root[6], t.root[7]]), 1, "depth");
        assert_eq!(u32::from_le_bytes(t.root[16..20].try_into().unwrap()), 77);
    }
}
