//! A compressed stream of the raw image (zstd, xz): every byte up to the
//! image's size, in order, gaps as zeros, through the compressor the
//! container opens once it knows the image's size.

use std::io::{self, Write};

use super::{Chunk, Container};

/// A compressing writer that is finished once, at the image's end.
pub(super) trait Compressor: Write + Send {
    fn done(self: Box<Self>) -> io::Result<()>;
}

/// Opens the compressor for an image of the given size.
type Open = Box<dyn FnOnce(u64) -> io::Result<Box<dyn Compressor>> + Send>;

pub(super) struct Stream {
    /// What the container is called in messages.
    name: &'static str,
    open: Option<Open>,
    enc: Option<Box<dyn Compressor>>,
    len: u64,
    pos: u64,
}

impl Stream {
    pub(super) fn new(name: &'static str, open: Open) -> Stream {
        Stream {
            name,
            open: Some(open),
            enc: None,
            len: 0,
            pos: 0,
        }
    }

    fn enc(&mut self) -> io::Result<&mut Box<dyn Compressor>> {
        let name = self.name;
        self.enc.as_mut().ok_or_else(|| {
            io::Error::other(format!("internal: {name}: a chunk before the image's size"))
        })
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

impl Container for Stream {
    fn ordered(&self) -> bool {
        true
    }

    fn begin(&mut self, size: u64, _map: &[(u64, u64)]) -> io::Result<()> {
        let open = self
            .open
            .take()
            .ok_or_else(|| io::Error::other(format!("internal: {}: begun twice", self.name)))?;
        self.enc = Some(open(size)?);
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
            Some(enc) => enc.done(),
            None => Err(io::Error::other(format!(
                "internal: {}: finished before it began",
                self.name
            ))),
        }
    }
}
