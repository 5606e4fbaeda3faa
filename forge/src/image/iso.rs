//! iso: a hybrid ISO 9660 image (`--format iso`). raw-efi's ESP and
//! read-only root (EROFS by default) are GPT partitions and, the same
//! bytes, files of an ISO 9660 volume (`efi.img`, `root.img`, and with
//! `--verity` `verity.img` and `verity.sig`) whose metadata sits after
//! the table in the first MiB; El Torito boots `efi.img`. Burnt to a CD
//! the firmware boots the El Torito image, written to a USB stick the
//! GPT's ESP; either way stage 1 finds the root partition by its type
//! (on a CD through the GPT, see ARCHITECTURE.md). No state partition: a
//! live system's /var is in memory.

use anyhow::{bail, Result};

use formats::fat::FatError;
use formats::tree::Tree;

use super::raw_efi::RawEfi;
use super::{DiskFormat, Input, Options, RootMode};
use crate::layout::{Iso as IsoVolume, Layout, Role, Table, ALIGN};

pub(super) struct Iso(RawEfi);

pub(super) fn trees_of(i: &Input) -> Result<Iso> {
    Ok(Iso(super::raw_efi::trees_of(i)?))
}

/// What `--format iso` cannot go with.
pub(super) fn check_options(o: &Options) -> Result<()> {
    if o.root_mode == RootMode::Rw {
        bail!("--format iso: an ISO's root is read-only; not with --root-mode rw");
    }
    if o.slots != 1 {
        bail!("--format iso: an ISO has one root; --slots 2 is for raw-efi");
    }
    if o.disk_size.is_some() {
        bail!("--disk-size: an ISO is as large as its content");
    }
    if o.sector_size != 512 {
        bail!(
            "--format iso: a hybrid ISO's GPT has 512-byte sectors; --sector-size {} does not apply",
            o.sector_size
        );
    }
    Ok(())
}

/// The least FAT32 volume, whole MiBs, that holds `tree`, and a MiB
/// more: room for the signatures `forge sign` adds to its PE files.
fn fitted_esp(i: &Input, tree: &Tree) -> Result<u64> {
    let mut size = ALIGN;
    for _ in 0..8 {
        let opts = super::parts::fat_options(i, "ESP", (ALIGN, size))?;
        match formats::fat::plan(tree, &opts) {
            Ok(_) => return Ok(size + ALIGN),
            Err(FatError::TooSmall { needed, .. })
            | Err(FatError::TooSmallForFat32 { needed, .. }) => {
                size = needed.max(size + 1).next_multiple_of(ALIGN)
            }
            Err(e) => return Err(e.into()),
        }
    }
    bail!("internal: no ESP size fits its content")
}

/// An ISO file's name for a partition's role.
fn file_name(role: Role) -> Option<&'static str> {
    match role {
        Role::Esp => Some("efi.img"),
        Role::Root => Some("root.img"),
        Role::RootVerity => Some("verity.img"),
        Role::RootVeritySig => Some("verity.sig"),
        Role::Firmware | Role::State => None,
    }
}

impl DiskFormat for Iso {
    fn esp(&self) -> Option<&Tree> {
        self.0.esp()
    }

    fn layout<'t>(&'t self, i: &Input) -> Result<Layout<'t>> {
        let esp_size = |esp: &Tree| match i.o.esp_size {
            Some(n) => Ok(n),
            None => fitted_esp(i, esp),
        };
        let partitions = self.0.partitions(i, &esp_size)?;
        let files = partitions
            .iter()
            .enumerate()
            .filter_map(|(k, p)| file_name(p.role).map(|n| (k, n.to_string())))
            .collect();
        let mut layout = Layout::of(Table::Gpt, i.o.sector_size, i.seed, partitions);
        layout.iso = Some(IsoVolume {
            volume_id: "NIXOS_ISO".into(),
            epoch: i.o.epoch as i64,
            files,
            efi_boot: 0,
        });
        Ok(layout)
    }
}
