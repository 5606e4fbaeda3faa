//! What the filesystem writers write into: any `Write + Seek`, which may
//! also take a host file's bytes by reference (and read them itself,
//! later, on another thread, where it can hash them while they are in
//! cache) instead of being handed a copy.

use std::io::{self, BufWriter, Cursor, Seek, Write};
use std::path::Path;

pub trait Sink: Write + Seek {
    /// Write `span` bytes at the current position: the first `len` are
    /// bytes `off..off + len` of the host file `path` (whose size must
    /// still be `size` when it is read), the rest zeros. `Ok(false)`: this
    /// sink wants the bytes themselves, and the caller writes them.
    fn put_host(
        &mut self,
        path: &Path,
        off: u64,
        len: u64,
        span: u64,
        size: u64,
    ) -> io::Result<bool> {
        let _ = (path, off, len, span, size);
        Ok(false)
    }
}

impl Sink for std::fs::File {}
impl<T: AsRef<[u8]>> Sink for Cursor<T> where Cursor<T>: Write {}
impl<W: Write + Seek> Sink for BufWriter<W> {}
impl<S: Sink + ?Sized> Sink for &mut S {
    fn put_host(
        &mut self,
        path: &Path,
        off: u64,
        len: u64,
        span: u64,
        size: u64,
    ) -> io::Result<bool> {
        (**self).put_host(path, off, len, span, size)
    }
}
