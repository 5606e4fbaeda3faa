//! The partitions every format is built from: the root (ext4 or EROFS,
//! sized for an A/B slot), its dm-verity hash and signature partitions,
//! the state partition and FAT partitions, each a `layout::Partition`.

use anyhow::{Context, Result};
use std::sync::Arc;

use formats::ext4;
use formats::tree::Tree;
use formats::verity;

use super::{slots, Input, RootFs, RootMode};
use crate::layout::{Filesystem, PartType, Partition, Role, SizePolicy};

/// The root filesystem: the closure's ext4 (read-only unless
/// `--root-mode rw`) or EROFS, planned (an EROFS root is compressed
/// here): once per image, then hashed ([`verity_of`]) and placed
/// ([`root_partition`]).
pub(crate) fn root_fs<'t>(i: &Input, tree: &'t Tree, label: &str) -> Result<Filesystem<'t>> {
    let what = "planning the root filesystem (--root-size)";
    // An A/B slot's filesystem is its content's size; --root-size is the slot's.
    let size = match (i.version.is_some(), i.o.root_size) {
        (true, ext4::Size::Fixed(_)) => ext4::Size::Auto {
            slack: Default::default(),
        },
        (_, size) => size,
    };
    Ok(match i.o.root_fs {
        RootFs::Ext4 => {
            let rw = i.o.root_mode == RootMode::Rw;
            let opts = ext4::Options::from_seed(i.seed, label, size, rw, i.o.epoch);
            let plan = ext4::plan(tree, &opts).context(what)?;
            Filesystem::Ext4 {
                plan,
                uuid: opts.uuid,
            }
        }
        RootFs::Erofs => {
            let mut opts = formats::erofs::Options::from_seed(i.seed, label, i.o.epoch.into());
            opts.compression = i.o.erofs_compression;
            let plan = formats::erofs::plan(tree, &opts).context("planning the EROFS root")?;
            Filesystem::Erofs {
                plan,
                uuid: opts.uuid,
            }
        }
    })
}

/// The root partition holding `fs` ([`root_fs`]); with verity, its
/// GUID is the root hash's first 128 bits. An A/B slot is
/// `--root-size`, or its filesystem and a quarter.
pub(crate) fn root_partition<'t>(
    i: &Input,
    (fs, label): (Filesystem<'t>, &str),
    ty: PartType,
    bootable: bool,
    verity: Option<&verity::Tree>,
) -> Result<Partition<'t>> {
    let size = match (&i.version, i.o.root_size) {
        (None, _) => SizePolicy::Content,
        (Some(_), ext4::Size::Fixed(n)) => SizePolicy::Fixed(slots::slot_size(fs.size(), Some(n))?),
        (Some(_), _) => SizePolicy::Fixed(slots::slot_size(fs.size(), None)?),
    };
    Ok(Partition {
        role: Role::Root,
        ty,
        name: i.part_name("nixos"),
        label: label.into(),
        read_only: i.o.root_mode != RootMode::Rw && matches!(ty, PartType::Gpt(_)),
        bootable,
        start: None,
        size,
        fs,
        guid: verity.map(|t| t.root_hash[..16].try_into().expect("16 bytes")),
    })
}

/// The salt and superblock UUID of the root's hash tree, from the seed.
fn verity_params(seed: &str) -> verity::Params {
    let salt = formats::seed::derive(seed, "verity:salt");
    verity::Params {
        salt,
        uuid: formats::seed::uuid(seed, "verity:uuid"),
    }
}

/// The dm-verity hash tree of the planned root filesystem `fs`: written
/// once into a hasher, before anything of the image is written (the root
/// hash goes on the kernel command line, in the ESP that comes first).
/// `--verity` only.
pub(crate) fn verity_of(i: &Input, fs: &Filesystem) -> Result<Option<Arc<verity::Tree>>> {
    if !i.o.verity {
        return Ok(None);
    }
    let mut h = verity::Hasher::new(verity_params(i.seed));
    fs.stream(&mut h, 0)
        .context("hashing the root filesystem (--verity)")?;
    let t = h
        .finish(fs.size())
        .context("the root's hash tree (--verity)")?;
    Ok(Some(Arc::new(t)))
}

/// The root's hash partition (after the root): its GUID is the root
/// hash's last 128 bits, as the Discoverable Partitions spec says. In an
/// A/B image, `slot` is the root slot's size, and the hash partition's
/// slot holds a tree for a filesystem that fills it.
pub(crate) fn verity_partition<'t>(
    i: &Input,
    t: &Arc<verity::Tree>,
    ty: PartType,
    slot: Option<u64>,
) -> Partition<'t> {
    Partition {
        role: Role::RootVerity,
        ty,
        name: i.part_name("nixos-verity"),
        label: "verity".into(),
        read_only: matches!(ty, PartType::Gpt(_)),
        bootable: false,
        start: None,
        size: match slot {
            Some(n) => SizePolicy::Fixed(slots::verity_slot_size(n, t.bytes.len() as u64)),
            None => SizePolicy::Content,
        },
        fs: Filesystem::Verity { tree: t.clone() },
        guid: Some(t.root_hash[16..].try_into().expect("16 bytes")),
    }
}

/// The GPT name of the root hash's signature partition, signed or not.
pub const VERITY_SIG_NAME: &str = "nixos-verity-sig";

/// The root hash's signature partition after the hash partition, 1 MiB,
/// its GUID by role from the seed: with `--verity-key`, a root-verity-sig
/// partition holding the signed root hash; without, an empty slot of type
/// "Linux reserved" that `forge sign` fills and retypes, so an image
/// signed after its build is the image built with the key.
pub(crate) fn verity_sig_partition<'t>(
    i: &Input,
    t: &verity::Tree,
    sig_type: &'static str,
) -> Result<Partition<'t>> {
    let (ty, bytes) = match &i.signers.verity {
        Some(signer) => {
            let bytes = formats::sign::verity_signature(signer, &t.root_hex())
                .context("signing the root hash (--verity-key)")?;
            (sig_type, bytes)
        }
        None => (formats::gpt::types::LINUX_RESERVED, Vec::new()),
    };
    Ok(Partition {
        role: Role::RootVeritySig,
        ty: PartType::Gpt(ty),
        name: i.part_name(VERITY_SIG_NAME),
        label: "verity-sig".into(),
        read_only: true,
        bootable: false,
        start: None,
        size: SizePolicy::Fixed(crate::layout::ALIGN),
        fs: Filesystem::VeritySig { bytes },
        guid: None,
    })
}

/// The kernel parameters `--verity` adds: the root hash, which systemd's
/// veritysetup generator (and the fixture's stage 1) opens the root by.
pub(crate) fn verity_params_line(t: Option<&verity::Tree>) -> Vec<String> {
    t.map(|t| vec![format!("roothash={}", t.root_hex())])
        .unwrap_or_default()
}

/// The state partition (/var): a journaled ext4 of `--state-size`.
pub(crate) fn state_partition<'t>(
    i: &Input,
    tree: &'t Tree,
    size: u64,
    ty: PartType,
) -> Result<Partition<'t>> {
    let opts = ext4::Options::from_seed(i.seed, "state", ext4::Size::Fixed(size), true, i.o.epoch);
    let plan = ext4::plan(tree, &opts).context("planning the state filesystem (--state-size)")?;
    Ok(Partition {
        role: Role::State,
        ty,
        name: "state".into(),
        label: "state".into(),
        read_only: false,
        bootable: false,
        start: None,
        // --state-size, or everything --disk-size leaves.
        size: SizePolicy::Fill,
        fs: Filesystem::Ext4 {
            plan,
            uuid: opts.uuid,
        },
        guid: None,
    })
}

/// A FAT32 partition of exactly `size` bytes at `start`.
/// A FAT volume's options: `size` bytes at byte `start` of the disk,
/// its volume ID from the seed and `label`.
pub(crate) fn fat_options(
    i: &Input,
    label: &str,
    (start, size): (u64, u64),
) -> Result<formats::fat::Options> {
    Ok(formats::fat::Options {
        size,
        sector_size: i.o.sector_size,
        label: label.into(),
        volume_id: formats::fat::volume_id(i.seed, label),
        epoch: i.o.epoch,
        hidden_sectors: u32::try_from(start / i.o.sector_size as u64)
            .context("a FAT volume past 2^32 sectors")?,
    })
}

pub(crate) fn fat_partition<'t>(
    i: &Input,
    tree: &'t Tree,
    (role, name, label): (Role, &'static str, &str),
    (start, size): (u64, u64),
    ty: PartType,
    what: &str,
) -> Result<Partition<'t>> {
    let opts = fat_options(i, label, (start, size))?;
    let volume_id = opts.volume_id;
    let plan = formats::fat::plan(tree, &opts).with_context(|| format!("planning the {what}"))?;
    Ok(Partition {
        role,
        ty,
        name: name.into(),
        label: label.into(),
        read_only: false,
        bootable: false,
        start: Some(start),
        size: SizePolicy::Fixed(size),
        fs: Filesystem::Fat { plan, volume_id },
        guid: None,
    })
}
