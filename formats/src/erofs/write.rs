//! Streaming the planned EROFS image out in ascending order: the
//! superblock and the metadata area block by block (inodes and their inline
//! tails, read from the host as they come), then every inode's data
//! blocks. Every byte up to the end is written (padding as zeros).

use std::io::SeekFrom;
use std::os::unix::fs::FileExt;

use super::{
    ErofsError, Ino, Plan, BS, COMPACT, FLAT_INLINE, MAGIC, META_BLKADDR, SB_END, ZERO_PADDING,
};
use crate::sink::{named, Sink};
use crate::tree::{Content, Kind, Node};

/// What was written: the filesystem's size and the byte ranges (relative
/// to its start) whose content matters (all of it).
#[derive(Clone, Debug)]
pub struct Written {
    pub size: u64,
    pub mapped: Vec<(u64, u64)>,
}

impl Plan<'_> {
    /// Write the filesystem into `out` starting at byte `base`.
    pub fn write<W: Sink + ?Sized>(&self, out: &mut W, base: u64) -> Result<Written, ErofsError> {
        let werr = |offset: u64| move |err| ErofsError::Write { offset, err };
        out.seek(SeekFrom::Start(base)).map_err(werr(base))?;
        self.write_meta(out, base)?;
        for ino in self.inodes.iter().filter(|i| i.blocks > 0) {
            let at = base + ino.blkaddr * BS;
            self.write_data(out, ino).map_err(werr(at))?;
        }
        Ok(Written {
            size: self.size_bytes(),
            mapped: self.mapped(),
        })
    }

    fn superblock(&self) -> [u8; 128] {
        let o = &self.opts;
        let mut sb = [0u8; 128];
        sb[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        sb[12] = 12; // blkszbits: 4096
        let root = self.inodes[0].nid();
        sb[14..16].copy_from_slice(&(root as u16).to_le_bytes());
        sb[16..24].copy_from_slice(&(self.inodes.len() as u64).to_le_bytes());
        sb[24..32].copy_from_slice(&o.epoch.to_le_bytes());
        sb[36..40].copy_from_slice(&(self.blocks as u32).to_le_bytes());
        sb[40..44].copy_from_slice(&(META_BLKADDR as u32).to_le_bytes());
        sb[48..64].copy_from_slice(&o.uuid);
        sb[64..64 + o.label.len()].copy_from_slice(o.label.as_bytes());
        if self.inodes.iter().any(|i| i.packed.is_some()) {
            sb[80..84].copy_from_slice(&ZERO_PADDING.to_le_bytes());
        }
        sb
    }

    /// The metadata area, from block 1 to the first data block: each
    /// block assembled in memory and written whole.
    fn write_meta<W: Sink + ?Sized>(&self, out: &mut W, base: u64) -> Result<(), ErofsError> {
        let first = META_BLKADDR * BS;
        let end = self.meta_end.div_ceil(BS) * BS;
        let mut block = vec![0u8; BS as usize];
        // Block 0 holds the superblock, then the first inodes.
        block[1024..SB_END as usize].copy_from_slice(&self.superblock());
        let mut at = first; // the block being assembled
        let flush = |out: &mut W, block: &mut Vec<u8>, at: u64| {
            out.write_all(block)
                .map_err(|err| ErofsError::Write {
                    offset: base + at,
                    err,
                })
                .map(|_| block.fill(0))
        };
        // In place order: a small inode may sit in an earlier block's end.
        let mut order: Vec<usize> = (0..self.inodes.len()).collect();
        order.sort_by_key(|&i| self.inodes[i].pos);
        for i in order {
            let ino = &self.inodes[i];
            while ino.pos >= at + BS {
                flush(out, &mut block, at)?;
                at += BS;
            }
            let node = self.tree.node(ino.node);
            let mut bytes = self.inode_bytes(ino, node, i as u32 + 1);
            if ino.inline > 0 {
                bytes.extend(self.tail(ino, node).map_err(|err| ErofsError::Write {
                    offset: base + ino.pos,
                    err,
                })?);
            }
            if let Some(p) = &ino.packed {
                bytes.extend(super::zindex::index_bytes(
                    &p.extents,
                    ino.size,
                    ino.blkaddr,
                ));
            }
            // An inode and its tail share a block; a compressed file's
            // indexes may run on into the next ones.
            let mut off = (ino.pos - at) as usize;
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let n = rest.len().min(BS as usize - off);
                block[off..off + n].copy_from_slice(&rest[..n]);
                rest = &rest[n..];
                off += n;
                if off == BS as usize {
                    flush(out, &mut block, at)?;
                    at += BS;
                    off = 0;
                }
            }
        }
        while at < end.max(first + BS) {
            flush(out, &mut block, at)?;
            at += BS;
        }
        Ok(())
    }

    /// The on-disk inode (compact or extended).
    fn inode_bytes(&self, ino: &Ino, node: &Node, number: u32) -> Vec<u8> {
        let fmt = (ino.extended as u16) | (ino.layout << 1);
        let mode = mode_of(node);
        let u = match &node.kind {
            Kind::CharDev { major, minor } | Kind::BlockDev { major, minor } => {
                (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
            }
            // A compressed file's i_u counts its blocks.
            _ if ino.packed.is_some() => ino.blocks as u32,
            _ => ino.blkaddr as u32,
        };
        let mut b = Vec::with_capacity(64);
        b.extend(fmt.to_le_bytes());
        b.extend(0u16.to_le_bytes()); // no xattrs
        b.extend(mode.to_le_bytes());
        if ino.extended {
            b.extend(0u16.to_le_bytes());
            b.extend(ino.size.to_le_bytes());
            b.extend(u.to_le_bytes());
            b.extend(number.to_le_bytes());
            b.extend(node.uid.to_le_bytes());
            b.extend(node.gid.to_le_bytes());
            b.extend(self.opts.epoch.to_le_bytes());
            b.extend(0u32.to_le_bytes());
            b.extend(ino.nlink.to_le_bytes());
            b.resize(64, 0);
        } else {
            b.extend((ino.nlink as u16).to_le_bytes());
            b.extend((ino.size as u32).to_le_bytes());
            b.extend(0u32.to_le_bytes());
            b.extend(u.to_le_bytes());
            b.extend(number.to_le_bytes());
            b.extend((node.uid as u16).to_le_bytes());
            b.extend((node.gid as u16).to_le_bytes());
            b.resize(COMPACT as usize, 0);
        }
        b
    }

    /// The bytes of `node` from `from` on, `len` of them.
    fn content(&self, ino: &Ino, node: &Node, from: u64, len: u64) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        match &node.kind {
            Kind::File { .. } => file_bytes(&node.kind, from, &mut buf)?,
            Kind::Symlink { target } => {
                buf.copy_from_slice(&target[from as usize..(from + len) as usize])
            }
            Kind::Dir { .. } => {
                let d = &self.dirs[&ino.node];
                buf.copy_from_slice(&d[from as usize..(from + len) as usize]);
            }
            _ => {}
        }
        Ok(buf)
    }

    /// The inline tail of `ino`.
    fn tail(&self, ino: &Ino, node: &Node) -> std::io::Result<Vec<u8>> {
        debug_assert_eq!(ino.layout, FLAT_INLINE);
        self.content(ino, node, ino.blocks * BS, ino.inline)
    }

    /// The whole data blocks of `ino` (a plain file's last one padded).
    fn write_data<W: Sink + ?Sized>(&self, out: &mut W, ino: &Ino) -> std::io::Result<()> {
        let node = self.tree.node(ino.node);
        let span = ino.blocks * BS;
        if let (Some(p), Some(s)) = (&ino.packed, &self.scratch) {
            for &(at, len) in &p.runs {
                out.put_host(s.file.path(), at, len, len, s.size)?;
            }
            return Ok(());
        }
        let len = span.min(ino.size);
        if let Kind::File {
            content: Content::Host { path, .. },
            size,
        } = &node.kind
        {
            return out.put_host(path, 0, len, span, *size);
        }
        let mut b = self.content(ino, node, 0, len)?;
        b.resize(span as usize, 0);
        out.write_all(&b)
    }
}

/// `buf.len()` bytes of a file at `from`: read from the host (which must
/// still be the size the tree says) or the tree's own bytes.
pub(crate) fn file_bytes(kind: &Kind, from: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let end = from as usize + buf.len();
    match kind {
        Kind::File {
            content: Content::Host { path, .. },
            size,
        } => {
            let f = std::fs::File::open(path).map_err(|e| named(path, e))?;
            if f.metadata().map_err(|e| named(path, e))?.len() != *size {
                return Err(crate::sink::changed(path, *size));
            }
            f.read_exact_at(buf, from).map_err(|e| named(path, e))
        }
        Kind::File {
            content: Content::Bytes(b),
            ..
        } => {
            buf.copy_from_slice(&b[from as usize..end]);
            Ok(())
        }
        _ => Ok(()),
    }
}

/// i_mode: the type bits and the permissions.
fn mode_of(node: &Node) -> u16 {
    let ty: u16 = match node.kind {
        Kind::Dir { .. } => 0o040000,
        Kind::File { .. } => 0o100000,
        Kind::Symlink { .. } => 0o120000,
        Kind::CharDev { .. } => 0o020000,
        Kind::BlockDev { .. } => 0o060000,
        Kind::Fifo => 0o010000,
        Kind::Socket => 0o140000,
    };
    ty | (node.perm & 0o7777)
}
