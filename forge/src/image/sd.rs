//! sd-aarch64: the Raspberry Pi layout nixpkgs' sd-image-aarch64 uses —
//! MBR, FAT32 firmware partition at 8 MiB, bootable ext4 root with
//! extlinux (booted by U-Boot's distro boot), optional ext4 state. With
//! `--verity` the root cannot hold the command line that names its own
//! hash: extlinux and the kernels move to the firmware partition, which
//! becomes the bootable one, and the hash partition follows the root.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use formats::mbr;
use formats::tree::{Kind, Owner, Tree, ROOT};

use super::parts::root_fs;
use super::{
    fat_partition, root_partition, state_partition, trees, verity_of, verity_params_line,
    verity_partition, DiskFormat, Input, Options,
};
use crate::closure::Store;
use crate::layout::{Layout, PartType, Role, Table};

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
    for f in &o.firmware {
        let p = &f.path;
        let phys = physical(store, p);
        let md = std::fs::metadata(&phys).with_context(|| format!("--firmware {}", p.display()))?;
        if let Some(name) = &f.name {
            if !md.is_file() {
                bail!("--firmware {name}={}: not a file", p.display());
            }
            t.add_host(ROOT, name.as_bytes(), &phys, owner)
                .with_context(|| format!("--firmware {name}={}", p.display()))?;
        } else if md.is_dir() {
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
                formats::tree::Node::bytes(DEFAULT_CONFIG_TXT, 0o644),
            )?;
        }
        None => {}
    }
    Ok(t)
}

/// The files a config.txt has the firmware start (`kernel=`), in order.
fn kernels_named(config: &str) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for l in config.lines() {
        let l = l.split('#').next().unwrap_or("").trim();
        if let Some(k) = l.strip_prefix("kernel=").map(str::trim) {
            if !k.is_empty() && !v.iter().any(|x| x == k) {
                v.push(k.to_string());
            }
        }
    }
    v
}

/// The config.txt the firmware partition will hold, as text.
fn config_text(o: &Options, store: &Store) -> Result<String> {
    let from = |p: &Path| {
        std::fs::read(p)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .with_context(|| p.display().to_string())
    };
    if let Some(c) = &o.config_txt {
        return from(c);
    }
    for f in &o.firmware {
        let phys = physical(store, &f.path);
        if f.name.as_deref() == Some("config.txt") {
            return from(&phys);
        }
        if f.name.is_some() {
            continue;
        }
        if phys.is_dir() && phys.join("config.txt").is_file() {
            return from(&phys.join("config.txt"));
        }
        if phys.file_name().is_some_and(|n| n == "config.txt") {
            return from(&phys);
        }
    }
    Ok(DEFAULT_CONFIG_TXT.to_string())
}

/// The firmware must be given, and hold a file config.txt starts (else
/// the Pi stops at its rainbow screen).
fn check_firmware(o: &Options, store: &Store, fw: &Tree) -> Result<()> {
    if o.firmware.is_empty() {
        bail!("sd-aarch64 needs the Pi firmware and U-Boot: give --firmware (directories or files: start4.elf, fixup4.dat, … and u-boot-rpi4.bin for a Pi 4)");
    }
    let named = kernels_named(&config_text(o, store)?);
    let Kind::Dir { children } = &fw.nodes[ROOT].kind else {
        bail!("internal: the firmware tree has no root directory");
    };
    if !named.is_empty() && !named.iter().any(|k| children.contains_key(k.as_bytes())) {
        bail!(
            "config.txt starts {} (kernel=), but none of them is among the --firmware files (NAME=FILE puts a file on the card under NAME)",
            named.join(", ")
        );
    }
    Ok(())
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

/// An sd-aarch64 image's trees, one per partition.
pub(super) struct SdAarch64 {
    /// The firmware files (`--firmware`), checked.
    firmware_files: Tree,
    /// The closure, with extlinux (without --verity).
    root: Tree,
    state: Tree,
    /// extlinux and the kernels on the firmware partition (with --verity or
    /// an EROFS root), which is then the bootable one.
    boot_on_fw: bool,
    /// The firmware partition's tree, made with the layout: with
    /// `--verity`, once the root is hashed (extlinux names the root hash).
    firmware: OnceLock<Tree>,
}

/// The root filesystem's label (U-Boot's and stage 1's way to it).
const ROOT_LABEL: &str = "NIXOS_SD";

/// The firmware files, the root (with extlinux) and an empty state tree.
pub(super) fn trees_of(i: &Input) -> Result<SdAarch64> {
    let system = i.c.bootspec.spec.system.as_str();
    if system != "aarch64-linux" {
        let fits = if system == "x86_64-linux" {
            "; --format raw-efi fits x86_64-linux systems"
        } else {
            ""
        };
        bail!("{}: system {system:?} is not aarch64-linux, which sd-aarch64 images (64-bit Raspberry Pis) need{fits}", i.c.toplevel);
    }
    if i.o.sector_size != 512 {
        bail!("sd-aarch64 images use 512-byte sectors (SD cards and their MBR); --sector-size {} does not apply", i.o.sector_size);
    }
    let mut specs = vec![&i.c.bootspec.spec];
    specs.extend(i.c.bootspec.specialisations.values().map(|b| &b.spec));
    for s in &specs {
        check_arm64_image(&i.store.physical(&s.kernel), &s.kernel)?;
    }
    let fw = firmware_tree(i.o, i.store)?;
    check_firmware(i.o, i.store, &fw)?;
    let mut root = trees::root_tree(i.store, i.c, i.o.epoch)?;
    // U-Boot reads extlinux from FAT or ext4: an EROFS root cannot hold
    // it; with verity the root cannot hold the line naming its own hash.
    let boot_on_fw = i.o.verity || i.o.root_fs == super::RootFs::Erofs;
    if !boot_on_fw {
        trees::extlinux(&mut root, i.store, i.c, i.o.epoch, i.o.loader_timeout, &[])?;
    }
    Ok(SdAarch64 {
        firmware_files: fw,
        root,
        state: Tree::new(0o755),
        boot_on_fw,
        firmware: OnceLock::new(),
    })
}

impl SdAarch64 {
    /// The firmware partition's tree: the files, and extlinux when the
    /// card boots from there (its line has the root hash with `--verity`).
    fn firmware<'t>(
        &'t self,
        i: &Input,
        verity: Option<&formats::verity::Tree>,
    ) -> Result<&'t Tree> {
        if self.firmware.get().is_none() {
            let mut fw = self.firmware_files.clone();
            if self.boot_on_fw {
                let mut extra = verity_params_line(verity);
                if verity.is_some() {
                    extra.extend(mbr_verity_devices(i));
                }
                trees::extlinux(&mut fw, i.store, i.c, i.o.epoch, i.o.loader_timeout, &extra)?;
            }
            let _ = self.firmware.set(fw);
        }
        Ok(self.firmware.get().expect("made above"))
    }
}

/// The card's root and hash partitions as systemd's veritysetup
/// generator is told them: an MBR's PARTUUIDs (signature-number) do not
/// come from the root hash as GPT GUIDs do. Their numbers are the
/// layout's order below: firmware, root, verity.
fn mbr_verity_devices(i: &Input) -> [String; 2] {
    let sig = crate::layout::mbr_signature(i.seed);
    let dev = |n| format!("PARTUUID={}", crate::layout::mbr_partuuid(sig, n));
    [
        format!("systemd.verity_root_data={}", dev(2)),
        format!("systemd.verity_root_hash={}", dev(3)),
    ]
}

impl DiskFormat for SdAarch64 {
    fn layout<'t>(&'t self, i: &Input) -> Result<Layout<'t>> {
        // The root planned once (an EROFS root compressed once), hashed
        // with --verity before the firmware partition is made.
        let root = root_fs(i, &self.root, ROOT_LABEL)?;
        let verity = verity_of(i, &root)?;
        let fw = self.firmware(i, verity.as_deref())?;
        let boot_on_fw = self.boot_on_fw;
        let fw_part = (Role::Firmware, "firmware", "FIRMWARE");
        let fw_at = (FIRMWARE_OFFSET, i.o.firmware_size);
        let what = "firmware partition (--firmware-size; with --verity it holds the kernels too)";
        let mut firmware =
            fat_partition(i, fw, fw_part, fw_at, PartType::Mbr(mbr::FAT32_LBA), what)?;
        // U-Boot's distro boot scans only partitions marked bootable: the
        // one holding extlinux.
        firmware.bootable = boot_on_fw;
        let linux = PartType::Mbr(mbr::LINUX);
        let tree = verity.as_deref();
        let mut partitions = vec![
            firmware,
            root_partition(i, (root, ROOT_LABEL), linux, !boot_on_fw, tree)?,
        ];
        if let Some(t) = &verity {
            partitions.push(verity_partition(i, t, linux, None));
        }
        if let Some(size) = i.o.state_size {
            partitions.push(state_partition(
                i,
                &self.state,
                size,
                PartType::Mbr(mbr::LINUX),
            )?);
        }
        Ok(Layout::of(Table::Mbr, 512, i.seed, partitions))
    }
}
