//! How an image is shipped: a container takes the image's size and its
//! block map first, then the image's chunks. Containers whose metadata
//! precedes the data (qcow2's tables, a dynamic VHD's block table) can
//! lay it out from the map before the first chunk arrives.
//!
//! A new container is one new file here plus a line in [`Kind::for_output`].

mod gce;
mod metered;
mod ova;
mod qcow2;
mod raw;
mod stream;
mod vhd;
mod vhdx;
mod vmdk;
mod xz;
mod zstd;

pub use metered::metered;

use std::fs::File;
use std::io;
use std::path::Path;

use anyhow::{Context, Result};

pub use crate::assemble::{Chunk, Container};
use crate::assemble::{Hashes, ImageOut};
use crate::output::AtomicOutput;
use formats::bmap::BLOCK as FS_BLOCK;

/// Fill `out` with one image of `size` bytes, in the container `kind`,
/// that `write` writes (in ascending order, touching only `map`): the
/// way `forge image` writes images, for a bare filesystem (`forge ext4`,
/// `forge fat`) or a VM's state disk.
pub fn write_image(
    out: &mut AtomicOutput,
    kind: Kind,
    settings: &Settings,
    size: u64,
    map: Vec<(u64, u64)>,
    write: impl FnOnce(&mut dyn formats::sink::Sink) -> Result<()>,
) -> Result<()> {
    fill(out, kind, settings, (size, map), false, write).map(drop)
}

/// [`write_image`] into a raw file, returning the SHA-256 of all `size`
/// bytes (holes as zeros), hashed as they are written.
pub fn write_hashed(
    out: &mut AtomicOutput,
    size: u64,
    map: Vec<(u64, u64)>,
    write: impl FnOnce(&mut dyn formats::sink::Sink) -> Result<()>,
) -> Result<String> {
    let settings = Settings {
        file_name: file_name(out.target()),
        ..Settings::default()
    };
    let hashed = fill(out, Kind::Raw, &settings, (size, map), true, write)?;
    Ok(hashed.expect("the whole range watched"))
}

/// A path's last component, for a container's own metadata.
pub fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The image written; with `hash`, the SHA-256 of all of it.
fn fill(
    out: &mut AtomicOutput,
    kind: Kind,
    settings: &Settings,
    (size, map): (u64, Vec<(u64, u64)>),
    hash: bool,
    write: impl FnOnce(&mut dyn formats::sink::Sink) -> Result<()>,
) -> Result<Option<String>> {
    let target = out.target().display().to_string();
    let what = || format!("writing {target}");
    let temp = out.temp_path();
    let c = kind.open(out.file(), &temp, settings).with_context(what)?;
    let hashes = Hashes {
        bmap: false,
        partitions: hash,
        image: false,
    };
    let mut w = ImageOut::new(c, hashes).with_context(what)?;
    w.begin(size, map).with_context(what)?;
    if hash {
        w.watch(0, size).with_context(what)?;
    }
    write(&mut w)?;
    let done = w.finish().with_context(what)?;
    Ok(done.watched.into_iter().next().map(|h| h.2))
}

/// A bare filesystem of `size` bytes (`forge ext4`, `forge fat`) as a
/// raw file at `path`, appearing whole or not at all.
pub fn write_file(
    path: &Path,
    size: u64,
    map: Vec<(u64, u64)>,
    write: impl FnOnce(&mut dyn formats::sink::Sink) -> Result<()>,
) -> Result<()> {
    let mut out = AtomicOutput::create(path)?;
    write_image(&mut out, Kind::Raw, &Settings::default(), size, map, write)?;
    out.commit()
}

/// The chunk's touched bytes cut where they cross a `block`-byte
/// boundary, in order: (block, offset in the block, bytes).
fn pieces(c: &Chunk, block: u64) -> Vec<(u64, u64, &[u8])> {
    let mut out = Vec::new();
    for (a, b) in c.touched_runs() {
        let (mut at, end) = (c.off + a as u64 * FS_BLOCK, c.off + b as u64 * FS_BLOCK);
        while at < end {
            let blk = at / block;
            let upto = ((blk + 1) * block).min(end);
            let bytes = &c.bytes()[(at - c.off) as usize..(upto - c.off) as usize];
            out.push((blk, at - blk * block, bytes));
            at = upto;
        }
    }
    out
}

/// What one `cluster`-byte piece of a chunk holds.
enum Held {
    Nothing,
    Zeros,
    /// Touched block runs `(first, past_last)`, relative to the cluster.
    Data(Vec<(usize, usize)>),
}

/// What each cluster of the chunk's first `n` bytes holds: (index in the
/// chunk, what).
fn held(c: &Chunk, n: usize, cluster: u64) -> Vec<(usize, Held)> {
    let per = (cluster / FS_BLOCK) as usize;
    let runs: Vec<(usize, usize)> = c.touched_runs().collect();
    (0..n.div_ceil(cluster as usize))
        .map(|k| {
            let (lo, hi) = (k * per, (k + 1) * per);
            let inside: Vec<(usize, usize)> = runs
                .iter()
                .filter(|r| r.0 < hi && r.1 > lo)
                .map(|r| (r.0.max(lo) - lo, r.1.min(hi) - lo))
                .collect();
            let bytes = |r: &(usize, usize)| {
                &c.bytes()[(lo + r.0) * FS_BLOCK as usize..(lo + r.1) * FS_BLOCK as usize]
            };
            let h = if inside.is_empty() {
                Held::Nothing
            } else if inside.iter().all(|r| formats::sys::is_zero(bytes(r))) {
                Held::Zeros
            } else {
                Held::Data(inside)
            };
            (k, h)
        })
        .collect()
}

/// Cluster `k` of the chunk whole, zeros where nothing was written.
fn cluster_bytes(c: &Chunk, k: usize, cluster: u64, runs: &[(usize, usize)]) -> Vec<u8> {
    let mut buf = vec![0u8; cluster as usize];
    let from = k * cluster as usize;
    for r in runs {
        let (a, b) = (r.0 * FS_BLOCK as usize, r.1 * FS_BLOCK as usize);
        buf[a..b].copy_from_slice(&c.bytes()[from + a..from + b]);
    }
    buf
}

/// All of `input` through `c`, ended by `flush` (the output grows until
/// the stream ends, or for a flush, until everything is taken with room
/// to spare).
fn compress_all(
    mut c: flate2::Compress,
    input: &[u8],
    flush: flate2::FlushCompress,
) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len() + input.len() / 8 + 64);
    loop {
        let taken = c.total_in() as usize;
        let status = c
            .compress_vec(&input[taken..], &mut out, flush)
            .map_err(io::Error::other)?;
        let done = match flush {
            flate2::FlushCompress::Finish => status == flate2::Status::StreamEnd,
            _ => c.total_in() as usize == input.len() && out.len() < out.capacity(),
        };
        if done {
            return Ok(out);
        }
        out.reserve(out.capacity().max(64));
    }
}

/// The containers, chosen by the output's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `.img`, `.raw`: a sparse raw file.
    Raw,
    /// `.img.zst`, `.raw.zst`: a zstd stream of the raw image.
    Zstd,
    /// `.img.xz`, `.raw.xz`: an xz stream of the raw image.
    Xz,
    /// `.qcow2`: qcow2 version 3.
    Qcow2,
    /// `.vhd`: a fixed (default) or dynamic VHD.
    Vhd(formats::vhd::Type),
    /// `.vhdx`: a dynamic VHDX (Hyper-V).
    Vhdx,
    /// `.vmdk`: a streamOptimized VMDK (VMware, VirtualBox).
    Vmdk,
    /// `.ova`: the OVF descriptor and a streamOptimized VMDK in a tar.
    Ova,
    /// `.tar.gz`: Google Compute Engine's `disk.raw` (sparse) in a tar, gzipped.
    Gce,
}

const GIB: u64 = 1 << 30;

/// The accepted output names, for messages and help.
pub const NAMES: &str =
    ".img or .raw (raw image), .iso (--format iso), .img.zst or .raw.zst (zstd-compressed), .img.xz or .raw.xz (xz-compressed), .qcow2, .vhd, .vhdx, .vmdk, .ova, .tar.gz (GCE)";

/// What a container may need beyond the bytes.
pub struct Settings {
    pub zstd_level: i32,
    /// xz preset, 0-9.
    pub xz_level: u32,
    /// The image's time (SOURCE_DATE_EPOCH), for formats that stamp one.
    pub unix_time: u32,
    /// The image file's own UUID (VHD), derived from the seed.
    pub uuid: [u8; 16],
    /// qcow2: deflate-compressed clusters.
    pub deflate: bool,
    /// The output's file name (a VMDK's descriptor names its extent).
    pub file_name: String,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            zstd_level: 3,
            xz_level: 6,
            unix_time: 1,
            uuid: [0; 16],
            deflate: false,
            file_name: "disk".into(),
        }
    }
}

impl Kind {
    /// The container an output name asks for.
    pub fn for_output(name: &Path) -> Option<Kind> {
        let n = name.file_name()?.to_string_lossy();
        let has = |ext: &str| n.len() > ext.len() && n.ends_with(ext);
        if has(".img.zst") || has(".raw.zst") {
            Some(Kind::Zstd)
        } else if has(".img.xz") || has(".raw.xz") {
            Some(Kind::Xz)
        } else if has(".img") || has(".raw") || has(".iso") {
            Some(Kind::Raw)
        } else if has(".qcow2") {
            Some(Kind::Qcow2)
        } else if has(".vhd") {
            Some(Kind::Vhd(formats::vhd::Type::Fixed))
        } else if has(".vhdx") {
            Some(Kind::Vhdx)
        } else if has(".vmdk") {
            Some(Kind::Vmdk)
        } else if has(".ova") {
            Some(Kind::Ova)
        } else if has(".tar.gz") {
            Some(Kind::Gce)
        } else {
            None
        }
    }

    /// Whether an image of `size` bytes fits this container, asked once the
    /// layout is placed, before anything is written.
    pub fn check_size(self, size: u64) -> Result<(), String> {
        match self {
            Kind::Vhd(_) => formats::vhd::check_size(size).map_err(|e| e.to_string()),
            Kind::Vhdx => formats::vhdx::check_size(size).map_err(|e| e.to_string()),
            Kind::Vmdk | Kind::Ova => formats::vmdk::check_size(size).map_err(|e| e.to_string()),
            Kind::Gce if !size.is_multiple_of(GIB) => Err(format!(
                "a GCE disk is a whole number of GiB: {size} bytes is not (--disk-size {}G)",
                size.div_ceil(GIB)
            )),
            _ => Ok(()),
        }
    }

    /// A virtual machine's disk format (for raw-efi systems, 512-byte
    /// sectors).
    pub fn vm_disk(self) -> bool {
        matches!(
            self,
            Kind::Qcow2 | Kind::Vhd(_) | Kind::Vhdx | Kind::Vmdk | Kind::Ova | Kind::Gce
        )
    }

    /// What the disk's size must be a multiple of, beyond its sectors.
    pub fn size_granule(self) -> Option<u64> {
        (self == Kind::Gce).then_some(GIB)
    }

    pub fn compressed(self) -> bool {
        matches!(self, Kind::Zstd | Kind::Xz)
    }

    /// Whether a bmap goes beside the image (it describes raw images).
    pub fn has_bmap(self) -> bool {
        matches!(self, Kind::Raw | Kind::Zstd | Kind::Xz)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Raw => "raw",
            Kind::Zstd => "zstd",
            Kind::Xz => "xz",
            Kind::Qcow2 => "qcow2",
            Kind::Vhd(formats::vhd::Type::Fixed) => "vhd (fixed)",
            Kind::Vhd(formats::vhd::Type::Dynamic) => "vhd (dynamic)",
            Kind::Vhdx => "vhdx (dynamic)",
            Kind::Vmdk => "vmdk (streamOptimized)",
            Kind::Ova => "ova (OVF and a streamOptimized VMDK)",
            Kind::Gce => "gce (disk.raw in a .tar.gz)",
        }
    }

    /// The container writing into `file` (created empty, at `path`).
    pub fn open(self, file: &File, path: &Path, s: &Settings) -> io::Result<Box<dyn Container>> {
        Ok(match self {
            Kind::Raw => Box::new(raw::Raw::open(file, path)?),
            Kind::Zstd => Box::new(zstd::open(file.try_clone()?, s.zstd_level)),
            Kind::Xz => Box::new(xz::open(file.try_clone()?, s.xz_level)),
            Kind::Qcow2 => Box::new(qcow2::Qcow2::open(file, path, s.deflate)?),
            Kind::Vhd(t) => Box::new(vhd::Vhd::open(t, file, path, s.unix_time, s.uuid)?),
            Kind::Vhdx => Box::new(vhdx::Vhdx::open(file, path, s.uuid)?),
            Kind::Vmdk => Box::new(vmdk::Vmdk::open(file, s.file_name.clone(), s.uuid)?),
            Kind::Ova => Box::new(ova::Ova::open(file, s)?),
            Kind::Gce => Box::new(gce::Gce::open(file, s.unix_time)?),
        })
    }
}
