//! VHD (`formats::vhd`). Fixed: the raw image (written as `raw.rs` writes
//! it) and the footer. Dynamic: chunks come in image order; a 2 MiB block
//! is stored, after the ones before it, when the first non-zero byte of
//! it arrives, so blocks holding only zeros (a journal, empty groups)
//! take no room, as `qemu-img convert` leaves them; the block table
//! (its size known from the disk's) is written last, then the footer.
//! Image order makes the file's layout independent of the thread count.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::raw::Raw;
use super::{Chunk, Container};
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
    /// Dynamic: where the next stored block goes.
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

    /// Block `blk` stored at the end (its sectors all marked present).
    fn store(&mut self, blk: u64) -> io::Result<u64> {
        let at = self.end;
        self.file.write_all_at(&[0xFFu8; BITMAP as usize], at)?;
        self.blocks[blk as usize] = Some(at);
        self.end += BITMAP + BLOCK;
        Ok(at)
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
        self.ty == Type::Dynamic
    }

    fn begin(&mut self, size: u64, map: &[(u64, u64)]) -> io::Result<()> {
        vhd::check_size(size).map_err(invalid)?;
        self.size = size;
        if let Some(raw) = self.raw.as_mut() {
            return raw.begin(size, map);
        }
        self.blocks = vec![None; vhd::table_entries(size) as usize];
        self.end = TABLE_AT + vhd::table_len(size);
        self.file.write_all_at(&self.footer(), 0)?;
        self.file.write_all_at(&vhd::dynamic_header(size), FOOTER)?;
        Ok(())
    }

    fn chunk(&mut self, c: &Chunk, n: usize) -> io::Result<()> {
        if let Some(raw) = self.raw.as_mut() {
            return raw.chunk(c, n);
        }
        for (blk, within, bytes) in super::pieces(c, BLOCK) {
            let base = match self.blocks.get(blk as usize) {
                Some(Some(base)) => *base,
                // Zeros in a block not stored: they read as zeros.
                Some(None) if formats::sys::is_zero(bytes) => continue,
                Some(None) => self.store(blk)?,
                None => {
                    return Err(io::Error::other(format!(
                        "internal: VHD: block {blk} is past the disk's end"
                    )))
                }
            };
            self.file.write_all_at(bytes, base + BITMAP + within)?;
        }
        Ok(())
    }

    fn finish(&mut self) -> io::Result<()> {
        let end = match self.raw.as_mut() {
            Some(raw) => {
                raw.finish()?;
                self.size
            }
            None => {
                let sectors: Vec<Option<u32>> = self
                    .blocks
                    .iter()
                    .map(|b| b.map(|o| (o / 512) as u32))
                    .collect();
                self.file
                    .write_all_at(&vhd::table(self.size, &sectors), TABLE_AT)?;
                self.end
            }
        };
        self.file.write_all_at(&self.footer(), end)?;
        self.file.set_len(end + FOOTER)
    }
}
