//! What the filesystem writers write into: any `Write + Seek` that can
//! also take a host file's bytes by reference. The default reads and
//! writes them at once; forge's image output overrides it to read them
//! later, on another thread, where it hashes them while they are in cache.

use std::fs::File;
use std::io::{self, Cursor, Read, Seek, SeekFrom, Write};
use std::path::Path;

/// The error for a host file whose size is not the one planned.
pub fn changed(path: &Path, expected: u64) -> io::Error {
    io::Error::other(format!(
        "{}: file changed size while it was read (expected {expected} bytes)",
        path.display()
    ))
}

/// An I/O error reading `path`, naming it.
pub fn named(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

pub trait Sink: Write + Seek {
    /// Write `span` bytes at the current position: the first `len` are
    /// bytes `off..off + len` of the host file `path` (whose size must
    /// still be `size` when it is read), the rest zeros. Errors name the
    /// file.
    fn put_host(
        &mut self,
        path: &Path,
        off: u64,
        len: u64,
        span: u64,
        size: u64,
    ) -> io::Result<()> {
        let mut f = File::open(path).map_err(|e| named(path, e))?;
        if f.metadata().map_err(|e| named(path, e))?.len() != size {
            return Err(changed(path, size));
        }
        f.seek(SeekFrom::Start(off)).map_err(|e| named(path, e))?;
        let mut buf = vec![0u8; span.min(1 << 20) as usize];
        let mut done = 0u64;
        while done < span {
            let n = (span - done).min(buf.len() as u64) as usize;
            let from_file = len.saturating_sub(done).min(n as u64) as usize;
            let b = &mut buf[..n];
            f.read_exact(&mut b[..from_file])
                .map_err(|e| match e.kind() {
                    io::ErrorKind::UnexpectedEof => changed(path, size),
                    _ => named(path, e),
                })?;
            b[from_file..].fill(0);
            self.write_all(b)?;
            done += n as u64;
        }
        Ok(())
    }
}

impl Sink for File {}
impl<T: AsRef<[u8]>> Sink for Cursor<T> where Cursor<T>: Write {}
impl<W: Write + Seek> Sink for io::BufWriter<W> {}
impl<S: Sink + ?Sized> Sink for &mut S {
    fn put_host(
        &mut self,
        path: &Path,
        off: u64,
        len: u64,
        span: u64,
        size: u64,
    ) -> io::Result<()> {
        (**self).put_host(path, off, len, span, size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_put_host_copies_the_range_and_pads_with_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let mut c = Cursor::new(vec![0xAAu8; 3_200_000]);
        c.seek(SeekFrom::Start(10)).unwrap();
        c.put_host(&p, 5, 2_500_000, 3_000_000, 3_000_000).unwrap();
        let v = c.into_inner();
        assert_eq!(v[..10], [0xAA; 10]);
        assert!(v[10..2_500_010] == data[5..2_500_005]);
        assert!(v[2_500_010..3_000_010].iter().all(|&b| b == 0));
        assert!(v[3_000_010..].iter().all(|&b| b == 0xAA));
    }

    #[test]
    fn a_host_file_of_another_size_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"12345").unwrap();
        let mut c = Cursor::new(Vec::new());
        let e = c.put_host(&p, 0, 6, 4096, 6).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}: file changed size while it was read (expected 6 bytes)",
                p.display()
            )
        );
    }
}

/// What an extent holds: bytes, or only zeros (kept as a length).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    Data(Vec<u8>),
    Zeros(u64),
}

impl Piece {
    pub fn len(&self) -> u64 {
        match self {
            Piece::Data(v) => v.len() as u64,
            Piece::Zeros(n) => *n,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Writes kept in memory as ascending extents (offset, piece): what a
/// writer produces for a target that is written elsewhere later (flash
/// compiles a device's state filesystem this way). Runs of zeros of at
/// least [`Extents::ZERO_RUN`] bytes are kept as lengths (a journal is
/// mostly zeros). Writes must ascend, as every writer here does; a write
/// that goes back is an error.
#[derive(Default)]
pub struct Extents {
    pos: u64,
    extents: Vec<(u64, Piece)>,
}

impl Extents {
    pub const ZERO_RUN: u64 = 64 << 10;

    /// The extents: data, and zero runs of at least [`Extents::ZERO_RUN`].
    pub fn into_extents(self) -> Vec<(u64, Piece)> {
        let mut out: Vec<(u64, Piece)> = Vec::new();
        for (o, p) in self.extents {
            // A short zero run is data again, joined to its neighbours.
            let p = match p {
                Piece::Zeros(n) if n < Self::ZERO_RUN => Piece::Data(vec![0; n as usize]),
                p => p,
            };
            match (out.last_mut(), p) {
                (Some((lo, Piece::Data(v))), Piece::Data(b)) if *lo + v.len() as u64 == o => {
                    v.extend_from_slice(&b)
                }
                (_, p) => out.push((o, p)),
            }
        }
        out
    }
}

impl Write for Extents {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        if b.is_empty() {
            return Ok(0);
        }
        let zeros = crate::sys::is_zero(b);
        match self.extents.last_mut() {
            Some((o, p)) if *o + p.len() > self.pos => {
                return Err(io::Error::other(format!(
                    "a write at byte {} goes back before byte {}",
                    self.pos,
                    *o + p.len()
                )))
            }
            Some((o, Piece::Zeros(n))) if zeros && *o + *n == self.pos => *n += b.len() as u64,
            Some((o, Piece::Data(v))) if !zeros && *o + v.len() as u64 == self.pos => {
                v.extend_from_slice(b)
            }
            _ if zeros => self.extents.push((self.pos, Piece::Zeros(b.len() as u64))),
            _ => self.extents.push((self.pos, Piece::Data(b.to_vec()))),
        }
        self.pos += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where a seek moves a sink that has no end (it is being written):
/// `what` names it in the errors.
pub fn seek_in(pos: u64, to: SeekFrom, what: &str) -> io::Result<u64> {
    match to {
        SeekFrom::Start(p) => Ok(p),
        SeekFrom::Current(d) => pos
            .checked_add_signed(d)
            .ok_or_else(|| io::Error::other(format!("{what}: seek before 0"))),
        SeekFrom::End(_) => Err(io::Error::other(format!("{what}: no end to seek from"))),
    }
}

impl Seek for Extents {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = seek_in(self.pos, to, "an extent list")?;
        Ok(self.pos)
    }
}

impl Sink for Extents {}

#[cfg(test)]
mod extent_tests {
    use super::*;

    #[test]
    fn zero_runs_are_lengths_short_ones_data_and_going_back_is_an_error() {
        let mut e = Extents::default();
        e.write_all(&[1; 4096]).unwrap();
        e.write_all(&[0; 4096]).unwrap(); // short: data again
        e.write_all(&[2; 4096]).unwrap();
        e.seek(SeekFrom::Start(1 << 20)).unwrap();
        for _ in 0..64 {
            e.write_all(&[0; 4096]).unwrap();
        }
        e.write_all(&[3; 512]).unwrap();
        assert!(e.seek(SeekFrom::Start(0)).is_ok());
        assert!(e.write_all(&[9]).is_err(), "a write that goes back");
        let x = e.into_extents();
        assert_eq!(x.len(), 3);
        assert_eq!(x[0].0, 0);
        assert_eq!(x[0].1.len(), 3 * 4096);
        assert_eq!(x[1], (1 << 20, Piece::Zeros(64 * 4096)));
        assert_eq!(x[2], ((1 << 20) + 64 * 4096, Piece::Data(vec![3; 512])));
    }
}
