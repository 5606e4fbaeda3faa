//! `forge image`: closure → filesystem trees → plans → partition table →
//! one ascending pass of writes → rename into place. A raw image is written
//! sparse into a temporary file and its bmap hashed from it; a compressed
//! one streams through zstd, its bmap hashed on the way (`stream`).

mod raw_efi;
mod sd;
mod stream;
pub mod trees;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::time::Instant;

use formats::{bmap, ext4};

use crate::closure::{self, Closure, Store};

pub const ALIGN: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// GPT + FAT32 ESP with systemd-boot + ext4 root + ext4 state (UEFI).
    RawEfi,
    /// Raspberry Pi: MBR + FAT32 firmware + ext4 root (U-Boot, extlinux) + state.
    SdAarch64,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::RawEfi => "raw-efi",
            Format::SdAarch64 => "sd-aarch64",
        }
    }
}

/// How the image is shipped, from the output name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Container {
    Raw,
    Zstd,
}

pub fn container_for(out: &std::path::Path) -> Result<Container> {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.ends_with(".img.zst") || name.ends_with(".raw.zst") {
        Ok(Container::Zstd)
    } else if name.ends_with(".img") || name.ends_with(".raw") {
        Ok(Container::Raw)
    } else {
        bail!("{}: unknown output extension: use .img or .raw (raw image) or .img.zst (zstd-compressed)", out.display())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RootMode {
    /// Read-only root without a journal (GPT read-only attribute set).
    Ro,
    /// Journaled, writable root, for systems that rebuild in place.
    Rw,
}

pub struct Options {
    pub system: PathBuf,
    pub store_root: PathBuf,
    pub format: Format,
    pub output: PathBuf,
    pub seed: Option<String>,
    pub esp_size: u64,
    pub root_size: ext4::Size,
    pub root_mode: RootMode,
    /// None: no state partition (sd-aarch64 only).
    pub state_size: Option<u64>,
    pub sector_size: u32,
    pub firmware: Vec<PathBuf>,
    pub config_txt: Option<PathBuf>,
    pub firmware_size: u64,
    pub zstd_level: i32,
    pub loader_timeout: u32,
    pub epoch: u32,
    pub hash_partitions: bool,
}

#[derive(Serialize)]
pub struct PartitionReport {
    pub number: u32,
    pub name: String,
    pub type_guid: String,
    pub guid: String,
    pub offset: u64,
    pub size: u64,
    pub filesystem: &'static str,
    pub label: String,
    pub fs_uuid: String,
    pub fs_size: u64,
    pub read_only: bool,
    pub bootable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

#[derive(Serialize)]
pub struct Report {
    pub image: PathBuf,
    pub bmap: PathBuf,
    pub format: &'static str,
    pub compressed: bool,
    /// Size of the raw image.
    pub size: u64,
    pub sector_size: u32,
    pub table: &'static str,
    /// GPT disk GUID, or the MBR disk signature.
    pub disk_id: String,
    pub mapped_bytes: u64,
    pub toplevel: String,
    pub closure_paths: usize,
    pub partitions: Vec<PartitionReport>,
}

/// Stage lines on stderr: one per stage, with elapsed time.
struct Progress(Instant);
impl Progress {
    fn stage(&self, what: &str) {
        eprintln!("forge: [{:6.2}s] {what}", self.0.elapsed().as_secs_f64());
    }
}

fn align(n: u64) -> u64 {
    n.next_multiple_of(ALIGN)
}

/// What a format's layout wrote into the raw image.
pub(crate) struct Laid {
    size: u64,
    table: &'static str,
    disk_id: String,
    mapped: Vec<(u64, u64)>,
    partitions: Vec<PartitionReport>,
}

/// A planned filesystem, ready to be written at an offset.
pub(crate) enum Planned<'t> {
    Fat(formats::fat::Plan<'t>),
    Ext4(formats::ext4::Plan<'t>),
}

impl Planned<'_> {
    pub(crate) fn size(&self) -> u64 {
        match self {
            Planned::Fat(p) => p.size_bytes(),
            Planned::Ext4(p) => p.size_bytes(),
        }
    }
    /// Write at `off`, returning the mapped ranges relative to the image.
    pub(crate) fn write<W: Out>(&self, f: &mut W, off: u64, what: &str) -> Result<Vec<(u64, u64)>> {
        let w = match self {
            Planned::Fat(p) => p.write(f, off).map_err(anyhow::Error::from),
            Planned::Ext4(p) => p.write(f, off).map_err(anyhow::Error::from),
        }
        .with_context(|| format!("writing the {what} at byte {off}"))?;
        Ok(w.mapped.iter().map(|&(s, l)| (s + off, l)).collect())
    }
}

/// Where a layout writes its image, in ascending order: the raw file, or
/// the compressing [`stream::Stream`].
pub(crate) trait Out: Write + Seek {
    /// The image's size; called before any write.
    fn set_len(&mut self, n: u64) -> std::io::Result<()>;
    /// A byte range (a partition) whose SHA-256 the stream should note.
    fn watch(&mut self, _off: u64, _len: u64) {}
}

impl Out for File {
    fn set_len(&mut self, n: u64) -> std::io::Result<()> {
        File::set_len(self, n)
    }
}

fn lay<W: Out>(
    o: &Options,
    c: &Closure,
    store: &Store,
    seed: &str,
    f: &mut W,
    p: &Progress,
) -> Result<Laid> {
    match o.format {
        Format::RawEfi => raw_efi::lay(o, c, store, seed, f, p),
        Format::SdAarch64 => sd::lay(o, c, store, seed, f, p),
    }
    .with_context(|| format!("building {}", o.output.display()))
}

pub fn build(o: &Options) -> Result<Report> {
    let container = container_for(&o.output)?;
    let p = Progress(Instant::now());
    let c: Closure = closure::read(
        &o.system,
        &closure::Options {
            root: o.store_root.clone(),
            closure_info: None,
        },
    )
    .with_context(|| format!("reading the closure of {}", o.system.display()))?;
    p.stage(&format!(
        "closure: {} paths, {} bytes",
        c.paths.len(),
        c.total_nar_size()
    ));
    let store = Store::new(&o.store_root);
    let seed = o.seed.clone().unwrap_or_else(|| c.toplevel.clone());

    let bmap_path = bmap_path_for(&o.output);
    let mut out = crate::cli::output::AtomicOutput::create(&o.output)?;
    let tmp = out.temp_path().to_owned();
    let (laid, bmap_text) = match container {
        Container::Raw => {
            let mut laid = lay(o, &c, &store, &seed, out.file(), &p)?;
            let text = bmap::create(out.file(), laid.size, &laid.mapped)
                .with_context(|| format!("reading back {}", tmp.display()))?;
            if o.hash_partitions {
                for pr in &mut laid.partitions {
                    pr.sha256 = Some(hash_range(out.file(), pr.offset, pr.size)?);
                }
            }
            (laid, text)
        }
        Container::Zstd => {
            let mut s = stream::Stream::new(out.file(), o.zstd_level)
                .with_context(|| format!("compressing into {}", tmp.display()))?;
            let mut laid = lay(o, &c, &store, &seed, &mut s, &p)?;
            let (text, hashes) = s
                .finish()
                .with_context(|| format!("compressing into {}", tmp.display()))?;
            for pr in &mut laid.partitions {
                pr.sha256 = hashes
                    .iter()
                    .find(|h| (h.0, h.1) == (pr.offset, pr.size))
                    .map(|h| h.2.clone())
                    .filter(|_| o.hash_partitions);
            }
            p.stage(&format!("compressed (zstd level {})", o.zstd_level));
            (laid, text)
        }
    };
    let mapped_bytes: u64 = bmap::blocks(&laid.mapped)
        .iter()
        .map(|r| (r.1 - r.0 + 1) * bmap::BLOCK)
        .sum();
    let partitions = laid.partitions;
    let mut bout = crate::cli::output::AtomicOutput::create(&bmap_path)?;
    bout.file()
        .write_all(bmap_text.as_bytes())
        .with_context(|| format!("writing {}", bmap_path.display()))?;
    out.commit()?;
    bout.commit()?;
    p.stage(&format!(
        "done: {} ({} bytes raw, {mapped_bytes} mapped) and {}",
        o.output.display(),
        laid.size,
        bmap_path.display()
    ));
    Ok(Report {
        image: o.output.clone(),
        bmap: bmap_path,
        format: o.format.name(),
        compressed: container == Container::Zstd,
        size: laid.size,
        sector_size: o.sector_size,
        table: laid.table,
        disk_id: laid.disk_id,
        mapped_bytes,
        toplevel: c.toplevel.clone(),
        closure_paths: c.paths.len(),
        partitions,
    })
}

/// `disk.img` → `disk.img.bmap`; `nixos.img.zst` → `nixos.img.bmap`.
pub fn bmap_path_for(out: &std::path::Path) -> PathBuf {
    let s = out.to_string_lossy();
    let base = s.strip_suffix(".zst").unwrap_or(&s);
    PathBuf::from(format!("{base}.bmap"))
}

fn write_at<W: Out>(f: &mut W, off: u64, data: &[u8]) -> std::io::Result<()> {
    f.seek(SeekFrom::Start(off))?;
    f.write_all(data)
}

fn hash_range(f: &mut File, off: u64, size: u64) -> Result<String> {
    let mut h = Sha256::new();
    f.seek(SeekFrom::Start(off))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = (buf.len() as u64).min(left) as usize;
        f.read_exact(&mut buf[..n])?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(format!("{:x}", h.finalize()))
}
