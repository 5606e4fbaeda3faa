//! EROFS compression (LZ4, LZ4HC) for the kernel's readers since Linux
//! 5.3: fixed-size output, one 4 KiB physical cluster per extent, the
//! compressed bytes at the block's end (LZ4_0PADDING); the indexes that
//! map them are `zindex.rs`.
//!
//! Compressing happens while planning, so the map still comes before the
//! bytes: each file is cut into segments of [`SEGMENT`] bytes, compressed
//! on every core (each thread taking the next largest segment as it
//! finishes one), and each segment's blocks are appended to a scratch file
//! as it is done, its run recorded for its file; the extents are the same
//! for any thread count, and so are the image's bytes; writing copies the
//! runs from there. Within a segment, each extent
//! is the most input LZ4 fits in one block (`compress_fill`, LZ4's
//! `destSize`); an extent that would not take less room than its input is
//! stored as one raw block of 4 KiB, and so is a segment's last 4 KiB or
//! less. LZ4HC searches only input where a quicker matcher found
//! something to match (`fill_hc`). A file whose blocks would not be
//! fewer than its plain blocks is not compressed.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use super::BS;
use crate::tree::{NodeId, Tree};

/// Input per compressed segment (a multiple of the block size): 16 MiB,
/// as erofs-utils' threaded mkfs cuts files. Each segment's last block is
/// on average half used (4 MiB segments cost 23 blocks more on the
/// 2 GiB corpus than one stream), so fewer cuts make smaller images; files
/// are many, so the cores stay busy.
pub const SEGMENT: u64 = 16 << 20;
/// The most input one extent takes (LZ4 packs up to about 255:1, so only
/// runs of one byte reach it): the compact indexes count a position's
/// distance to its extent's head in 11 bits.
pub const EXTENT_MAX_IN: usize = 256 * BS as usize;
/// `--compression`: none, lz4, or lz4hc with a level (1 to 12, default 9).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    #[default]
    None,
    Lz4,
    Lz4Hc(i32),
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, level) = match s.split_once(',') {
            Some((n, l)) => (n, Some(l)),
            None => (s, None),
        };
        match (name, level) {
            ("none", None) => Ok(Compression::None),
            ("lz4", None) => Ok(Compression::Lz4),
            ("lz4hc", None) => Ok(Compression::Lz4Hc(9)),
            ("lz4hc", Some(l)) => match l.parse::<i32>() {
                Ok(n @ 1..=12) => Ok(Compression::Lz4Hc(n)),
                _ => Err(format!("{s:?}: an lz4hc level is 1 to 12")),
            },
            _ => Err(format!("{s:?}: expected none, lz4 or lz4hc[,LEVEL]")),
        }
    }
}

/// One extent: `len` bytes of the file, in one physical block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u32,
    /// Stored as it is (not worth compressing).
    pub raw: bool,
}

/// A compressed file: its extents in order, and where their blocks are in
/// the scratch file: one run (offset, bytes) per segment, in order.
#[derive(Clone, Debug)]
pub(crate) struct Packed {
    pub extents: Vec<Extent>,
    pub runs: Vec<(u64, u64)>,
}

/// The compressed blocks of every compressed file, in one unnamed file.
pub(crate) struct Scratch {
    pub file: tempfile::NamedTempFile,
    pub size: u64,
}

/// One segment's result.
struct Seg {
    extents: Vec<Extent>,
    blocks: Vec<u8>,
}

/// The extents and blocks of `data` (one segment).
fn compress_segment(data: &[u8], c: Compression) -> std::io::Result<Seg> {
    let bs = BS as usize;
    let mut extents = Vec::new();
    let mut blocks = Vec::new();
    let mut pos = 0;
    let mut dst = vec![0u8; bs];
    while pos < data.len() {
        let rest = &data[pos..data.len().min(pos + EXTENT_MAX_IN)];
        let (used, written) = match (rest.len() > bs, c) {
            (false, _) | (true, Compression::None) => (0, 0),
            (true, Compression::Lz4) => fill(rest, &mut dst, None)?,
            (true, Compression::Lz4Hc(l)) => fill_hc(rest, &mut dst, l)?,
        };
        let start = blocks.len();
        blocks.resize(start + bs, 0);
        if used > bs {
            // LZ4_0PADDING: the compressed bytes end the block.
            blocks[start + bs - written..].copy_from_slice(&dst[..written]);
            extents.push(Extent {
                len: used as u32,
                raw: false,
            });
            pos += used;
        } else {
            let n = rest.len().min(bs);
            blocks[start..start + n].copy_from_slice(&rest[..n]);
            extents.push(Extent {
                len: n as u32,
                raw: true,
            });
            pos += n;
        }
    }
    Ok(Seg { extents, blocks })
}

/// LZ4's `destSize` compression of `src` into `dst` (LZ4HC at `level`,
/// or LZ4): the input it took and the bytes it wrote.
fn fill(src: &[u8], dst: &mut [u8], level: Option<i32>) -> std::io::Result<(usize, usize)> {
    match level {
        None => lzzzz::lz4::compress_fill(src, dst),
        Some(l) => lzzzz::lz4_hc::compress_fill(src, dst, l),
    }
    .map_err(|e| std::io::Error::other(format!("lz4: {e}")))
}

/// The most input one block can hold as literals alone: LZ4's output when
/// it finds nothing to match. Its token and length bytes take the rest.
const fn literal_capacity(block: usize) -> usize {
    let mut n = block;
    while n + 1 + if n >= 15 { (n - 15) / 255 + 1 } else { 0 } > block {
        n -= 1;
    }
    n
}

/// LZ4HC's `destSize` result for one extent, after two cheap looks: where
/// neither LZ4 nor LZ4HC's level 2 (the middle matcher) finds anything to
/// match in a block's worth of input, the extent is stored raw, as LZ4HC
/// would almost always have stored it, without its search (about 40 % of
/// the corpus's compression time went to such blocks: already compressed
/// files). Compressible input goes straight to LZ4HC.
fn fill_hc(src: &[u8], dst: &mut [u8], level: i32) -> std::io::Result<(usize, usize)> {
    const LITERALS: usize = literal_capacity(BS as usize);
    debug_assert_eq!(dst.len(), BS as usize, "one block out");
    let nothing = |(used, _): (usize, usize)| used <= LITERALS;
    if nothing(fill(src, dst, None)?) && level > 2 && nothing(fill(src, dst, Some(2))?) {
        return Ok((0, 0));
    }
    fill(src, dst, Some(level))
}

/// `len` bytes of a file node at `off`.
fn read(tree: &Tree, id: NodeId, off: u64, len: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    super::write::file_bytes(&tree.node(id).kind, off, &mut buf)?;
    Ok(buf)
}

/// Compress `files` (node, size), in order: those that take fewer blocks
/// compressed, with their extents; the scratch file holding the blocks.
pub(crate) fn compress_all(
    tree: &Tree,
    files: &[(NodeId, u64)],
    c: Compression,
) -> std::io::Result<(HashMap<NodeId, Packed>, Option<Scratch>)> {
    if c == Compression::None || files.is_empty() {
        return Ok((HashMap::new(), None));
    }
    let units: Vec<(usize, u64, u64)> = files
        .iter()
        .enumerate()
        .flat_map(|(i, &(_, size))| {
            (0..size.div_ceil(SEGMENT))
                .map(move |k| (i, k * SEGMENT, SEGMENT.min(size - k * SEGMENT)))
        })
        .collect();
    let (file, size, done) = compress_units(tree, files, &units, c)?;
    let mut per_file: Vec<Packed> = vec![
        Packed {
            extents: Vec::new(),
            runs: Vec::new(),
        };
        files.len()
    ];
    for (&(i, _, _), (extents, run)) in units.iter().zip(done) {
        per_file[i].extents.extend(extents);
        per_file[i].runs.push(run);
    }
    let packed = files
        .iter()
        .zip(per_file)
        .filter(|((_, size), p)| (p.extents.len() as u64) < size.div_ceil(BS))
        .map(|(&(id, _), p)| (id, p))
        .collect();
    Ok((packed, Some(Scratch { file, size })))
}

/// One segment's extents and its run in the scratch file.
type Done = (Vec<Extent>, (u64, u64));

/// Compress every unit (file index, offset, length) on every core, the
/// largest first (so the last ones taken are small and no core waits long
/// at the end), each appended to the scratch file as it is done. Where a
/// segment lands there depends on timing; what each unit records does
/// not, nor does the image, which copies the runs in file order.
fn compress_units(
    tree: &Tree,
    files: &[(NodeId, u64)],
    units: &[(usize, u64, u64)],
    c: Compression,
) -> std::io::Result<(tempfile::NamedTempFile, u64, Vec<Done>)> {
    let mut order: Vec<usize> = (0..units.len()).collect();
    order.sort_by_key(|&u| std::cmp::Reverse(units[u].2));
    let scratch = Mutex::new((tempfile::NamedTempFile::new()?, 0u64));
    let done: Vec<OnceLock<Done>> = units.iter().map(|_| OnceLock::new()).collect();
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<std::io::Error>> = Mutex::new(None);
    let one = |u: usize| -> std::io::Result<Done> {
        let (i, off, len) = units[u];
        let seg = compress_segment(&read(tree, files[i].0, off, len)?, c)?;
        let mut s = scratch.lock().unwrap_or_else(|e| e.into_inner());
        let at = s.1;
        s.0.write_all(&seg.blocks)?;
        s.1 += seg.blocks.len() as u64;
        Ok((seg.extents, (at, seg.blocks.len() as u64)))
    };
    std::thread::scope(|s| {
        for _ in 0..rayon::current_num_threads().max(1) {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= order.len() {
                    return;
                }
                match one(order[k]) {
                    Ok(d) => drop(done[order[k]].set(d)),
                    Err(e) => {
                        next.store(order.len(), Ordering::Relaxed);
                        let mut f = failed.lock().unwrap_or_else(|e| e.into_inner());
                        f.get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    let (mut file, size) = scratch.into_inner().unwrap_or_else(|e| e.into_inner());
    file.flush()?;
    let done = done
        .into_iter()
        .map(|d| d.into_inner().expect("every unit compressed"))
        .collect();
    Ok((file, size, done))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_names_parse() {
        assert_eq!("lz4hc".parse(), Ok(Compression::Lz4Hc(9)));
        assert_eq!("lz4hc,12".parse(), Ok(Compression::Lz4Hc(12)));
        assert_eq!("lz4".parse(), Ok(Compression::Lz4));
        assert_eq!("none".parse(), Ok(Compression::None));
        for bad in ["lz4hc,0", "lz4hc,13", "lz4,3", "zstd", ""] {
            assert!(bad.parse::<Compression>().is_err(), "{bad}");
        }
    }

    /// Bytes that do not repeat.
    fn noise(n: usize, seed: u64) -> Vec<u8> {
        crate::fuzz::Rng::seeded(seed).bytes(n)
    }

    #[test]
    fn a_block_of_literals_alone_is_what_lz4_takes_of_noise() {
        assert_eq!(literal_capacity(4096), 4079);
        assert_eq!(literal_capacity(16), 14);
        let mut dst = vec![0u8; BS as usize];
        for level in [None, Some(2), Some(9)] {
            let (used, _) = fill(&noise(64 << 10, 7), &mut dst, level).unwrap();
            assert_eq!(used, literal_capacity(BS as usize), "{level:?}");
        }
    }

    #[test]
    fn lz4hc_is_spared_noise_and_gets_everything_else() {
        let mut dst = vec![0u8; BS as usize];
        assert_eq!(fill_hc(&noise(64 << 10, 3), &mut dst, 9).unwrap(), (0, 0));
        // Noise with a repeat in reach: the quick looks see it, and LZ4HC
        // compresses it as it would alone.
        let mut data = noise(3000, 5);
        data.extend_from_within(..3000);
        data.extend(noise(8000, 9));
        let mut alone = vec![0u8; BS as usize];
        let want = fill(&data, &mut alone, Some(9)).unwrap();
        assert!(want.0 > BS as usize, "{want:?}");
        assert_eq!(fill_hc(&data, &mut dst, 9).unwrap(), want);
        assert_eq!(dst[..want.1], alone[..want.1]);
    }

    #[test]
    fn segments_decompress_to_their_input_and_raw_blocks_hold_it() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i / 13 % 7) as u8).collect();
        let seg = compress_segment(&data, Compression::Lz4Hc(9)).unwrap();
        assert_eq!(seg.blocks.len(), seg.extents.len() * BS as usize);
        let mut pos = 0;
        for (k, e) in seg.extents.iter().enumerate() {
            let block = &seg.blocks[k * BS as usize..(k + 1) * BS as usize];
            let want = &data[pos..pos + e.len as usize];
            if e.raw {
                assert_eq!(&block[..want.len()], want);
            } else {
                let z = block.iter().position(|&b| b != 0).unwrap();
                let mut out = vec![0u8; e.len as usize];
                lzzzz::lz4::decompress(&block[z..], &mut out).unwrap();
                assert_eq!(out, want);
            }
            pos += e.len as usize;
        }
        assert_eq!(pos, data.len());
        assert!(
            seg.extents.len() < data.len() / BS as usize / 4,
            "it compresses"
        );
    }
}
