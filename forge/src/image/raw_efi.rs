//! raw-efi: GPT, FAT32 ESP with systemd-boot, ext4 (or EROFS) root,
//! ext4 state.

use anyhow::{bail, Result};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use formats::gpt::types;
use formats::tree::Tree;
use formats::verity;

use super::parts::root_fs;
use super::{
    fat_partition, root_partition, state_partition, trees, verity_of, verity_params_line,
    verity_partition, verity_sig_partition, DiskFormat, Input,
};
use crate::layout::{Filesystem, Layout, PartType, Partition, Role, SizePolicy, Table, ALIGN};

/// The root filesystem's label.
const ROOT_LABEL: &str = "nixos";

/// A raw-efi image's trees, one per partition.
pub(super) struct RawEfi {
    root: Tree,
    /// Empty; unused with `--state-size none` (a base image whose /var
    /// lives on another disk).
    state: Tree,
    /// systemd-boot, its names on the ESP, the UKIs' stub (`--uki`).
    sd_boot: PathBuf,
    arch: trees::EfiArch,
    uki_stub: Option<PathBuf>,
    /// Made with the layout, once the root is planned (and with
    /// `--verity` hashed: its entries name the root hash).
    esp: OnceLock<Tree>,
}

/// The root and an empty state tree, and what the ESP is made of.
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
    let uki_stub = match i.o.uki {
        true => Some(super::uki::stub_path(i.o.uki_stub.as_deref(), &sd_boot)?),
        false => None,
    };
    Ok(RawEfi {
        root: trees::root_tree(i.store, i.c, i.o.epoch)?,
        state: Tree::new(0o755),
        sd_boot,
        arch,
        uki_stub,
        esp: OnceLock::new(),
    })
}

impl RawEfi {
    /// The root filesystem, planned once (an EROFS root compressed once);
    /// with `--verity` its hash tree; and the ESP, whose entries name the
    /// root hash, made now.
    fn root_and_esp<'t>(
        &'t self,
        i: &Input,
    ) -> Result<(Filesystem<'t>, Option<Arc<verity::Tree>>, &'t Tree)> {
        let fs = root_fs(i, &self.root, ROOT_LABEL)?;
        let verity = verity_of(i, &fs)?;
        let mut extra = verity_params_line(verity.as_deref());
        if let (Some(v), None) = (&i.version, &verity) {
            // Two root partitions of one type: the entry names its slot
            // (with verity, the root hash finds it).
            extra.push(format!("root=PARTLABEL={}", super::slots::slot_name(v)));
        }
        let o = trees::EspOptions {
            epoch: i.o.epoch,
            timeout: i.o.loader_timeout,
            extra,
            uki_stub: self.uki_stub.clone(),
            secure_boot: i.signers.secure_boot.as_ref(),
            version: i.version.clone(),
        };
        if self.esp.get().is_none() {
            let esp = trees::esp_tree(i.store, i.c, &self.sd_boot, &self.arch, &o)?;
            let _ = self.esp.set(esp);
        }
        Ok((fs, verity, self.esp.get().expect("made above")))
    }
}

impl DiskFormat for RawEfi {
    fn esp(&self) -> Option<&Tree> {
        self.esp.get()
    }

    fn layout<'t>(&'t self, i: &Input) -> Result<Layout<'t>> {
        let esp_size = |_: &Tree| Ok(i.o.esp_size.unwrap_or(512 << 20));
        let mut partitions = self.partitions(i, &esp_size)?;
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
    /// The ESP (`esp_size` of its tree bytes), the root and what goes
    /// with it (verity, A/B twins): every partition but the state's.
    pub(super) fn partitions<'t>(
        &'t self,
        i: &Input,
        esp_size: &dyn Fn(&Tree) -> Result<u64>,
    ) -> Result<Vec<Partition<'t>>> {
        let (root, verity, esp) = self.root_and_esp(i)?;
        let esp_size = esp_size(esp)?;
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
                (root, ROOT_LABEL),
                PartType::Gpt(root_type),
                false,
                verity.as_deref(),
            )?,
        ];
        let slot = match (&i.version, &partitions[1].size) {
            (Some(_), SizePolicy::Fixed(n)) => Some(*n),
            _ => None,
        };
        if let Some(t) = &verity {
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
