//! flash: writing images to block devices safely.
//!
//! `devices` finds disks and why each would be refused; `source` streams an
//! image (raw or zstd) by its bmap; `preflight` runs every named check;
//! `write` writes to every device from one read (first MiB last) and
//! verifies by reading back; `progress` draws a bar per device; `ioctl`
//! holds the only unsafe code.

pub mod devices;
pub mod ioctl;
pub mod preflight;
pub mod progress;
pub mod source;
pub mod write;
