//! flash: writing images to block devices safely.
//!
//! `session` is a run in its safe order (every check and plan, then the
//! devices opened and probed, then the writes); the binary only parses
//! arguments, asks and prints.
//! `devices` finds disks and why each would be refused (`refusal` names
//! every check); `source` streams an image (raw, or zstd, xz, gzip, bzip2) by its bmap
//! from a file, a URL (`http`) or stdin (`origin` says which);
//! `trust` checks an image's signature and what it vouches for;
//! `examine` checks the source (a whole disk image, its own sidecars) and
//! `preflight` each device, before any write; `provision` assigns each
//! device its identity and plans its own bytes (`personal`);
//! `device` opens a checked disk (the [`device::BlockDevice`] seam, which
//! `memdisk` also implements for tests); `write` writes to every device
//! from one read (first MiB last) and verifies by reading back; `ioctl`
//! holds the only unsafe code. `station` flashes every device that
//! appears, each with the next identity. Nothing here prints: progress goes through
//! [`Progress`], which the binary implements.

pub mod codec;
pub mod device;
pub mod devices;
pub mod examine;
pub mod http;
pub mod ioctl;
#[cfg(test)]
pub mod memdisk;
pub mod origin;
pub mod personal;
pub mod preflight;
pub mod probe;
pub mod provision;
pub mod refusal;
pub mod session;
pub mod source;
pub mod station;
pub mod trust;
pub mod write;

/// Where the writers report progress; the binary draws it.
pub trait Progress: Sync {
    /// A meter for one device.
    fn meter(&self, device: &str) -> Box<dyn Meter>;
}

/// Progress of one device; shared by the threads working on it.
pub trait Meter: Send + Sync {
    /// A phase ("writing", "verifying") of `total` bytes starts.
    fn phase(&self, phase: &'static str, total: u64);
    fn add(&self, n: u64);
    /// The device is done (`done` or `failed`).
    fn finish(&self, how: &str);
    /// The writer reached a named point: `cleared` (old tables zeroed),
    /// `body` (the first write past the head), `head` (the body is on the
    /// disk, the head is next). Tests pause here to interrupt at a known
    /// moment.
    fn reached(&self, _point: &'static str) {}
}

/// Progress nobody watches.
pub struct Silent;

impl Progress for Silent {
    fn meter(&self, _: &str) -> Box<dyn Meter> {
        Box::new(Silent)
    }
}

impl Meter for Silent {
    fn phase(&self, _: &'static str, _: u64) {}
    fn add(&self, _: u64) {}
    fn finish(&self, _: &str) {}
}
