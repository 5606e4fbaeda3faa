//! flash: writing images to block devices safely.
//!
//! This first part is device discovery (`flash list`): what the machine has,
//! and why a disk would be refused as a target. Writing and verifying are
//! tracked in issue 6.

pub mod devices;
pub mod ioctl;
pub mod preflight;
pub mod source;
pub mod write;
