//! Block-device discovery from sysfs and `/proc/self/mountinfo`, with the
//! reasons a disk is refused as a flash target. No libblkid: everything
//! needed is in /sys.

use serde::Serialize;
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, Serialize)]
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
    /// Why this disk may not be written (empty: it may).
    pub refusals: Vec<String>,
    /// Busy or backing the running system: shown only with --all.
    pub system: bool,
}

fn read_trim(p: impl AsRef<Path>) -> String {
    fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Mount points per "major:minor" from mountinfo.
fn mounts() -> Vec<(String, String)> {
    read_trim("/proc/self/mountinfo")
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Some((f.get(2)?.to_string(), f.get(4)?.to_string()))
        })
        .collect()
}

fn swaps() -> BTreeSet<String> {
    read_trim("/proc/swaps")
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

/// Every whole disk in /sys/block, with refusal reasons filled in.
pub fn list() -> std::io::Result<Vec<Disk>> {
    let mounts = mounts();
    let swaps = swaps();
    let mut disks = Vec::new();
    let mut names: Vec<_> = fs::read_dir("/sys/block")?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        let sys = Path::new("/sys/block").join(&name);
        let size = read_trim(sys.join("size")).parse::<u64>().unwrap_or(0) * 512;
        if name.starts_with("loop") && size == 0 {
            continue; // unattached loop device
        }
        let mut parts = Vec::new();
        let mut devnums = vec![read_trim(sys.join("dev"))];
        let mut holders = !dir_empty(&sys.join("holders"));
        if let Ok(rd) = fs::read_dir(&sys) {
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
        let mut refusals = Vec::new();
        let mut system = false;
        for (dev, mnt) in &mounts {
            if devnums.contains(dev) {
                if ["/", "/boot", "/nix", "/usr"].contains(&mnt.as_str()) {
                    refusals.push(format!("backs the running system ({mnt} is on it)"));
                    system = true;
                } else {
                    refusals.push(format!("mounted ({mnt})"));
                }
            }
        }
        if holders {
            refusals.push("in use (has holders)".into());
            system = true;
        }
        if swaps.contains(&name) || parts.iter().any(|p| swaps.contains(p)) {
            refusals.push("in use as swap".into());
            system = true;
        }
        let read_only = read_trim(sys.join("ro")) == "1";
        if read_only {
            refusals.push("read-only".into());
        }
        let removable = read_trim(sys.join("removable")) == "1";
        if !removable {
            refusals.push("not removable (needs --allow-non-removable)".into());
        }
        disks.push(Disk {
            path: PathBuf::from("/dev").join(&name),
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
        });
    }
    Ok(disks)
}

fn dir_empty(p: &Path) -> bool {
    fs::read_dir(p)
        .map(|mut r| r.next().is_none())
        .unwrap_or(true)
}
