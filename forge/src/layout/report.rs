//! One description of a disk: what `forge image` writes beside an image
//! (the layout manifest, `IMAGE.layout.json`), what `forge image --json`
//! prints, and what `forge inspect` reads back from any image. The
//! manifest's format is stable API: see ARCHITECTURE.md.

use serde::{Deserialize, Serialize};

use super::{PartType, Placed, Table};
use formats::gpt;

/// Bumped when a field changes meaning or goes away (new fields may come).
pub const MANIFEST_VERSION: u32 = 1;

/// What a partition is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// EFI system partition (systemd-boot).
    Esp,
    /// The Raspberry Pi firmware partition.
    Firmware,
    /// The root filesystem holding the closure.
    Root,
    /// Mutable state, mounted at /var.
    State,
}

impl Role {
    /// The word a partition's GUID is derived from (with the seed): the
    /// GPT name the first partition of the role has always had, so the
    /// GUIDs of images made before roles had indexes stay as they were.
    pub fn guid_word(self) -> &'static str {
        match self {
            Role::Esp => "ESP",
            Role::Firmware => "firmware",
            Role::Root => "nixos",
            Role::State => "state",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fs {
    /// `vfat` or `ext4`.
    pub kind: String,
    pub label: String,
    /// ext4 UUID, or the FAT volume ID as blkid shows it (`XXXX-XXXX`).
    pub uuid: String,
    /// Bytes the filesystem spans (it may be less than its partition).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub size: Option<u64>,
}

/// A boot loader entry found on a partition (by `forge inspect`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootEntry {
    pub loader: String,
    pub file: String,
    /// key → value, in file order.
    pub fields: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// 1-based, as the kernel numbers partitions.
    pub number: u32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub role: Option<Role>,
    pub offset: u64,
    pub size: u64,
    /// GPT type GUID, or the MBR type byte as two hex digits.
    pub type_id: String,
    /// A short name for the type (`esp`, `root-x86-64`, `var`, `linux`, …).
    pub type_name: String,
    /// GPT partition GUID, or the MBR PARTUUID (`<signature>-<NN>`).
    pub guid: String,
    /// GPT partition name (for MBR, the filesystem label).
    pub name: String,
    pub read_only: bool,
    pub bootable: bool,
    pub filesystem: Option<Fs>,
    /// SHA-256 of the whole partition, where it was computed (`--json`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sha256: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub boot_entries: Vec<BootEntry>,
}

/// Where our layouts put a machine's identity in the state filesystem
/// (`/var/identity` on the running system).
pub const IDENTITY_PATH: &str = "identity";

/// Where a machine's identity goes: a directory of the state
/// filesystem, visible at `/var/<path>` on the running system.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityAt {
    /// The partition number of the state filesystem.
    pub partition: u32,
    /// The directory inside that filesystem.
    pub path: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// The manifest format's version ([`MANIFEST_VERSION`]).
    pub version: u32,
    /// `gpt`, `mbr`, or `none`.
    pub table: String,
    pub sector_size: u64,
    /// GPT disk GUID, or the MBR disk signature (8 hex digits).
    pub disk_id: String,
    /// The raw image's size in bytes.
    pub size: u64,
    pub partitions: Vec<Part>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub identity: Option<IdentityAt>,
    /// SHA-256 of the image's first MiB (its table; all of a smaller
    /// image): pairs the manifest and the bmap with their image.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub head_sha256: Option<String>,
}

/// SHA-256 (hex) of an image's first MiB, given its bytes.
pub fn head_sha256(first_mib: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(first_mib))
}

/// A short name for a partition type.
pub fn type_name(t: &str) -> &'static str {
    match t {
        gpt::types::ESP => "esp",
        gpt::types::ROOT_X86_64 => "root-x86-64",
        gpt::types::ROOT_AARCH64 => "root-arm64",
        gpt::types::VAR => "var",
        "0fc63daf-8483-4772-8e79-3d69d8477de4" => "linux-generic",
        "0c" => "fat32-lba",
        "83" => "linux",
        "ee" => "gpt-protective",
        _ => "unknown",
    }
}

impl Placed<'_, '_> {
    /// The disk as laid out; `sha256` gives each partition's hash where
    /// it was computed.
    /// The image's first MiB, known without writing it when nothing but
    /// the table lies there (every partition starts at 1 MiB or later).
    fn first_mib(&self) -> Option<Vec<u8>> {
        let n = self.size.min(super::ALIGN) as usize;
        if self.at.iter().any(|&(off, _)| off < n as u64) || self.table.head.len() > n {
            return None;
        }
        let mut b = self.table.head.clone();
        b.resize(n, 0);
        Some(b)
    }

    pub fn report(&self, sha256: &dyn Fn(u64, u64) -> Option<String>) -> Disk {
        let mut partitions = Vec::new();
        for (i, (p, &(off, size))) in self.layout.partitions.iter().zip(&self.at).enumerate() {
            let type_id = match p.ty {
                PartType::Gpt(t) => t.to_string(),
                PartType::Mbr(b) => format!("{b:02x}"),
            };
            partitions.push(Part {
                number: i as u32 + 1,
                role: Some(p.role),
                offset: off,
                size,
                type_name: type_name(&type_id).into(),
                type_id,
                guid: self.table.guids[i].clone(),
                name: match self.layout.table {
                    Table::Gpt => p.name.to_string(),
                    Table::Mbr => p.label.clone(),
                },
                read_only: p.read_only,
                bootable: p.bootable,
                filesystem: Some(Fs {
                    kind: p.fs.kind().into(),
                    label: p.label.clone(),
                    uuid: p.fs.uuid(),
                    size: Some(p.fs.size()),
                }),
                sha256: sha256(off, size),
                boot_entries: Vec::new(),
            });
        }
        let identity = partitions
            .iter()
            .find(|p| p.role == Some(Role::State))
            .map(|p| IdentityAt {
                partition: p.number,
                path: IDENTITY_PATH.into(),
            });
        Disk {
            version: MANIFEST_VERSION,
            table: match self.layout.table {
                Table::Gpt => "gpt",
                Table::Mbr => "mbr",
            }
            .into(),
            sector_size: self.layout.sector_size as u64,
            disk_id: self.table.disk_id.clone(),
            size: self.size,
            partitions,
            identity,
            head_sha256: self.first_mib().map(|b| head_sha256(&b)),
        }
    }
}
