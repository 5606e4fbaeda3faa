//! A compressed image written in one pass: the partition writers write in
//! ascending order (each filesystem writer does; the layouts write their
//! tables in order), so their output is a stream. Gaps become zeros fed to
//! zstd, and the bmap's ranges and SHA-256s — and the partitions' hashes —
//! come from the same bytes on their way to the compressor. No raw image is
//! written or read back.

use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};

use formats::bmap::{self, BLOCK, MAX_RANGE_BLOCKS};

/// Which 4 KiB blocks were written, and the SHA-256 of each bmap piece,
/// from bytes fed in order (`touched` = written, not a gap).
#[derive(Default)]
struct BmapStream {
    pos: u64,
    /// The current block's bytes while it is incomplete, and whether any
    /// of them was written.
    partial: Vec<u8>,
    touched: bool,
    /// The open piece: first block, block count, running hash.
    piece: Option<(u64, u64, Sha256)>,
    done: Vec<(u64, u64, String)>,
}

impl BmapStream {
    fn feed(&mut self, mut data: &[u8], touched: bool) {
        while !data.is_empty() {
            let in_block = (self.pos % BLOCK) as usize;
            if in_block == 0 && data.len() as u64 >= BLOCK {
                let n = data.len() - data.len() % BLOCK as usize;
                self.blocks(self.pos / BLOCK, &data[..n], touched);
                self.pos += n as u64;
                data = &data[n..];
                continue;
            }
            let take = (BLOCK as usize - in_block).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            self.touched |= touched;
            self.pos += take as u64;
            data = &data[take..];
            if self.pos.is_multiple_of(BLOCK) {
                self.end_partial();
            }
        }
    }

    /// The block being filled, as it is (the last block of an image whose
    /// size is not a multiple of the block size is hashed as far as it goes).
    fn end_partial(&mut self) {
        if !self.partial.is_empty() {
            let block = std::mem::take(&mut self.partial);
            let touched = std::mem::take(&mut self.touched);
            self.blocks((self.pos - 1) / BLOCK, &block, touched);
        }
    }

    /// Whole blocks from block `first` on, all written or all gap.
    fn blocks(&mut self, mut first: u64, mut data: &[u8], touched: bool) {
        if !touched {
            self.close();
            return;
        }
        while !data.is_empty() {
            let (_, count, h) = self.piece.get_or_insert_with(|| (first, 0, Sha256::new()));
            let room = ((MAX_RANGE_BLOCKS - *count) * BLOCK) as usize;
            let take = room.min(data.len());
            h.update(&data[..take]);
            let n = (take as u64).div_ceil(BLOCK);
            *count += n;
            first += n;
            data = &data[take..];
            if *count == MAX_RANGE_BLOCKS {
                self.close();
            }
        }
    }

    fn close(&mut self) {
        if let Some((first, count, h)) = self.piece.take() {
            self.done
                .push((first, first + count - 1, format!("{:x}", h.finalize())));
        }
    }
}

/// The compressing output of `lay`: see the module comment.
pub(crate) struct Stream<'f> {
    enc: zstd::stream::write::Encoder<'static, BufWriter<&'f mut File>>,
    /// Bytes handed to the compressor so far, and where the next write goes.
    pos: u64,
    cursor: u64,
    len: u64,
    bmap: BmapStream,
    /// Byte ranges whose SHA-256 is wanted (the partitions).
    watches: Vec<(u64, u64, Sha256)>,
}

static ZEROS: [u8; 1 << 16] = [0; 1 << 16];

/// (offset, length, SHA-256 hex) of a watched range.
pub(crate) type Watched = (u64, u64, String);

impl<'f> Stream<'f> {
    pub(crate) fn new(out: &'f mut File, level: i32) -> io::Result<Stream<'f>> {
        let mut enc =
            zstd::stream::write::Encoder::new(BufWriter::with_capacity(4 << 20, out), level)?;
        // Multithreaded: the output is the same for any worker count.
        enc.multithread(2)?;
        // Levels up to 19 use windows of at most 2^23: readers need no --long.
        enc.include_checksum(true)?;
        Ok(Stream {
            enc,
            pos: 0,
            cursor: 0,
            len: 0,
            bmap: BmapStream::default(),
            watches: Vec::new(),
        })
    }

    fn emit(&mut self, data: &[u8], touched: bool) -> io::Result<()> {
        self.enc.write_all(data)?;
        self.bmap.feed(data, touched);
        let (s, e) = (self.pos, self.pos + data.len() as u64);
        for (off, len, h) in &mut self.watches {
            let (a, b) = (s.max(*off), e.min(*off + *len));
            if a < b {
                h.update(&data[(a - s) as usize..(b - s) as usize]);
            }
        }
        self.pos = e;
        Ok(())
    }

    fn zeros_to(&mut self, to: u64) -> io::Result<()> {
        while self.pos < to {
            let n = (to - self.pos).min(ZEROS.len() as u64) as usize;
            self.emit(&ZEROS[..n], false)?;
        }
        Ok(())
    }

    /// Finish the image at its `set_len` size: (bmap text, SHA-256 of each
    /// watched range in the order watched).
    pub(crate) fn finish(mut self) -> io::Result<(String, Vec<Watched>)> {
        let len = self.len;
        self.zeros_to(len)?;
        self.bmap.end_partial();
        self.bmap.close();
        let text = bmap::render(len, &self.bmap.done);
        let hashes = self
            .watches
            .drain(..)
            .map(|(o, l, h)| (o, l, format!("{:x}", h.finalize())))
            .collect();
        let mut w = self.enc.finish()?;
        w.flush()?;
        Ok((text, hashes))
    }
}

impl Write for Stream<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.cursor < self.pos {
            return Err(io::Error::other(format!(
                "internal: a write at byte {} after byte {} was streamed (writes must ascend)",
                self.cursor, self.pos
            )));
        }
        self.zeros_to(self.cursor)?;
        self.emit(data, true)?;
        self.cursor = self.pos;
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Stream<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.cursor = match to {
            SeekFrom::Start(n) => n,
            SeekFrom::Current(d) => self
                .cursor
                .checked_add_signed(d)
                .ok_or_else(|| io::Error::other("seek before the start"))?,
            SeekFrom::End(d) => self
                .len
                .checked_add_signed(d)
                .ok_or_else(|| io::Error::other("seek before the start"))?,
        };
        Ok(self.cursor)
    }
}

impl super::Out for Stream<'_> {
    fn set_len(&mut self, n: u64) -> io::Result<()> {
        self.len = n;
        self.enc.set_pledged_src_size(Some(n))
    }
    fn watch(&mut self, off: u64, len: u64) {
        self.watches.push((off, len, Sha256::new()));
    }
}
