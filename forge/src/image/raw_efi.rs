//! raw-efi: GPT, FAT32 ESP with systemd-boot, ext4 root, ext4 state.

use anyhow::{bail, Context, Result};

use formats::{ext4, fat, gpt, seed};

use super::{
    align, trees, write_at, ImageOut, Laid, Options, PartitionReport, Planned, Progress, RootMode,
    ALIGN,
};
use crate::closure::{Closure, Store};

pub(super) fn lay(
    o: &Options,
    c: &Closure,
    store: &Store,
    seed: &str,
    f: &mut ImageOut,
    p: &Progress,
) -> Result<Laid> {
    let system = c.bootspec.spec.system.as_str();
    let Some(arch) = trees::efi_arch(system) else {
        bail!("{}: system {system:?} cannot boot from a raw-efi image (x86_64-linux and aarch64-linux can)", c.toplevel);
    };
    let root_type = if system == "x86_64-linux" {
        gpt::types::ROOT_X86_64
    } else {
        gpt::types::ROOT_AARCH64
    };
    let Some(state_size) = o.state_size else {
        bail!("raw-efi images always have a state partition: give --state-size a size");
    };
    let sd_boot = trees::find_systemd_boot(store, c, &arch)?;
    let mut specs = vec![&c.bootspec.spec];
    specs.extend(c.bootspec.specialisations.values().map(|b| &b.spec));
    for s in &specs {
        trees::check_efi_stub(&store.physical(&s.kernel), &s.kernel)?;
    }
    let ss = o.sector_size as u64;

    // Plans: everything is decided before a byte is written.
    let esp_tree = trees::esp_tree(store, c, &sd_boot, &arch, o.epoch, o.loader_timeout)?;
    let esp_off = ALIGN;
    let esp_opts = fat::Options {
        size: o.esp_size,
        sector_size: o.sector_size,
        label: "ESP".into(),
        volume_id: crate::cli::fat::volume_id(seed, "ESP"),
        epoch: o.epoch,
        hidden_sectors: (esp_off / ss) as u32,
    };
    let esp =
        Planned::Fat(fat::plan(&esp_tree, &esp_opts).context("planning the ESP (--esp-size)")?);
    let root_tree = trees::root_tree(store, c)?;
    let rw = o.root_mode == RootMode::Rw;
    let root_opts = ext4::Options::from_seed(seed, "nixos", o.root_size, rw, o.epoch);
    let root = Planned::Ext4(
        ext4::plan(&root_tree, &root_opts).context("planning the root filesystem (--root-size)")?,
    );
    let state_tree = ext4::Tree::new(0o755);
    let state_opts =
        ext4::Options::from_seed(seed, "state", ext4::Size::Fixed(state_size), true, o.epoch);
    let state = Planned::Ext4(
        ext4::plan(&state_tree, &state_opts)
            .context("planning the state filesystem (--state-size)")?,
    );
    p.stage(&format!(
        "planned: ESP {} bytes, root {} bytes, state {} bytes",
        esp.size(),
        root.size(),
        state.size()
    ));

    let root_off = align(esp_off + o.esp_size);
    let state_off = align(root_off + root.size());
    let end = align(state_off + state_size) + ALIGN;
    let guid = |what: &str| seed::uuid(seed, &format!("gpt:{what}"));
    let part = |ty: &str, name: &str, off: u64, size: u64, attrs: u64| gpt::Partition {
        type_guid: seed::parse_uuid(ty).expect("constant GUIDs parse"),
        guid: guid(name),
        first_lba: off / ss,
        last_lba: (off + size) / ss - 1,
        attributes: attrs,
        name: name.to_string(),
    };
    let table = gpt::Gpt {
        sector: ss,
        disk_sectors: end / ss,
        disk_guid: guid("disk"),
        partitions: vec![
            part(gpt::types::ESP, "ESP", esp_off, o.esp_size, 0),
            part(
                root_type,
                "nixos",
                root_off,
                align(root.size()),
                if rw { 0 } else { gpt::ATTR_READ_ONLY },
            ),
            part(gpt::types::VAR, "state", state_off, align(state_size), 0),
        ],
    };

    f.set_len(end).context("sizing the image")?;
    let mut mapped = Vec::new();
    let primary = table.primary();
    write_at(f, 0, &primary).context("writing the GPT")?;
    mapped.push((0, primary.len() as u64));
    for pt in &table.partitions {
        f.watch(pt.first_lba * ss, (pt.last_lba + 1 - pt.first_lba) * ss)
            .context("hashing the partitions")?;
    }
    mapped.extend(esp.write(f, esp_off, "ESP")?);
    p.stage("wrote the ESP");
    mapped.extend(root.write(f, root_off, "root filesystem")?);
    p.stage("wrote the root filesystem");
    mapped.extend(state.write(f, state_off, "state filesystem")?);
    p.stage("wrote the state filesystem");
    // Last, as everything is written in ascending order: the backup table.
    let (boff, backup) = table.backup();
    write_at(f, boff, &backup).context("writing the backup GPT")?;
    mapped.push((boff, backup.len() as u64));

    let fs = [
        (
            "vfat",
            "ESP",
            format!("{:08X}", esp_opts.volume_id),
            esp.size(),
        ),
        (
            "ext4",
            "nixos",
            seed::format_uuid(&root_opts.uuid),
            root.size(),
        ),
        (
            "ext4",
            "state",
            seed::format_uuid(&state_opts.uuid),
            state.size(),
        ),
    ];
    let partitions = table
        .partitions
        .iter()
        .zip(fs)
        .enumerate()
        .map(
            |(i, (pt, (fstype, label, fs_uuid, fs_size)))| PartitionReport {
                number: i as u32 + 1,
                name: pt.name.clone(),
                type_guid: seed::format_uuid(&pt.type_guid),
                guid: seed::format_uuid(&pt.guid),
                offset: pt.first_lba * ss,
                size: (pt.last_lba + 1 - pt.first_lba) * ss,
                filesystem: fstype,
                label: label.into(),
                fs_uuid,
                fs_size,
                read_only: pt.attributes & gpt::ATTR_READ_ONLY != 0,
                bootable: false,
                sha256: None,
            },
        )
        .collect();
    Ok(Laid {
        size: end,
        table: "gpt",
        disk_id: seed::format_uuid(&table.disk_guid),
        mapped,
        partitions,
    })
}
