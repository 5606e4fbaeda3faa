//! Every check of one device before a destructive write, each with its
//! own [`Check`] in the message. A refusal happens before the device is
//! opened for writing. What sysfs and /proc say is read under a
//! [`Host`]'s root, so the checks run on a fake tree in unit tests.

use anyhow::{Context, Result};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::devices::{self, Disk};
use crate::refusal::{Check, Refusal, Refused, Verb};

pub struct Target {
    pub given: PathBuf,
    pub disk: Disk,
}

/// Where discovery reads /sys and /proc: `/` on a real host, a fake tree
/// in tests.
#[derive(Debug, Clone)]
pub struct Host {
    pub root: PathBuf,
}

impl Default for Host {
    fn default() -> Self {
        Host { root: "/".into() }
    }
}

impl Host {
    /// Every whole disk, with its refusals.
    pub fn disks(&self) -> Result<Vec<Disk>> {
        devices::list_under(&self.root)
            .with_context(|| format!("reading {}", self.root.join("sys/block").display()))
    }
}

/// What the image asks of a device.
#[derive(Debug, Clone, Copy)]
pub struct Need {
    pub size: u64,
    /// The logical sector size its partition table is for (none: raw).
    pub sector: Option<u32>,
    pub allow_non_removable: bool,
}

fn refused(verb: Verb, dev: &Path, check: Check, detail: impl Into<String>) -> anyhow::Error {
    Refused {
        verb,
        device: dev.display().to_string(),
        refusal: Refusal::new(check, detail),
    }
    .into()
}

/// Every check before writing an image to `given`.
pub fn check(host: &Host, given: &Path, need: Need) -> Result<Target> {
    check_for(host, given, need, Verb::Write)
}

/// The checks before reading `given` to compare it with an image (`flash
/// verify`): a device that is read-only, or whose partitions are mounted
/// read-only (a booted card), may be read.
pub fn check_to_read(host: &Host, given: &Path, need: Need) -> Result<Target> {
    check_for(host, given, need, Verb::Verify)
}

/// `given` resolved (its path, how to show it) and its device number:
/// it exists and is a block device.
fn block_device(given: &Path, verb: Verb) -> Result<(PathBuf, String, (u32, u32))> {
    let refuse = |dev: &Path, check, detail: String| refused(verb, dev, check, detail);
    let md = match std::fs::symlink_metadata(given) {
        Ok(m) => m,
        Err(e) => return Err(refuse(given, Check::Exists, e.to_string())),
    };
    let path = std::fs::canonicalize(given)
        .map_err(|e| refuse(given, Check::Exists, format!("cannot resolve: {e}")))?;
    let shown = if path != given {
        format!("{} (resolved from {})", path.display(), given.display())
    } else {
        path.display().to_string()
    };
    let md = if md.file_type().is_symlink() {
        std::fs::metadata(&path).context("stat")?
    } else {
        md
    };
    if !md.file_type().is_block_device() {
        let what = if md.is_file() {
            "a regular file (refused, never created or overwritten)"
        } else {
            "not a block device"
        };
        return Err(refuse(Path::new(&shown), Check::BlockDevice, what.into()));
    }
    let devnum = (libc::major(md.rdev()), libc::minor(md.rdev()));
    Ok((path, shown, devnum))
}

fn check_for(host: &Host, given: &Path, need: Need, verb: Verb) -> Result<Target> {
    let (_, shown, devnum) = block_device(given, verb)?;
    let disk = check_disk(host, Path::new(&shown), devnum, need, verb)?;
    Ok(Target {
        given: given.to_owned(),
        disk,
    })
}

/// The checks of the block device `devnum` (shown as `shown`) against
/// what sysfs and /proc under `host` say of it.
fn check_disk(
    host: &Host,
    shown: &Path,
    devnum: (u32, u32),
    need: Need,
    verb: Verb,
) -> Result<Disk> {
    let refuse = |check, detail: String| refused(verb, shown, check, detail);
    let (major, minor) = devnum;
    let sys = host.root.join(format!("sys/dev/block/{major}:{minor}"));
    let sys = std::fs::canonicalize(&sys).with_context(|| format!("{}", sys.display()))?;
    if sys.join("partition").exists() {
        let parent = sys
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| format!("/dev/{}", n.to_string_lossy()))
            .unwrap_or_default();
        return Err(refuse(
            Check::WholeDisk,
            format!("a partition of {parent}; give the whole disk"),
        ));
    }
    let name = sys
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let disk = host
        .disks()?
        .into_iter()
        .find(|d| {
            d.path
                .file_name()
                .is_some_and(|n| n.to_string_lossy() == name)
        })
        .ok_or_else(|| refuse(Check::WholeDisk, format!("{name} is not in /sys/block")))?;
    for r in &disk.refusals {
        if r.check == Check::Removable && need.allow_non_removable {
            continue;
        }
        if verb == Verb::Verify && r.readable {
            continue;
        }
        return Err(refuse(r.check, r.detail.clone()));
    }
    if disk.size < need.size {
        return Err(refuse(
            Check::LargeEnough,
            format!("{} bytes, the image needs {}", disk.size, need.size),
        ));
    }
    if let Some(ss) = need.sector {
        if ss != disk.logical_sector_size {
            return Err(refuse(
                Check::SectorSize,
                format!("the image's partition table is for {ss}-byte sectors, the device has {}-byte sectors", disk.logical_sector_size),
            ));
        }
    }
    Ok(disk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A fake host: sdb (8:16, removable, 4 MiB, 512-byte sectors) with
    /// a partition sdb1 (8:17); sda (8:0) holding /.
    fn host() -> (tempfile::TempDir, Host) {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        for (name, dev, removable) in [("sda", "8:0", "0"), ("sdb", "8:16", "1")] {
            let d = r.join("sys/block").join(name);
            fs::create_dir_all(d.join("queue")).unwrap();
            for (f, v) in [
                ("size", "8192"),
                ("dev", dev),
                ("removable", removable),
                ("ro", "0"),
                ("queue/logical_block_size", "512"),
            ] {
                fs::write(d.join(f), format!("{v}\n")).unwrap();
            }
            fs::create_dir_all(r.join("sys/dev/block")).unwrap();
            std::os::unix::fs::symlink(
                format!("../../block/{name}"),
                r.join("sys/dev/block").join(dev),
            )
            .unwrap();
        }
        let p = r.join("sys/block/sdb/sdb1");
        fs::create_dir_all(&p).unwrap();
        fs::write(p.join("partition"), "1\n").unwrap();
        fs::write(p.join("dev"), "8:17\n").unwrap();
        std::os::unix::fs::symlink("../../block/sdb/sdb1", r.join("sys/dev/block/8:17")).unwrap();
        fs::create_dir_all(r.join("proc/self")).unwrap();
        fs::write(
            r.join("proc/self/mountinfo"),
            "22 1 8:0 / / rw - ext4 /dev/sda rw\n",
        )
        .unwrap();
        let h = Host { root: r.into() };
        (t, h)
    }

    fn need(size: u64, sector: u32) -> Need {
        Need {
            size,
            sector: Some(sector),
            allow_non_removable: false,
        }
    }

    fn refusal(r: Result<Disk>) -> Check {
        r.err()
            .unwrap()
            .downcast::<Refused>()
            .unwrap()
            .refusal
            .check
    }

    #[test]
    fn each_check_refuses_on_a_fake_host() {
        let (_t, h) = host();
        let dev = Path::new("/dev/x");
        let ok = check_disk(&h, dev, (8, 16), need(1 << 20, 512), Verb::Write).unwrap();
        assert_eq!(ok.path, Path::new("/dev/sdb"));
        let w = Verb::Write;
        assert_eq!(
            refusal(check_disk(&h, dev, (8, 17), need(1, 512), w)),
            Check::WholeDisk
        );
        assert_eq!(
            refusal(check_disk(&h, dev, (8, 0), need(1, 512), w)),
            Check::SystemDisk
        );
        assert_eq!(
            refusal(check_disk(&h, dev, (8, 16), need(8 << 20, 512), w)),
            Check::LargeEnough
        );
        assert_eq!(
            refusal(check_disk(&h, dev, (8, 16), need(1, 4096), w)),
            Check::SectorSize
        );
        assert!(
            check_disk(&h, dev, (9, 9), need(1, 512), w).is_err(),
            "no sysfs entry"
        );
    }

    #[test]
    fn a_non_removable_disk_needs_the_flag_and_a_read_only_mount_only_stops_writes() {
        let (_t, h) = host();
        let dev = Path::new("/dev/x");
        fs::write(h.root.join("sys/block/sdb/removable"), "0\n").unwrap();
        let n = need(1, 512);
        assert_eq!(
            refusal(check_disk(&h, dev, (8, 16), n, Verb::Write)),
            Check::Removable
        );
        let allowed = Need {
            allow_non_removable: true,
            ..n
        };
        assert!(check_disk(&h, dev, (8, 16), allowed, Verb::Write).is_ok());
        fs::write(
            h.root.join("proc/self/mountinfo"),
            "22 1 8:0 / / rw - ext4 /dev/sda rw\n30 22 8:17 / /media/c ro - ext4 /dev/sdb1 ro\n",
        )
        .unwrap();
        assert_eq!(
            refusal(check_disk(&h, dev, (8, 16), allowed, Verb::Write)),
            Check::NotMounted
        );
        assert!(check_disk(&h, dev, (8, 16), allowed, Verb::Verify).is_ok());
    }

    #[test]
    fn a_regular_file_is_refused_and_never_touched() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("img");
        fs::write(&f, b"x").unwrap();
        let e = check(&Host::default(), &f, need(1, 512)).err().unwrap();
        let r = e.downcast::<Refused>().unwrap();
        assert_eq!(r.refusal.check, Check::BlockDevice);
        assert_eq!(fs::read(&f).unwrap(), b"x");
        let gone = t.path().join("nothing");
        let r = check(&Host::default(), &gone, need(1, 512)).err().unwrap();
        assert_eq!(
            r.downcast::<Refused>().unwrap().refusal.check,
            Check::Exists
        );
    }
}
