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

#[cfg(test)]
mod tests {
    use super::*;

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
