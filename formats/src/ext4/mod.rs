//! Our own ext4 writer: a layout compiler.
//!
//! [`plan`] decides everything — geometry, inode numbers, every block of
//! every file, directory and extent tree — from the tree description
//! alone (no file contents are read). [`Plan::write`] then streams the
//! filesystem out in one mostly-sequential pass: metadata first, then data
//! in allocation order, backup superblocks in passing.
//!
//! Features: 4 KiB blocks, extents (with index blocks as needed), flex_bg,
//! sparse_super, large_file, huge_file, dir_nlink, extra_isize (256-byte
//! inodes), filetype, dir_index (htree for every multi-block directory),
//! metadata_csum, 64bit when the block count needs it, and for the
//! read-write profile a clean jbd2 journal ([`Journal`]).

mod csum;
mod dir;
mod hash;
mod inode;
mod write;

#[cfg(test)]
mod tests;

pub use crate::tree::{Content, Kind, Node, NodeId, Owner, Tree, TreeError, ROOT};
pub use write::Written;

use dir::{Entry, Packed, Shape};
use inode::Extent;

pub const BS: usize = 4096;
const BS64: u64 = BS as u64;
const MAX_BPG: u64 = 32768;
const MAX_IPG: u64 = 32768;
const INODES_PER_BLOCK: u64 = (BS / inode::INODE_SIZE) as u64;
const FIRST_INO: u32 = 11;
const ROOT_INO: u32 = 2;
const JOURNAL_INO: u32 = 8;
/// Blocks mkfs gives lost+found, so e2fsck never has to grow it.
const LOST_FOUND_BLOCKS: u32 = 4;

#[derive(Clone, Copy, Debug)]
pub enum Size {
    /// Exactly what the content needs, plus slack.
    Auto {
        slack: Slack,
    },
    Fixed(u64),
}

/// Free space added to an auto-sized filesystem: the larger of `bytes`
/// and `percent` of what the content takes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Slack {
    pub bytes: u64,
    pub percent: u32,
}

impl Slack {
    pub fn bytes(b: u64) -> Slack {
        Slack {
            bytes: b,
            percent: 0,
        }
    }
    pub fn percent(p: u32) -> Slack {
        Slack {
            bytes: 0,
            percent: p,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub size: Size,
    pub label: String,
    pub uuid: [u8; 16],
    pub hash_seed: [u8; 16],
    /// A jbd2 journal (the read-write "state" profile), and how.
    pub journal: Journal,
    /// Every timestamp (SOURCE_DATE_EPOCH).
    pub epoch: u32,
}

impl Options {
    /// Options with UUID and hash seed derived from `seed`.
    pub fn from_seed(seed: &str, label: &str, size: Size, journal: bool, epoch: u32) -> Self {
        let purpose = format!("ext4:{label}");
        Options {
            size,
            label: label.to_string(),
            uuid: crate::seed::uuid(seed, &format!("{purpose}:uuid")),
            hash_seed: crate::seed::uuid(seed, &format!("{purpose}:hash")),
            journal: if journal {
                Journal::Zeroed
            } else {
                Journal::None
            },
            epoch,
        }
    }
}

/// The jbd2 journal of a read-write filesystem. It is always clean
/// (`s_start` = 0, nothing to replay); the variants differ in what its
/// other blocks hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Journal {
    /// No journal (the read-only profile).
    None,
    /// Every block written: the superblock, whose log starts at
    /// transaction 1, then zeros. Deterministic; what images carry.
    Zeroed,
    /// Only the superblock is written (mke2fs's `lazy_journal_init`); the
    /// other blocks keep whatever the target held, and are not mapped.
    /// The log starts at `sequence`, which the caller draws from the OS's
    /// randomness, as e2fsck does when it resets a journal: recovery only
    /// follows blocks carrying the next expected sequence number, so a
    /// stale transaction left on the device (even by this same image
    /// flashed before) can never continue the new log.
    Lazy { sequence: u32 },
}

impl Journal {
    pub fn present(self) -> bool {
        self != Journal::None
    }
}

/// The largest filesystem forge writes: 16 TiB (2^32 blocks). Every
/// group's bitmaps are planned and written, so time and memory grow with
/// the size (16 TiB: about 9 s and 2.3 GB, 650 MB of metadata); the
/// format itself would go to 2^48 blocks.
pub const MAX_BLOCKS: u64 = 1 << 32;

#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    #[error("a {size}-byte filesystem is too small for this content: {needed} bytes are needed")]
    TooSmall { size: u64, needed: u64 },
    #[error("the content needs {needed} inodes, but a {size}-byte filesystem holds at most {max}")]
    TooManyInodes { needed: u64, max: u64, size: u64 },
    #[error("a {size}-byte filesystem is larger than forge writes (at most 16 TiB: every group's bitmaps are written, so time and memory grow with the size); make it smaller and grow it on the machine (resize2fs)")]
    TooLarge { size: u64 },
    #[error("label {0:?} is longer than 16 bytes")]
    Label(String),
    #[error("writing the filesystem at byte {offset}: {err}")]
    Write { offset: u64, err: std::io::Error },
}

/// Filesystem geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub blocks: u64,
    pub groups: u64,
    pub blocks_per_group: u64,
    pub inodes_per_group: u64,
    pub gdt_blocks: u64,
    pub desc_size: usize,
    pub journal_blocks: u64,
}

impl Geometry {
    pub fn is_64bit(&self) -> bool {
        self.desc_size == 64
    }
    fn itable_blocks(&self) -> u64 {
        self.inodes_per_group / INODES_PER_BLOCK
    }
    fn group_start(&self, g: u64) -> u64 {
        g * self.blocks_per_group
    }
    fn group_len(&self, g: u64) -> u64 {
        (self.blocks - self.group_start(g)).min(self.blocks_per_group)
    }
    pub fn inodes(&self) -> u64 {
        self.groups * self.inodes_per_group
    }
}

/// sparse_super: superblock copies in groups 0, 1 and powers of 3, 5, 7.
pub fn has_super(g: u64) -> bool {
    if g <= 1 {
        return true;
    }
    [3u64, 5, 7].iter().any(|&b| {
        let mut p = b;
        while p < g {
            p *= b;
        }
        p == g
    })
}

fn journal_blocks_for(blocks: u64) -> u64 {
    match blocks {
        0..32768 => 1024,
        32768..262144 => 4096,
        262144..524288 => 8192,
        524288..4194304 => 16384,
        4194304..8388608 => 32768,
        8388608..16777216 => 65536,
        16777216..33554432 => 131072,
        _ => 262144,
    }
}

/// Groups are as large as they may be (32768 blocks), but there must be
/// enough of them to index the inodes (at most 32768 each); a last group
/// too small to hold a superblock backup is left out.
fn geometry(blocks: u64, inodes: u64, journal: bool) -> Geometry {
    let want = blocks
        .div_ceil(MAX_BPG)
        .max(inodes.div_ceil(MAX_IPG))
        .max(1);
    let bpg = blocks.div_ceil(want).next_multiple_of(8).clamp(8, MAX_BPG);
    let mut groups = blocks.div_ceil(bpg).max(1);
    let mut blocks = blocks;
    if groups > 1 && blocks - (groups - 1) * bpg < 64 {
        groups -= 1;
        blocks = groups * bpg;
    }
    let ipg = inodes
        .div_ceil(groups)
        .next_multiple_of(INODES_PER_BLOCK)
        .clamp(INODES_PER_BLOCK, MAX_IPG);
    let desc_size = if blocks > u32::MAX as u64 { 64 } else { 32 };
    Geometry {
        blocks,
        groups,
        blocks_per_group: bpg,
        inodes_per_group: ipg,
        gdt_blocks: (groups * desc_size as u64).div_ceil(BS64),
        desc_size: desc_size as usize,
        journal_blocks: if journal {
            journal_blocks_for(blocks)
        } else {
            0
        },
    }
}

/// Sequential block allocator that steps around superblock backups.
struct Alloc {
    next: u64,
    reserved: Vec<(u64, u64)>, // sorted (start, len)
    used: Vec<(u64, u64)>,
}

impl Alloc {
    fn new(g: &Geometry) -> Self {
        let reserved: Vec<(u64, u64)> = (0..g.groups)
            .filter(|&n| has_super(n))
            .map(|n| (g.group_start(n), 1 + g.gdt_blocks))
            .collect();
        Alloc {
            next: 0,
            used: reserved.clone(),
            reserved,
        }
    }

    /// Skip `next` past any reserved range it falls in.
    fn skip_reserved(&mut self) {
        for &(s, l) in &self.reserved {
            if self.next >= s && self.next < s + l {
                self.next = s + l;
            }
        }
    }

    /// The next reserved start after `next`.
    fn next_reserved(&self) -> u64 {
        self.reserved
            .iter()
            .map(|r| r.0)
            .find(|&s| s >= self.next)
            .unwrap_or(u64::MAX)
    }

    fn mark(&mut self, s: u64, l: u64) {
        match self.used.last_mut() {
            Some(last) if last.0 + last.1 == s => last.1 += l,
            _ => self.used.push((s, l)),
        }
    }

    /// `n` blocks as runs; each run ends before a reserved area.
    fn runs(&mut self, mut n: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        while n > 0 {
            self.skip_reserved();
            let room = self.next_reserved() - self.next;
            let take = room.min(n);
            out.push((self.next, take));
            self.mark(self.next, take);
            self.next += take;
            n -= take;
        }
        out
    }

    /// `n` contiguous blocks.
    fn contiguous(&mut self, n: u64) -> u64 {
        loop {
            self.skip_reserved();
            if self.next_reserved() - self.next >= n {
                let s = self.next;
                self.mark(s, n);
                self.next += n;
                return s;
            }
            // Too little room before the next backup: leave the gap unused.
            self.next = self.next_reserved();
        }
    }

    fn end(&self) -> u64 {
        self.next
            .max(self.used.last().map(|u| u.0 + u.1).unwrap_or(0))
    }
}

#[derive(Clone, Debug)]
enum What {
    Node(NodeId),
    LostFound,
    Journal,
}

/// Everything decided about one inode.
pub(crate) struct InodePlan {
    ino: u32,
    what: What,
    parent: u32,
    links: u32,
    extents: Vec<Extent>,
    tree_blocks: Vec<u64>,
    dir: Option<Shape>,
}

pub(crate) struct GroupMeta {
    block_bitmap: u64,
    inode_bitmap: u64,
    inode_table: u64,
}

/// A complete layout, ready to be written.
pub struct Plan<'t> {
    tree: &'t Tree,
    opts: Options,
    pub geometry: Geometry,
    inodes: Vec<InodePlan>, // inodes[i].ino == i + 1 for ino >= 1
    groups: Vec<GroupMeta>,
    used: Vec<(u64, u64)>,
    /// Directory packings by inode index (None for non-directories).
    dirs: Vec<Option<(Shape, Packed)>>,
}

impl<'t> Plan<'t> {
    pub fn size_bytes(&self) -> u64 {
        self.geometry.blocks * BS64
    }
    pub fn inodes_used(&self) -> u64 {
        self.inodes.len() as u64
    }
    pub fn blocks_used(&self) -> u64 {
        self.used.iter().map(|u| u.1).sum()
    }
    /// The same tree and options, planned at exactly `bytes`.
    pub fn resized(&self, bytes: u64) -> Result<Plan<'t>, Ext4Error> {
        let opts = Options {
            size: Size::Fixed(bytes),
            ..self.opts.clone()
        };
        plan(self.tree, &opts)
    }
}

/// The inode-independent facts about the tree that sizing needs.
struct Census {
    /// Inode order: (what, parent ino) in DFS order; index + 1 = ino.
    order: Vec<(What, u32)>,
    links: Vec<u32>,
    node_ino: Vec<u32>,
    data_blocks: u64,
}

fn census(tree: &Tree, journal: bool) -> Census {
    // Reserved inodes 1..=10, root is 2, journal 8, lost+found 11.
    let mut order: Vec<(What, u32)> = (1..FIRST_INO).map(|_| (What::LostFound, 0)).collect();
    let mut node_ino = vec![0u32; tree.nodes.len()];
    let mut links = vec![0u32; FIRST_INO as usize - 1];
    node_ino[ROOT] = ROOT_INO;
    order[ROOT_INO as usize - 1] = (What::Node(ROOT), ROOT_INO);
    if journal {
        order[JOURNAL_INO as usize - 1] = (What::Journal, 0);
        links[JOURNAL_INO as usize - 1] = 1;
    }
    let has_lf = matches!(&tree.nodes[ROOT].kind, Kind::Dir { children } if children.contains_key(&b"lost+found"[..]));
    if !has_lf {
        order.push((What::LostFound, ROOT_INO));
        links.push(2);
    }
    let mut data_blocks = 0;
    // Iterative DFS (preorder, names sorted), so inode numbers follow paths.
    let mut stack = vec![ROOT];
    while let Some(id) = stack.pop() {
        let my_ino = node_ino[id];
        let Kind::Dir { children } = &tree.nodes[id].kind else {
            continue;
        };
        let mut subdirs = 0;
        for &c in children.values() {
            let node = &tree.nodes[c];
            if matches!(node.kind, Kind::Dir { .. }) {
                subdirs += 1;
            }
            if node_ino[c] == 0 {
                order.push((What::Node(c), my_ino));
                links.push(0);
                node_ino[c] = order.len() as u32;
                data_blocks += match &node.kind {
                    Kind::File { content, size } => match content {
                        Content::Host { segments, .. } => {
                            segments.iter().map(|s| s.1.div_ceil(BS64)).sum()
                        }
                        Content::Bytes(_) => size.div_ceil(BS64),
                    },
                    Kind::Symlink { target } if target.len() >= 60 => 1,
                    _ => 0,
                };
            }
            let ci = node_ino[c] as usize - 1;
            links[ci] += if matches!(node.kind, Kind::Dir { .. }) {
                2
            } else {
                1
            };
        }
        if !has_lf && id == ROOT {
            subdirs += 1;
        }
        links[my_ino as usize - 1] += subdirs + if id == ROOT { 2 } else { 0 };
        for &c in children.values().rev() {
            stack.push(c);
        }
    }
    Census {
        order,
        links,
        node_ino,
        data_blocks,
    }
}

/// Plan the filesystem for `tree`.
pub fn plan<'t>(tree: &'t Tree, opts: &Options) -> Result<Plan<'t>, Ext4Error> {
    if opts.label.len() > 16 {
        return Err(Ext4Error::Label(opts.label.clone()));
    }
    let c = census(tree, opts.journal.present());
    let needed_inodes = c.order.len() as u64;
    let hash_seed = words(&opts.hash_seed);
    // Directory shapes depend only on names: compute once.
    let dirs = dir_shapes(tree, &c, &hash_seed);
    let dir_blocks: u64 = dirs
        .iter()
        .map(|d| d.as_ref().map_or(0, |s| s.0.blocks as u64))
        .sum();
    let estimate = c.data_blocks + dir_blocks + needed_inodes / INODES_PER_BLOCK + 64;

    let mut p = choose(tree, opts, &c, &dirs, estimate, needed_inodes)?;
    p.dirs = dirs;
    Ok(p)
}

fn choose<'t>(
    tree: &'t Tree,
    opts: &Options,
    c: &Census,
    dirs: &[Option<(Shape, Packed)>],
    estimate: u64,
    needed_inodes: u64,
) -> Result<Plan<'t>, Ext4Error> {
    let fit = |blocks: u64, inodes: u64| try_layout(tree, opts, c, dirs, blocks, inodes);
    let auto = |slack: Slack| -> Result<Plan<'t>, Ext4Error> {
        // Grow until the content fits, then add slack and settle again.
        let mut blocks = estimate.max(16);
        let mut inodes = needed_inodes;
        let mut slacked = false;
        loop {
            match fit(blocks, inodes) {
                Ok(p) if slacked => return Ok(p),
                Ok(p) => {
                    let used = p.used_end();
                    let extra = slack
                        .bytes
                        .div_ceil(BS64)
                        .max(used * slack.percent as u64 / 100);
                    blocks = used.max(16) + extra;
                    // Slack for a writable filesystem wants inodes too.
                    inodes = needed_inodes + extra * BS64 / 16384;
                    slacked = true;
                }
                Err(Short(more)) => blocks = (blocks + more).max(blocks + 1),
            }
            if blocks > MAX_BLOCKS {
                return Err(Ext4Error::TooLarge {
                    size: blocks * BS64,
                });
            }
        }
    };
    match opts.size {
        Size::Auto { slack } => auto(slack),
        Size::Fixed(bytes) => {
            let blocks = bytes / BS64;
            if blocks > MAX_BLOCKS {
                return Err(Ext4Error::TooLarge { size: bytes });
            }
            let ratio_inodes = (bytes / 16384).max(needed_inodes);
            match fit(blocks, ratio_inodes).or_else(|_| fit(blocks, needed_inodes)) {
                Ok(p) => Ok(p),
                Err(_) => {
                    let max = max_inodes(blocks);
                    if needed_inodes > max {
                        return Err(Ext4Error::TooManyInodes {
                            needed: needed_inodes,
                            max,
                            size: bytes,
                        });
                    }
                    let minimum = auto(Slack::default())?;
                    Err(Ext4Error::TooSmall {
                        size: bytes,
                        needed: minimum.size_bytes(),
                    })
                }
            }
        }
    }
}

/// The most inodes `blocks` can hold: every group full of inode table,
/// less one block each for the bitmaps, the superblock and descriptors.
fn max_inodes(blocks: u64) -> u64 {
    let g = geometry(blocks, 0, false);
    let overhead = g.groups * 2 + 1 + g.gdt_blocks + 1;
    (g.groups * MAX_IPG).min(blocks.saturating_sub(overhead) * INODES_PER_BLOCK)
}

fn words(b: &[u8; 16]) -> [u32; 4] {
    let mut w = [0u32; 4];
    for (i, x) in w.iter_mut().enumerate() {
        *x = u32::from_le_bytes(b[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
    }
    w
}

/// The layout needs this many more blocks.
struct Short(u64);

fn dir_shapes(tree: &Tree, c: &Census, seed: &[u32; 4]) -> Vec<Option<(Shape, Packed)>> {
    c.order
        .iter()
        .enumerate()
        .map(|(i, (what, _))| match what {
            What::LostFound if i + 1 >= FIRST_INO as usize => {
                Some(dir::shape(&[], seed, LOST_FOUND_BLOCKS))
            }
            What::Node(id) => match &tree.nodes[*id].kind {
                Kind::Dir { children } => {
                    let mut entries: Vec<Entry> = children
                        .iter()
                        .map(|(name, &cid)| Entry {
                            name: name.clone(),
                            ino: c.node_ino[cid],
                            ftype: file_type(&tree.nodes[cid].kind),
                        })
                        .collect();
                    if *id == ROOT
                        && c.order
                            .get(FIRST_INO as usize - 1)
                            .is_some_and(|o| matches!(o.0, What::LostFound))
                    {
                        entries.push(Entry {
                            name: b"lost+found".to_vec(),
                            ino: FIRST_INO,
                            ftype: dir::FT_DIR,
                        });
                    }
                    Some(dir::shape(&entries, seed, 1))
                }
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn file_type(k: &Kind) -> u8 {
    match k {
        Kind::Dir { .. } => dir::FT_DIR,
        Kind::File { .. } => dir::FT_REG,
        Kind::Symlink { .. } => dir::FT_LNK,
        Kind::CharDev { .. } => dir::FT_CHR,
        Kind::BlockDev { .. } => dir::FT_BLK,
        Kind::Fifo => dir::FT_FIFO,
        Kind::Socket => dir::FT_SOCK,
    }
}

impl Plan<'_> {
    fn used_end(&self) -> u64 {
        self.used.last().map(|u| u.0 + u.1).unwrap_or(0)
    }
}

/// The runs of logical blocks `(first, count)` an inode's data takes:
/// the journal's, a file's (a sparse host file's data segments), a long
/// symlink's, a directory's.
fn segments_of(tree: &Tree, what: &What, g: &Geometry, dir: Option<&Shape>) -> Vec<(u64, u64)> {
    let mut segments: Vec<(u64, u64)> = Vec::new();
    match what {
        What::Journal => segments.push((0, g.journal_blocks)),
        What::Node(id) => match &tree.nodes[*id].kind {
            Kind::File { size, content } => match content {
                Content::Host { segments: s, .. } => {
                    segments.extend(s.iter().map(|&(o, l)| (o / BS64, l.div_ceil(BS64))))
                }
                Content::Bytes(_) if *size > 0 => segments.push((0, size.div_ceil(BS64))),
                Content::Bytes(_) => {}
            },
            Kind::Symlink { target } if target.len() >= 60 => segments.push((0, 1)),
            _ => {}
        },
        _ => {}
    }
    if let Some(shape) = dir {
        segments.push((0, shape.blocks as u64));
    }
    segments
}

/// Blocks allocated for `segments`, as extents of at most
/// `MAX_EXTENT` blocks, physically and logically adjacent ones merged.
fn extents_in(a: &mut Alloc, segments: Vec<(u64, u64)>) -> Vec<Extent> {
    let mut extents = Vec::new();
    for (logical, count) in segments {
        let mut l = logical;
        for (start, len) in a.runs(count) {
            let mut off = 0;
            while off < len {
                let n = (len - off).min(inode::MAX_EXTENT as u64);
                extents.push(Extent {
                    logical: l as u32,
                    physical: start + off,
                    len: n as u32,
                });
                l += n;
                off += n;
            }
        }
    }
    let mut merged: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents {
        match merged.last_mut() {
            Some(m)
                if m.logical + m.len == e.logical
                    && m.physical + m.len as u64 == e.physical
                    && m.len + e.len <= inode::MAX_EXTENT =>
            {
                m.len += e.len
            }
            _ => merged.push(e),
        }
    }
    merged
}

fn try_layout<'t>(
    tree: &'t Tree,
    opts: &Options,
    c: &Census,
    dirs: &[Option<(Shape, Packed)>],
    blocks: u64,
    inodes: u64,
) -> Result<Plan<'t>, Short> {
    let g = geometry(blocks, inodes, opts.journal.present());
    if (g.inodes() as usize) < c.order.len() {
        // Only when a trimmed last group held needed inodes.
        return Err(Short(64));
    }
    let mut a = Alloc::new(&g);
    let bb: Vec<u64> = (0..g.groups).map(|_| a.contiguous(1)).collect();
    let ib: Vec<u64> = (0..g.groups).map(|_| a.contiguous(1)).collect();
    let it: Vec<u64> = (0..g.groups)
        .map(|_| a.contiguous(g.itable_blocks()))
        .collect();
    let groups = (0..g.groups as usize)
        .map(|i| GroupMeta {
            block_bitmap: bb[i],
            inode_bitmap: ib[i],
            inode_table: it[i],
        })
        .collect();
    let mut inodes_out = Vec::with_capacity(c.order.len());
    for (i, (what, parent)) in c.order.iter().enumerate() {
        let ino = i as u32 + 1;
        let dir = match what {
            What::LostFound if ino >= FIRST_INO => dirs[i].as_ref().map(|d| d.0),
            What::Node(id) if matches!(tree.nodes[*id].kind, Kind::Dir { .. }) => {
                dirs[i].as_ref().map(|d| d.0)
            }
            _ => None,
        };
        let merged = extents_in(&mut a, segments_of(tree, what, &g, dir.as_ref()));
        let tree_blocks = a
            .runs(inode::tree_blocks_needed(merged.len()) as u64)
            .into_iter()
            .flat_map(|(s, l)| s..s + l)
            .collect();
        inodes_out.push(InodePlan {
            ino,
            what: what.clone(),
            parent: *parent,
            links: c.links[i],
            extents: merged,
            tree_blocks,
            dir,
        });
    }
    if a.end() > g.blocks {
        return Err(Short(a.end() - g.blocks));
    }
    Ok(Plan {
        tree,
        opts: opts.clone(),
        geometry: g,
        inodes: inodes_out,
        groups,
        used: a.used,
        dirs: Vec::new(),
    })
}
