//! A zstd stream of the raw image: every byte up to the image's size, in
//! order, gaps as zeros. Multithreaded mode (the output does not depend
//! on the worker count: checked with the zstd CLI at -T1, -T2 and -T4),
//! with a checksum and the content size in the frame header; levels up to
//! 19 use windows of at most 2^23, so readers need no --long.

use std::fs::File;
use std::io::{self, BufWriter, Write};

use super::{Chunk, Container};

type Encoder = zstd::stream::write::Encoder<'static, BufWriter<File>>;

pub(super) struct Zstd {
    out: Option<File>,
    level: i32,
    enc: Option<Encoder>,
    len: u64,
    pos: u64,
}

impl Zstd {
    pub(super) fn new(out: File, level: i32) -> Zstd {
        Zstd {
            out: Some(out),
            level,
            enc: None,
            len: 0,
            pos: 0,
        }
    }

    fn enc(&mut self) -> io::Result<&mut Encoder> {
        self.enc
            .as_mut()
            .ok_or_else(|| io::Error::other("internal: zstd: a chunk before the image's size"))
    }

    /// Zeros up to byte `to`.
    fn zeros_to(&mut self, to: u64) -> io::Result<()> {
        while self.pos < to {
            let n = (to - self.pos).min(formats::sys::ZEROS.len() as u64) as usize;
            self.enc()?.write_all(&formats::sys::ZEROS[..n])?;
            self.pos += n as u64;
        }
        Ok(())
    }
}

impl Container for Zstd {
    fn ordered(&self) -> bool {
        true
    }

    fn begin(&mut self, size: u64, _map: &[(u64, u64)]) -> io::Result<()> {
        let out = self
            .out
            .take()
            .ok_or_else(|| io::Error::other("internal: zstd: begun twice"))?;
        let mut enc = Encoder::new(BufWriter::with_capacity(4 << 20, out), self.level)?;
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
        enc.multithread(workers as u32)?;
        enc.include_checksum(true)?;
        enc.set_pledged_src_size(Some(size))?;
        self.enc = Some(enc);
        self.len = size;
        Ok(())
    }

    fn chunk(&mut self, c: &Chunk, n: usize) -> io::Result<()> {
        self.zeros_to(c.off)?;
        let enc = self.enc()?;
        let mut r = Ok(());
        c.image_bytes(n, |b| {
            if r.is_ok() {
                r = enc.write_all(b);
            }
        });
        r?;
        self.pos += n as u64;
        Ok(())
    }

    fn finish(&mut self) -> io::Result<()> {
        self.zeros_to(self.len)?;
        match self.enc.take() {
            Some(enc) => enc.finish()?.flush(),
            None => Err(io::Error::other("internal: zstd: finished before it began")),
        }
    }
}
