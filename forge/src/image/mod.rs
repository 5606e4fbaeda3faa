//! `forge image`: closure → filesystem trees → a layout value (the
//! format's) → placed → one ascending pass of writes through the output's
//! container → rename into place, with the .bmap and the layout manifest.
//! The bmap lists exactly the blocks written, and those must be the
//! blocks the layout planned.

mod iso;
mod parts;
mod raw_efi;
mod sd;
pub mod slots;
pub use parts::VERITY_SIG_NAME;
pub(crate) use parts::{
    fat_partition, root_partition, state_partition, verity_of, verity_params_line,
    verity_partition, verity_sig_partition,
};
pub mod trees;
mod uki;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

use formats::bmap;
use formats::ext4;
use formats::sign::Signer;
use formats::tree::Tree;

use crate::assemble::{self, ImageOut};
use crate::closure::{self, Closure, Store};
use crate::container;
use crate::layout::{Disk, Layout};
use crate::output::AtomicOutput;
use crate::Progress;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// GPT + FAT32 ESP with systemd-boot + ext4 root + ext4 state (UEFI).
    RawEfi,
    /// Raspberry Pi: MBR + FAT32 firmware + ext4 root (U-Boot, extlinux) + state.
    SdAarch64,
    /// A hybrid ISO 9660 image: raw-efi's ESP (El Torito's EFI image) and
    /// read-only root, files of the volume and GPT partitions both.
    Iso,
}

impl Format {
    pub const NAMES: [&'static str; 3] = ["raw-efi", "sd-aarch64", "iso"];

    pub fn name(self) -> &'static str {
        match self {
            Format::RawEfi => "raw-efi",
            Format::SdAarch64 => "sd-aarch64",
            Format::Iso => "iso",
        }
    }

    pub fn from_name(s: &str) -> Option<Format> {
        [Format::RawEfi, Format::SdAarch64, Format::Iso]
            .into_iter()
            .find(|f| f.name() == s)
    }
}

/// The root filesystem's format (`--root-fs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RootFs {
    #[default]
    Ext4,
    /// Read-only, sized to its content.
    Erofs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootMode {
    /// Read-only root without a journal (GPT read-only attribute set).
    Ro,
    /// Journaled, writable root, for systems that rebuild in place.
    Rw,
}

/// The container the options ask for: the output's name, `--vhd-type`,
/// and what the format allows.
pub fn container_of(o: &Options) -> Result<container::Kind> {
    let kind = container_for(&o.output)?;
    let out = o.output.display();
    match (kind, o.vhd_type) {
        (container::Kind::Vhd(_), Some(t)) => return Ok(container::Kind::Vhd(t)),
        (_, Some(_)) => bail!("{out}: --vhd-type applies to .vhd outputs only"),
        _ => {}
    }
    if o.deflate && kind != container::Kind::Qcow2 {
        bail!("{out}: --compression deflate applies to .qcow2 outputs only");
    }
    if kind.vm_disk() && kind != container::Kind::Qcow2 && o.sector_size != 512 {
        bail!(
            "{out}: {} has 512-byte sectors; --sector-size {} does not apply",
            kind.name(),
            o.sector_size
        );
    }
    if kind.vm_disk() && o.format != Format::RawEfi {
        bail!("{out}: qcow2, VHD, VHDX and VMDK outputs are for --format raw-efi (VM disks)");
    }
    let iso_name = o.output.to_string_lossy().ends_with(".iso");
    if iso_name != (o.format == Format::Iso) {
        bail!("{out}: --format iso writes .iso outputs, and only it does");
    }
    Ok(kind)
}

/// Every check of the options that needs nothing read: the container
/// ([`container_of`]), and what goes with `--verity`.
pub fn checked(o: &Options) -> Result<container::Kind> {
    let kind = container_of(o)?;
    check_options(o)?;
    Ok(kind)
}

/// Every check of the options but the container's.
pub fn check_options(o: &Options) -> Result<()> {
    if o.root_fs == RootFs::Erofs && o.root_mode == RootMode::Rw {
        bail!("--root-fs erofs is read-only: not with --root-mode rw");
    }
    if o.root_fs == RootFs::Erofs && matches!(o.root_size, ext4::Size::Fixed(_)) && o.slots == 1 {
        bail!("--root-size: an EROFS root is as large as its content; a size applies to --root-fs ext4");
    }
    if o.verity && o.root_mode == RootMode::Rw {
        bail!("--verity needs a read-only root (dm-verity maps it read-only); --root-mode rw cannot be verified");
    }
    if o.format == Format::Iso {
        iso::check_options(o)?;
    }
    if o.uki && o.format == Format::SdAarch64 {
        bail!("--uki is for --format raw-efi (systemd-boot); an sd-aarch64 card boots through U-Boot's extlinux");
    }
    if o.uki_stub.is_some() && !o.uki {
        bail!("--uki-stub goes with --uki");
    }
    if o.secure_boot.is_some() && !o.uki {
        bail!("--secure-boot-key goes with --uki: under Secure Boot systemd-boot loads only signed images, and forge signs UKIs, not bare kernels");
    }
    if o.verity_sig.is_some() && !o.verity {
        bail!("--verity-key goes with --verity (it signs the root hash)");
    }
    check_slots(o)
}

/// What goes with `--slots 2`.
fn check_slots(o: &Options) -> Result<()> {
    match o.slots {
        1 if o.version.is_some() => {
            bail!("--version names an A/B slot's version: it goes with --slots 2")
        }
        1 => return Ok(()),
        2 => {}
        n => bail!("--slots {n}: an image has 1 root slot, or 2 for A/B updates"),
    }
    if o.format != Format::RawEfi {
        bail!("--slots 2 is for --format raw-efi (and its VM containers); sd-aarch64 cards are not laid out for A/B updates yet");
    }
    if o.root_mode == RootMode::Rw {
        bail!(
            "--slots 2 holds read-only roots that updates replace whole; not with --root-mode rw"
        );
    }
    if let Some(v) = &o.version {
        slots::check_version(v)?;
    }
    Ok(())
}

/// The container an output name asks for, or an error naming the output.
pub fn container_for(out: &Path) -> Result<container::Kind> {
    match container::Kind::for_output(out) {
        Some(k) => Ok(k),
        None => bail!(
            "{}: unknown output extension: use {}",
            out.display(),
            container::NAMES
        ),
    }
}

/// A `--firmware` item: a directory or file, or `NAME=FILE`, the file
/// under another name on the card (nixpkgs' U-Boot packages hold
/// `u-boot.bin`; the Pi's config.txt starts `u-boot-rpi3.bin`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Firmware {
    pub name: Option<String>,
    pub path: PathBuf,
}

impl std::str::FromStr for Firmware {
    type Err = String;
    /// `NAME=FILE` when what precedes the first `=` is a file name (no
    /// `/`); anything else is a path as it is.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((name, path)) if !name.contains('/') => {
                if name.is_empty() || name == "." || name == ".." || path.is_empty() {
                    return Err(format!("{s:?}: expected NAME=FILE or a path"));
                }
                Ok(Firmware {
                    name: Some(name.into()),
                    path: path.into(),
                })
            }
            _ => Ok(Firmware {
                name: None,
                path: s.into(),
            }),
        }
    }
}

pub struct Options {
    pub system: PathBuf,
    pub store_root: PathBuf,
    pub format: Format,
    pub output: PathBuf,
    pub seed: Option<String>,
    /// None: 512 MiB, or for an ISO as small as its content.
    pub esp_size: Option<u64>,
    pub root_size: ext4::Size,
    pub root_mode: RootMode,
    pub root_fs: RootFs,
    /// `--erofs-compression`: an EROFS root's compression.
    pub erofs_compression: formats::erofs::Compression,
    /// None: no state partition (sd-aarch64 only). With `disk_size`, the
    /// state partition's least size.
    pub state_size: Option<u64>,
    /// The whole image's size: the state partition fills what the others
    /// leave (without one, the rest is unallocated). None: as small as
    /// the partitions allow.
    pub disk_size: Option<u64>,
    /// `.vhd` outputs: fixed (None: the default) or dynamic.
    pub vhd_type: Option<formats::vhd::Type>,
    /// `.qcow2` outputs: deflate-compressed clusters.
    pub deflate: bool,
    /// nixpkgs' closureInfo output to take the closure from.
    pub closure_info: Option<PathBuf>,
    /// Hash every NAR even where Nix recorded the hash.
    pub verify_nar: bool,
    pub sector_size: u32,
    pub firmware: Vec<Firmware>,
    pub config_txt: Option<PathBuf>,
    pub firmware_size: u64,
    pub zstd_level: i32,
    pub xz_level: u32,
    pub loader_timeout: u32,
    pub epoch: u32,
    /// SHA-256 of each partition and of the whole image (`--json`).
    pub hash_partitions: bool,
    /// A dm-verity hash partition after the root, its root hash on the
    /// kernel command line.
    pub verity: bool,
    /// A Unified Kernel Image per boot entry (raw-efi), of this EFI stub
    /// (None: the one beside the system's systemd-boot).
    pub uki: bool,
    pub uki_stub: Option<PathBuf>,
    /// `--secure-boot-key`/`--secure-boot-cert`: sign the ESP's PE files.
    pub secure_boot: Option<KeyFiles>,
    /// `--verity-key`/`--verity-cert`: a root-verity-sig partition.
    pub verity_sig: Option<KeyFiles>,
    /// `--sign`: a Nix secret key file; `IMAGE.sig`, its signature of the
    /// layout manifest, is one more sidecar.
    pub sign: Option<PathBuf>,
    /// `--slots`: 1, or 2 for A/B updates (raw-efi).
    pub slots: u8,
    /// `--version`: the installed slot's version (default: the system's
    /// `nixos-version`).
    pub version: Option<String>,
}

/// A private key and its certificate, as files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyFiles {
    pub key: PathBuf,
    pub cert: PathBuf,
}

impl KeyFiles {
    /// Both or neither.
    pub fn pair(key: Option<PathBuf>, cert: Option<PathBuf>) -> Option<KeyFiles> {
        Some(KeyFiles {
            key: key?,
            cert: cert?,
        })
    }

    /// The signer, checked (its key matches its certificate and can sign);
    /// errors name `flag` and the file.
    pub fn load(&self, flag: &str) -> Result<Signer> {
        Signer::load(&self.key, &self.cert).context(flag.to_string())
    }
}

/// The keys an image is signed with, loaded before anything is built.
#[derive(Default)]
pub(crate) struct Signers {
    pub secure_boot: Option<Signer>,
    pub verity: Option<Signer>,
    pub manifest: Option<formats::sign::nixkey::SecretKey>,
}

impl Signers {
    fn load(o: &Options) -> Result<Signers> {
        Ok(Signers {
            secure_boot: o
                .secure_boot
                .as_ref()
                .map(|k| k.load("--secure-boot-key"))
                .transpose()?,
            verity: o
                .verity_sig
                .as_ref()
                .map(|k| k.load("--verity-key"))
                .transpose()?,
            manifest: o
                .sign
                .as_deref()
                .map(crate::sign::manifest::load_key)
                .transpose()
                .context("--sign")?,
        })
    }
}

/// What `forge image --json` prints: the outputs, and the disk as laid
/// out (the same fields as the manifest).
#[derive(Serialize)]
pub struct Report {
    pub image: PathBuf,
    /// Raw and zstd images only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bmap: Option<PathBuf>,
    pub manifest: PathBuf,
    pub format: &'static str,
    /// `raw`, `zstd`, `qcow2`, `vhd (fixed)` or `vhd (dynamic)`.
    pub container: &'static str,
    pub compressed: bool,
    pub mapped_bytes: u64,
    pub toplevel: String,
    pub closure_paths: usize,
    #[serde(flatten)]
    pub disk: Disk,
}

/// The inputs a format's layout is made from.
pub(crate) struct Input<'a> {
    pub o: &'a Options,
    pub c: &'a Closure,
    pub store: &'a Store,
    pub seed: &'a str,
    pub signers: &'a Signers,
    /// With `--slots 2`: the installed slot's version.
    pub version: Option<String>,
}

impl Input<'_> {
    /// A partition's GPT name: `plain`, or in an A/B image the slot's.
    fn part_name(&self, plain: &str) -> String {
        match &self.version {
            Some(v) => slots::slot_name(v),
            None => plain.into(),
        }
    }
}

/// A disk format: a struct owning a tree per partition, by name, made
/// first; then the layout that plans them (borrowing them).
pub(crate) trait DiskFormat {
    fn layout<'t>(&'t self, i: &Input) -> Result<Layout<'t>>;
    /// The ESP's tree, where the format has one, once `layout` has made
    /// it (its entries may name the root hash, known only then).
    fn esp(&self) -> Option<&Tree> {
        None
    }
}

fn trees(i: &Input) -> Result<Box<dyn DiskFormat>> {
    Ok(match i.o.format {
        Format::RawEfi => Box::new(raw_efi::trees_of(i)?),
        Format::SdAarch64 => Box::new(sd::trees_of(i)?),
        Format::Iso => Box::new(iso::trees_of(i)?),
    })
}

pub fn build(o: &Options, progress: &dyn Progress) -> Result<Report> {
    let kind = checked(o)?;
    plan(o, progress, |input, _, mut layout| {
        let c = input.c;
        let what = || format!("building {}", o.output.display());
        if let Some(disk) = o.disk_size {
            layout
                .fill(disk)
                .context("--disk-size")
                .with_context(what)?;
        } else if let Some(g) = kind.size_granule() {
            let size = layout.place().with_context(what)?.size;
            if !size.is_multiple_of(g) {
                layout.fill(size.next_multiple_of(g)).with_context(what)?;
            }
        }
        let placed = layout.place().with_context(what)?;
        kind.check_size(placed.size)
            .map_err(|e| anyhow::anyhow!("{}: {e}", o.output.display()))?;
        if crate::output::locked(&o.output)? {
            bail!(
                "{}: in use by a running VM (a process holds its image lock); stop it first",
                o.output.display()
            );
        }
        progress.stage(&format!(
            "planned: {}",
            layout
                .partitions
                .iter()
                .zip(&placed.at)
                .map(|(p, a)| format!("{} {} bytes", p.label, a.1))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let w = write_outputs(
            o,
            kind,
            input.seed,
            &placed,
            (&c.toplevel, c.nixos_version(input.store)),
            input.signers,
            progress,
        )?;
        Ok(Report {
            image: o.output.clone(),
            bmap: w.bmap,
            manifest: w.manifest,
            format: o.format.name(),
            container: kind.name(),
            compressed: kind.compressed(),
            mapped_bytes: w.mapped_bytes,
            toplevel: c.toplevel.clone(),
            closure_paths: c.paths.len(),
            disk: w.disk,
        })
    })
}

/// The image `o` describes, planned: its inputs, the format's trees and
/// their layout, handed to `then` (which writes it, or parts of it).
/// Nothing is written here.
pub(crate) fn plan<R>(
    o: &Options,
    progress: &dyn Progress,
    then: impl FnOnce(&Input, &dyn DiskFormat, Layout) -> Result<R>,
) -> Result<R> {
    let signers = Signers::load(o)?;
    let c = read_closure(o, progress)?;
    let store = Store::new(&o.store_root);
    let seed = o.seed.clone().unwrap_or_else(|| c.toplevel.clone());
    let input = Input {
        o,
        c: &c,
        store: &store,
        seed: &seed,
        signers: &signers,
        version: (o.slots == 2)
            .then(|| slots::version_of(o.version.as_deref(), &store, &c))
            .transpose()?,
    };
    let what = || format!("building {}", o.output.display());
    let format = trees(&input).with_context(what)?;
    let layout = format.layout(&input).with_context(what)?;
    then(&input, format.as_ref(), layout)
}

/// The closure of `o.system`, however it is found.
fn read_closure(o: &Options, progress: &dyn Progress) -> Result<Closure> {
    let opts = closure::Options {
        root: o.store_root.clone(),
        closure_info: o.closure_info.clone(),
        verify_nar: o.verify_nar,
        // root_tree checks them as it reads each path.
        sizes_later: true,
    };
    closure::read_reported(&o.system, &opts, progress)
}

/// What was written: the sidecars' names and the disk's description.
struct Outputs {
    bmap: Option<PathBuf>,
    manifest: PathBuf,
    mapped_bytes: u64,
    disk: Disk,
}

/// The image in its container, its bmap and layout manifest, all made
/// (unnamed) before any work is written and committed together.
fn write_outputs(
    o: &Options,
    kind: container::Kind,
    seed: &str,
    placed: &crate::layout::Placed,
    (toplevel, version): (&str, Option<String>),
    signers: &Signers,
    progress: &dyn Progress,
) -> Result<Outputs> {
    let bmap_path = kind.has_bmap().then(|| bmap_path_for(&o.output));
    let manifest_path = manifest_path_for(&o.output);
    let mut out = AtomicOutput::create(&o.output)?;
    let mut bout = bmap_path.as_deref().map(AtomicOutput::create).transpose()?;
    let mut mout = AtomicOutput::create(&manifest_path)?;
    let tapped = write_image(o, kind, seed, placed, &mut out, progress)?;
    let mapped = placed.mapped();
    same_ranges(&tapped.pieces, &mapped)?;
    let disk = placed.report(&|off, len| {
        let h = tapped.watched.iter().find(|h| (h.0, h.1) == (off, len));
        h.map(|h| h.2.clone())
    });
    let mapped_bytes: u64 = bmap::blocks(&mapped)
        .iter()
        .map(|r| (r.1 - r.0 + 1) * bmap::BLOCK)
        .sum();
    let mut disk = disk;
    disk.toplevel = Some(toplevel.to_string());
    disk.system_version = version;
    disk.image_sha256 = tapped.image_sha256.clone();
    disk.ranges = Some(formats::manifest::ranges_of(placed.size, &tapped.pieces));
    let mut sidecars = Vec::new();
    if let (Some(b), Some(p)) = (bout.as_mut(), &bmap_path) {
        let bmap_text = bmap::render(placed.size, &tapped.pieces);
        b.file()
            .write_all(bmap_text.as_bytes())
            .with_context(|| format!("writing {}", p.display()))?;
        disk.bmap_sha256 = Some(formats::manifest::sha256_hex(bmap_text.as_bytes()));
    }
    sidecars.extend(bout);
    let manifest = serde_json::to_vec_pretty(&disk).context("rendering the layout manifest")?;
    mout.file()
        .write_all(&manifest)
        .with_context(|| format!("writing {}", manifest_path.display()))?;
    sidecars.push(mout);
    let sig = crate::sign::manifest::sig_path_for(&o.output);
    match &signers.manifest {
        Some(key) => sidecars.push(crate::sign::manifest::signature(&o.output, &manifest, key)?),
        // A signature beside an earlier image at this name is of its manifest.
        None => match std::fs::remove_file(&sig) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing the stale {}", sig.display()))
            }
            _ => {}
        },
    }
    crate::output::commit_together(out, sidecars)?;
    progress.stage(&format!(
        "done: {} ({}, {} bytes raw, {mapped_bytes} mapped), {}{}",
        o.output.display(),
        kind.name(),
        placed.size,
        bmap_path
            .as_ref()
            .map(|p| format!("{} and ", p.display()))
            .unwrap_or_default(),
        manifest_path.display()
    ));
    Ok(Outputs {
        bmap: bmap_path,
        manifest: manifest_path,
        mapped_bytes,
        disk,
    })
}

/// The placed layout written through the assembler into `out`'s
/// container; the bmap pieces hashed whatever the container (the blocks
/// written are checked against the layout's map from them).
fn write_image(
    o: &Options,
    kind: container::Kind,
    seed: &str,
    placed: &crate::layout::Placed,
    out: &mut AtomicOutput,
    progress: &dyn Progress,
) -> Result<assemble::Finished> {
    let writing = || format!("writing {}", o.output.display());
    let hashes = assemble::Hashes {
        bmap: true,
        partitions: o.hash_partitions,
        // A second SHA-256 pass over every byte (measured: 3.6 → 4.8 s for
        // the 2 GiB bench image on two cores), so only when asked, as the
        // partitions' are.
        image: o.hash_partitions,
    };
    let settings = container::Settings {
        zstd_level: o.zstd_level,
        xz_level: o.xz_level,
        unix_time: o.epoch,
        uuid: formats::seed::uuid(seed, "image:uuid"),
        deflate: o.deflate,
        file_name: container::file_name(&o.output),
    };
    let tmp = out.temp_path();
    let container = kind
        .open(out.file(), &tmp, &settings)
        .with_context(writing)?;
    let container = container::metered(container, progress, &writing());
    let mut w = ImageOut::new(container, hashes).with_context(writing)?;
    placed
        .write(&mut w, &mut |s| progress.stage(s))
        .with_context(|| format!("building {}", o.output.display()))?;
    let tapped = w.finish().with_context(writing)?;
    match kind {
        container::Kind::Zstd => {
            progress.stage(&format!("compressed (zstd level {})", o.zstd_level))
        }
        container::Kind::Xz => progress.stage(&format!("compressed (xz preset {})", o.xz_level)),
        _ => {}
    }
    Ok(tapped)
}

/// `disk.img` → `disk.img.bmap`; `nixos.img.zst` → `nixos.img.zst.bmap`
/// (so `x.img` and `x.img.zst` never replace each other's; bmaptool and
/// flash look for IMAGE.bmap first).
pub fn bmap_path_for(out: &Path) -> PathBuf {
    crate::output::with_suffix(out, ".bmap")
}

/// `disk.img` → `disk.img.layout.json`; `nixos.img.zst` →
/// `nixos.img.zst.layout.json`.
pub fn manifest_path_for(out: &Path) -> PathBuf {
    formats::manifest::path_for(out)
}

/// The bmap lists what was written; the layout says what must be mapped.
/// They are the same ranges, or a writer left out bytes it relies on (a
/// device holding old data would show them) or wrote bytes it did not
/// plan: either is a bug, never a silently wrong bmap.
fn same_ranges(written: &[bmap::Piece], mapped: &[(u64, u64)]) -> Result<()> {
    let want = bmap::pieces(mapped);
    let got: Vec<(u64, u64)> = written.iter().map(|w| (w.first, w.last)).collect();
    if let Some(i) = (0..got.len().max(want.len())).find(|&i| got.get(i) != want.get(i)) {
        let show = |r: Option<&(u64, u64)>| match r {
            Some((a, b)) => format!("blocks {a}-{b}"),
            None => "nothing".into(),
        };
        bail!(
            "internal: the image's written blocks differ from the blocks its layout maps: piece {i} is {} written, {} mapped",
            show(got.get(i)),
            show(want.get(i))
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Firmware;

    #[test]
    fn firmware_is_a_path_or_name_equals_file() {
        let f = |s: &str| s.parse::<Firmware>();
        assert_eq!(
            f("u-boot-rpi3.bin=/nix/store/x-uboot/u-boot.bin").unwrap(),
            Firmware {
                name: Some("u-boot-rpi3.bin".into()),
                path: "/nix/store/x-uboot/u-boot.bin".into()
            }
        );
        // An `=` after a `/` is part of a path.
        assert_eq!(f("/a/b=c").unwrap().name, None);
        assert_eq!(f("fw").unwrap().path, std::path::PathBuf::from("fw"));
        for bad in ["=x", "name=", "..=x"] {
            assert!(f(bad).is_err(), "{bad}");
        }
    }
}
