//! Why flash will not touch a device: every check before a destructive
//! write has a [`Check`] variant, and its name is what the message shows
//! ("refusing to write to /dev/sdb: not mounted: mounted at /media/usb").
//! A new check before writing is a variant here and one `if` where it is
//! decided (`devices` for what sysfs says, `preflight` for the image
//! against the device, `session` for the run as a whole).

use serde::Serialize;

/// A check a device (or the run) must pass before any byte is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The path given exists.
    Exists,
    /// It is a block device (never a regular file).
    BlockDevice,
    /// A whole disk, not a partition.
    WholeDisk,
    /// Not a disk the running system is on.
    SystemDisk,
    /// None of its partitions is mounted.
    NotMounted,
    /// Nothing (device-mapper, a loop device) is built on it.
    NoHolders,
    /// Not used as swap.
    NotSwap,
    /// Not read-only.
    Writable,
    /// Marked removable (or an SD card), unless allowed.
    Removable,
    /// At least the image's size.
    LargeEnough,
    /// The image's table is for the device's logical sector size.
    SectorSize,
    /// No disk given twice (by two paths).
    Distinct,
    /// The identities given map one to each device.
    Identities,
    /// The device's own bytes (identity, state partition) could be planned.
    Provisioning,
    /// The user said yes (or --yes).
    Confirmed,
    /// The fake-capacity probe read back what it wrote.
    RealCapacity,
    /// The device opened is the one checked (same size, sectors, model).
    Identity,
}

impl Check {
    /// The name messages and `flash list --json` show.
    pub fn name(self) -> &'static str {
        match self {
            Check::Exists => "exists",
            Check::BlockDevice => "block device",
            Check::WholeDisk => "whole disk",
            Check::SystemDisk => "system disk",
            Check::NotMounted => "not mounted",
            Check::NoHolders => "no holders",
            Check::NotSwap => "not swap",
            Check::Writable => "writable",
            Check::Removable => "removable",
            Check::LargeEnough => "large enough",
            Check::SectorSize => "sector size",
            Check::Distinct => "distinct",
            Check::Identities => "identities",
            Check::Provisioning => "provisioning",
            Check::Confirmed => "confirmed",
            Check::RealCapacity => "real capacity",
            Check::Identity => "identity",
        }
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Check {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// One failed check: which, and what was found.
#[derive(Debug, Clone, Serialize)]
pub struct Refusal {
    pub check: Check,
    pub detail: String,
    /// It stops writing only: the device may still be read (`flash
    /// verify` of a booted card: partitions mounted read-only, a
    /// read-only device).
    #[serde(skip)]
    pub readable: bool,
}

impl Refusal {
    pub fn new(check: Check, detail: impl Into<String>) -> Refusal {
        Refusal {
            check,
            detail: detail.into(),
            readable: false,
        }
    }

    /// A refusal of writing only (see [`Refusal::readable`]).
    pub fn to_write(check: Check, detail: impl Into<String>) -> Refusal {
        Refusal {
            readable: true,
            ..Refusal::new(check, detail)
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.check, self.detail)
    }
}

/// What a refused device was to be used for, as the message says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Write,
    Verify,
}

impl std::fmt::Display for Verb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verb::Write => "write to",
            Verb::Verify => "verify",
        })
    }
}

/// A device (or several, comma-separated) refused: nothing was written.
#[derive(Debug, thiserror::Error)]
#[error("refusing to {verb} {device}: {refusal}")]
pub struct Refused {
    pub verb: Verb,
    pub device: String,
    pub refusal: Refusal,
}

impl Refused {
    /// `device` (shown as given) refused for writing by `check`.
    pub fn write(device: impl std::fmt::Display, check: Check, detail: impl Into<String>) -> Self {
        Refused {
            verb: Verb::Write,
            device: device.to_string(),
            refusal: Refusal::new(check, detail),
        }
    }
}

/// The source cannot be written as it is (exit code 2, like a refused
/// device): not a disk image, not whole, sidecars not its own.
#[derive(Debug, thiserror::Error)]
#[error("refusing {image}: {detail}")]
pub struct Unfit {
    pub image: String,
    pub detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_check_and_device() {
        let e = Refused::write("/dev/sdb", Check::NotMounted, "mounted at /media/usb");
        assert_eq!(
            e.to_string(),
            "refusing to write to /dev/sdb: not mounted: mounted at /media/usb"
        );
        let v = serde_json::to_value(Refusal::to_write(Check::Writable, "read-only")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"check": "writable", "detail": "read-only"})
        );
    }
}
