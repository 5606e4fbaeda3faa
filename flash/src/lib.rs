//! flash: writing images to block devices safely.
//!
//! `devices` finds disks and why each would be refused; `source` streams an
//! image (raw or zstd) by its bmap; `preflight` runs every named check;
//! `write` writes (first MiB last) and verifies by reading back; `ioctl`
//! holds the only unsafe code.

pub mod devices;
pub mod ioctl;
pub mod preflight;
pub mod source;
pub mod write;
