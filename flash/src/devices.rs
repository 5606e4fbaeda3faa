//! Block-device discovery from sysfs and `/proc/self/mountinfo`, with the
//! reasons a disk is refused as a flash target. No libblkid: everything
//! needed is in /sys.

use serde::Serialize;
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// One failed preflight check: its name and what was found.
#[derive(Debug, Clone, Serialize)]
pub struct Refusal {
    pub check: &'static str,
    pub detail: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.check, self.detail)
    }
}

fn refusal(check: &'static str, detail: impl Into<String>) -> Refusal {
    Refusal {
        check,
        detail: detail.into(),
    }
}

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

/// (loop device, backing file) for every attached loop device: a disk or
/// partition backing a loop device is in use even though nothing mounts it.
fn loop_backings() -> Vec<(String, String)> {
    let Ok(rd) = fs::read_dir("/sys/block") else {
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
    let mounts = mounts();
    let swaps = swaps();
    let backings = loop_backings();
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
                    refusals.push(refusal("system disk", format!("{mnt} is on it")));
                    system = true;
                } else {
                    refusals.push(refusal("not mounted", format!("mounted at {mnt}")));
                }
            }
        }
        if holders {
            refusals.push(refusal("no holders", "in use by another device (holders)"));
            system = true;
        }
        let ours: Vec<String> = std::iter::once(&name)
            .chain(&parts)
            .map(|n| format!("/dev/{n}"))
            .collect();
        for (lo, backing) in &backings {
            if ours.contains(backing) {
                refusals.push(refusal("no holders", format!("{backing} backs /dev/{lo}")));
            }
        }
        if swaps.contains(&name) || parts.iter().any(|p| swaps.contains(p)) {
            refusals.push(refusal("not swap", "in use as swap"));
            system = true;
        }
        let read_only = read_trim(sys.join("ro")) == "1";
        if read_only {
            refusals.push(refusal("writable", "the device is read-only"));
        }
        let removable = read_trim(sys.join("removable")) == "1";
        if !removable {
            refusals.push(refusal(
                "removable",
                "not a removable disk (pass --allow-non-removable if you mean it)",
            ));
        }
        disks.push(Disk {
            devnum: devnums[0].clone(),
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
