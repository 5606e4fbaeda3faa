//! PE/COFF images (EFI applications): a Unified Kernel Image is systemd's
//! EFI stub with sections added (the caller's, in ukify's order) after the
//! stub's own, each at the next section-aligned address and file-aligned
//! offset, read-only initialized data, the header's counts and image size
//! updated. (ukify also merges `.sbat`; not done here.)

/// IMAGE_SCN_CNT_INITIALIZED_DATA | IMAGE_SCN_MEM_READ.
const DATA_READ: u32 = 0x4000_0040;
pub(crate) const SECTION_HEADER: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum PeError {
    #[error("not a PE image ({0})")]
    NotPe(&'static str),
    #[error("no room in the PE headers for {0} more sections")]
    NoRoom(usize),
    #[error("section name {0:?} is longer than 8 bytes")]
    Name(String),
    #[error("the image would pass 4 GiB")]
    TooLarge,
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, PeError> {
    let s = b
        .get(at..at + 2)
        .ok_or(PeError::NotPe("truncated headers"))?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> Result<u32, PeError> {
    let s = b
        .get(at..at + 4)
        .ok_or(PeError::NotPe("truncated headers"))?;
    Ok(u32::from_le_bytes(s.try_into().expect("4 bytes")))
}

pub(crate) fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Where a PE image's headers are.
pub(crate) struct Layout {
    /// The COFF header (after "PE\0\0").
    coff: usize,
    pub(crate) optional: usize,
    pub(crate) sections: usize,
    pub(crate) count: usize,
    section_align: u32,
    file_align: u32,
    pub(crate) size_of_headers: u32,
}

pub(crate) fn layout(b: &[u8]) -> Result<Layout, PeError> {
    if b.get(..2) != Some(b"MZ".as_slice()) {
        return Err(PeError::NotPe("no MZ header"));
    }
    let pe = u32_at(b, 0x3C)? as usize;
    if b.get(pe..pe + 4) != Some(b"PE\0\0".as_slice()) {
        return Err(PeError::NotPe("no PE signature"));
    }
    let coff = pe + 4;
    let count = u16_at(b, coff + 2)? as usize;
    let optional = coff + 20;
    if u16_at(b, optional)? != 0x20B {
        return Err(PeError::NotPe("not PE32+"));
    }
    let sections = optional + u16_at(b, coff + 16)? as usize;
    let (section_align, file_align) = (u32_at(b, optional + 32)?, u32_at(b, optional + 36)?);
    if section_align == 0 || file_align == 0 {
        return Err(PeError::NotPe("zero alignment"));
    }
    // The checksum, which a writer clears, is there too.
    u32_at(b, optional + 64)?;
    Ok(Layout {
        coff,
        optional,
        sections,
        count,
        section_align,
        file_align,
        size_of_headers: u32_at(b, optional + 60)?,
    })
}

/// The sections of a PE image: (name, bytes as in the file, up to the
/// section's virtual size).
pub fn sections(b: &[u8]) -> Result<Vec<(String, Vec<u8>)>, PeError> {
    let l = layout(b)?;
    (0..l.count)
        .map(|i| {
            let h = l.sections + i * SECTION_HEADER;
            let name = b
                .get(h..h + 8)
                .ok_or(PeError::NotPe("truncated section table"))?;
            let name = String::from_utf8_lossy(name)
                .trim_end_matches('\0')
                .to_string();
            let (size, raw, at) = (u32_at(b, h + 8)?, u32_at(b, h + 16)?, u32_at(b, h + 20)?);
            let n = size.min(raw) as usize;
            let bytes = b
                .get(at as usize..at as usize + n)
                .ok_or(PeError::NotPe("a section past the end"))?;
            Ok((name, bytes.to_vec()))
        })
        .collect()
}

fn align(v: u64, a: u32) -> u64 {
    v.div_ceil(a as u64) * a as u64
}

/// `stub` with `add` appended as new sections, in order.
pub fn add_sections(stub: &[u8], add: &[(&str, &[u8])]) -> Result<Vec<u8>, PeError> {
    let l = layout(stub)?;
    if l.size_of_headers as usize > stub.len() {
        return Err(PeError::NotPe("headers past the end"));
    }
    let table_end = l.sections + (l.count + add.len()) * SECTION_HEADER;
    if table_end > l.size_of_headers as usize {
        return Err(PeError::NoRoom(add.len()));
    }
    let mut next_va = 0u64;
    for i in 0..l.count {
        let h = l.sections + i * SECTION_HEADER;
        let end = u32_at(stub, h + 12)? as u64 + u32_at(stub, h + 8)? as u64;
        next_va = next_va.max(end);
    }
    let mut out = stub.to_vec();
    for (k, (name, data)) in add.iter().enumerate() {
        if name.len() > 8 {
            return Err(PeError::Name(name.to_string()));
        }
        let va = align(next_va, l.section_align);
        let at = align(out.len() as u64, l.file_align);
        let raw = align(data.len() as u64, l.file_align);
        if at + raw > u32::MAX as u64 || va + data.len() as u64 > u32::MAX as u64 {
            return Err(PeError::TooLarge);
        }
        out.resize(at as usize, 0);
        out.extend_from_slice(data);
        out.resize((at + raw) as usize, 0);
        let h = l.sections + (l.count + k) * SECTION_HEADER;
        let mut header = [0u8; SECTION_HEADER];
        header[..name.len()].copy_from_slice(name.as_bytes());
        put32(&mut header, 8, data.len() as u32);
        put32(&mut header, 12, va as u32);
        put32(&mut header, 16, raw as u32);
        put32(&mut header, 20, at as u32);
        put32(&mut header, 36, DATA_READ);
        out[h..h + SECTION_HEADER].copy_from_slice(&header);
        next_va = va + data.len() as u64;
    }
    let count = (l.count + add.len()) as u16;
    out[l.coff + 2..l.coff + 4].copy_from_slice(&count.to_le_bytes());
    put32(
        &mut out,
        l.optional + 56,
        align(next_va, l.section_align) as u32,
    );
    // No checksum: EFI firmware does not check it (ukify leaves it too).
    put32(&mut out, l.optional + 64, 0);
    Ok(out)
}

/// A minimal PE32+ with one section (0x200 bytes of 0xCC at 0x400),
/// room for more in its headers and 16 data directories: for tests.
#[cfg(test)]
pub(crate) fn test_image() -> Vec<u8> {
    let mut b = vec![0u8; 0x600];
    b[..2].copy_from_slice(b"MZ");
    put32(&mut b, 0x3C, 0x80);
    b[0x80..0x84].copy_from_slice(b"PE\0\0");
    let coff = 0x84;
    b[coff + 2..coff + 4].copy_from_slice(&1u16.to_le_bytes());
    b[coff + 16..coff + 18].copy_from_slice(&240u16.to_le_bytes());
    let opt = coff + 20;
    b[opt..opt + 2].copy_from_slice(&0x20Bu16.to_le_bytes());
    put32(&mut b, opt + 32, 0x1000);
    put32(&mut b, opt + 36, 0x200);
    put32(&mut b, opt + 56, 0x2000);
    put32(&mut b, opt + 60, 0x400);
    put32(&mut b, opt + 108, 16);
    let s = opt + 240;
    b[s..s + 5].copy_from_slice(b".text");
    put32(&mut b, s + 8, 0x100);
    put32(&mut b, s + 12, 0x1000);
    put32(&mut b, s + 16, 0x200);
    put32(&mut b, s + 20, 0x400);
    b[0x400..0x500].fill(0xCC);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stub() -> Vec<u8> {
        test_image()
    }

    #[test]
    fn added_sections_read_back_aligned_after_the_stub() {
        let out = add_sections(
            &stub(),
            &[(".osrel", b"ID=nixos\n"), (".linux", &[7u8; 5000])],
        )
        .unwrap();
        let s = sections(&out).unwrap();
        let names: Vec<&str> = s.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(names, [".text", ".osrel", ".linux"]);
        assert_eq!(s[1].1, b"ID=nixos\n");
        assert_eq!(s[2].1, vec![7u8; 5000]);
        let l = layout(&out).unwrap();
        let h = |i: usize| l.sections + i * SECTION_HEADER;
        assert_eq!(
            u32_at(&out, h(1) + 12).unwrap(),
            0x2000,
            "the next aligned address"
        );
        assert_eq!(u32_at(&out, h(2) + 12).unwrap(), 0x3000);
        assert_eq!(u32_at(&out, h(2) + 20).unwrap() % 0x200, 0);
        assert_eq!(
            u32_at(&out, l.optional + 56).unwrap(),
            0x3000 + 0x2000,
            "SizeOfImage"
        );
    }

    #[test]
    fn no_room_and_not_pe_are_errors() {
        let many: Vec<(&str, &[u8])> = (0..20).map(|_| (".x", b"1".as_slice())).collect();
        assert!(matches!(
            add_sections(&stub(), &many),
            Err(PeError::NoRoom(20))
        ));
        assert!(matches!(
            add_sections(b"not a pe", &[]),
            Err(PeError::NotPe(_))
        ));
        assert!(matches!(
            add_sections(&stub(), &[(".toolongname", b"")]),
            Err(PeError::Name(_))
        ));
        // Headers said to reach past the file (no sections, their table
        // far out).
        let mut far = stub();
        far[0x84 + 2..0x84 + 4].copy_from_slice(&0u16.to_le_bytes());
        far[0x84 + 16..0x84 + 18].copy_from_slice(&0xF000u16.to_le_bytes());
        put32(&mut far, 0x84 + 20 + 60, 0x10000);
        assert!(matches!(
            add_sections(&far, &[(".osrel", b"ID=x\n")]),
            Err(PeError::NotPe("headers past the end"))
        ));
    }
}
