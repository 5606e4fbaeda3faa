//! The devices an image is written to: the [`BlockDevice`] seam, and the
//! real one, a whole disk opened exclusively, locked and re-identified.
//! Tests put an in-memory disk ([`crate::memdisk`]) or a fault-injecting
//! wrapper behind the same seam.

use anyhow::{anyhow, Context, Result};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::ioctl;
use crate::preflight::Target;
use crate::refusal::{Check, Refused};

/// Where an image goes: a block device, or in tests a device with faults.
pub trait BlockDevice: Send + Sync {
    fn name(&self) -> &str;
    fn size(&self) -> u64;
    fn sector_size(&self) -> u64;
    /// One positional write of sector-aligned bytes from an aligned buffer;
    /// may write fewer bytes than given (a short write).
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<usize>;
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    fn sync(&self) -> io::Result<()>;
    /// Drop cached blocks so that reads reach the medium (BLKFLSBUF).
    fn drop_cache(&self) -> io::Result<()>;
    /// Zeros over `len` bytes at `off` (both sector-aligned), written from
    /// a zero buffer. (BLKZEROOUT was tried: on a loop device it made the
    /// read-back of those zeros slower than writing them; on SD cards the
    /// kernel writes zeros for it anyway.)
    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        write_zeros(self, off, len)
    }
    /// Make the kernel see the new partition table.
    fn announce(&self) {}
}

/// How a transfer of many bytes stopped short.
#[derive(Debug)]
pub enum Short {
    /// The device moved `done` bytes, then none.
    Stuck { done: usize },
    /// A short transfer of `n` bytes at `done`, not whole sectors.
    Unaligned { done: usize, n: usize },
    /// An error at `done` bytes in.
    Failed { done: usize, err: io::Error },
}

/// The one loop every read or write of many bytes on a device goes
/// through: `op(done)` moves bytes from `done` on and says how many; an
/// interrupted call (EINTR) is retried; a short transfer goes on from
/// where it stopped, and must be whole `unit`s (sectors; 1 for any).
pub fn transfer(
    len: usize,
    unit: usize,
    mut op: impl FnMut(usize) -> io::Result<usize>,
) -> Result<(), Short> {
    let mut done = 0;
    while done < len {
        match op(done) {
            Ok(0) => return Err(Short::Stuck { done }),
            Ok(n) if n % unit != 0 => return Err(Short::Unaligned { done, n }),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(Short::Failed { done, err }),
        }
    }
    Ok(())
}

impl Short {
    /// As an I/O error; a device that stopped moving bytes is `stuck`
    /// (`UnexpectedEof` for reads, `WriteZero` for writes).
    pub fn into_io(self, stuck: io::ErrorKind) -> io::Error {
        match self {
            Short::Stuck { .. } => io::Error::from(stuck),
            Short::Unaligned { n, .. } => {
                io::Error::other(format!("a short transfer of {n} bytes, not whole sectors"))
            }
            Short::Failed { err, .. } => err,
        }
    }
}

/// Zeros over `len` bytes at `off`, written from an aligned zero buffer.
fn write_zeros<D: BlockDevice + ?Sized>(dev: &D, off: u64, len: u64) -> io::Result<()> {
    let zeros = formats::sys::Aligned::new(len.min(4 << 20) as usize);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        let at = off + done;
        transfer(n, 1, |d| dev.write_at(zeros.get(n - d), at + d as u64))
            .map_err(|e| e.into_io(io::ErrorKind::WriteZero))?;
        done += n as u64;
    }
    Ok(())
}

/// A whole-disk block device, opened O_DIRECT and locked.
pub struct Device {
    name: String,
    file: nix::fcntl::Flock<File>,
    size: u64,
    lbs: u64,
}

fn model_of(dev: &Path) -> String {
    let name = dev
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::fs::read_to_string(format!("/sys/block/{name}/device/model"))
        .map(|m| m.trim().to_string())
        .unwrap_or_default()
}

impl Device {
    /// Open a checked target. For writing: O_EXCL (no mounts, no other
    /// exclusive openers), an exclusive flock (keeps udev from probing
    /// mid-write), and the identity re-checked right before the first write.
    pub fn open(t: &Target, write: bool) -> Result<Device> {
        let path: PathBuf = t.disk.path.clone();
        let name = path.display().to_string();
        let mut o = OpenOptions::new();
        o.read(true);
        if write {
            o.write(true).custom_flags(libc::O_EXCL | libc::O_DIRECT);
        } else {
            o.custom_flags(libc::O_DIRECT);
        }
        let f = o.open(&path).with_context(|| {
            format!("opening {name}{}", if write { " exclusively" } else { "" })
        })?;
        let how = if write {
            nix::fcntl::FlockArg::LockExclusiveNonblock
        } else {
            nix::fcntl::FlockArg::LockSharedNonblock
        };
        let file =
            nix::fcntl::Flock::lock(f, how).map_err(|(_, e)| anyhow!("locking {name}: {e}"))?;
        let size = ioctl::size(&file).with_context(|| format!("size of {name}"))?;
        let lbs =
            ioctl::logical_sector_size(&file).with_context(|| format!("sector size of {name}"))?;
        let model = model_of(&path);
        if write
            && (size != t.disk.size || lbs != t.disk.logical_sector_size || model != t.disk.model)
        {
            let detail = format!(
                "the device changed since the checks (now {size} bytes, {lbs}-byte sectors, model {model:?})"
            );
            return Err(Refused::write(name, Check::Identity, detail).into());
        }
        Ok(Device {
            name,
            file,
            size,
            lbs: lbs as u64,
        })
    }
}

impl BlockDevice for Device {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn sector_size(&self) -> u64 {
        self.lbs
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<usize> {
        self.file.write_at(buf, off)
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.file.read_at(buf, off)
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync_all()
    }
    fn drop_cache(&self) -> io::Result<()> {
        ioctl::flush_buffers(&self.file)
    }
    fn announce(&self) {
        // BLKRRPART, and where the kernel has no partition parsers, BLKPG
        // through partx.
        // through partx: the old nodes first (they may describe the old
        // table: a grown partition keeps its old size until re-added).
        let _ = ioctl::reread_partitions(&self.file);
        for args in [["-d", &self.name], ["-a", &self.name]] {
            let _ = std::process::Command::new("partx")
                .args(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_retries_interruptions_goes_on_after_short_ones_and_stops_when_stuck() {
        let mut calls = vec![
            Err(io::Error::from(io::ErrorKind::Interrupted)),
            Ok(512),
            Ok(1024),
        ]
        .into_iter();
        let mut at = Vec::new();
        transfer(1536, 512, |d| {
            at.push(d);
            calls.next().unwrap()
        })
        .unwrap();
        assert_eq!(at, [0, 0, 512]);
        let stuck = transfer(1024, 512, |d| Ok(if d == 0 { 512 } else { 0 }));
        assert!(matches!(stuck, Err(Short::Stuck { done: 512 })));
        let odd = transfer(1024, 512, |_| Ok(100));
        assert!(matches!(odd, Err(Short::Unaligned { done: 0, n: 100 })));
        let failed = transfer(8, 1, |d| {
            if d < 4 {
                Ok(4)
            } else {
                Err(io::Error::other("EIO"))
            }
        });
        assert!(matches!(failed, Err(Short::Failed { done: 4, .. })));
    }
}
