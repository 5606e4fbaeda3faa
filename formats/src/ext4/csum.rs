//! ext4's checksums: CRC32C without the final inversion, chained from a
//! per-filesystem seed (`crc32c(~0, uuid)`), as the kernel's `ext4_chksum`.

/// The kernel's `ext4_chksum(seed, data)`.
pub fn crc(seed: u32, data: &[u8]) -> u32 {
    // crc32c_append inverts on entry and exit; undo both.
    !crc32c::crc32c_append(!seed, data)
}

pub fn fs_seed(uuid: &[u8; 16]) -> u32 {
    crc(!0, uuid)
}

/// The per-inode seed: fs seed, then inode number and generation.
pub fn inode_seed(fs_seed: u32, ino: u32, generation: u32) -> u32 {
    crc(crc(fs_seed, &ino.to_le_bytes()), &generation.to_le_bytes())
}

#[cfg(test)]
mod tests {
    #[test]
    fn matches_standard_crc32c_when_inverted() {
        // Standard CRC-32C("123456789") = 0xE3069283.
        assert_eq!(!super::crc(!0, b"123456789"), 0xE306_9283);
    }
}
