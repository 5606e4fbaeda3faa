//! The VM disk containers forge writes beyond qcow2 and VHD, read back as
//! their raw images: a dynamic VHDX, a streamOptimized VMDK (also inside
//! an OVA) and a GCE `.tar.gz` (a GNU sparse `disk.raw`). Each is read as
//! forge writes it; anything else is refused with what was wrong.

use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::unix::fs::FileExt;

use super::sparse;
use formats::{vhdx, vmdk};

fn bad(what: &str, detail: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {detail}"))
}

pub(super) fn vhdx(f: &File) -> io::Result<(File, u64)> {
    let mut head = vec![0u8; vhdx::BAT_AT as usize];
    f.read_exact_at(&mut head, 0)?;
    let p = vhdx::parse(&head).ok_or_else(|| {
        bad(
            "VHDX",
            "not a dynamic VHDX forge reads (checksums, a log to replay, a parent, \
             a table pointing outside its region)",
        )
    })?;
    let len = f.metadata()?.len();
    if p.bat_end() > len {
        return Err(bad(
            "VHDX",
            &format!(
                "its block table ends at byte {}, past the file's {len}",
                p.bat_end()
            ),
        ));
    }
    sparse(p.size, |out| {
        let mut buf = vec![0u8; p.block as usize];
        for (i, entry_at) in p.entries() {
            let mut e = [0u8; 8];
            f.read_exact_at(&mut e, entry_at)?;
            if let Some(from) = vhdx::stored_at(u64::from_le_bytes(e)) {
                let at = i * p.block;
                let n = (p.size - at).min(p.block) as usize;
                f.read_exact_at(&mut buf[..n], from)?;
                out.write_all_at(&buf[..n], at)?;
            }
        }
        Ok(())
    })
}

/// A streamOptimized VMDK of `len` bytes at `base` in `f`.
pub(super) fn vmdk(f: &File, base: u64, len: u64) -> io::Result<(File, u64)> {
    let mut tail = [0u8; 1536];
    if len < 1536 {
        return Err(bad("VMDK", "shorter than its footer"));
    }
    f.read_exact_at(&mut tail, base + len - 1536)?;
    let p = vmdk::parse_tail(&tail)
        .ok_or_else(|| bad("VMDK", "no streamOptimized footer at its end"))?;
    let sectors = |b: &[u8]| -> Vec<u64> {
        b.chunks(4)
            .map(|e| u32::from_le_bytes(e.try_into().expect("4 bytes")) as u64)
            .collect()
    };
    let (gd_at, gd_len) = (p.gd.saturating_mul(vmdk::SECTOR), vmdk::tables(p.size) * 4);
    if gd_at.saturating_add(gd_len) > len {
        return Err(bad(
            "VMDK",
            &format!("its grain directory (byte {gd_at}, {gd_len} bytes) lies past its end"),
        ));
    }
    let mut gd = vec![0u8; gd_len as usize];
    f.read_exact_at(&mut gd, base + gd_at)?;
    sparse(p.size, |out| {
        let mut gt = vec![0u8; (vmdk::GT_ENTRIES * 4) as usize];
        let mut grain = vec![0u8; vmdk::GRAIN as usize];
        for (t, table) in sectors(&gd).into_iter().enumerate() {
            if table == 0 {
                continue;
            }
            f.read_exact_at(&mut gt, base + table * vmdk::SECTOR)?;
            for (g, at) in sectors(&gt).into_iter().enumerate() {
                let lba = (t as u64 * vmdk::GT_ENTRIES + g as u64) * vmdk::GRAIN;
                if at == 0 || lba >= p.size {
                    continue;
                }
                read_grain(f, base + at * vmdk::SECTOR, lba, &mut grain)?;
                let n = (p.size - lba).min(vmdk::GRAIN) as usize;
                out.write_all_at(&grain[..n], lba)?;
            }
        }
        Ok(())
    })
}

/// The grain at `at` (its marker, then zlib data) into `out`, checking
/// that the marker names the grain at image byte `lba`.
fn read_grain(f: &File, at: u64, lba: u64, out: &mut [u8]) -> io::Result<()> {
    let mut m = [0u8; 12];
    f.read_exact_at(&mut m, at)?;
    let (marked, n) = (
        u64::from_le_bytes(m[..8].try_into().expect("8 bytes")),
        u32::from_le_bytes(m[8..].try_into().expect("4 bytes")),
    );
    if marked != lba / vmdk::SECTOR || n as u64 > 2 * vmdk::GRAIN {
        return Err(bad(
            "VMDK",
            &format!("the grain at byte {at} is not the one its table names"),
        ));
    }
    let mut z = vec![0u8; n as usize];
    f.read_exact_at(&mut z, at + 12)?;
    let mut d = flate2::Decompress::new(true);
    d.decompress(&z, out, flate2::FlushDecompress::Finish)
        .map_err(|e| bad("VMDK", &format!("the grain at byte {at}: {e}")))?;
    if d.total_out() != out.len() as u64 {
        return Err(bad("VMDK", &format!("the grain at byte {at} is short")));
    }
    Ok(())
}

/// A tar header's number: octal, or GNU's base-256.
fn number(field: &[u8]) -> u64 {
    if field[0] & 0x80 != 0 {
        return field[1..].iter().fold(0u64, |v, &b| v << 8 | b as u64);
    }
    let s: String = field
        .iter()
        .take_while(|&&c| c != 0 && c != b' ')
        .map(|&c| c as char)
        .collect();
    u64::from_str_radix(s.trim(), 8).unwrap_or(0)
}

/// The OVA's VMDK (the first `.vmdk` member).
pub(super) fn ova(f: &File, len: u64) -> io::Result<(File, u64)> {
    let mut at = 0;
    let mut h = [0u8; 512];
    while at + 512 <= len {
        f.read_exact_at(&mut h, at)?;
        if formats::sys::is_zero(&h) {
            break;
        }
        let size = number(&h[124..136]);
        let end = h[..100].iter().position(|&c| c == 0).unwrap_or(100);
        let room = len - at - 512;
        if h[..end].ends_with(b".vmdk") {
            return vmdk(f, at + 512, size.min(room));
        }
        if size > room {
            return Err(bad(
                "OVA",
                &format!("the member at byte {at} says it is {size} bytes, past the end"),
            ));
        }
        at += 512 + size.next_multiple_of(512);
    }
    Err(bad("OVA", "no .vmdk member"))
}

/// A GCE image: the gzip-compressed tar's GNU sparse `disk.raw`.
/// Whether a gzip file holds a tar (a GCE image) rather than an image.
pub(super) fn is_tar_gz(f: &File) -> io::Result<bool> {
    let mut file = f.try_clone()?;
    file.seek(io::SeekFrom::Start(0))?;
    let mut h = Vec::with_capacity(512);
    flate2::read::GzDecoder::new(io::BufReader::new(file))
        .take(512)
        .read_to_end(&mut h)?;
    Ok(h.get(257..262) == Some(b"ustar".as_slice()))
}

pub(super) fn gce(f: &File) -> io::Result<(File, u64)> {
    let mut file = f.try_clone()?;
    file.seek(io::SeekFrom::Start(0))?; // open() measured the length at the end
    let mut z = flate2::read::GzDecoder::new(io::BufReader::new(file));
    let mut h = [0u8; 512];
    z.read_exact(&mut h)?;
    if h[156] != b'S' || &h[257..265] != b"ustar  \0" {
        return Err(bad(
            "gzip",
            "not a GCE image (a GNU sparse disk.raw in a tar)",
        ));
    }
    let size = number(&h[483..495]);
    let mut regions: Vec<(u64, u64)> = h[386..482]
        .chunks(24)
        .map(|r| (number(&r[..12]), number(&r[12..])))
        .collect();
    let mut more = h[482] != 0;
    while more {
        z.read_exact(&mut h)?;
        regions.extend(
            h[..504]
                .chunks(24)
                .map(|r| (number(&r[..12]), number(&r[12..]))),
        );
        more = h[504] != 0;
    }
    sparse(size, |out| {
        let mut buf = vec![0u8; 1 << 20];
        for (mut at, len) in regions.into_iter().filter(|r| r.1 > 0) {
            if at.checked_add(len).is_none_or(|end| end > size) {
                return Err(bad("GCE", "a region past disk.raw's size"));
            }
            let mut left = len;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                z.read_exact(&mut buf[..n])?;
                out.write_all_at(&buf[..n], at)?;
                (at, left) = (at + n as u64, left - n as u64);
            }
        }
        Ok(())
    })
}
