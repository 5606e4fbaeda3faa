//! Streaming the planned filesystem out: every block the filesystem
//! relies on is written explicitly (zeros included), in ascending order,
//! and recorded, so a bmap of the result maps exactly what matters.

use std::io::SeekFrom;

use super::inode::{self, Extent, Inode};
use super::{csum, dir, Content, Ext4Error, Kind, Plan, What, BS, BS64, FIRST_INO, JOURNAL_INO};
use crate::sink::Sink;

/// What was written: the filesystem's size and the byte ranges (relative
/// to its start) whose content matters.
#[derive(Clone, Debug)]
pub struct Written {
    pub size: u64,
    pub mapped: Vec<(u64, u64)>,
}

const COMPAT_HAS_JOURNAL: u32 = 0x4;
const COMPAT_EXT_ATTR: u32 = 0x8;
const COMPAT_DIR_INDEX: u32 = 0x20;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const RO_SPARSE_SUPER: u32 = 0x1;
const RO_LARGE_FILE: u32 = 0x2;
const RO_HUGE_FILE: u32 = 0x8;
const RO_DIR_NLINK: u32 = 0x20;
const RO_EXTRA_ISIZE: u32 = 0x40;
const RO_METADATA_CSUM: u32 = 0x400;
const FLAGS_SIGNED_HASH: u32 = 0x1;

struct Out<'w, W: Sink + ?Sized> {
    w: &'w mut W,
    base: u64,
    pos: Option<u64>,
    mapped: Vec<(u64, u64)>, // blocks
}

impl<W: Sink + ?Sized> Out<'_, W> {
    /// Extent `e` of a host file of `size` bytes, through the sink.
    fn host(&mut self, e: &Extent, path: &std::path::Path, size: u64) -> Result<(), Ext4Error> {
        let off = self.base + e.physical * BS64;
        let werr = |err| Ext4Error::Write { offset: off, err };
        let span = e.len as u64 * BS64;
        let from = e.logical as u64 * BS64;
        let len = span.min(size.saturating_sub(from));
        if self.pos != Some(off) {
            self.w.seek(SeekFrom::Start(off)).map_err(werr)?;
        }
        self.w.put_host(path, from, len, span, size).map_err(werr)?;
        self.pos = Some(off + span);
        let n = e.len as u64;
        match self.mapped.last_mut() {
            Some(m) if m.0 + m.1 == e.physical => m.1 += n,
            _ => self.mapped.push((e.physical, n)),
        }
        Ok(())
    }

    fn at(&mut self, block: u64, data: &[u8]) -> Result<(), Ext4Error> {
        debug_assert_eq!(data.len() % BS, 0);
        let off = self.base + block * BS64;
        let werr = |err| Ext4Error::Write { offset: off, err };
        if self.pos != Some(off) {
            self.w.seek(SeekFrom::Start(off)).map_err(werr)?;
        }
        self.w.write_all(data).map_err(werr)?;
        self.pos = Some(off + data.len() as u64);
        let n = (data.len() / BS) as u64;
        match self.mapped.last_mut() {
            Some(m) if m.0 + m.1 == block => m.1 += n,
            _ => self.mapped.push((block, n)),
        }
        Ok(())
    }
}

impl Plan<'_> {
    fn fs_seed(&self) -> u32 {
        csum::fs_seed(&self.opts.uuid)
    }

    /// The byte ranges (relative to the filesystem's start) that `write`
    /// writes, known before writing: superblocks with their descriptors,
    /// bitmaps, the used part of each inode table, extent tree blocks and
    /// every extent (a zeroed journal's zeros included; of a lazy one, its
    /// superblock). Sorted and merged.
    pub fn mapped(&self) -> Vec<(u64, u64)> {
        let g = &self.geometry;
        let mut blocks: Vec<(u64, u64)> = Vec::new();
        for grp in (0..g.groups).filter(|&grp| super::has_super(grp)) {
            blocks.push((g.group_start(grp), 1 + g.gdt_blocks));
        }
        for (grp, gm) in self.groups.iter().enumerate() {
            blocks.push((gm.block_bitmap, 1));
            blocks.push((gm.inode_bitmap, 1));
            let first = grp as u64 * g.inodes_per_group;
            let used = (self.inodes.len() as u64)
                .saturating_sub(first)
                .min(g.inodes_per_group);
            if used > 0 {
                blocks.push((gm.inode_table, used.div_ceil(super::INODES_PER_BLOCK)));
            }
        }
        let lazy = matches!(self.opts.journal, super::Journal::Lazy { .. });
        for ip in &self.inodes {
            blocks.extend(ip.tree_blocks.iter().map(|&b| (b, 1)));
            if lazy && matches!(ip.what, What::Journal) {
                let first = ip.extents.iter().find(|e| e.logical == 0);
                blocks.extend(first.map(|e| (e.physical, 1)));
                continue;
            }
            blocks.extend(ip.extents.iter().map(|e| (e.physical, e.len as u64)));
        }
        crate::ranges::merge(blocks.into_iter().map(|(b, n)| (b * BS64, n * BS64)))
    }

    /// Write the filesystem into `out` starting at byte `base`, in
    /// ascending order. Writes go straight to `out` (whole blocks, often
    /// small): give it a buffered target (`forge image`'s own output
    /// assembles chunks; a plain file wants a `BufWriter`).
    pub fn write<W: Sink + ?Sized>(&self, out: &mut W, base: u64) -> Result<Written, Ext4Error> {
        let g = &self.geometry;
        let fs_seed = self.fs_seed();
        // Inode tables (and extent trees, whose roots live in the inodes).
        let mut tree_blocks: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut itable = vec![0u8; self.inodes.len() * inode::INODE_SIZE];
        let mut dirs_per_group = vec![0u64; g.groups as usize];
        for (i, ip) in self.inodes.iter().enumerate() {
            let raw = self.encode_inode(ip, fs_seed, &mut tree_blocks);
            itable[i * inode::INODE_SIZE..(i + 1) * inode::INODE_SIZE].copy_from_slice(&raw);
            if ip.dir.is_some() {
                dirs_per_group[((ip.ino as u64 - 1) / g.inodes_per_group) as usize] += 1;
            }
        }
        let (bitmaps, free_blocks, free_inodes) = self.bitmaps();
        let gdt = self.descriptors(
            &free_blocks,
            &free_inodes,
            &dirs_per_group,
            &bitmaps,
            fs_seed,
        );

        let mut items = self.metadata(&gdt, &bitmaps, &free_blocks, &free_inodes, &itable, fs_seed);
        drop(itable);
        for (b, data) in tree_blocks {
            items.push((b, Item::Bytes(data)));
        }
        // Every extent on its own: a file whose data jumps over metadata
        // (a backup superblock) is written in two places, each in order.
        for (i, ip) in self.inodes.iter().enumerate() {
            for (k, e) in ip.extents.iter().enumerate() {
                items.push((e.physical, Item::Extent(i, k)));
            }
        }
        items.sort_by_key(|it| it.0);

        let mut o = Out {
            w: out,
            base,
            pos: None,
            mapped: Vec::new(),
        };
        for (block, item) in items {
            match item {
                Item::Bytes(b) => o.at(block, &b)?,
                Item::Extent(i, k) => self.write_extent(&mut o, i, k)?,
            }
        }
        let end = base + g.blocks * BS64;
        o.w.flush()
            .map_err(|err| Ext4Error::Write { offset: end, err })?;
        Ok(Written {
            size: g.blocks * BS64,
            mapped: o
                .mapped
                .iter()
                .map(|&(b, n)| (b * BS64, n * BS64))
                .collect(),
        })
    }

    /// The metadata blocks, each where it goes: the superblock and its
    /// copies with the descriptors, every group's bitmaps and its part
    /// of the inode table.
    fn metadata(
        &self,
        gdt: &[u8],
        bitmaps: &[(Vec<u8>, Vec<u8>)],
        free_blocks: &[u64],
        free_inodes: &[u64],
        itable: &[u8],
        fs_seed: u32,
    ) -> Vec<(u64, Item)> {
        let g = &self.geometry;
        let mut items: Vec<(u64, Item)> = Vec::new();
        for grp in 0..g.groups {
            if super::has_super(grp) {
                let mut head = vec![0u8; BS];
                let sb = self.superblock(grp, free_blocks, free_inodes, fs_seed);
                let at = if grp == 0 { 1024 } else { 0 };
                head[at..at + 1024].copy_from_slice(&sb);
                head.extend_from_slice(gdt);
                items.push((g.group_start(grp), Item::Bytes(head)));
            }
        }
        for (grp, gm) in self.groups.iter().enumerate() {
            items.push((gm.block_bitmap, Item::Bytes(bitmaps[grp].0.clone())));
            items.push((gm.inode_bitmap, Item::Bytes(bitmaps[grp].1.clone())));
            let first = grp as u64 * g.inodes_per_group;
            let used = (self.inodes.len() as u64)
                .saturating_sub(first)
                .min(g.inodes_per_group);
            if used > 0 {
                let bytes = used.div_ceil(super::INODES_PER_BLOCK) * BS64;
                let lo = (first as usize) * inode::INODE_SIZE;
                let mut chunk = itable[lo..(lo + bytes as usize).min(itable.len())].to_vec();
                chunk.resize(bytes as usize, 0);
                items.push((gm.inode_table, Item::Bytes(chunk)));
            }
        }
        items
    }

    fn encode_inode(
        &self,
        ip: &super::InodePlan,
        fs_seed: u32,
        tree_blocks: &mut Vec<(u64, Vec<u8>)>,
    ) -> [u8; inode::INODE_SIZE] {
        let data_blocks: u64 = ip.extents.iter().map(|e| e.len as u64).sum();
        let mut of = InodeOf {
            ip,
            seed: csum::inode_seed(fs_seed, ip.ino, 0),
            time: self.opts.epoch,
            sectors: (data_blocks + ip.tree_blocks.len() as u64) * (BS64 / 512),
            tree_blocks,
        };
        let i = match &ip.what {
            What::Journal => Inode {
                mode: inode::S_IFREG | 0o600,
                uid: 0,
                gid: 0,
                size: self.geometry.journal_blocks * BS64,
                time: of.time,
                links: 1,
                sectors: of.sectors,
                flags: inode::FL_EXTENTS,
                block: of.ext_root(),
            },
            What::LostFound if ip.ino >= FIRST_INO => of.dir(0o700, 0, 0),
            What::LostFound => {
                // Unused reserved inode: zero, but with a valid checksum.
                let mut b = [0u8; inode::INODE_SIZE];
                inode::set_checksum(&mut b, ip.ino, fs_seed);
                return b;
            }
            What::Node(id) => of.node(&self.tree.nodes[*id]),
        };
        inode::encode(&i, ip.ino, fs_seed)
    }

    /// Extent `k` of inode `idx`, at its physical blocks.
    fn write_extent<W: Sink + ?Sized>(
        &self,
        o: &mut Out<W>,
        idx: usize,
        k: usize,
    ) -> Result<(), Ext4Error> {
        let ip = &self.inodes[idx];
        let extents = &ip.extents[k..=k];
        let seed = csum::inode_seed(self.fs_seed(), ip.ino, 0);
        let mem: Vec<u8> = match &ip.what {
            What::Journal => return self.write_journal(o, extents),
            What::LostFound => {
                let shape = ip.dir.expect("lost+found is a directory");
                let packed = &self.dirs[idx].as_ref().expect("packed").1;
                dir::encode(shape, packed, ip.ino, ip.parent, seed)
            }
            What::Node(id) => match &self.tree.nodes[*id].kind {
                Kind::Dir { .. } => {
                    let shape = ip.dir.expect("directory has a shape");
                    let packed = &self.dirs[idx].as_ref().expect("packed").1;
                    dir::encode(shape, packed, ip.ino, ip.parent, seed)
                }
                Kind::Symlink { target } => target.clone(),
                Kind::File {
                    content: Content::Bytes(b),
                    ..
                } => b.to_vec(),
                Kind::File {
                    content: Content::Host { path, .. },
                    size,
                } => {
                    for e in extents {
                        o.host(e, path, *size)?;
                    }
                    return Ok(());
                }
                _ => return Ok(()),
            },
        };
        for e in extents {
            let lo = (e.logical as usize * BS).min(mem.len());
            let hi = ((e.logical + e.len) as usize * BS).min(mem.len());
            let mut chunk = mem[lo..hi].to_vec();
            chunk.resize(e.len as usize * BS, 0);
            o.at(e.physical, &chunk)?;
        }
        Ok(())
    }

    fn write_journal<W: Sink + ?Sized>(
        &self,
        o: &mut Out<W>,
        extents: &[Extent],
    ) -> Result<(), Ext4Error> {
        // jbd2 superblock v2 (big-endian), clean: s_start = 0. A zeroed
        // journal's other blocks are zeros, written explicitly so stale
        // device data can never look like a transaction; a lazy one's are
        // left alone, its random first sequence number guarding instead.
        let (sequence, zeroed) = match self.opts.journal {
            super::Journal::Lazy { sequence } => (sequence, false),
            _ => (1, true),
        };
        let mut jsb = vec![0u8; BS];
        let be = |b: &mut [u8], o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_be_bytes());
        be(&mut jsb, 0x0, 0xC03B_3998);
        be(&mut jsb, 0x4, 4);
        be(&mut jsb, 0xC, BS as u32);
        be(&mut jsb, 0x10, self.geometry.journal_blocks as u32);
        be(&mut jsb, 0x14, 1);
        be(&mut jsb, 0x18, sequence);
        jsb[0x30..0x40].copy_from_slice(&self.opts.uuid);
        be(&mut jsb, 0x40, 1);
        let zeros = vec![0u8; 256 * BS];
        for e in extents {
            let mut b = e.physical;
            let end = e.physical + e.len as u64;
            if e.logical == 0 {
                o.at(b, &jsb)?;
                b += 1;
            }
            while zeroed && b < end {
                let n = (end - b).min(256);
                o.at(b, &zeros[..n as usize * BS])?;
                b += n;
            }
        }
        Ok(())
    }

    /// Per group: (block bitmap, inode bitmap), plus free counts.
    #[allow(clippy::type_complexity)]
    fn bitmaps(&self) -> (Vec<(Vec<u8>, Vec<u8>)>, Vec<u64>, Vec<u64>) {
        let g = &self.geometry;
        let mut out = Vec::new();
        let mut free_b = Vec::new();
        let mut free_i = Vec::new();
        let used_inodes = self.inodes.len() as u64;
        for grp in 0..g.groups {
            let start = g.group_start(grp);
            let len = g.group_len(grp);
            let mut bb = vec![0xFFu8; BS];
            bb[..(g.blocks_per_group / 8) as usize].fill(0);
            // Padding past the group's end stays set.
            for b in len..g.blocks_per_group {
                bb[(b / 8) as usize] |= 1 << (b % 8);
            }
            let mut used = 0;
            for &(s, l) in &self.used {
                let lo = s.max(start);
                let hi = (s + l).min(start + len);
                for b in lo..hi {
                    let r = b - start;
                    bb[(r / 8) as usize] |= 1 << (r % 8);
                }
                used += hi.saturating_sub(lo);
            }
            free_b.push(len - used);
            let mut ib = vec![0xFFu8; BS];
            ib[..(g.inodes_per_group / 8) as usize].fill(0);
            let first = grp * g.inodes_per_group;
            let n = used_inodes.saturating_sub(first).min(g.inodes_per_group);
            for r in 0..n {
                ib[(r / 8) as usize] |= 1 << (r % 8);
            }
            free_i.push(g.inodes_per_group - n);
            out.push((bb, ib));
        }
        (out, free_b, free_i)
    }

    fn descriptors(
        &self,
        free_b: &[u64],
        free_i: &[u64],
        dirs: &[u64],
        bitmaps: &[(Vec<u8>, Vec<u8>)],
        fs_seed: u32,
    ) -> Vec<u8> {
        let g = &self.geometry;
        let ds = g.desc_size;
        let mut out = vec![0u8; g.gdt_blocks as usize * BS];
        for (grp, gm) in self.groups.iter().enumerate() {
            let d = &mut out[grp * ds..(grp + 1) * ds];
            let lo32 = |d: &mut [u8], o: usize, v: u64| {
                d[o..o + 4].copy_from_slice(&(v as u32).to_le_bytes())
            };
            let lo16 = |d: &mut [u8], o: usize, v: u64| {
                d[o..o + 2].copy_from_slice(&(v as u16).to_le_bytes())
            };
            let bcs = csum::crc(
                fs_seed,
                &bitmaps[grp].0[..(g.blocks_per_group / 8) as usize],
            );
            let ics = csum::crc(
                fs_seed,
                &bitmaps[grp].1[..(g.inodes_per_group / 8) as usize],
            );
            let unused = free_i[grp];
            lo32(d, 0x00, gm.block_bitmap);
            lo32(d, 0x04, gm.inode_bitmap);
            lo32(d, 0x08, gm.inode_table);
            lo16(d, 0x0C, free_b[grp]);
            lo16(d, 0x0E, free_i[grp]);
            lo16(d, 0x10, dirs[grp]);
            lo16(d, 0x12, 0); // flags
            lo16(d, 0x18, bcs as u64);
            lo16(d, 0x1A, ics as u64);
            lo16(d, 0x1C, unused);
            if ds == 64 {
                lo32(d, 0x20, gm.block_bitmap >> 32);
                lo32(d, 0x24, gm.inode_bitmap >> 32);
                lo32(d, 0x28, gm.inode_table >> 32);
                lo16(d, 0x2C, free_b[grp] >> 16);
                lo16(d, 0x2E, free_i[grp] >> 16);
                lo16(d, 0x30, dirs[grp] >> 16);
                lo16(d, 0x32, unused >> 16);
                lo16(d, 0x38, (bcs >> 16) as u64);
                lo16(d, 0x3A, (ics >> 16) as u64);
            }
            let mut c = csum::crc(fs_seed, &(grp as u32).to_le_bytes());
            c = csum::crc(c, &d[..0x1E]);
            c = csum::crc(c, &[0, 0]);
            c = csum::crc(c, &d[0x20..ds]);
            d[0x1E..0x20].copy_from_slice(&(c as u16).to_le_bytes());
        }
        out
    }

    fn superblock(&self, group: u64, free_b: &[u64], free_i: &[u64], fs_seed: u32) -> [u8; 1024] {
        let g = &self.geometry;
        let o = &self.opts;
        let mut s = [0u8; 1024];
        let w16 = |s: &mut [u8], off: usize, v: u64| {
            s[off..off + 2].copy_from_slice(&(v as u16).to_le_bytes())
        };
        let w32 = |s: &mut [u8], off: usize, v: u64| {
            s[off..off + 4].copy_from_slice(&(v as u32).to_le_bytes())
        };
        let free_blocks: u64 = free_b.iter().sum();
        let free_inodes: u64 = free_i.iter().sum();
        w32(&mut s, 0x00, g.inodes());
        w32(&mut s, 0x04, g.blocks);
        w32(&mut s, 0x0C, free_blocks);
        w32(&mut s, 0x10, free_inodes);
        w32(&mut s, 0x14, 0); // first data block
        w32(&mut s, 0x18, 2); // log block size: 1024 << 2
        w32(&mut s, 0x1C, 2);
        w32(&mut s, 0x20, g.blocks_per_group);
        w32(&mut s, 0x24, g.blocks_per_group);
        w32(&mut s, 0x28, g.inodes_per_group);
        w32(&mut s, 0x30, o.epoch as u64); // wtime
        w16(&mut s, 0x36, 0xFFFF); // max mount count: -1
        w16(&mut s, 0x38, 0xEF53);
        w16(&mut s, 0x3A, 1); // clean
        w16(&mut s, 0x3C, 1); // errors: continue
        w32(&mut s, 0x40, o.epoch as u64); // lastcheck
        w32(&mut s, 0x4C, 1); // dynamic revision
        w32(&mut s, 0x54, FIRST_INO as u64);
        w16(&mut s, 0x58, inode::INODE_SIZE as u64);
        w16(&mut s, 0x5A, group);
        let mut compat = COMPAT_DIR_INDEX | COMPAT_EXT_ATTR;
        if g.journal_blocks > 0 {
            compat |= COMPAT_HAS_JOURNAL;
        }
        let mut incompat = INCOMPAT_FILETYPE | INCOMPAT_EXTENTS | INCOMPAT_FLEX_BG;
        if g.is_64bit() {
            incompat |= INCOMPAT_64BIT;
        }
        let ro = RO_SPARSE_SUPER
            | RO_LARGE_FILE
            | RO_HUGE_FILE
            | RO_DIR_NLINK
            | RO_EXTRA_ISIZE
            | RO_METADATA_CSUM;
        w32(&mut s, 0x5C, compat as u64);
        w32(&mut s, 0x60, incompat as u64);
        w32(&mut s, 0x64, ro as u64);
        s[0x68..0x78].copy_from_slice(&o.uuid);
        s[0x78..0x78 + o.label.len()].copy_from_slice(o.label.as_bytes());
        if g.journal_blocks > 0 {
            w32(&mut s, 0xE0, JOURNAL_INO as u64);
            // Backup of the journal inode's i_block, i_size_high, i_size.
            let j = &self.inodes[JOURNAL_INO as usize - 1];
            let t = inode::build_tree(&j.extents, &j.tree_blocks, 0);
            s[0x10C..0x10C + 60].copy_from_slice(&t.root);
            let size = g.journal_blocks * BS64;
            w32(&mut s, 0x10C + 60, size >> 32);
            w32(&mut s, 0x10C + 64, size);
            s[0xFD] = 1; // s_jnl_backup_type: EXT3_JNL_BACKUP_BLOCKS
        }
        s[0xEC..0xFC].copy_from_slice(&o.hash_seed);
        s[0xFC] = 1; // default hash: half_md4
        w16(&mut s, 0xFE, if g.is_64bit() { 64 } else { 0 });
        w32(&mut s, 0x108, o.epoch as u64); // mkfs time
        w32(&mut s, 0x150, g.blocks >> 32);
        w32(&mut s, 0x158, free_blocks >> 32);
        w16(&mut s, 0x15C, inode::EXTRA_ISIZE as u64);
        w16(&mut s, 0x15E, inode::EXTRA_ISIZE as u64);
        w32(&mut s, 0x160, FLAGS_SIGNED_HASH as u64);
        s[0x174] = 4; // log groups per flex
        s[0x175] = 1; // checksum type: crc32c
        let _ = fs_seed;
        let c = csum::crc(!0, &s[..0x3FC]);
        s[0x3FC..].copy_from_slice(&c.to_le_bytes());
        s
    }
}

enum Item {
    Bytes(Vec<u8>),
    /// (inode index, extent index)
    Extent(usize, usize),
}

/// One inode being encoded: its plan, and where the blocks of its extent
/// tree go.
struct InodeOf<'a> {
    ip: &'a super::InodePlan,
    seed: u32,
    time: u32,
    sectors: u64,
    tree_blocks: &'a mut Vec<(u64, Vec<u8>)>,
}

impl InodeOf<'_> {
    /// The extent tree's root (in the inode); its other blocks noted.
    fn ext_root(&mut self) -> [u8; 60] {
        let t = inode::build_tree(&self.ip.extents, &self.ip.tree_blocks, self.seed);
        self.tree_blocks.extend(t.blocks);
        t.root
    }

    fn dir(&mut self, perm: u16, uid: u32, gid: u32) -> Inode {
        let shape = self.ip.dir.expect("directory has a shape");
        let flags = inode::FL_EXTENTS
            | if shape.htree_levels > 0 {
                inode::FL_INDEX
            } else {
                0
            };
        Inode {
            mode: inode::S_IFDIR | perm,
            uid,
            gid,
            size: shape.blocks as u64 * BS64,
            time: self.time,
            // dir_nlink: past 65000 subdirectories the count is 1.
            links: if self.ip.links >= 65000 {
                1
            } else {
                self.ip.links as u16
            },
            sectors: self.sectors,
            flags,
            block: self.ext_root(),
        }
    }

    /// The inode of a tree node.
    fn node(&mut self, n: &crate::tree::Node) -> Inode {
        let (time, links, sectors) = (self.time, self.ip.links as u16, self.sectors);
        let base = |mode: u16, size: u64, flags: u32, block: [u8; 60]| Inode {
            mode: mode | n.perm,
            uid: n.uid,
            gid: n.gid,
            size,
            time,
            links,
            sectors,
            flags,
            block,
        };
        match &n.kind {
            Kind::Dir { .. } => self.dir(n.perm, n.uid, n.gid),
            Kind::File { size, .. } => {
                base(inode::S_IFREG, *size, inode::FL_EXTENTS, self.ext_root())
            }
            Kind::Symlink { target } if target.len() < 60 => {
                let mut b = [0u8; 60];
                b[..target.len()].copy_from_slice(target);
                base(inode::S_IFLNK, target.len() as u64, 0, b)
            }
            Kind::Symlink { target } => {
                let len = target.len() as u64;
                base(inode::S_IFLNK, len, inode::FL_EXTENTS, self.ext_root())
            }
            Kind::CharDev { major, minor } => {
                base(inode::S_IFCHR, 0, 0, inode::device_block(*major, *minor))
            }
            Kind::BlockDev { major, minor } => {
                base(inode::S_IFBLK, 0, 0, inode::device_block(*major, *minor))
            }
            Kind::Fifo => base(inode::S_IFIFO, 0, 0, [0; 60]),
            Kind::Socket => base(inode::S_IFSOCK, 0, 0, [0; 60]),
        }
    }
}
