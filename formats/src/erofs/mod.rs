//! EROFS (the kernel's Enhanced Read-Only File System), plain or with
//! LZ4/LZ4HC clusters (`compress.rs`, indexes in `zindex.rs`): a pure plan
//! from a tree description (`crate::tree`) that knows every byte's place
//! before any is written, then one ascending stream (`write.rs`).
//!
//! Layout (4 KiB blocks): block 0 holds the superblock at byte 1024; the
//! metadata area starts right after it, in block 0, and holds every inode
//! (32-byte slots, addressed by nid = slot number from byte 0), each
//! followed by its inline tail (the last partial block of a file,
//! directory or symlink, when it fits in the same block as the inode),
//! smaller ones filling what larger ones left at the ends of blocks; then
//! each inode's whole data blocks, in the inodes' order. Inodes are placed
//! breadth first from the root (the first, nid 36, which the superblock's
//! 16-bit `root_nid` can always name), children in name order, a hard
//! link's node once. Every node has the one timestamp
//! (the superblock's build time), so inodes are the compact 32-byte form
//! unless a size, owner or link count needs the 64-byte one.
//!
//! Directories are blocks of 12-byte dirents then their names, sorted by
//! name bytes across the whole directory ("." and ".." included), as the
//! kernel's binary search needs; a block's last name ends at a NUL or the
//! block's (or directory's) end.

pub mod compress;
mod write;
mod zindex;

use std::collections::{BTreeSet, HashMap};

pub use compress::Compression;

use crate::tree::{Kind, NodeId, Tree, ROOT};

pub use write::Written;

pub const BS: u64 = 4096;
pub const MAGIC: u32 = 0xE0F5_E1E2;
/// The metadata area's first block: block 0, shared with the superblock
/// (inodes start after it, as mkfs.erofs places them).
const META_BLKADDR: u64 = 0;
/// The superblock's end: the first inode's place (nid 36).
const SB_END: u64 = 1024 + 128;
const COMPACT: u64 = 32;
const EXTENDED: u64 = 64;
const DIRENT: usize = 12;

/// i_format's data layouts.
const FLAT_PLAIN: u16 = 0;
const COMPRESSED_COMPACT: u16 = 3;
const FLAT_INLINE: u16 = 2;
/// feature_incompat: compressed data ends its block (LZ4_0PADDING).
const ZERO_PADDING: u32 = 1;

#[derive(Clone, Debug)]
pub struct Options {
    /// At most 16 bytes.
    pub label: String,
    pub uuid: [u8; 16],
    /// Every timestamp (SOURCE_DATE_EPOCH).
    pub epoch: u64,
    /// Files larger than a block are compressed where that saves blocks.
    pub compression: Compression,
}

impl Options {
    /// Options with the UUID derived from `seed`.
    pub fn from_seed(seed: &str, label: &str, epoch: u64) -> Options {
        Options {
            label: label.to_string(),
            uuid: crate::seed::uuid(seed, &format!("erofs:{label}:uuid")),
            epoch,
            compression: Compression::None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ErofsError {
    #[error("label {0:?} is longer than 16 bytes")]
    Label(String),
    #[error("the filesystem would need {0} blocks; EROFS addresses at most 2^32")]
    TooLarge(u64),
    #[error("writing at byte {offset}: {err}")]
    Write { offset: u64, err: std::io::Error },
    #[error("compressing: {0}")]
    Compress(std::io::Error),
}

/// One inode as placed.
#[derive(Clone, Debug)]
pub(crate) struct Ino {
    pub node: NodeId,
    /// Byte offset of the inode in the filesystem.
    pub pos: u64,
    pub extended: bool,
    pub layout: u16,
    pub size: u64,
    pub nlink: u32,
    /// First data block (whole blocks only; 0 when there are none).
    pub blkaddr: u64,
    /// Whole data blocks (the tail among them unless inline).
    pub blocks: u64,
    /// Bytes kept inline after the inode.
    pub inline: u64,
    /// A compressed file's extents (its `blocks` are theirs, one each).
    pub packed: Option<compress::Packed>,
}

impl Ino {
    pub fn nid(&self) -> u64 {
        (self.pos - META_BLKADDR * BS) / COMPACT
    }
    /// The bytes after a compressed inode: map header and indexes.
    fn zmeta_len(&self) -> u64 {
        match self.packed {
            Some(_) => zindex::len(self.size),
            None => 0,
        }
    }
    fn isize(&self) -> u64 {
        if self.extended {
            EXTENDED
        } else {
            COMPACT
        }
    }
}

/// The planned filesystem.
pub struct Plan<'t> {
    pub(crate) tree: &'t Tree,
    pub(crate) opts: Options,
    /// In placement order (breadth first; nids ascend but where a small
    /// inode fills an earlier block's end); the root first.
    pub(crate) inodes: Vec<Ino>,
    pub(crate) meta_end: u64,
    pub(crate) blocks: u64,
    /// A directory's contents, as placed blocks of dirents and names.
    pub(crate) dirs: HashMap<NodeId, Vec<u8>>,
    /// The compressed files' blocks, made while planning.
    pub(crate) scratch: Option<compress::Scratch>,
}

impl Plan<'_> {
    pub fn size_bytes(&self) -> u64 {
        self.blocks * BS
    }
    pub fn inodes_used(&self) -> usize {
        self.inodes.len()
    }
    pub fn compressed_files(&self) -> usize {
        self.inodes.iter().filter(|i| i.packed.is_some()).count()
    }
    /// Everything up to the end is written (the metadata area's padding
    /// and every data block's tail included).
    pub fn mapped(&self) -> Vec<(u64, u64)> {
        vec![(0, self.size_bytes())]
    }
}

/// The inodes in breadth-first order from the root (children in name
/// order), each node once, with its link count.
fn order(tree: &Tree) -> (Vec<NodeId>, HashMap<NodeId, u32>) {
    let mut seen: HashMap<NodeId, u32> = HashMap::new();
    let mut out = vec![ROOT];
    seen.insert(ROOT, 2);
    let mut i = 0;
    while i < out.len() {
        if let Kind::Dir { children } = &tree.node(out[i]).kind {
            let dir = out[i];
            for &c in children.values() {
                let is_dir = matches!(tree.node(c).kind, Kind::Dir { .. });
                if is_dir {
                    *seen.get_mut(&dir).expect("placed") += 1;
                }
                match seen.get_mut(&c) {
                    Some(n) => *n += 1,
                    None => {
                        seen.insert(c, if is_dir { 2 } else { 1 });
                        out.push(c);
                    }
                }
            }
        }
        i += 1;
    }
    (out, seen)
}

/// A directory's entries ("." and ".." included) in name order, cut into
/// blocks: each a run of entries whose dirents and names fit in a block.
fn dir_blocks(tree: &Tree, dir: NodeId, parent: NodeId) -> Vec<Vec<(&[u8], NodeId)>> {
    let Kind::Dir { children } = &tree.node(dir).kind else {
        return Vec::new();
    };
    let mut all: Vec<(&[u8], NodeId)> = vec![(b".", dir), (b"..", parent)];
    all.extend(children.iter().map(|(n, &c)| (n.as_slice(), c)));
    all.sort_by(|a, b| a.0.cmp(b.0));
    let mut blocks: Vec<Vec<(&[u8], NodeId)>> = vec![Vec::new()];
    let mut used = 0usize;
    for e in all {
        let need = DIRENT + e.0.len();
        if used + need > BS as usize {
            blocks.push(Vec::new());
            used = 0;
        }
        used += need;
        blocks.last_mut().expect("one block at least").push(e);
    }
    blocks
}

/// The bytes one block of entries takes (dirents and names).
fn block_len(entries: &[(&[u8], NodeId)]) -> u64 {
    entries.iter().map(|e| (DIRENT + e.0.len()) as u64).sum()
}

/// Plan `tree` as an uncompressed EROFS filesystem.
pub fn plan<'t>(tree: &'t Tree, opts: &Options) -> Result<Plan<'t>, ErofsError> {
    if opts.label.len() > 16 {
        return Err(ErofsError::Label(opts.label.clone()));
    }
    let (ids, links) = order(tree);
    let parents = parents(tree, &ids);
    let big: Vec<(NodeId, u64)> = ids
        .iter()
        .filter_map(|&id| match tree.node(id).kind {
            Kind::File { size, .. } if size > BS => Some((id, size)),
            _ => None,
        })
        .collect();
    let (mut packed, scratch) =
        compress::compress_all(tree, &big, opts.compression).map_err(ErofsError::Compress)?;
    let mut inodes = Vec::with_capacity(ids.len());
    let mut meta = Meta::new();
    for &id in &ids {
        let node = tree.node(id);
        let size = match &node.kind {
            Kind::Dir { .. } => {
                let b = dir_blocks(tree, id, parents[&id]);
                (b.len() as u64 - 1) * BS + block_len(b.last().expect("one block"))
            }
            Kind::File { size, .. } => *size,
            Kind::Symlink { target } => target.len() as u64,
            _ => 0,
        };
        let nlink = links[&id];
        let extended =
            size > u32::MAX as u64 || node.uid > 0xffff || node.gid > 0xffff || nlink > 0xffff;
        let mut ino = Ino {
            node: id,
            pos: 0,
            extended,
            layout: FLAT_PLAIN,
            size,
            nlink,
            blkaddr: 0,
            blocks: size.div_ceil(BS),
            inline: 0,
            packed: packed.remove(&id),
        };
        place(&mut ino, &mut meta);
        inodes.push(ino);
    }
    let meta_end = meta.frontier;
    let mut next = meta_end.div_ceil(BS);
    for ino in inodes.iter_mut().filter(|i| i.blocks > 0) {
        ino.blkaddr = next;
        next += ino.blocks;
    }
    if next > u32::MAX as u64 {
        return Err(ErofsError::TooLarge(next));
    }
    let nids: HashMap<NodeId, u64> = inodes.iter().map(|i| (i.node, i.nid())).collect();
    let dirs = ids
        .iter()
        .filter(|&&id| matches!(tree.node(id).kind, Kind::Dir { .. }))
        .map(|&id| (id, dir_bytes(tree, id, parents[&id], &nids)))
        .collect();
    Ok(Plan {
        tree,
        opts: opts.clone(),
        inodes,
        meta_end,
        blocks: next.max(META_BLKADDR + 1),
        dirs,
        scratch,
    })
}

/// The metadata area as it fills: the frontier, and the holes left
/// behind it (the ends of blocks an inode and its tail did not fit in),
/// which later inodes fill (`hole`: best fit, as mkfs.erofs fills its
/// metadata blocks, but for 32-byte leftovers). Positions are 32-byte
/// aligned.
struct Meta {
    frontier: u64,
    /// (free bytes, start), smallest first.
    holes: BTreeSet<(u64, u64)>,
}

impl Meta {
    fn new() -> Meta {
        Meta {
            frontier: SB_END,
            holes: BTreeSet::new(),
        }
    }

    /// Where `len` bytes go that must stay in one block (`len <= BS`):
    /// a hole that holds them (`hole`), else the frontier's block, else
    /// the next one.
    fn in_block(&mut self, len: u64) -> u64 {
        self.hole(len).unwrap_or_else(|| self.run_on(len, len))
    }

    /// The hole `len` bytes go in, taken: the smallest that holds them,
    /// unless that would leave 32 bytes (room for only an inode without
    /// data, of which a tree has few); then the smallest that leaves more,
    /// if there is one.
    fn hole(&mut self, len: u64) -> Option<u64> {
        let best = *self.holes.range((len, 0)..).next()?;
        let (free, at) = match best.0 == len + COMPACT {
            true => (self.holes.range((len + 2 * COMPACT, 0)..).next()).map_or(best, |h| *h),
            false => best,
        };
        self.holes.remove(&(free, at));
        if free > len {
            self.holes.insert((free - len, at + len));
        }
        Some(at)
    }

    /// Where `len` bytes go at the frontier, their first `head` in one
    /// block (a compressed inode's indexes run on into the next blocks).
    fn run_on(&mut self, head: u64, len: u64) -> u64 {
        let room = BS - self.frontier % BS;
        if head > room {
            self.holes.insert((room, self.frontier));
            self.frontier = self.frontier.next_multiple_of(BS);
        }
        let at = self.frontier;
        self.frontier += len.next_multiple_of(COMPACT);
        at
    }
}

/// Place `ino` in the metadata area: its tail inline right after it
/// whenever the inode and tail fit in a block (they never cross one),
/// else the tail in a data block of its own; a compressed file's map
/// header and indexes right after it. (Names over 255 bytes never reach
/// here: the tree refuses them.)
fn place(ino: &mut Ino, meta: &mut Meta) {
    let isize = ino.isize();
    if let Some(p) = &ino.packed {
        // A compressed file: its map header and indexes follow the inode
        // (packs of 8 or 32 bytes, aligned, never across a block), in a
        // hole they fit in or at the frontier, running on into the next
        // blocks; its data all in blocks.
        ino.layout = COMPRESSED_COMPACT;
        ino.blocks = p.extents.len() as u64;
        let len = (isize + ino.zmeta_len()).next_multiple_of(COMPACT);
        ino.pos = meta.hole(len).unwrap_or_else(|| meta.run_on(isize, len));
        return;
    }
    let tail = ino.size % BS;
    if tail > 0 && isize + tail <= BS {
        ino.layout = FLAT_INLINE;
        ino.inline = tail;
        ino.blocks = ino.size / BS;
    }
    ino.pos = meta.in_block((isize + ino.inline).next_multiple_of(COMPACT));
}

/// Each directory's parent (the root is its own).
fn parents(tree: &Tree, ids: &[NodeId]) -> HashMap<NodeId, NodeId> {
    let mut p = HashMap::from([(ROOT, ROOT)]);
    for &id in ids {
        if let Kind::Dir { children } = &tree.node(id).kind {
            for &c in children.values() {
                if matches!(tree.node(c).kind, Kind::Dir { .. }) {
                    p.entry(c).or_insert(id);
                }
            }
        }
    }
    p
}

/// The EROFS file type of a node.
fn file_type(k: &Kind) -> u8 {
    match k {
        Kind::File { .. } => 1,
        Kind::Dir { .. } => 2,
        Kind::CharDev { .. } => 3,
        Kind::BlockDev { .. } => 4,
        Kind::Fifo => 5,
        Kind::Socket => 6,
        Kind::Symlink { .. } => 7,
    }
}

/// A directory's content: its blocks of dirents then names, whole blocks
/// zero-padded, the last one as long as it is used.
fn dir_bytes(tree: &Tree, dir: NodeId, parent: NodeId, nids: &HashMap<NodeId, u64>) -> Vec<u8> {
    let blocks = dir_blocks(tree, dir, parent);
    let mut out = Vec::with_capacity(blocks.len() * BS as usize);
    for (i, b) in blocks.iter().enumerate() {
        let start = out.len();
        let mut nameoff = b.len() * DIRENT;
        for (name, id) in b {
            out.extend(nids[id].to_le_bytes());
            out.extend((nameoff as u16).to_le_bytes());
            out.push(file_type(&tree.node(*id).kind));
            out.push(0);
            nameoff += name.len();
        }
        for (name, _) in b {
            out.extend_from_slice(name);
        }
        if i + 1 < blocks.len() {
            out.resize(start + BS as usize, 0);
        }
    }
    out
}

#[cfg(test)]
mod tests;
