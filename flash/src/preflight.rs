//! Every check before a destructive write, each with its own name in the
//! message. A refusal happens before the device is opened for writing.

use anyhow::{Context, Result};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::devices::{self, Disk, Refusal};

pub struct Target {
    pub given: PathBuf,
    pub disk: Disk,
}

/// What a refused device was to be used for, as the message says it.
pub const WRITE: &str = "write to";
pub const VERIFY: &str = "verify";

#[derive(Debug, thiserror::Error)]
#[error("refusing to {verb} {device}: {refusal}")]
pub struct Refused {
    /// [`WRITE`] or [`VERIFY`].
    pub verb: &'static str,
    pub device: String,
    pub refusal: Refusal,
}

fn refused(
    verb: &'static str,
    dev: &Path,
    check: &'static str,
    detail: impl Into<String>,
) -> anyhow::Error {
    Refused {
        verb,
        device: dev.display().to_string(),
        refusal: Refusal {
            check,
            detail: detail.into(),
            readable: false,
        },
    }
    .into()
}

/// Every check before writing an image of `image_size` bytes (for
/// `image_sector`-byte sectors) to `given`.
pub fn check(
    given: &Path,
    image_size: u64,
    image_sector: Option<u32>,
    allow_non_removable: bool,
) -> Result<Target> {
    check_for(given, image_size, image_sector, allow_non_removable, WRITE)
}

/// The checks before reading `given` to compare it with an image (`flash
/// verify`): a device that is read-only, or whose partitions are mounted
/// read-only (a booted card), may be read.
pub fn check_to_read(given: &Path, image_size: u64, allow_non_removable: bool) -> Result<Target> {
    check_for(given, image_size, None, allow_non_removable, VERIFY)
}

/// `given` resolved (its path, how to show it) and its metadata: it
/// exists and is a block device.
fn block_device(given: &Path, verb: &'static str) -> Result<(PathBuf, String, std::fs::Metadata)> {
    let refuse = |dev: &Path, check, detail: String| refused(verb, dev, check, detail);
    let md = match std::fs::symlink_metadata(given) {
        Ok(m) => m,
        Err(e) => return Err(refuse(given, "exists", e.to_string())),
    };
    let path = std::fs::canonicalize(given)
        .map_err(|e| refuse(given, "exists", format!("cannot resolve: {e}")))?;
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
        return Err(refuse(Path::new(&shown), "block device", what.into()));
    }
    Ok((path, shown, md))
}

fn check_for(
    given: &Path,
    image_size: u64,
    image_sector: Option<u32>,
    allow_non_removable: bool,
    verb: &'static str,
) -> Result<Target> {
    let refuse = |dev: &Path, check, detail: String| refused(verb, dev, check, detail);
    let (path, shown, md) = block_device(given, verb)?;
    let shown = Path::new(&shown);
    let (major, minor) = (libc::major(md.rdev()), libc::minor(md.rdev()));
    let sys = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}"))
        .with_context(|| format!("sysfs entry of {}", path.display()))?;
    if sys.join("partition").exists() {
        let parent = sys
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| format!("/dev/{}", n.to_string_lossy()))
            .unwrap_or_default();
        return Err(refuse(
            shown,
            "whole disk",
            format!("a partition of {parent}; give the whole disk"),
        ));
    }
    let name = sys
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let disk = devices::list()
        .context("reading /sys/block")?
        .into_iter()
        .find(|d| {
            d.path
                .file_name()
                .map(|n| n.to_string_lossy() == name)
                .unwrap_or(false)
        })
        .ok_or_else(|| refuse(shown, "whole disk", format!("{name} is not in /sys/block")))?;
    for r in &disk.refusals {
        if r.check == "removable" && allow_non_removable {
            continue;
        }
        if verb == VERIFY && r.readable {
            continue;
        }
        return Err(refuse(shown, r.check, r.detail.clone()));
    }
    if disk.size < image_size {
        return Err(refuse(
            shown,
            "large enough",
            format!("{} bytes, the image needs {image_size}", disk.size),
        ));
    }
    if let Some(ss) = image_sector {
        if ss != disk.logical_sector_size {
            return Err(refuse(
                shown,
                "sector size",
                format!("the image's partition table is for {ss}-byte sectors, the device has {}-byte sectors", disk.logical_sector_size),
            ));
        }
    }
    Ok(Target {
        given: given.to_owned(),
        disk,
    })
}
