//! sd-aarch64: the Raspberry Pi layout nixpkgs' sd-image-aarch64 uses —
//! MBR, FAT32 firmware partition at 8 MiB, bootable ext4 root with
//! extlinux (booted by U-Boot's distro boot), optional ext4 state.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::path::{Path, PathBuf};

use formats::tree::{Kind, Owner, Tree, ROOT};
use formats::{ext4, fat, mbr, seed};

use super::{
    align, trees, write_at, ImageOut, Laid, Options, PartitionReport, Planned, Progress, RootMode,
};
use crate::closure::{Closure, Store};

const FIRMWARE_OFFSET: u64 = 8 << 20;

/// config.txt for the Pi firmware when none is given: start U-Boot in
/// 64-bit mode with the UART on (as nixpkgs' sd-image-aarch64).
pub const DEFAULT_CONFIG_TXT: &str = "\
# Written by nixforge: the Pi firmware starts U-Boot, which boots NixOS
# through /boot/extlinux/extlinux.conf on the root partition.
[pi3]
kernel=u-boot-rpi3.bin

[pi02]
kernel=u-boot-rpi3.bin

[pi4]
kernel=u-boot-rpi4.bin
enable_gic=1
armstub=armstub8-gic.bin
disable_overscan=1
arm_boost=1

[pi5]
kernel=u-boot-rpi5.bin

[all]
arm_64bit=1
enable_uart=1
avoid_warnings=1
";

/// A `--firmware` path on this machine: store paths are read under --root.
fn physical(store: &Store, p: &Path) -> PathBuf {
    match p.to_str() {
        Some(s) if s.starts_with("/nix/store/") => store.physical(s),
        _ => p.to_path_buf(),
    }
}

fn firmware_tree(o: &Options, store: &Store) -> Result<Tree> {
    let mut t = Tree::new(0o755);
    let owner = Owner::default();
    for p in &o.firmware {
        let phys = physical(store, p);
        let md = std::fs::metadata(&phys).with_context(|| format!("--firmware {}", p.display()))?;
        if md.is_dir() {
            t.add_host_contents(ROOT, &phys, owner)
                .with_context(|| format!("--firmware {}", p.display()))?;
        } else {
            let name = phys.file_name().context("--firmware names no file")?;
            t.add_host(ROOT, name.as_encoded_bytes(), &phys, owner)
                .with_context(|| format!("--firmware {}", p.display()))?;
        }
    }
    let has_config = matches!(&t.nodes[ROOT].kind, Kind::Dir { children } if children.contains_key(&b"config.txt"[..]));
    match &o.config_txt {
        Some(c) => {
            if has_config {
                bail!(
                    "--config-txt {}: a config.txt also comes from --firmware; give one of them",
                    c.display()
                );
            }
            std::fs::metadata(c).with_context(|| format!("--config-txt {}", c.display()))?;
            t.add_host(ROOT, b"config.txt", c, owner)?;
        }
        None if !has_config => {
            t.insert(
                ROOT,
                b"config.txt",
                trees::bytes_node(DEFAULT_CONFIG_TXT, 0o644),
            )?;
        }
        None => {}
    }
    Ok(t)
}

/// U-Boot's `booti` needs an uncompressed arm64 `Image`.
fn check_arm64_image(path: &Path, logical: &str) -> Result<()> {
    use std::io::Read;
    let mut head = [0u8; 64];
    let mut f = File::open(path).with_context(|| path.display().to_string())?;
    if f.read_exact(&mut head).is_err() || &head[0x38..0x3C] != b"ARM\x64" {
        bail!("{logical}: not an uncompressed arm64 Image (no ARM\\x64 magic at byte 56); U-Boot's booti cannot start it");
    }
    Ok(())
}

pub(super) fn lay(
    o: &Options,
    c: &Closure,
    store: &Store,
    seed: &str,
    f: &mut ImageOut,
    p: &Progress,
) -> Result<Laid> {
    let system = c.bootspec.spec.system.as_str();
    if system != "aarch64-linux" {
        let fits = if system == "x86_64-linux" {
            "; --format raw-efi fits x86_64-linux systems"
        } else {
            ""
        };
        bail!("{}: system {system:?} is not aarch64-linux, which sd-aarch64 images (64-bit Raspberry Pis) need{fits}", c.toplevel);
    }
    if o.sector_size != 512 {
        bail!("sd-aarch64 images use 512-byte sectors (SD cards and their MBR); --sector-size {} does not apply", o.sector_size);
    }
    let mut specs = vec![&c.bootspec.spec];
    specs.extend(c.bootspec.specialisations.values().map(|b| &b.spec));
    for s in &specs {
        check_arm64_image(&store.physical(&s.kernel), &s.kernel)?;
    }
    let fw_tree = firmware_tree(o, store)?;
    let fw_opts = fat::Options {
        size: o.firmware_size,
        sector_size: 512,
        label: "FIRMWARE".into(),
        volume_id: crate::cli::fat::volume_id(seed, "FIRMWARE"),
        epoch: o.epoch,
        hidden_sectors: (FIRMWARE_OFFSET / 512) as u32,
    };
    let fw = Planned::Fat(
        fat::plan(&fw_tree, &fw_opts)
            .context("planning the firmware partition (--firmware-size)")?,
    );
    let mut root_tree = trees::root_tree(store, c)?;
    trees::extlinux(&mut root_tree, store, c, o.epoch, o.loader_timeout)?;
    let rw = o.root_mode == RootMode::Rw;
    let root_opts = ext4::Options::from_seed(seed, "NIXOS_SD", o.root_size, rw, o.epoch);
    let root = Planned::Ext4(
        ext4::plan(&root_tree, &root_opts).context("planning the root filesystem (--root-size)")?,
    );
    let state_tree = ext4::Tree::new(0o755);
    let state_opts = o
        .state_size
        .map(|s| ext4::Options::from_seed(seed, "state", ext4::Size::Fixed(s), true, o.epoch));
    let state = match &state_opts {
        Some(so) => Some(Planned::Ext4(
            ext4::plan(&state_tree, so).context("planning the state filesystem (--state-size)")?,
        )),
        None => None,
    };
    p.stage(&format!(
        "planned: firmware {} bytes, root {} bytes, state {}",
        fw.size(),
        root.size(),
        state
            .as_ref()
            .map(|s| format!("{} bytes", s.size()))
            .unwrap_or_else(|| "none".into())
    ));

    let root_off = align(FIRMWARE_OFFSET + o.firmware_size);
    let root_size = align(root.size());
    let state_off = root_off + root_size;
    let end = state_off + o.state_size.map(align).unwrap_or(0);
    let lba = |b: u64| -> Result<u32> {
        u32::try_from(b / 512).context("image too large for an MBR (2 TiB)")
    };
    let mut parts = vec![
        mbr::Partition {
            bootable: false,
            kind: mbr::FAT32_LBA,
            first_lba: lba(FIRMWARE_OFFSET)?,
            sectors: lba(o.firmware_size)?,
        },
        // U-Boot's distro boot scans only partitions marked bootable.
        mbr::Partition {
            bootable: true,
            kind: mbr::LINUX,
            first_lba: lba(root_off)?,
            sectors: lba(root_size)?,
        },
    ];
    if let Some(s) = o.state_size {
        parts.push(mbr::Partition {
            bootable: false,
            kind: mbr::LINUX,
            first_lba: lba(state_off)?,
            sectors: lba(align(s))?,
        });
    }
    let d = formats::seed::derive(seed, "mbr:signature");
    let signature = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);

    f.set_len(end).context("sizing the image")?;
    let table = mbr::encode(signature, &parts);
    write_at(f, 0, &table).context("writing the MBR")?;
    let mut mapped = vec![(0, table.len() as u64)];
    for pt in &parts {
        f.watch(pt.first_lba as u64 * 512, pt.sectors as u64 * 512)
            .context("hashing the partitions")?;
    }
    mapped.extend(fw.write(f, FIRMWARE_OFFSET, "firmware partition")?);
    p.stage("wrote the firmware partition");
    mapped.extend(root.write(f, root_off, "root filesystem")?);
    p.stage("wrote the root filesystem");
    if let Some(s) = &state {
        mapped.extend(s.write(f, state_off, "state filesystem")?);
        p.stage("wrote the state filesystem");
    }

    let mut reports = Vec::new();
    let mut fs = vec![
        (
            "vfat",
            "FIRMWARE",
            format!("{:08X}", fw_opts.volume_id),
            fw.size(),
        ),
        (
            "ext4",
            "NIXOS_SD",
            seed::format_uuid(&root_opts.uuid),
            root.size(),
        ),
    ];
    if let (Some(so), Some(s)) = (&state_opts, &state) {
        fs.push(("ext4", "state", seed::format_uuid(&so.uuid), s.size()));
    }
    for (i, (pt, (fstype, label, fs_uuid, fs_size))) in parts.iter().zip(fs).enumerate() {
        reports.push(PartitionReport {
            number: i as u32 + 1,
            name: label.to_string(),
            type_guid: format!("{:02x}", pt.kind),
            // The Pi's PARTUUID: <disk signature>-<partition number>.
            guid: format!("{signature:08x}-{:02x}", i + 1),
            offset: pt.first_lba as u64 * 512,
            size: pt.sectors as u64 * 512,
            filesystem: fstype,
            label: label.into(),
            fs_uuid,
            fs_size,
            read_only: false,
            bootable: pt.bootable,
            sha256: None,
        });
    }
    Ok(Laid {
        size: end,
        table: "mbr",
        disk_id: format!("{signature:08x}"),
        mapped,
        partitions: reports,
    })
}
