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

/// The (first, last) block ranges a bmap lists for the mapped byte ranges:
/// merged, then cut at every multiple of [`MAX_RANGE_BLOCKS`] (windows of
/// the image, so each piece can be hashed on its own).
pub fn pieces(mapped: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for (first, last) in blocks(mapped) {
        let mut s = first;
        while s <= last {
            let window_end = (s / MAX_RANGE_BLOCKS + 1) * MAX_RANGE_BLOCKS - 1;
            out.push((s, window_end.min(last)));
            s = window_end + 1;
        }
    }
    out
}

/// A bmap piece, hashed: blocks `first..=last`, the SHA-256 the bmap
/// lists and the BLAKE3 the layout manifest lists (what flash checks a
/// signed image's ranges with: it hashes several times faster).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Piece {
    pub first: u64,
    pub last: u64,
    pub sha256: String,
    pub blake3: String,
}

/// Both hashes of one piece, fed its bytes in order.
#[derive(Clone, Default)]
pub struct PieceHash {
    sha: Sha256,
    b3: blake3::Hasher,
}

impl PieceHash {
    pub fn update(&mut self, bytes: &[u8]) {
        self.sha.update(bytes);
        self.b3.update(bytes);
    }

    pub fn finish(self, first: u64, last: u64) -> Piece {
        Piece {
            first,
            last,
            sha256: format!("{:x}", self.sha.finalize()),
            blake3: self.b3.finalize().to_hex().to_string(),
        }
    }
}

/// The pieces of `image` (of `image_size` bytes) for the mapped byte
/// ranges, hashed in parallel with positional reads.
pub fn hash(
    image: &std::fs::File,
    image_size: u64,
    mapped: &[(u64, u64)],
) -> io::Result<Vec<Piece>> {
    pieces(mapped)
        .par_iter()
        .map(|&(first, last)| -> io::Result<Piece> {
            let end = ((last + 1) * BLOCK).min(image_size);
            let mut h = PieceHash::default();
            let mut buf = vec![0u8; 1 << 20];
            let mut off = first * BLOCK;
            while off < end {
                let n = (buf.len() as u64).min(end - off) as usize;
                image.read_exact_at(&mut buf[..n], off)?;
                h.update(&buf[..n]);
                off += n as u64;
            }
            Ok(h.finish(first, last))
        })
        .collect()
}

/// Render the bmap of `image` (of `image_size` bytes) for the mapped byte
/// ranges.
pub fn create(image: &std::fs::File, image_size: u64, mapped: &[(u64, u64)]) -> io::Result<String> {
    Ok(render(image_size, &hash(image, image_size, mapped)?))
}

/// Render a bmap from pieces already hashed, as [`hash`] makes them or as
/// a stream computes them.
pub fn render(image_size: u64, ranges: &[Piece]) -> String {
    let mapped: u64 = ranges.iter().map(|r| r.last - r.first + 1).sum();
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
    for Piece {
        first: a,
        last: b,
        sha256: h,
        ..
    } in ranges
    {
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

/// A parsed bmap: image size and (first block, last block, sha256 hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bmap {
    pub image_size: u64,
    pub block_size: u64,
    pub ranges: Vec<(u64, u64, Option<String>)>,
}

impl Bmap {
    /// Mapped byte ranges (offset, length), clipped to the image size.
    pub fn byte_ranges(&self) -> Vec<(u64, u64)> {
        self.ranges
            .iter()
            .map(|&(a, b, _)| {
                // parse() made sure both ends lie within the image.
                let s = a * self.block_size;
                let e = b.saturating_add(1).saturating_mul(self.block_size);
                (s, e.min(self.image_size) - s)
            })
            .collect()
    }
}

fn tag<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let start = text.find(&open)? + open.len();
    let end = text[start..].find(&format!("</{name}>"))? + start;
    Some(text[start..end].trim())
}

/// Parse a bmap (version 1.x or 2.x, as bmap-tools and nixforge write),
/// verifying its own checksum when it carries one.
pub fn parse(text: &str) -> Result<Bmap, String> {
    let num = |name: &str| -> Result<u64, String> {
        tag(text, name)
            .ok_or_else(|| format!("no <{name}>"))?
            .parse()
            .map_err(|_| format!("<{name}> is not a number"))
    };
    let image_size = num("ImageSize")?;
    let block_size = num("BlockSize")?;
    if block_size == 0 || block_size % 512 != 0 {
        return Err(format!("block size {block_size} is not a multiple of 512"));
    }
    for (field, algo) in [("BmapFileChecksum", "sha256"), ("BmapFileSHA1", "sha1")] {
        if let Some(sum) = tag(text, field) {
            if algo == "sha256" {
                let zeroed = text.replacen(sum, &"0".repeat(sum.len()), 1);
                let got = format!("{:x}", Sha256::digest(zeroed.as_bytes()));
                if got != sum {
                    return Err(format!(
                        "bmap checksum mismatch: the file says {sum}, its contents hash to {got}"
                    ));
                }
            }
        }
    }
    let mut ranges = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("<Range") {
        let r = &rest[i..];
        let close = r.find("</Range>").ok_or("unterminated <Range>")?;
        let gt = r[..close].find('>').ok_or("malformed <Range>")?;
        let attrs = &r[..gt];
        let chksum = ["chksum=\"", "sha1=\""].iter().find_map(|k| {
            let s = attrs.find(k)? + k.len();
            Some(attrs[s..s + attrs[s..].find('"')?].to_string())
        });
        let span = r[gt + 1..close].trim();
        let (a, b) = match span.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (span, span),
        };
        let a: u64 = a.parse().map_err(|_| format!("bad range {span:?}"))?;
        let b: u64 = b.parse().map_err(|_| format!("bad range {span:?}"))?;
        if b < a
            || a.checked_mul(block_size)
                .is_none_or(|s| s >= image_size.max(1))
        {
            return Err(format!(
                "range {span} lies outside the {image_size}-byte image"
            ));
        }
        ranges.push((a, b, chksum));
        rest = &r[close..];
    }
    Ok(Bmap {
        image_size,
        block_size,
        ranges,
    })
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    #[test]
    fn arbitrary_and_mutated_bmaps_never_panic() {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &[3u8; 5 * 4096]).unwrap();
        let good = create(&f, 5 * 4096, &[(0, 4096), (3 * 4096, 2 * 4096)]).unwrap();
        let pieces = [
            "<Range",
            "</Range>",
            ">",
            "-",
            "\"",
            "chksum=\"",
            "<ImageSize>",
            "</ImageSize>",
            "<BlockSize>",
            "</BlockSize>",
            "18446744073709551615",
            "0",
            "4096",
        ];
        crate::fuzz::run("bmap::parse", 3000, |r| {
            let mut b = good.clone().into_bytes();
            r.mutate(&mut b, 6);
            let _ = parse(&String::from_utf8_lossy(&b)).map(|m| m.byte_ranges());
            // Text built from the grammar's own pieces.
            let t: String = (0..r.below(40))
                .map(|_| pieces[r.below(pieces.len())])
                .collect();
            let _ = parse(&t).map(|m| m.byte_ranges());
        });
    }

    #[test]
    fn parses_what_create_writes_and_catches_tampering() {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &[3u8; 5 * 4096]).unwrap();
        let s = create(&f, 5 * 4096, &[(0, 4096), (3 * 4096, 2 * 4096)]).unwrap();
        let b = parse(&s).unwrap();
        assert_eq!(b.image_size, 5 * 4096);
        assert_eq!(b.byte_ranges(), vec![(0, 4096), (3 * 4096, 2 * 4096)]);
        assert!(b
            .ranges
            .iter()
            .all(|r| r.2.as_ref().is_some_and(|c| c.len() == 64)));
        let tampered = s.replacen("> 0 </Range>", "> 1 </Range>", 1);
        assert!(parse(&tampered).unwrap_err().contains("checksum mismatch"));
    }
}
