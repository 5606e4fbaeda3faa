//! The few raw system calls the formats need, behind safe functions.

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use std::fs::File;
use std::io;

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
