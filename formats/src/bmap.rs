//! bmap files (bmap-tools' format 2.0): which 4 KiB blocks of an image
//! matter, each range with its SHA-256, and the file's own SHA-256
//! computed with that field's value replaced by zeros.

use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::io;
use std::os::unix::fs::FileExt;

pub const BLOCK: u64 = 4096;

/// Byte ranges → sorted, merged, block-aligned (first, last) block ranges.
pub fn blocks(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut b: Vec<(u64, u64)> = ranges
        .iter()
        .filter(|r| r.1 > 0)
        .map(|&(s, l)| (s / BLOCK, (s + l).div_ceil(BLOCK) - 1))
        .collect();
    b.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in b {
        match out.last_mut() {
            Some(last) if s <= last.1 + 1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Longest range written to a bmap: adjacent ranges are allowed, and
/// pieces of this size let every core hash (SHA-256 itself is sequential).
pub const MAX_RANGE_BLOCKS: u64 = 16384;

/// Render the bmap of `image` (of `image_size` bytes) for the mapped byte
/// ranges, hashing the pieces in parallel with positional reads.
pub fn create(image: &std::fs::File, image_size: u64, mapped: &[(u64, u64)]) -> io::Result<String> {
    let pieces: Vec<(u64, u64)> = blocks(mapped)
        .into_iter()
        .flat_map(|(first, last)| {
            (first..=last)
                .step_by(MAX_RANGE_BLOCKS as usize)
                .map(move |s| (s, (s + MAX_RANGE_BLOCKS - 1).min(last)))
        })
        .collect();
    let hashed = pieces
        .par_iter()
        .map(|&(first, last)| -> io::Result<(u64, u64, String)> {
            let end = ((last + 1) * BLOCK).min(image_size);
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 4 << 20];
            let mut off = first * BLOCK;
            while off < end {
                let n = (buf.len() as u64).min(end - off) as usize;
                image.read_exact_at(&mut buf[..n], off)?;
                h.update(&buf[..n]);
                off += n as u64;
            }
            Ok((first, last, format!("{:x}", h.finalize())))
        })
        .collect::<io::Result<Vec<_>>>()?;
    Ok(render(image_size, &hashed))
}

fn render(image_size: u64, ranges: &[(u64, u64, String)]) -> String {
    let mapped: u64 = ranges.iter().map(|r| r.1 - r.0 + 1).sum();
    let zeros = "0".repeat(64);
    let mut s = String::new();
    s.push_str("<?xml version=\"1.0\" ?>\n");
    s.push_str("<!-- Block map written by nixforge: the blocks of the image whose content\n");
    s.push_str("     matters (tables, filesystem metadata, directories, file data, and the\n");
    s.push_str("     zeros filesystems rely on). Unmapped blocks need not be written. -->\n");
    s.push_str("<bmap version=\"2.0\">\n");
    let _ = writeln!(s, "    <ImageSize> {image_size} </ImageSize>");
    let _ = writeln!(s, "    <BlockSize> {BLOCK} </BlockSize>");
    let _ = writeln!(
        s,
        "    <BlocksCount> {} </BlocksCount>",
        image_size.div_ceil(BLOCK)
    );
    let _ = writeln!(s, "    <MappedBlocksCount> {mapped} </MappedBlocksCount>");
    s.push_str("    <ChecksumType> sha256 </ChecksumType>\n");
    let _ = writeln!(s, "    <BmapFileChecksum> {zeros} </BmapFileChecksum>");
    s.push_str("    <BlockMap>\n");
    for (a, b, h) in ranges {
        let span = if a == b {
            a.to_string()
        } else {
            format!("{a}-{b}")
        };
        let _ = writeln!(s, "        <Range chksum=\"{h}\"> {span} </Range>");
    }
    s.push_str("    </BlockMap>\n</bmap>\n");
    let sum = format!("{:x}", Sha256::digest(s.as_bytes()));
    s.replacen(&zeros, &sum, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_align() {
        assert_eq!(
            blocks(&[(0, 512), (4096, 10), (20000, 1)]),
            vec![(0, 1), (4, 4)]
        );
        assert_eq!(blocks(&[(8192, 4096), (0, 4096)]), vec![(0, 0), (2, 2)]);
    }

    #[test]
    fn file_checksum_is_over_zeroed_field() {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &[7u8; 3 * 4096]).unwrap();
        let s = create(&f, 3 * 4096, &[(0, 8192)]).unwrap();
        let start = s.find("<BmapFileChecksum> ").unwrap() + 19;
        let sum = s[start..start + 64].to_string();
        let zeroed = s.replacen(&sum, &"0".repeat(64), 1);
        assert_eq!(format!("{:x}", Sha256::digest(zeroed.as_bytes())), sum);
        assert!(s.contains("> 0-1 </Range>"));
    }

    #[test]
    fn long_ranges_are_split_into_adjacent_pieces() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(40000 * BLOCK).unwrap();
        let s = create(&f, 40000 * BLOCK, &[(0, 40000 * BLOCK)]).unwrap();
        for want in [
            "> 0-16383 </Range>",
            "> 16384-32767 </Range>",
            "> 32768-39999 </Range>",
        ] {
            assert!(s.contains(want), "{want} in\n{s}");
        }
        assert!(s.contains("<MappedBlocksCount> 40000 </MappedBlocksCount>"));
    }
}
