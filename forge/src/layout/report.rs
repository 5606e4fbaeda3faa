//! The description of a placed layout: the layout manifest
//! (`formats::manifest::Disk`, written beside an image, printed by
//! `forge image --json`). The manifest's types live in `formats`, where
//! flash reads them too.

use super::{Filesystem, PartType, Placed, Table};
pub use formats::manifest::*;

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
                // A signature partition holds JSON, an empty slot nothing.
                filesystem: (!matches!(p.fs, Filesystem::VeritySig { .. } | Filesystem::Empty))
                    .then(|| Fs {
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
            verity: self.layout.partitions.iter().find_map(|p| p.fs.verity()),
            toplevel: None,
            system_version: None,
            bmap_sha256: None,
            // Read back from the bytes written, as forge inspect reads it.
            iso: self.layout.iso.as_ref().and_then(|_| {
                let head = std::io::Cursor::new(&self.table.head);
                let found = formats::iso9660::read(&mut { head }).ok().flatten();
                found.as_ref().map(formats::manifest::IsoVolume::from)
            }),
            image_sha256: None,
            ranges: None,
        }
    }
}
