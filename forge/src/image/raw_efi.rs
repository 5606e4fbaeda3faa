//! raw-efi: GPT, FAT32 ESP with systemd-boot, ext4 root, ext4 state.

use anyhow::{bail, Result};

use formats::gpt::types;
use formats::tree::Tree;

use std::sync::Arc;

use formats::verity;

use super::{
    fat_partition, root_partition, state_partition, trees, verity_of, verity_params_line,
    verity_partition, verity_sig_partition, DiskFormat, Input,
};

/// The root filesystem's label.
const ROOT_LABEL: &str = "nixos";
use crate::layout::{Layout, PartType, Partition, Role, SizePolicy, Table, ALIGN};

/// A raw-efi image's trees, one per partition.
pub(super) struct RawEfi {
    esp: Tree,
    root: Tree,
    /// Empty; unused with `--state-size none` (a base image whose /var
    /// lives on another disk).
    state: Tree,
    /// The root's hash tree (`--verity`).
    verity: Option<Arc<verity::Tree>>,
}

/// The ESP, the root and an empty state tree.
pub(super) fn trees_of(i: &Input) -> Result<RawEfi> {
    let system = i.c.bootspec.spec.system.as_str();
    let Some(arch) = trees::efi_arch(system) else {
        bail!("{}: system {system:?} cannot boot from a raw-efi image (x86_64-linux and aarch64-linux can)", i.c.toplevel);
    };
    let sd_boot = trees::find_systemd_boot(i.store, i.c, &arch)?;
    let mut specs = vec![&i.c.bootspec.spec];
    specs.extend(i.c.bootspec.specialisations.values().map(|b| &b.spec));
    for s in &specs {
        trees::check_efi_stub(&i.store.physical(&s.kernel), &s.kernel)?;
    }
    // The root first: with --verity its hash goes into the ESP's entries.
    let root = trees::root_tree(i.store, i.c, i.o.epoch)?;
    let verity = verity_of(i, &root, ROOT_LABEL)?;
    let mut extra = verity_params_line(verity.as_deref());
    if let (Some(v), None) = (&i.version, &verity) {
        // Two root partitions of one type: the entry names its slot (with
        // verity, the root hash finds it).
        extra.push(format!("root=PARTLABEL={}", super::slots::slot_name(v)));
    }
    let uki_stub = match i.o.uki {
        true => Some(super::uki::stub_path(i.o.uki_stub.as_deref(), &sd_boot)?),
        false => None,
    };
    let o = trees::EspOptions {
        epoch: i.o.epoch,
        timeout: i.o.loader_timeout,
        extra,
        uki_stub,
        secure_boot: i.signers.secure_boot.as_ref(),
        version: i.version.clone(),
    };
    let esp = trees::esp_tree(i.store, i.c, &sd_boot, &arch, &o)?;
    Ok(RawEfi {
        esp,
        root,
        state: Tree::new(0o755),
        verity,
    })
}

impl DiskFormat for RawEfi {
    fn esp(&self) -> Option<&Tree> {
        Some(&self.esp)
    }

    fn layout<'t>(&'t self, i: &Input) -> Result<Layout<'t>> {
        let mut partitions = self.partitions(i, i.o.esp_size.unwrap_or(512 << 20))?;
        if let Some(size) = i.o.state_size {
            partitions.push(state_partition(
                i,
                &self.state,
                size,
                PartType::Gpt(types::VAR),
            )?);
        }
        Ok(Layout::of(Table::Gpt, i.o.sector_size, i.seed, partitions))
    }
}

impl RawEfi {
    /// The ESP (`esp_size` bytes), the root and what goes with it
    /// (verity, A/B twins): every partition but the state's.
    pub(super) fn partitions<'t>(&'t self, i: &Input, esp_size: u64) -> Result<Vec<Partition<'t>>> {
        let RawEfi {
            esp, root, verity, ..
        } = self;
        let (root_type, verity_type, sig_type) = match i.c.bootspec.spec.system.as_str() {
            "x86_64-linux" => (
                types::ROOT_X86_64,
                types::ROOT_VERITY_X86_64,
                types::ROOT_VERITY_SIG_X86_64,
            ),
            _ => (
                types::ROOT_AARCH64,
                types::ROOT_VERITY_AARCH64,
                types::ROOT_VERITY_SIG_AARCH64,
            ),
        };
        let esp_part = (Role::Esp, "ESP", "ESP");
        let mut partitions = vec![
            fat_partition(
                i,
                esp,
                esp_part,
                (ALIGN, esp_size),
                PartType::Gpt(types::ESP),
                "ESP (--esp-size)",
            )?,
            root_partition(
                i,
                root,
                ROOT_LABEL,
                PartType::Gpt(root_type),
                false,
                verity.as_deref(),
            )?,
        ];
        let slot = match (&i.version, &partitions[1].size) {
            (Some(_), SizePolicy::Fixed(n)) => Some(*n),
            _ => None,
        };
        if let Some(t) = verity {
            partitions.push(verity_partition(i, t, PartType::Gpt(verity_type), slot));
            // An A/B image's signature slot is only there signed: forge
            // sign fills the placeholder of a one-slot image only.
            if slot.is_none() || i.signers.verity.is_some() {
                partitions.push(verity_sig_partition(i, t, sig_type)?);
            }
        }
        if slot.is_some() {
            let sizes = partitions[1..]
                .iter()
                .map(|p| match p.size {
                    SizePolicy::Fixed(n) => n,
                    _ => p.fs.size().next_multiple_of(ALIGN),
                })
                .collect::<Vec<_>>();
            let twins = super::slots::empty_twins(&partitions[1..], &sizes);
            partitions.extend(twins);
        }
        Ok(partitions)
    }
}
