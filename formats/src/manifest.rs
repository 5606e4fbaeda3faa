//! The layout manifest (`IMAGE.layout.json`): one description of a disk,
//! written by `forge image` beside every image, printed by `forge image
//! --json`, read back from any image by `forge inspect`, and read by
//! flash to pair sidecars with their image and to provision devices. One
//! typed value for all of them, one place for the sidecar's name and for
//! the check that a manifest is its image's. Stable API: see
//! ARCHITECTURE.md.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::gpt;

/// Bumped when a field changes meaning or goes away (new fields may come).
pub const MANIFEST_VERSION: u32 = 1;

/// What a partition is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// EFI system partition (systemd-boot).
    Esp,
    /// The Raspberry Pi firmware partition.
    Firmware,
    /// The root filesystem holding the closure.
    Root,
    /// Mutable state, mounted at /var.
    State,
    /// The root's dm-verity hash tree (`--verity`).
    RootVerity,
    /// The root hash, signed (`--verity-key`).
    RootVeritySig,
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
            Role::RootVerity => "root-verity",
            Role::RootVeritySig => "root-verity-sig",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fs {
    /// `vfat`, `ext4` or `erofs`.
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
    /// The root's dm-verity parameters (`--verity`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub verity: Option<Verity>,
    /// The system the image holds (its toplevel store path).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub toplevel: Option<String>,
    /// Its version (the toplevel's `nixos-version`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub system_version: Option<String>,
    /// SHA-256 of the bmap beside the image: a signature of this manifest
    /// (`IMAGE.sig`) vouches, through it, for every mapped range's hash.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bmap_sha256: Option<String>,
    /// A hybrid ISO's volume (`--format iso`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub iso: Option<IsoVolume>,
    /// SHA-256 of the whole raw image (holes as zeros): what `sha256sum`
    /// of the raw image prints.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub image_sha256: Option<String>,
    /// The mapped ranges, as the bmap lists them, each with its BLAKE3: a
    /// signed manifest vouches for every byte flash writes through these.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ranges: Option<Vec<Range>>,
}

/// A mapped range of the image and its BLAKE3 (hex).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    pub offset: u64,
    pub length: u64,
    pub blake3: String,
}

/// The manifest's ranges for an image's hashed bmap pieces (the last one
/// ends at the image's end, as the bmap's byte ranges do).
pub fn ranges_of(image_size: u64, pieces: &[crate::bmap::Piece]) -> Vec<Range> {
    let b = crate::bmap::BLOCK;
    pieces
        .iter()
        .map(|p| {
            let offset = p.first * b;
            Range {
                offset,
                length: ((p.last + 1) * b).min(image_size) - offset,
                blake3: p.blake3.clone(),
            }
        })
        .collect()
}

/// A hybrid ISO's ISO 9660 volume: its files are partitions' bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsoVolume {
    pub volume_id: String,
    /// The root directory's files.
    pub files: Vec<IsoFile>,
    /// The file El Torito boots under UEFI.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub efi_boot: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsoFile {
    pub name: String,
    pub offset: u64,
    pub size: u64,
}

impl From<&crate::iso9660::Found> for IsoVolume {
    fn from(f: &crate::iso9660::Found) -> IsoVolume {
        IsoVolume {
            volume_id: f.volume_id.clone(),
            files: f
                .files
                .iter()
                .map(|x| IsoFile {
                    name: x.name.clone(),
                    offset: x.start,
                    size: x.len,
                })
                .collect(),
            efi_boot: f.efi_boot.and_then(|at| {
                let boot = f.files.iter().find(|x| x.start == at);
                boot.map(|x| x.name.clone())
            }),
        }
    }
}

/// What `veritysetup` needs besides the two partitions: the root hash
/// (also the partitions' GUIDs: its first and last 128 bits) and how the
/// tree was made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verity {
    /// Hex, 64 digits: `veritysetup verify ROOT VERITY ROOTHASH`.
    pub root_hash: String,
    /// Hex, 64 digits.
    pub salt: String,
    pub data_blocks: u64,
    /// The hash algorithm and block size: `sha256`, 4096.
    pub hash: String,
    pub block_size: u32,
}

/// SHA-256 (hex) of an image's first MiB, given its bytes.
pub fn head_sha256(first_mib: &[u8]) -> String {
    sha256_hex(first_mib)
}

/// SHA-256 (hex) of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(bytes))
}

/// A short name for a partition type.
pub fn type_name(t: &str) -> &'static str {
    match t {
        gpt::types::ESP => "esp",
        gpt::types::ROOT_X86_64 => "root-x86-64",
        gpt::types::ROOT_AARCH64 => "root-arm64",
        gpt::types::VAR => "var",
        gpt::types::ROOT_VERITY_X86_64 => "root-x86-64-verity",
        gpt::types::ROOT_VERITY_AARCH64 => "root-arm64-verity",
        gpt::types::ROOT_VERITY_SIG_X86_64 => "root-x86-64-verity-sig",
        gpt::types::ROOT_VERITY_SIG_AARCH64 => "root-arm64-verity-sig",
        gpt::types::LINUX_RESERVED => "linux-reserved",
        "0fc63daf-8483-4772-8e79-3d69d8477de4" => "linux-generic",
        "0c" => "fat32-lba",
        "83" => "linux",
        "ee" => "gpt-protective",
        _ => "unknown",
    }
}

/// `disk.img` → `disk.img.layout.json`; `nixos.img.zst` →
/// `nixos.img.zst.layout.json` (the names never collide).
pub fn path_for(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".layout.json");
    PathBuf::from(s)
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {err}")]
    Unreadable { path: PathBuf, err: std::io::Error },
    #[error("{path}: not a layout manifest: {err}")]
    NotAManifest { path: PathBuf, err: String },
}

/// The manifest beside `image`: None when there is none; an error when
/// one is there but cannot be read or is not a manifest (never skipped).
pub fn read_beside(image: &Path) -> Result<Option<Disk>, ManifestError> {
    let path = path_for(image);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(ManifestError::Unreadable { path, err }),
    };
    parse(path, text.as_bytes()).map(Some)
}

/// A manifest's bytes, read from `path` (for the error).
pub fn parse(path: PathBuf, bytes: &[u8]) -> Result<Disk, ManifestError> {
    serde_json::from_slice(bytes).map_err(|e| ManifestError::NotAManifest {
        path,
        err: e.to_string(),
    })
}

/// The disk id an image's first MiB holds: the GPT disk GUID (at
/// `sector`-byte sectors), else the MBR signature.
pub fn disk_id_of(head: &[u8], sector: u64) -> Option<String> {
    let ss = usize::try_from(sector).ok()?;
    if head.get(ss..ss + 8) == Some(b"EFI PART".as_slice()) {
        let g: [u8; 16] = head.get(ss + 56..ss + 72)?.try_into().ok()?;
        return Some(crate::seed::format_uuid(&gpt::from_disk(&g)));
    }
    let m = crate::mbr::parse(head)?;
    Some(format!("{:08x}", m.signature))
}

impl Disk {
    /// Whether this manifest describes the image of `size` bytes whose
    /// first MiB (all of a smaller image) is `head`: the same size, disk
    /// id (compared case-insensitively) and first-MiB SHA-256. The
    /// answer names what differs.
    pub fn matches(&self, size: u64, head: &[u8]) -> Result<(), String> {
        if self.size != size {
            return Err(format!("{} bytes, this one is {size}", self.size));
        }
        let id = disk_id_of(head, self.sector_size).unwrap_or_default();
        if !self.disk_id.eq_ignore_ascii_case(&id) {
            return Err(format!("disk id {}, this one is {id}", self.disk_id));
        }
        if let Some(want) = &self.head_sha256 {
            let got = head_sha256(head);
            if *want != got {
                return Err(format!("first MiB sha256 {want}, this one's is {got}"));
            }
        }
        Ok(())
    }

    /// The partition of `role` (the first, if several).
    pub fn part(&self, role: Role) -> Option<&Part> {
        self.partitions.iter().find(|p| p.role == Some(role))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_matches_its_own_head_only_and_an_unreadable_one_is_an_error() {
        let mut head = vec![0u8; 4096];
        head[440..444].copy_from_slice(&0x1234_abcdu32.to_le_bytes());
        head[510..512].copy_from_slice(&[0x55, 0xAA]);
        let disk = Disk {
            version: MANIFEST_VERSION,
            table: "mbr".into(),
            sector_size: 512,
            disk_id: "1234ABCD".into(),
            size: 1 << 20,
            partitions: vec![],
            identity: None,
            head_sha256: Some(head_sha256(&head)),
            verity: None,
            toplevel: None,
            system_version: None,
            bmap_sha256: None,
            iso: None,
            image_sha256: None,
            ranges: None,
        };
        assert_eq!(disk.matches(1 << 20, &head), Ok(()));
        assert!(disk.matches(2 << 20, &head).unwrap_err().contains("bytes"));
        let mut other = head.clone();
        other[4000] = 1;
        assert!(disk
            .matches(1 << 20, &other)
            .unwrap_err()
            .contains("first MiB"));
        other[440] = 0;
        assert!(disk
            .matches(1 << 20, &other)
            .unwrap_err()
            .contains("disk id"));
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("x.img");
        assert!(read_beside(&img).unwrap().is_none(), "none there");
        std::fs::write(path_for(&img), "{\"size\": 1}").unwrap();
        assert!(matches!(
            read_beside(&img),
            Err(ManifestError::NotAManifest { .. })
        ));
        std::fs::remove_file(path_for(&img)).unwrap();
        std::fs::create_dir(path_for(&img)).unwrap();
        assert!(matches!(
            read_beside(&img),
            Err(ManifestError::Unreadable { .. })
        ));
        std::fs::write(
            img.with_file_name("y.img.layout.json"),
            serde_json::to_string(&disk).unwrap(),
        )
        .unwrap();
        assert_eq!(
            read_beside(&img.with_file_name("y.img")).unwrap(),
            Some(disk)
        );
    }
}
