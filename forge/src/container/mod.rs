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

pub use crate::image::out::Chunk;

/// The image's bytes leave through one of these, on the image output's
/// disk thread.
pub trait Container: Send {
    /// Whether chunks must arrive in image order (a stream); otherwise
    /// they come as they are ready.
    fn ordered(&self) -> bool;
    /// Before any chunk: the image's size and every byte range that will
    /// be written (sorted, merged); all else is zeros.
    fn begin(&mut self, size: u64, map: &[(u64, u64)]) -> io::Result<()>;
    /// The chunk's first `n` bytes are the image's, at `chunk.off`;
    /// blocks it does not mark touched are zeros.
    fn chunk(&mut self, chunk: &Chunk, n: usize) -> io::Result<()>;
    /// Everything has been given.
    fn finish(&mut self) -> io::Result<()>;
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
