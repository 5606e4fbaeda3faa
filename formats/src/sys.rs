//! The few raw system calls the formats need, behind safe functions.

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use std::fs::File;
use std::io;

/// Zeros to hand out for the parts of an image nobody wrote (forge's
/// assembler and its containers).
pub static ZEROS: [u8; 1 << 16] = [0; 1 << 16];

/// Whether every byte of `b` is zero: compared with [`ZEROS`] a piece at
/// a time (memcmp's vector loop; a byte-by-byte `all` made the zero
/// checks of `forge vm`'s 1 GiB /var disks most of its time).
pub fn is_zero(b: &[u8]) -> bool {
    b.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

/// Offset of the next data at or after `pos`, or None past the last data.
pub fn seek_data(f: &File, pos: u64) -> io::Result<Option<u64>> {
    match lseek(f, pos as i64, Whence::SeekData) {
        Ok(p) => Ok(Some(p as u64)),
        Err(Errno::ENXIO) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Offset of the next hole at or after `pos` (EOF counts as a hole).
pub fn seek_hole(f: &File, pos: u64) -> io::Result<u64> {
    lseek(f, pos as i64, Whence::SeekHole)
        .map(|p| p as u64)
        .map_err(Into::into)
}

/// Alignment of buffers and offsets for O_DIRECT I/O.
pub const DIRECT_ALIGN: usize = 4096;

/// A zeroed heap buffer whose usable slice starts on a 4 KiB boundary, as
/// O_DIRECT needs.
pub struct Aligned {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    pub fn new(len: usize) -> Aligned {
        let raw = vec![0u8; len + DIRECT_ALIGN];
        let off = raw.as_ptr().align_offset(DIRECT_ALIGN);
        Aligned { raw, off, len }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The first `n` bytes.
    pub fn slice(&mut self, n: usize) -> &mut [u8] {
        assert!(n <= self.len);
        &mut self.raw[self.off..self.off + n]
    }
    pub fn get(&self, n: usize) -> &[u8] {
        &self.raw[self.off..self.off + n]
    }
}

/// `path` opened for writing with O_DIRECT (no page cache), or None where
/// its filesystem does not support that (EINVAL).
pub fn open_direct_write(path: &std::path::Path) -> io::Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A buffer from a pool, shared read-only by several threads (as
/// `Arc<Lease<T>>`): when the last of them drops it, it goes back to the
/// pool's channel to be filled again. Whoever takes it from the pool
/// resets it.
pub struct Lease<T> {
    item: Option<T>,
    back: std::sync::mpsc::Sender<T>,
}

impl<T> Lease<T> {
    pub fn new(item: T, back: std::sync::mpsc::Sender<T>) -> Lease<T> {
        Lease {
            item: Some(item),
            back,
        }
    }
}

impl<T> std::ops::Deref for Lease<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.item
            .as_ref()
            .expect("a lease holds its item until dropped")
    }
}

/// Only its holder writes: before it is shared.
impl<T> std::ops::DerefMut for Lease<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.item
            .as_mut()
            .expect("a lease holds its item until dropped")
    }
}

impl<T> Drop for Lease<T> {
    fn drop(&mut self) {
        if let Some(item) = self.item.take() {
            // A pool that is gone needs nothing back.
            let _ = self.back.send(item);
        }
    }
}

/// Buffers lent out as [`Lease`]s and given back when dropped: at most
/// `cap` are ever made; past that, taking one waits for one to come back.
/// (forge's image output and flash's reader both fill 4 MiB chunks this way.)
pub struct Pool<T> {
    cap: usize,
    made: usize,
    free: std::sync::mpsc::Receiver<T>,
    back: std::sync::mpsc::Sender<T>,
}

impl<T> Pool<T> {
    pub fn new(cap: usize) -> Pool<T> {
        let (back, free) = std::sync::mpsc::channel();
        Pool {
            cap: cap.max(1),
            made: 0,
            free,
            back,
        }
    }

    /// A buffer as its last user left it (or new, from `make`): the taker
    /// resets it. Waits while all `cap` are out; since the pool keeps a
    /// sender itself, the wait ends when any lease is dropped.
    pub fn take(&mut self, make: impl FnOnce() -> T) -> Lease<T> {
        let item = match self.free.try_recv() {
            Ok(item) => item,
            Err(_) if self.made < self.cap => {
                self.made += 1;
                make()
            }
            Err(_) => self
                .free
                .recv()
                .expect("the pool holds a sender, so its channel stays open"),
        };
        Lease::new(item, self.back.clone())
    }
}

/// The non-zero 4 KiB blocks of `bytes` (to be placed at `at`), merged
/// into runs: what must be written for the file to hold `bytes`, the rest
/// left as holes that read as zeros (tables are mostly zeros).
pub fn nonzero_blocks(bytes: &[u8], at: u64) -> Vec<(u64, &[u8])> {
    let mut out: Vec<(u64, usize, usize)> = Vec::new();
    for (i, b) in bytes.chunks(4096).enumerate() {
        if is_zero(b) {
            continue;
        }
        let (lo, hi) = (i * 4096, i * 4096 + b.len());
        match out.last_mut() {
            Some(r) if r.2 == lo => r.2 = hi,
            _ => out.push((at + lo as u64, lo, hi)),
        }
    }
    out.into_iter()
        .map(|(o, lo, hi)| (o, &bytes[lo..hi]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_sees_one_nonzero_byte_anywhere_in_any_length() {
        let mut b = vec![0u8; (1 << 17) + 5];
        assert!(is_zero(&b) && is_zero(&[]));
        for at in [0, 4095, 1 << 16, (1 << 17) + 4] {
            b[at] = 1;
            assert!(!is_zero(&b), "byte {at}");
            assert!(is_zero(&b[..at]), "before byte {at}");
            b[at] = 0;
        }
    }

    #[test]
    fn a_pool_makes_at_most_cap_and_reuses_what_comes_back() {
        let mut p: Pool<Vec<u8>> = Pool::new(2);
        let mut made = 0;
        let mut make = || {
            made += 1;
            vec![0u8; 4]
        };
        let mut a = p.take(&mut make);
        a[0] = 9;
        let b = p.take(&mut make);
        drop(a);
        let c = p.take(&mut make);
        assert_eq!(c[0], 9, "the returned buffer, as its user left it");
        drop((b, c));
        assert_eq!(made, 2);
    }
}
