//! What a file is, by its first bytes: the containers and compressors an
//! image may come in. One place for every reader (flash's source and its
//! checks, forge's unpacking and inspect), so none of them takes a
//! compressed file for a raw image.

const ZSTD: u32 = 0xFD2F_B528;
/// zstd's skippable frames (pzstd starts its files with one).
const ZSTD_SKIPPABLE: std::ops::RangeInclusive<u32> = 0x184D_2A50..=0x184D_2A5F;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// zstd frames, also behind skippable frames.
    Zstd,
    Qcow2,
    /// A dynamic (or differencing) VHD: its footer's copy comes first.
    DynamicVhd,
    Vhdx,
    /// A sparse VMDK (`KDMV`): a streamOptimized or monolithic sparse disk.
    Vmdk,
    /// A tar whose first member is an OVF descriptor: a VM appliance.
    Ova,
    Gzip,
    Xz,
    Bzip2,
    Tar,
}

impl Format {
    /// What it is, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Format::Zstd => "zstd-compressed",
            Format::Qcow2 => "a qcow2 image",
            Format::DynamicVhd => "a dynamic VHD image",
            Format::Vhdx => "a VHDX image",
            Format::Vmdk => "a VMDK image",
            Format::Ova => "an OVA appliance",
            Format::Gzip => "gzip-compressed",
            Format::Xz => "xz-compressed",
            Format::Bzip2 => "bzip2-compressed",
            Format::Tar => "a tar archive",
        }
    }

    /// Compressed data (the image is inside).
    pub fn compressed(self) -> bool {
        matches!(
            self,
            Format::Zstd | Format::Gzip | Format::Xz | Format::Bzip2
        )
    }
}

/// The format `head` (a file's first bytes, 512 or more) starts, if it is
/// one of these; None for anything else (a raw image among it).
pub fn sniff(head: &[u8]) -> Option<Format> {
    let at = |o: usize, m: &[u8]| head.get(o..o + m.len()) == Some(m);
    let le32 = head
        .get(..4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
    Some(match le32 {
        Some(ZSTD) => Format::Zstd,
        Some(m) if ZSTD_SKIPPABLE.contains(&m) => Format::Zstd,
        _ if at(0, b"QFI\xfb") => Format::Qcow2,
        _ if at(0, b"conectix") => Format::DynamicVhd,
        _ if at(0, b"vhdxfile") => Format::Vhdx,
        _ if at(0, b"KDMV") => Format::Vmdk,
        _ if at(257, b"ustar") && ovf_first(head) => Format::Ova,
        _ if at(0, &[0x1f, 0x8b]) => Format::Gzip,
        _ if at(0, &[0xfd, b'7', b'z', b'X', b'Z', 0]) => Format::Xz,
        _ if at(0, b"BZh") => Format::Bzip2,
        _ if at(257, b"ustar") => Format::Tar,
        _ => return None,
    })
}

/// Whether the tar's first member's name ends in `.ovf`.
fn ovf_first(head: &[u8]) -> bool {
    let name = &head[..100];
    let end = name.iter().position(|&c| c == 0).unwrap_or(100);
    name[..end].ends_with(b".ovf")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zstd_behind_a_skippable_frame_is_zstd_and_a_raw_image_is_nothing() {
        let mut pz = vec![0x50, 0x2A, 0x4D, 0x18, 4, 0, 0, 0, 0, 0, 0, 0];
        pz.extend_from_slice(&[0x28, 0xB5, 0x2F, 0xFD]);
        pz.resize(512, 0);
        assert_eq!(sniff(&pz), Some(Format::Zstd));
        let mut z = zstd::encode_all(&[0u8; 1000][..], 3).unwrap();
        z.resize(512, 0);
        assert_eq!(sniff(&z), Some(Format::Zstd));
        let mut mbr = vec![0u8; 512];
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        assert_eq!(sniff(&mbr), None);
        assert_eq!(sniff(&[]), None);
        let mut xz = vec![0xfd, b'7', b'z', b'X', b'Z', 0];
        xz.resize(512, 0);
        assert_eq!(sniff(&xz), Some(Format::Xz));
        assert!(Format::Xz.compressed() && !Format::Qcow2.compressed());
    }
}
