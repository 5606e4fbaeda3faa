//! VHDX, dynamic (`formats::vhdx`). Chunks come in image order; a 2 MiB
//! payload block is stored, after the ones before it, when the first
//! non-zero byte of it arrives (blocks of zeros take no room, as with a
//! dynamic VHD); the first 4 MiB (identifier, headers, region tables,
//! metadata) are written first, the BAT last. Image order makes the
//! file's layout independent of the thread count.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{Chunk, Container};
use formats::vhdx::{self, BLOCK};

pub(super) struct Vhdx {
    /// Headers and BAT.
    file: File,
    /// Payload blocks (O_DIRECT where the filesystem allows: every piece
    /// is whole 4 KiB blocks of an aligned chunk at a MiB-aligned place).
    data: File,
    size: u64,
    uuid: [u8; 16],
    /// Where each stored payload block starts in the file.
    blocks: Vec<Option<u64>>,
    /// Where the next stored block goes.
    end: u64,
}

impl Vhdx {
    pub(super) fn open(file: &File, path: &Path, uuid: [u8; 16]) -> io::Result<Vhdx> {
        let data = match formats::sys::open_direct_write(path)? {
            Some(f) => f,
            None => file.try_clone()?,
        };
        Ok(Vhdx {
            file: file.try_clone()?,
            data,
            size: 0,
            uuid,
            blocks: Vec::new(),
            end: 0,
        })
    }
}

impl Container for Vhdx {
    fn ordered(&self) -> bool {
        true
    }

    fn begin(&mut self, size: u64, _map: &[(u64, u64)]) -> io::Result<()> {
        vhdx::check_size(size)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        self.size = size;
        self.blocks = vec![None; vhdx::blocks(size) as usize];
        self.end = vhdx::data_at(size);
        for (at, b) in formats::sys::nonzero_blocks(&vhdx::head(size, self.uuid), 0) {
            self.file.write_all_at(b, at)?;
        }
        Ok(())
    }

    fn chunk(&mut self, c: &Chunk, _n: usize) -> io::Result<()> {
        for (blk, within, bytes) in super::pieces(c, BLOCK) {
            let base = match self.blocks.get(blk as usize) {
                Some(Some(base)) => *base,
                Some(None) if formats::sys::is_zero(bytes) => continue,
                Some(None) => {
                    let at = self.end;
                    self.blocks[blk as usize] = Some(at);
                    self.end += BLOCK;
                    at
                }
                None => {
                    return Err(io::Error::other(format!(
                        "internal: VHDX: block {blk} is past the disk's end"
                    )))
                }
            };
            let at = base + within;
            self.data
                .write_all_at(bytes, at)
                .map_err(|e| io::Error::new(e.kind(), format!("writing at byte {at}: {e}")))?;
        }
        Ok(())
    }

    fn finish(&mut self) -> io::Result<()> {
        let bat = vhdx::bat(self.size, &self.blocks);
        for (at, b) in formats::sys::nonzero_blocks(&bat, vhdx::BAT_AT) {
            self.file.write_all_at(b, at)?;
        }
        self.file.set_len(self.end)
    }
}
