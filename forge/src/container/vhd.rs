//! VHD (`formats::vhd`). Fixed: the raw image (written as `raw.rs` writes
//! it) and the footer. Dynamic: the header and the block table are laid
//! out from the block map before the first chunk (a block is stored when
//! the map touches it), then each chunk's touched blocks go to their
//! block's place, the rest of a fresh file reading as zeros; the footer
//! last.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::raw::Raw;
use super::{Chunk, Container};
use formats::bmap::BLOCK as FS_BLOCK;
use formats::vhd::{self, Type, BITMAP, BLOCK, FOOTER, TABLE_AT};

pub(super) struct Vhd {
    ty: Type,
    /// Fixed: the raw part.
    raw: Option<Raw>,
    file: File,
    size: u64,
    unix_time: u32,
    uuid: [u8; 16],
    /// Dynamic: where each stored block's bitmap starts in the file.
    blocks: Vec<Option<u64>>,
    end: u64,
}

impl Vhd {
    pub(super) fn open(
        ty: Type,
        file: &File,
        path: &Path,
        unix_time: u32,
        uuid: [u8; 16],
    ) -> io::Result<Vhd> {
        Ok(Vhd {
            ty,
            raw: match ty {
                Type::Fixed => Some(Raw::open(file, path)?),
                Type::Dynamic => None,
            },
            file: file.try_clone()?,
            size: 0,
            unix_time,
            uuid,
            blocks: Vec::new(),
            end: 0,
        })
    }

    fn footer(&self) -> [u8; 512] {
        vhd::footer(self.ty, self.size, self.unix_time, self.uuid)
    }
}

fn invalid(e: vhd::VhdError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
}

impl Container for Vhd {
    fn ordered(&self) -> bool {
        false
    }

    fn begin(&mut self, size: u64, map: &[(u64, u64)]) -> io::Result<()> {
        vhd::check_size(size).map_err(invalid)?;
        self.size = size;
        if let Some(raw) = self.raw.as_mut() {
            return raw.begin(size, map);
        }
        let n = vhd::table_entries(size) as usize;
        let mut stored = vec![false; n];
        for &(off, len) in map {
            if len > 0 {
                for b in off / BLOCK..=(off + len - 1) / BLOCK {
                    stored[b as usize] = true;
                }
            }
        }
        let mut at = TABLE_AT + vhd::table_len(size);
        self.blocks = stored
            .iter()
            .map(|&s| {
                s.then(|| {
                    let here = at;
                    at += BITMAP + BLOCK;
                    here
                })
            })
            .collect();
        self.end = at;
        let sectors: Vec<Option<u32>> = self
            .blocks
            .iter()
            .map(|b| b.map(|o| (o / 512) as u32))
            .collect();
        self.file.set_len(self.end + FOOTER)?;
        self.file.write_all_at(&self.footer(), 0)?;
        self.file.write_all_at(&vhd::dynamic_header(size), FOOTER)?;
        self.file
            .write_all_at(&vhd::table(size, &sectors), TABLE_AT)?;
        let bitmap = [0xFFu8; BITMAP as usize];
        for o in self.blocks.iter().flatten() {
            self.file.write_all_at(&bitmap, *o)?;
        }
        Ok(())
    }

    fn chunk(&mut self, c: &Chunk, n: usize) -> io::Result<()> {
        if let Some(raw) = self.raw.as_mut() {
            return raw.chunk(c, n);
        }
        for (a, b) in c.touched_runs() {
            // A run, cut where it crosses a 2 MiB block.
            let (mut at, end) = (c.off + a as u64 * FS_BLOCK, c.off + b as u64 * FS_BLOCK);
            while at < end {
                let blk = at / BLOCK;
                let upto = ((blk + 1) * BLOCK).min(end);
                let Some(Some(base)) = self.blocks.get(blk as usize) else {
                    return Err(io::Error::other(format!(
                        "internal: VHD: byte {at} was written but its block is not in the map"
                    )));
                };
                let lo = (at - c.off) as usize;
                let hi = (upto - c.off) as usize;
                let dest = base + BITMAP + (at - blk * BLOCK);
                self.file.write_all_at(&c.bytes()[lo..hi], dest)?;
                at = upto;
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> io::Result<()> {
        let end = match self.raw.as_mut() {
            Some(raw) => {
                raw.finish()?;
                self.size
            }
            None => self.end,
        };
        self.file.write_all_at(&self.footer(), end)?;
        self.file.set_len(end + FOOTER)
    }
}
