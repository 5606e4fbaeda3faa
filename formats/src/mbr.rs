//! The classic DOS partition table (what a Raspberry Pi's boot ROM reads):
//! a 32-bit disk signature (the Pi's PARTUUIDs are `<signature>-0N`) and up
//! to four primary partitions.

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    pub bootable: bool,
    pub kind: u8,
    pub first_lba: u32,
    pub sectors: u32,
}

pub const FAT32_LBA: u8 = 0x0C;
pub const LINUX: u8 = 0x83;

/// CHS of an LBA on the conventional 255-head, 63-sector geometry,
/// saturated at the largest encodable address past 1024 cylinders.
pub fn chs(lba: u32) -> [u8; 3] {
    let (heads, sectors) = (255u32, 63u32);
    let c = lba / (heads * sectors);
    if c > 1023 {
        return [0xFE, 0xFF, 0xFF];
    }
    let h = (lba / sectors) % heads;
    let s = lba % sectors + 1;
    [h as u8, (s as u8) | (((c >> 8) as u8) << 6), c as u8]
}

/// The 512-byte MBR sector.
pub fn encode(signature: u32, parts: &[Partition]) -> Vec<u8> {
    assert!(parts.len() <= 4, "an MBR holds four primary partitions");
    let mut m = vec![0u8; 512];
    m[440..444].copy_from_slice(&signature.to_le_bytes());
    for (i, p) in parts.iter().enumerate() {
        let e = &mut m[446 + 16 * i..462 + 16 * i];
        e[0] = if p.bootable { 0x80 } else { 0 };
        e[1..4].copy_from_slice(&chs(p.first_lba));
        e[4] = p.kind;
        e[5..8].copy_from_slice(&chs(p.first_lba + p.sectors - 1));
        e[8..12].copy_from_slice(&p.first_lba.to_le_bytes());
        e[12..16].copy_from_slice(&p.sectors.to_le_bytes());
    }
    m[510] = 0x55;
    m[511] = 0xAA;
    m
}

/// An MBR read back: its disk signature and its four entries (kind 0:
/// an empty entry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mbr {
    pub signature: u32,
    pub entries: [Partition; 4],
}

/// The MBR in a disk's first sector (`sector`: at least its 512 bytes),
/// if it has the boot signature. Any bytes give an answer, never a panic.
pub fn parse(sector: &[u8]) -> Option<Mbr> {
    let m = sector.get(..512)?;
    if m[510..512] != [0x55, 0xAA] {
        return None;
    }
    let le32 = |o: usize| u32::from_le_bytes(m[o..o + 4].try_into().expect("4 bytes"));
    let entry = |i: usize| {
        let e = 446 + 16 * i;
        Partition {
            bootable: m[e] == 0x80,
            kind: m[e + 4],
            first_lba: le32(e + 8),
            sectors: le32(e + 12),
        }
    };
    Some(Mbr {
        signature: le32(440),
        entries: [entry(0), entry(1), entry(2), entry(3)],
    })
}

/// Entry `i` of the MBR in `sector` given `sectors` sectors (its CHS end
/// to match); None when there is no such entry, or it is empty.
pub fn set_sectors(sector: &mut [u8], i: usize, sectors: u32) -> Option<()> {
    let p = parse(sector)?.entries.get(i)?.clone();
    if p.kind == 0 {
        return None;
    }
    let last = p.first_lba.checked_add(sectors)?.checked_sub(1)?;
    let e = 446 + 16 * i;
    sector[e + 5..e + 8].copy_from_slice(&chs(last));
    sector[e + 12..e + 16].copy_from_slice(&sectors.to_le_bytes());
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_encoded_parses_back_and_an_entry_resizes() {
        let parts = [
            Partition {
                bootable: false,
                kind: FAT32_LBA,
                first_lba: 16384,
                sectors: 2048,
            },
            Partition {
                bootable: true,
                kind: LINUX,
                first_lba: 18432,
                sectors: 4096,
            },
        ];
        let mut m = encode(0x0102_0304, &parts);
        let got = parse(&m).unwrap();
        assert_eq!(got.signature, 0x0102_0304);
        assert_eq!(got.entries[..2], parts);
        assert_eq!(got.entries[2].kind, 0);
        set_sectors(&mut m, 1, 8192).unwrap();
        assert_eq!(parse(&m).unwrap().entries[1].sectors, 8192);
        assert_eq!(m[446 + 16 + 5..446 + 16 + 8], chs(18432 + 8191));
        assert!(set_sectors(&mut m, 4, 1).is_none());
        assert!(set_sectors(&mut m, 2, 1).is_none(), "an empty entry");
        m[511] = 0;
        assert!(parse(&m).is_none());
        assert!(parse(&m[..100]).is_none());
    }

    #[test]
    fn layout() {
        let m = encode(
            0xDEAD_BEEF,
            &[Partition {
                bootable: true,
                kind: LINUX,
                first_lba: 16384,
                sectors: 2048,
            }],
        );
        assert_eq!(&m[440..444], &[0xEF, 0xBE, 0xAD, 0xDE]);
        assert_eq!(m[446], 0x80);
        assert_eq!(m[450], LINUX);
        assert_eq!(u32::from_le_bytes(m[454..458].try_into().unwrap()), 16384);
        assert_eq!(chs(0), [0, 1, 0]);
        assert_eq!(chs(u32::MAX), [0xFE, 0xFF, 0xFF]);
    }
}
