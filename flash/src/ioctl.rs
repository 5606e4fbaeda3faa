//! The raw block-device ioctls flash needs, behind safe functions. This is
//! the only module allowed `unsafe` (as coreos-installer keeps `mod ioctl`).
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
nix::ioctl_read_bad!(blksszget, 0x1268, libc::c_int);
nix::ioctl_read_bad!(blkroget, 0x125e, libc::c_int);
nix::ioctl_none!(blkflsbuf, 0x12, 97);
nix::ioctl_none!(blkrrpart, 0x12, 95);

/// Size in bytes.
pub fn size(f: &File) -> io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
    unsafe { blkgetsize64(f.as_raw_fd(), &mut v) }?;
    Ok(v)
}

/// Logical sector size in bytes.
pub fn logical_sector_size(f: &File) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer.
    unsafe { blksszget(f.as_raw_fd(), &mut v) }?;
    Ok(v as u32)
}

pub fn read_only(f: &File) -> io::Result<bool> {
    let mut v: libc::c_int = 0;
    // SAFETY: BLKROGET writes one int through the pointer.
    unsafe { blkroget(f.as_raw_fd(), &mut v) }?;
    Ok(v != 0)
}

/// Drop the device's buffer cache, so reads come from the device.
pub fn flush_buffers(f: &File) -> io::Result<()> {
    // SAFETY: BLKFLSBUF takes no argument.
    unsafe { blkflsbuf(f.as_raw_fd()) }?;
    Ok(())
}

/// Ask the kernel to re-read the partition table.
pub fn reread_partitions(f: &File) -> io::Result<()> {
    // SAFETY: BLKRRPART takes no argument.
    unsafe { blkrrpart(f.as_raw_fd()) }?;
    Ok(())
}
