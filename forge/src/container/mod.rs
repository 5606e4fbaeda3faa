//! How an image is shipped: a container takes the image's size and its
//! block map first, then the image's chunks. Containers whose metadata
//! precedes the data (qcow2's tables, a dynamic VHD's block table) can
//! lay it out from the map before the first chunk arrives.
//!
//! A new container is one new file here plus a line in [`Kind::for_output`].

mod qcow2;
mod raw;
mod vhd;
mod zstd;

use std::fs::File;
use std::io;
use std::path::Path;

use anyhow::{Context, Result};

pub use crate::assemble::{Chunk, Container};
use crate::assemble::{Hashes, ImageOut};
use crate::output::AtomicOutput;

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
    let settings = Settings::default();
    let hashed = fill(out, Kind::Raw, &settings, (size, map), true, write)?;
    Ok(hashed.expect("the whole range watched"))
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

/// The containers, chosen by the output's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `.img`, `.raw`: a sparse raw file.
    Raw,
    /// `.img.zst`, `.raw.zst`: a zstd stream of the raw image.
    Zstd,
    /// `.qcow2`: qcow2 version 3.
    Qcow2,
    /// `.vhd`: a fixed (default) or dynamic VHD.
    Vhd(formats::vhd::Type),
}

/// The accepted output names, for messages and help.
pub const NAMES: &str =
    ".img or .raw (raw image), .img.zst or .raw.zst (zstd-compressed), .qcow2, .vhd";

/// What a container may need beyond the bytes.
pub struct Settings {
    pub zstd_level: i32,
    /// The image's time (SOURCE_DATE_EPOCH), for formats that stamp one.
    pub unix_time: u32,
    /// The image file's own UUID (VHD), derived from the seed.
    pub uuid: [u8; 16],
    /// qcow2: deflate-compressed clusters.
    pub deflate: bool,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            zstd_level: 3,
            unix_time: 1,
            uuid: [0; 16],
            deflate: false,
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
        } else if has(".img") || has(".raw") {
            Some(Kind::Raw)
        } else if has(".qcow2") {
            Some(Kind::Qcow2)
        } else if has(".vhd") {
            Some(Kind::Vhd(formats::vhd::Type::Fixed))
        } else {
            None
        }
    }

    /// Whether an image of `size` bytes fits this container, asked once the
    /// layout is placed, before anything is written.
    pub fn check_size(self, size: u64) -> Result<(), String> {
        match self {
            Kind::Vhd(_) => formats::vhd::check_size(size).map_err(|e| e.to_string()),
            _ => Ok(()),
        }
    }

    pub fn compressed(self) -> bool {
        self == Kind::Zstd
    }

    /// Whether a bmap goes beside the image (it describes raw images).
    pub fn has_bmap(self) -> bool {
        matches!(self, Kind::Raw | Kind::Zstd)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Raw => "raw",
            Kind::Zstd => "zstd",
            Kind::Qcow2 => "qcow2",
            Kind::Vhd(formats::vhd::Type::Fixed) => "vhd (fixed)",
            Kind::Vhd(formats::vhd::Type::Dynamic) => "vhd (dynamic)",
        }
    }

    /// The container writing into `file` (created empty, at `path`).
    pub fn open(self, file: &File, path: &Path, s: &Settings) -> io::Result<Box<dyn Container>> {
        Ok(match self {
            Kind::Raw => Box::new(raw::Raw::open(file, path)?),
            Kind::Zstd => Box::new(zstd::Zstd::new(file.try_clone()?, s.zstd_level)),
            Kind::Qcow2 => Box::new(qcow2::Qcow2::open(file, path, s.deflate)?),
            Kind::Vhd(t) => Box::new(vhd::Vhd::open(t, file, path, s.unix_time, s.uuid)?),
        })
    }
}
