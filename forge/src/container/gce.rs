//! Google Compute Engine: `disk.raw` in a gzip-compressed tar, the raw
//! image as a GNU old-format sparse file (`formats::gnu_sparse`; its data
//! regions are the image's map), as Google's image import requires.
//!
//! The gzip stream is one member whose deflate data is cut every 1 MiB
//! of input (as pigz does): each piece compressed on its own, on every
//! core, ending byte-aligned (a full flush), so the bytes depend on the
//! input alone, never on the thread count; the CRC-32 and length of the
//! whole input close it.

use flate2::{Compress, Compression, FlushCompress};
use rayon::prelude::*;
use std::fs::File;
use std::io::{self, BufWriter, Write};

use super::{Chunk, Container};
use formats::{gnu_sparse, tar};

const PIECE: usize = 1 << 20;
/// Pieces compressed together.
const BATCH: usize = 8 * PIECE;

/// A deterministic gzip member compressed in parallel pieces.
struct ParallelGzip {
    out: BufWriter<File>,
    pending: Vec<u8>,
    crc: crc32fast::Hasher,
    len: u64,
}

impl ParallelGzip {
    fn new(file: &File) -> io::Result<ParallelGzip> {
        let mut out = BufWriter::with_capacity(4 << 20, file.try_clone()?);
        // No name, no time, "unknown" system: the same bytes anywhere.
        out.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255])?;
        Ok(ParallelGzip {
            out,
            pending: Vec::with_capacity(BATCH),
            crc: crc32fast::Hasher::new(),
            len: 0,
        })
    }

    fn write(&mut self, mut b: &[u8]) -> io::Result<()> {
        while !b.is_empty() {
            let k = (BATCH - self.pending.len()).min(b.len());
            self.pending.extend_from_slice(&b[..k]);
            b = &b[k..];
            if self.pending.len() == BATCH {
                self.flush_pending()?;
            }
        }
        Ok(())
    }

    fn flush_pending(&mut self) -> io::Result<()> {
        self.crc.update(&self.pending);
        self.len += self.pending.len() as u64;
        let pieces: Vec<io::Result<Vec<u8>>> = self
            .pending
            .par_chunks(PIECE)
            .map(|p| deflate(p, FlushCompress::Full))
            .collect();
        for p in pieces {
            self.out.write_all(&p?)?;
        }
        self.pending.clear();
        Ok(())
    }

    fn finish(&mut self) -> io::Result<()> {
        self.flush_pending()?;
        self.out.write_all(&deflate(&[], FlushCompress::Finish)?)?;
        let crc = std::mem::take(&mut self.crc).finalize();
        self.out.write_all(&crc.to_le_bytes())?;
        self.out.write_all(&(self.len as u32).to_le_bytes())?;
        self.out.flush()
    }
}

/// `input` as raw deflate on its own, ended by `flush`.
fn deflate(input: &[u8], flush: FlushCompress) -> io::Result<Vec<u8>> {
    super::compress_all(Compress::new(Compression::default(), false), input, flush)
}

pub(super) struct Gce {
    gz: ParallelGzip,
    mtime: u64,
    /// The data regions still to store (image byte ranges).
    regions: std::collections::VecDeque<(u64, u64)>,
    stored: u64,
    chunk: Vec<u8>,
}

impl Gce {
    pub(super) fn open(file: &File, unix_time: u32) -> io::Result<Gce> {
        Ok(Gce {
            gz: ParallelGzip::new(file)?,
            mtime: u64::from(unix_time),
            regions: Default::default(),
            stored: 0,
            chunk: Vec::new(),
        })
    }

    /// The regions' bytes before `upto` (image offset), `bytes` holding
    /// the image from `from` (zeros before it).
    fn store(&mut self, upto: u64, from: u64, bytes: &[u8]) -> io::Result<()> {
        while let Some(&(at, len)) = self.regions.front() {
            if at >= upto {
                break;
            }
            let end = (at + len).min(upto);
            for piece in [(at, end.min(from)), (at.max(from), end)] {
                if piece.0 >= piece.1 {
                    continue;
                }
                let n = (piece.1 - piece.0) as usize;
                if piece.0 < from {
                    zeros(&mut self.gz, n)?;
                } else {
                    let a = (piece.0 - from) as usize;
                    self.gz.write(&bytes[a..a + n])?;
                }
                self.stored += n as u64;
            }
            if end == at + len {
                self.regions.pop_front();
            } else {
                self.regions[0] = (end, at + len - end);
            }
        }
        Ok(())
    }
}

fn zeros(gz: &mut ParallelGzip, mut n: usize) -> io::Result<()> {
    while n > 0 {
        let k = n.min(formats::sys::ZEROS.len());
        gz.write(&formats::sys::ZEROS[..k])?;
        n -= k;
    }
    Ok(())
}

impl Container for Gce {
    fn ordered(&self) -> bool {
        true
    }

    fn begin(&mut self, size: u64, map: &[(u64, u64)]) -> io::Result<()> {
        let regions = gnu_sparse::regions(size, map);
        let h = gnu_sparse::header("disk.raw", size, &regions, self.mtime);
        self.gz.write(&h)?;
        self.regions = regions.into_iter().filter(|r| r.1 > 0).collect();
        Ok(())
    }

    fn chunk(&mut self, c: &Chunk, n: usize) -> io::Result<()> {
        let mut bytes = std::mem::take(&mut self.chunk);
        bytes.clear();
        c.image_bytes(n, |b| bytes.extend_from_slice(b));
        let r = self.store(c.off + n as u64, c.off, &bytes);
        self.chunk = bytes;
        r
    }

    fn finish(&mut self) -> io::Result<()> {
        self.store(u64::MAX, u64::MAX, &[])?;
        self.gz.write(tar::padding(self.stored))?;
        self.gz.write(&tar::END)?;
        self.gz.finish()
    }
}
