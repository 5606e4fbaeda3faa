//! `forge image`: arguments for the image compiler.

use anyhow::{Context, Result};
use std::path::PathBuf;

use super::WordOrSize;
use forge::image::{self, Format, RootMode};
use formats::ext4::{Size, Slack};

#[derive(clap::Args)]
pub struct ImageArgs {
    /// Toplevel store path of the system, or a link to one (e.g. ./result).
    system: PathBuf,
    /// Image format.
    #[arg(long, default_value = "raw-efi", value_parser = clap::builder::TypedValueParser::map(
        clap::builder::PossibleValuesParser::new(Format::NAMES),
        |s: String| Format::from_name(&s).expect("one of Format::NAMES"),
    ))]
    format: Format,
    /// Output image (a missing directory it goes in is made when its parent exists): .img or .raw (raw), .img.zst or .raw.zst (zstd),
    /// .img.xz or .raw.xz (xz), .qcow2, .vhd, .vhdx, .vmdk, .ova, .tar.gz (GCE) (raw-efi only). IMAGE.layout.json (the layout
    /// manifest) goes beside every image, IMAGE.bmap beside raw, zstd and xz ones.
    #[arg(short, long)]
    output: PathBuf,
    /// .vhd outputs: fixed (the raw bytes and a footer; Azure) or dynamic
    /// (only the 2 MiB blocks holding data; AWS import-snapshot).
    #[arg(long, value_enum)]
    vhd_type: Option<VhdType>,
    /// .qcow2 outputs: `deflate` compresses each cluster (as qemu-img
    /// convert -c), on every core; a cluster that does not shrink is stored plain.
    #[arg(long, value_enum)]
    compression: Option<Compression>,
    /// Seed for every UUID and GUID (default: the toplevel store path).
    #[arg(long)]
    seed: Option<String>,
    /// raw-efi and iso: size of the FAT32 EFI system partition (kernels,
    /// initrds, systemd-boot) (default: 512M; an ISO's as small as its
    /// content and a MiB).
    #[arg(long, value_parser = super::size_arg)]
    esp_size: Option<u64>,
    /// `auto` (the content plus --root-slack) or a size.
    #[arg(long, default_value = "auto", value_parser = |s: &str| super::word_or_size(s, "auto"))]
    root_size: WordOrSize,
    /// Extra space with --root-size auto: bytes, percent, or `25%,256M` for
    /// the larger of both (default: none for ro; 25%, at least 256M, for rw).
    #[arg(long, value_parser = slack_arg)]
    root_slack: Option<Slack>,
    /// ro: read-only root without a journal (GPT read-only attribute set);
    /// rw: journaled and writable, for systems that rebuild in place.
    #[arg(long, value_enum, default_value = "ro")]
    root_mode: RootModeArg,
    /// The root filesystem: ext4, or erofs (read-only, as large as its
    /// content; the stage 1 needs the kernel's erofs) (default: erofs for
    /// --format iso, else ext4).
    #[arg(long, value_enum)]
    root_fs: Option<RootFsArg>,
    /// With --root-fs erofs: none, lz4, or lz4hc[,LEVEL] (1-12, default 9):
    /// files over 4 KiB in LZ4 blocks where that saves space.
    #[arg(long, default_value = "lz4hc", value_name = "ALGO")]
    erofs_compression: formats::erofs::Compression,
    /// Size of the state partition (`none`: no state partition, e.g. a VM
    /// base whose /var is another disk); with --disk-size, its least size
    /// (default: 256M; an ISO has none, its /var is in memory).
    #[arg(long, value_parser = |s: &str| super::word_or_size(s, "none"))]
    state_size: Option<WordOrSize>,
    /// Size of the whole image (e.g. 8G): the state partition, and its
    /// filesystem, fill what the others leave (default: as small as they allow).
    #[arg(long, value_name = "SIZE", value_parser = super::size_arg)]
    disk_size: Option<u64>,
    /// sd-aarch64: files for the firmware partition: a store path or
    /// directory (its files), a file, or NAME=FILE (the file named NAME on
    /// the card, e.g. u-boot-rpi3.bin=…/u-boot.bin); repeatable.
    #[arg(long, value_name = "[NAME=]PATH")]
    firmware: Vec<forge::image::Firmware>,
    /// sd-aarch64: the Pi's config.txt (default: one that starts U-Boot in 64-bit mode, UART on).
    #[arg(long, value_name = "FILE")]
    config_txt: Option<PathBuf>,
    /// sd-aarch64: size of the FAT32 firmware partition.
    #[arg(long, default_value = "128M", value_parser = super::size_arg)]
    firmware_size: u64,
    /// zstd level for outputs ending in .zst.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=22))]
    zstd_level: i32,
    /// xz preset for outputs ending in .xz, 0 (fastest) to 9 (smallest); 6 is xz's own default.
    #[arg(long, default_value_t = 6, value_name = "N",
          value_parser = clap::value_parser!(u32).range(0..=9))]
    xz_level: u32,
    /// Logical sector size of the target disk, 512 or 4096 (the partition
    /// table is laid out for it; sd-aarch64 is always 512).
    #[arg(long, default_value_t = 512, value_parser = super::sector_size)]
    sector_size: u32,
    /// systemd-boot menu timeout in seconds (loader.conf).
    #[arg(long, default_value_t = 0)]
    loader_timeout: u32,
    #[command(flatten)]
    src: super::ClosureSource,
    /// raw-efi: a dm-verity hash partition for the read-only root (its
    /// root hash on the kernel command line, `roothash=`, and in the
    /// layout manifest; the root and hash partitions' GUIDs are its first
    /// and last 128 bits).
    #[arg(long)]
    verity: bool,
    /// raw-efi: a Unified Kernel Image per boot entry in EFI/Linux/ (the
    /// EFI stub with the entry's os-release, command line, kernel and
    /// initrd), which systemd-boot lists itself.
    #[arg(long)]
    uki: bool,
    /// The EFI stub for --uki (default: linuxx64.efi.stub beside the
    /// system's systemd-boot).
    #[arg(long, value_name = "PATH")]
    uki_stub: Option<PathBuf>,
    #[command(flatten)]
    keys: super::SigningKeys,
    /// Sign the layout manifest with this Nix Ed25519 secret key (NAME:BASE64,
    /// as nix-store --generate-binary-cache-key writes it): IMAGE.sig beside
    /// the image, which flash --trust checks (or forge sign --key later).
    #[arg(long, value_name = "KEYFILE")]
    sign: Option<PathBuf>,
    /// raw-efi with --uki: 2 for A/B updates: a second, empty root slot
    /// (and hash slot with --verity) for systemd-sysupdate to install the
    /// next version into; --root-size is then each slot's size (default:
    /// the root filesystem and 25 %).
    #[arg(long, default_value_t = 1, value_name = "N")]
    slots: u8,
    /// With --slots 2: the installed version, in the slot's partition
    /// names and its boot entry (default: the system's nixos-version).
    #[arg(long, value_name = "V")]
    version: Option<String>,
    /// Print the layout as JSON; the layout manifest then also holds the
    /// SHA-256 of each partition and of the whole raw image (a pass over
    /// every byte each).
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum VhdType {
    Fixed,
    Dynamic,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Compression {
    Deflate,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RootFsArg {
    Ext4,
    Erofs,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RootModeArg {
    Ro,
    Rw,
}

fn slack_arg(s: &str) -> Result<Slack, String> {
    super::ext4::parse_slack(s).map_err(|e| format!("{e:#}"))
}

pub fn run(a: ImageArgs) -> Result<()> {
    let json = a.json;
    let opts = a.options()?;
    image::checked(&opts)?;
    let made = forge::output::make_parents(&opts.output)?;
    check_output_dir(&opts.output)?;
    for p in [
        opts.output.clone(),
        image::bmap_path_for(&opts.output),
        image::manifest_path_for(&opts.output),
    ] {
        if p.is_dir() {
            anyhow::bail!("{}: is a directory", p.display());
        }
    }
    let report = image::build(&opts, &super::Stages::new())?;
    made.keep();
    if json {
        crate::out!("{}", serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

impl ImageArgs {
    /// `--json`.
    pub fn json(&self) -> bool {
        self.json
    }

    /// The options given that only a disk container reads (`forge update`
    /// writes partition images, not a container).
    pub fn container_only(&self) -> Option<&'static str> {
        match (self.vhd_type.is_some(), self.compression.is_some()) {
            (true, _) => Some("--vhd-type"),
            (_, true) => Some("--compression"),
            _ => None,
        }
    }

    /// The library's options (`forge update` takes the same).
    pub fn options(self) -> Result<image::Options> {
        let a = self;
        let iso = a.format == Format::Iso;
        let root_fs = a.root_fs.unwrap_or(match iso {
            true => RootFsArg::Erofs,
            false => RootFsArg::Ext4,
        });
        if iso && a.state_size.is_some() {
            anyhow::bail!(
                "--state-size: an ISO has no state partition (a live system's /var is in memory)"
            );
        }
        if matches!(root_fs, RootFsArg::Erofs) && a.root_slack.is_some() {
            anyhow::bail!("--root-slack: an EROFS root is as large as its content; slack applies to --root-fs ext4");
        }
        let root_mode = match a.root_mode {
            RootModeArg::Rw => RootMode::Rw,
            RootModeArg::Ro => RootMode::Ro,
        };
        let slack = match (a.root_slack, root_mode) {
            (Some(s), _) => s,
            (None, RootMode::Ro) => Slack::default(),
            // Room to rebuild in place; Nix alone reserves 8 MiB for its database.
            (None, RootMode::Rw) => Slack {
                bytes: 256 << 20,
                percent: 25,
            },
        };
        let root_size = match a.root_size {
            WordOrSize::Word => Size::Auto { slack },
            WordOrSize::Bytes(n) => Size::Fixed(n),
        };
        let opts = image::Options {
            system: a.system,
            store_root: a.src.root,
            format: a.format,
            output: a.output,
            seed: a.seed,
            esp_size: a.esp_size,
            root_size,
            root_mode,
            root_fs: match root_fs {
                RootFsArg::Ext4 => image::RootFs::Ext4,
                RootFsArg::Erofs => image::RootFs::Erofs,
            },
            erofs_compression: a.erofs_compression,
            state_size: match a.state_size {
                _ if iso => None,
                Some(WordOrSize::Word) => None,
                Some(WordOrSize::Bytes(n)) => Some(n),
                None => Some(256 << 20),
            },
            deflate: a.compression.is_some(),
            closure_info: a.src.closure_info,
            verify_nar: a.src.verify_nar,
            vhd_type: a.vhd_type.map(|t| match t {
                VhdType::Dynamic => formats::vhd::Type::Dynamic,
                VhdType::Fixed => formats::vhd::Type::Fixed,
            }),
            disk_size: a.disk_size,
            sector_size: a.sector_size,
            firmware: a.firmware,
            config_txt: a.config_txt,
            firmware_size: a.firmware_size,
            zstd_level: a.zstd_level,
            xz_level: a.xz_level,
            loader_timeout: a.loader_timeout,
            epoch: super::epoch()?,
            hash_partitions: a.json,
            verity: a.verity,
            uki: a.uki,
            uki_stub: a.uki_stub,
            secure_boot: a.keys.secure_boot(),
            sign: a.sign,
            verity_sig: a.keys.verity(),
            slots: a.slots,
            version: a.version,
        };
        Ok(opts)
    }
}

/// Fail early, before any work, when the output cannot be created.
fn check_output_dir(out: &std::path::Path) -> Result<()> {
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    let md =
        std::fs::metadata(dir).with_context(|| format!("output directory {}", dir.display()))?;
    if !md.is_dir() {
        anyhow::bail!("output directory {}: not a directory", dir.display());
    }
    Ok(())
}
