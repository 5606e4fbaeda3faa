//! Block-device discovery from sysfs and `/proc/self/mountinfo`, with the
//! reasons a disk is refused as a flash target. No libblkid: everything
//! needed is in /sys.

use serde::Serialize;
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use crate::refusal::{Check, Refusal};

#[derive(Debug, Default, Serialize)]
pub struct Disk {
    pub path: PathBuf,
    pub size: u64,
    pub model: String,
    pub serial: String,
    pub transport: String,
    pub removable: bool,
    pub read_only: bool,
    pub logical_sector_size: u32,
    pub partitions: Vec<String>,
    /// The kernel still lists partitions, but the disk holds no partition
    /// table (a flash killed after wiping it): the nodes are stale.
    pub stale_partitions: bool,
    /// "major:minor" of the disk.
    pub devnum: String,
    /// Why this disk may not be written (empty: it may).
    pub refusals: Vec<Refusal>,
    /// Busy or backing the running system: shown only with --all.
    pub system: bool,
}

impl Disk {
    /// One line: path, size, transport, model, serial, sector size, partitions.
    pub fn describe(&self) -> String {
        let or_dash = |s: &str| {
            if s.is_empty() {
                "-".to_string()
            } else {
                s.to_string()
            }
        };
        format!(
            "{}  {:.1} GiB  {} {}  {}  sector {}  partitions: {}",
            self.path.display(),
            self.size as f64 / (1u64 << 30) as f64,
            self.transport,
            or_dash(&self.model),
            or_dash(&self.serial),
            self.logical_sector_size,
            if self.partitions.is_empty() {
                "none".into()
            } else if self.stale_partitions {
                format!(
                    "{} (stale: the disk holds no partition table)",
                    self.partitions.join(",")
                )
            } else {
                self.partitions.join(",")
            },
        )
    }
}

fn read_trim(p: impl AsRef<Path>) -> String {
    fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// (major:minor, mount point, read-only) of every mount, from mountinfo.
fn mounts(root: &Path) -> Vec<(String, String, bool)> {
    read_trim(root.join("proc/self/mountinfo"))
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let ro = f.get(5)?.split(',').any(|o| o == "ro");
            Some((f.get(2)?.to_string(), f.get(4)?.to_string(), ro))
        })
        .collect()
}

fn swaps(root: &Path) -> BTreeSet<String> {
    read_trim(root.join("proc/swaps"))
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|d| {
            Path::new(d)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .collect()
}

fn transport(sys: &Path) -> String {
    let dev = fs::canonicalize(sys.join("device")).unwrap_or_default();
    let s = dev.to_string_lossy();
    for (needle, name) in [
        ("/usb", "usb"),
        ("/nvme", "nvme"),
        ("/mmc", "mmc"),
        ("/virtio", "virtio"),
        ("/ata", "sata"),
        ("/host", "scsi"),
    ] {
        if s.contains(needle) {
            return name.to_string();
        }
    }
    if sys
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("loop"))
    {
        return "loop".into();
    }
    "unknown".into()
}

/// (loop device, backing file) for every attached loop device: a disk or
/// partition backing a loop device is in use even though nothing mounts it.
fn loop_backings(root: &Path) -> Vec<(String, String)> {
    let Ok(rd) = fs::read_dir(root.join("sys/block")) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let b = read_trim(e.path().join("loop/backing_file"));
            (!b.is_empty()).then_some((name, b))
        })
        .collect()
}

/// Every whole disk in /sys/block, with refusal reasons filled in.
pub fn list() -> std::io::Result<Vec<Disk>> {
    list_under(Path::new("/"))
}

/// Whether a disk is a card or stick the user plugs in: marked removable,
/// or an SD card (`device/type` SD) in a built-in reader, which the
/// kernel marks not removable; an eMMC (type MMC) is soldered in.
fn removable(sys: &Path) -> bool {
    read_trim(sys.join("removable")) == "1" || read_trim(sys.join("device/type")) == "SD"
}

/// The same with /sys and /proc under `root` (a fake tree in tests).
pub fn list_under(root: &Path) -> std::io::Result<Vec<Disk>> {
    let host = Host {
        mounts: mounts(root),
        swaps: swaps(root),
        backings: loop_backings(root),
    };
    let block = root.join("sys/block");
    let mut names: Vec<_> = fs::read_dir(&block)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut disks = Vec::new();
    for name in names {
        let sys = block.join(&name);
        let size = read_trim(sys.join("size")).parse::<u64>().unwrap_or(0) * 512;
        // An unattached loop device, an empty reader, RAM (zram, ram):
        // nothing to write an image to.
        if size == 0 || name.starts_with("zram") || name.starts_with("ram") {
            continue;
        }
        disks.push(disk(root, &host, &name, size));
    }
    Ok(disks)
}

/// What the host says of every disk: mounts, swaps, loop backings.
struct Host {
    mounts: Vec<(String, String, bool)>,
    swaps: BTreeSet<String>,
    backings: Vec<(String, String)>,
}

/// A disk's partitions, its and their device numbers, and whether any
/// has holders.
fn partitions(sys: &Path) -> (Vec<String>, Vec<String>, bool) {
    let mut parts = Vec::new();
    let mut devnums = vec![read_trim(sys.join("dev"))];
    let mut holders = !dir_empty(&sys.join("holders"));
    if let Ok(rd) = fs::read_dir(sys) {
        for e in rd.filter_map(|e| e.ok()) {
            let p = e.path();
            if p.join("partition").exists() {
                parts.push(e.file_name().to_string_lossy().into_owned());
                devnums.push(read_trim(p.join("dev")));
                holders |= !dir_empty(&p.join("holders"));
            }
        }
    }
    parts.sort();
    (parts, devnums, holders)
}

/// Why a disk in use is refused, and whether it is the system's.
fn in_use(
    host: &Host,
    name: &str,
    parts: &[String],
    devnums: &[String],
    holders: bool,
) -> (Vec<Refusal>, bool) {
    let mut refusals = Vec::new();
    let mut system = false;
    for (dev, mnt, ro) in &host.mounts {
        if devnums.contains(dev) {
            if ["/", "/boot", "/nix", "/usr"].contains(&mnt.as_str()) {
                refusals.push(Refusal::new(Check::SystemDisk, format!("{mnt} is on it")));
                system = true;
            } else if *ro {
                refusals.push(Refusal::to_write(
                    Check::NotMounted,
                    format!("mounted read-only at {mnt}"),
                ));
            } else {
                refusals.push(Refusal::new(Check::NotMounted, format!("mounted at {mnt}")));
            }
        }
    }
    if holders {
        refusals.push(Refusal::new(
            Check::NoHolders,
            "in use by another device (holders)",
        ));
        system = true;
    }
    let ours: Vec<String> = std::iter::once(name)
        .chain(parts.iter().map(String::as_str))
        .map(|n| format!("/dev/{n}"))
        .collect();
    for (lo, backing) in &host.backings {
        if ours.contains(backing) {
            refusals.push(Refusal::new(
                Check::NoHolders,
                format!("{backing} backs /dev/{lo}"),
            ));
        }
    }
    if host.swaps.contains(name) || parts.iter().any(|p| host.swaps.contains(p)) {
        refusals.push(Refusal::new(Check::NotSwap, "in use as swap"));
        system = true;
    }
    (refusals, system)
}

/// One whole disk of `size` bytes, with every refusal filled in.
fn disk(root: &Path, host: &Host, name: &str, size: u64) -> Disk {
    let sys = root.join("sys/block").join(name);
    let (parts, devnums, holders) = partitions(&sys);
    let (mut refusals, system) = in_use(host, name, &parts, &devnums, holders);
    let read_only = read_trim(sys.join("ro")) == "1";
    if read_only {
        refusals.push(Refusal::to_write(
            Check::Writable,
            "the device is read-only",
        ));
    }
    let removable = removable(&sys);
    if !removable {
        refusals.push(Refusal::new(
            Check::Removable,
            "not a removable disk (pass --allow-non-removable if you mean it)",
        ));
    }
    Disk {
        stale_partitions: !parts.is_empty() && no_table(&root.join("dev").join(name)),
        devnum: devnums[0].clone(),
        path: PathBuf::from("/dev").join(name),
        size,
        model: read_trim(sys.join("device/model")),
        serial: read_trim(sys.join("device/serial")),
        transport: transport(&sys),
        removable,
        read_only,
        logical_sector_size: read_trim(sys.join("queue/logical_block_size"))
            .parse()
            .unwrap_or(512),
        partitions: parts,
        refusals,
        system,
    }
}

/// Whether the disk at `dev` can be read and holds no partition table
/// (no MBR signature, no GPT header at either sector size); false when it
/// cannot be read (not root, no medium).
fn no_table(dev: &Path) -> bool {
    use std::io::Read;
    let mut head = vec![0u8; 8192];
    let Ok(mut f) = fs::File::open(dev) else {
        return false;
    };
    if f.read_exact(&mut head).is_err() {
        return false;
    }
    head[510..512] != [0x55, 0xAA]
        && &head[512..520] != b"EFI PART"
        && &head[4096..4104] != b"EFI PART"
}

fn dir_empty(p: &Path) -> bool {
    fs::read_dir(p)
        .map(|mut r| r.next().is_none())
        .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(root: &Path, name: &str, dev: &str, sectors: u64, files: &[(&str, &str)]) {
        let d = root.join("sys/block").join(name);
        fs::create_dir_all(d.join("device")).unwrap();
        fs::create_dir_all(d.join("queue")).unwrap();
        for (f, v) in [
            ("size", sectors.to_string().as_str()),
            ("dev", dev),
            ("removable", "0"),
            ("ro", "0"),
            ("queue/logical_block_size", "512"),
        ]
        .iter()
        .chain(files)
        {
            fs::write(d.join(f), format!("{v}\n")).unwrap();
        }
    }

    #[test]
    fn an_sd_card_in_a_built_in_reader_is_removable_and_an_emmc_is_not() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        disk(r, "mmcblk0", "179:0", 1 << 21, &[("device/type", "SD")]);
        disk(r, "mmcblk1", "179:8", 1 << 21, &[("device/type", "MMC")]);
        disk(r, "sda", "8:0", 1 << 22, &[]);
        disk(r, "sdb", "8:16", 1 << 22, &[("removable", "1")]);
        disk(r, "zram0", "252:0", 0, &[]);
        disk(r, "loop3", "7:3", 0, &[]);
        fs::create_dir_all(r.join("proc/self")).unwrap();
        fs::write(
            r.join("proc/self/mountinfo"),
            "22 1 8:0 / / rw - ext4 /dev/sda rw\n30 22 8:16 / /media/usb ro - vfat /dev/sdb ro\n",
        )
        .unwrap();
        let disks = list_under(r).unwrap();
        let names: Vec<String> = disks.iter().map(|d| d.path.display().to_string()).collect();
        assert_eq!(
            names,
            ["/dev/mmcblk0", "/dev/mmcblk1", "/dev/sda", "/dev/sdb"]
        );
        let checks =
            |i: usize| -> Vec<&str> { disks[i].refusals.iter().map(|r| r.check.name()).collect() };
        assert!(disks[0].removable);
        assert_eq!(checks(0), Vec::<&str>::new(), "an SD card is a target");
        assert_eq!(checks(1), ["removable"], "an eMMC is soldered in");
        assert_eq!(checks(2), ["system disk", "removable"]);
        assert!(disks[2].system);
        assert_eq!(checks(3), ["not mounted"]);
        assert!(
            disks[3].refusals[0].readable,
            "read-only: verify may read it"
        );
        assert!(!disks[2].refusals[0].readable);
    }
}
