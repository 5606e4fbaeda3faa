//! `forge image`: closure → filesystem trees → plans → partition table →
//! one ascending pass of writes → rename into place. A raw image is written
//! sparse into a temporary file, its bmap hashed right behind the writer
//! (`raw`); a compressed one streams through zstd, its bmap hashed on the
//! way (`stream`). Either way the bmap lists exactly the blocks written,
//! and those must be the blocks the filesystems say they use.

pub(crate) mod out;
mod raw_efi;
mod sd;
pub mod trees;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::time::Instant;

use formats::{bmap, ext4};

use crate::closure::{self, Closure, Store};
use out::ImageOut;

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
    pub(crate) fn write(&self, f: &mut ImageOut, off: u64, what: &str) -> Result<Vec<(u64, u64)>> {
        let w = match self {
            Planned::Fat(p) => p.write(f, off).map_err(anyhow::Error::from),
            Planned::Ext4(p) => p.write(f, off).map_err(anyhow::Error::from),
        }
        .with_context(|| format!("writing the {what} at byte {off}"))?;
        Ok(w.mapped.iter().map(|&(s, l)| (s + off, l)).collect())
    }
}

fn lay(
    o: &Options,
    c: &Closure,
    store: &Store,
    seed: &str,
    f: &mut ImageOut,
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
    let stage = match container {
        Container::Raw => out::Stage::Raw(tmp.clone()),
        Container::Zstd => out::Stage::Zstd(o.zstd_level),
    };
    let hashes = out::Hashes {
        bmap: true,
        partitions: o.hash_partitions,
    };
    let mut w = out::ImageOut::new(out.file(), stage, hashes)
        .with_context(|| format!("writing {}", tmp.display()))?;
    let mut laid = lay(o, &c, &store, &seed, &mut w, &p)?;
    let tapped = w
        .finish()
        .with_context(|| format!("writing {}", tmp.display()))?;
    if container == Container::Zstd {
        p.stage(&format!("compressed (zstd level {})", o.zstd_level));
    }
    same_ranges(&tapped.pieces, &laid.mapped)?;
    let bmap_text = bmap::render(laid.size, &tapped.pieces);
    for pr in &mut laid.partitions {
        pr.sha256 = tapped
            .watched
            .iter()
            .find(|h| (h.0, h.1) == (pr.offset, pr.size))
            .map(|h| h.2.clone());
    }
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

fn write_at(f: &mut ImageOut, off: u64, data: &[u8]) -> std::io::Result<()> {
    f.seek(SeekFrom::Start(off))?;
    f.write_all(data)
}

/// The bmap lists what was written; the filesystems say what must be
/// mapped. They are the same ranges, or a writer left out bytes it relies
/// on (a device holding old data would show them) or wrote bytes it did
/// not report: either is a bug, never a silently wrong bmap.
fn same_ranges(written: &[(u64, u64, String)], mapped: &[(u64, u64)]) -> Result<()> {
    let want = bmap::pieces(mapped);
    let got: Vec<(u64, u64)> = written.iter().map(|w| (w.0, w.1)).collect();
    if let Some(i) = (0..got.len().max(want.len())).find(|&i| got.get(i) != want.get(i)) {
        let show = |r: Option<&(u64, u64)>| match r {
            Some((a, b)) => format!("blocks {a}-{b}"),
            None => "nothing".into(),
        };
        bail!(
            "internal: the image's written blocks differ from the blocks its filesystems map: piece {i} is {} written, {} mapped",
            show(got.get(i)),
            show(want.get(i))
        );
    }
    Ok(())
}
