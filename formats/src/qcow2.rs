//! qcow2 version 3 (qemu's docs/interop/qcow2.rst) with 64 KiB clusters
//! and 16-bit refcounts: the metadata for an image whose data clusters are
//! already placed, and a reader of such images (flat: no backing file, no
//! snapshots, no encryption).
//!
//! The file: cluster 0 the header; the data, in guest order; then the L2
//! tables, the L1 table, the refcount table and the refcount blocks. A
//! guest cluster is unallocated (reads as zeros), a zero cluster (the L2
//! entry's "reads as zeros" flag), data at a host cluster, or compressed:
//! raw deflate with a 4 KiB window (zlib, as QEMU reads it) at any byte
//! offset, packed one after another.

use std::io;

pub const CLUSTER_BITS: u32 = 16;
pub const CLUSTER: u64 = 1 << CLUSTER_BITS;
const MAGIC: &[u8; 4] = b"QFI\xfb";
const HEADER_LEN: u32 = 104;
/// L2 entries per table (8 bytes each).
const L2_ENTRIES: u64 = CLUSTER / 8;
/// Refcounts per refcount block (16 bits each: refcount_order 4).
const REFS_PER_BLOCK: u64 = CLUSTER / 2;
/// Standard cluster descriptor flags.
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Compressed descriptors: the offset in bits 0..CSIZE_SHIFT, the count
/// of 512-byte sectors after the first in the bits above.
const CSIZE_SHIFT: u32 = 62 - (CLUSTER_BITS - 8);
const CSIZE_MASK: u64 = (1 << (CLUSTER_BITS - 8)) - 1;
/// The deflate window QEMU's zlib decompression uses (2^12 bytes).
pub const DEFLATE_WINDOW_BITS: u8 = 12;

/// One guest cluster's L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    Unallocated,
    Zero,
    /// Data at this host cluster index.
    Data(u64),
    /// `len` bytes of deflate at byte `offset` of the file. Read back:
    /// `len` is an upper bound (to the end of the last sector).
    Compressed {
        offset: u64,
        len: u64,
    },
}

impl Entry {
    /// The 512-byte sectors a compressed cluster's bytes touch: the first
    /// and how many more.
    fn sectors(offset: u64, len: u64) -> (u64, u64) {
        let first = offset / 512;
        (first, (offset + len.max(1) - 1) / 512 - first)
    }
}

/// The metadata clusters that follow the data, and the header.
pub struct Tables {
    /// Host cluster index of the first table cluster (right after the data).
    pub first: u64,
    /// The table clusters' bytes, from `first * CLUSTER` on.
    pub bytes: Vec<u8>,
    /// Cluster 0.
    pub header: Vec<u8>,
    /// The file's whole length.
    pub file_len: u64,
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// A guest's L2 entries by guest cluster index; a cluster not in it is
/// unallocated. Sparse, so the tables' memory follows what the image
/// holds, not its virtual size.
pub type Entries = std::collections::BTreeMap<u64, Entry>;

/// The tables for an image of `size` bytes whose guest clusters are
/// `entries` and whose data occupies the file from cluster 1 up to byte
/// `data_end`.
pub fn tables(size: u64, entries: &Entries, data_end: u64) -> Tables {
    let first_free = data_end.div_ceil(CLUSTER).max(1);
    let guest = size.div_ceil(CLUSTER);
    debug_assert!(entries.keys().next_back().is_none_or(|&k| k < guest));
    let l1_entries = guest.div_ceil(L2_ENTRIES);
    let mut l2_used: Vec<u64> = entries
        .iter()
        .filter(|(_, e)| **e != Entry::Unallocated)
        .map(|(&k, _)| k / L2_ENTRIES)
        .collect();
    l2_used.dedup();
    let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER).max(1);
    // Refcount blocks cover every cluster, themselves included: the
    // smallest count that covers the total it makes.
    let fixed = first_free + l2_used.len() as u64 + l1_clusters;
    let mut rb = 1u64;
    let (total, rt_clusters) = loop {
        let rt = (rb * 8).div_ceil(CLUSTER);
        let total = fixed + rt + rb;
        if total.div_ceil(REFS_PER_BLOCK) <= rb {
            break (total, rt);
        }
        rb = total.div_ceil(REFS_PER_BLOCK);
    };
    let first = first_free;
    let l2_at = first;
    let l1_at = l2_at + l2_used.len() as u64;
    let rt_at = l1_at + l1_clusters;
    let rb_at = rt_at + rt_clusters;
    let mut bytes = vec![0u8; ((total - first) * CLUSTER) as usize];
    let at = |cluster: u64| ((cluster - first) * CLUSTER) as usize;
    let mut l1 = vec![0u64; l1_entries as usize];
    for (i, &t) in l2_used.iter().enumerate() {
        let host = l2_at + i as u64;
        l1[t as usize] = (host * CLUSTER) | COPIED;
        let base = at(host);
        let lo = t * L2_ENTRIES;
        for (&g, e) in entries.range(lo..lo + L2_ENTRIES) {
            let v = match *e {
                Entry::Data(h) => (h * CLUSTER) | COPIED,
                Entry::Zero => ZERO,
                Entry::Compressed { offset, len } => {
                    let (_, more) = Entry::sectors(offset, len);
                    COMPRESSED | (more << CSIZE_SHIFT) | offset
                }
                Entry::Unallocated => 0,
            };
            put64(&mut bytes, base + ((g - lo) * 8) as usize, v);
        }
    }
    for (i, v) in l1.iter().enumerate() {
        put64(&mut bytes, at(l1_at) + i * 8, *v);
    }
    for i in 0..rb {
        put64(
            &mut bytes,
            at(rt_at) + (i * 8) as usize,
            (rb_at + i) * CLUSTER,
        );
    }
    let refs = refcounts(entries, first, total);
    for (c, r) in refs.iter().enumerate() {
        let o = at(rb_at) + c * 2;
        bytes[o..o + 2].copy_from_slice(&r.to_be_bytes());
    }
    let header = header(size, l1_entries, l1_at, rt_at, rt_clusters);
    // No header extensions: the end marker (type 0, length 0) is zeros.
    Tables {
        first,
        bytes,
        header,
        file_len: total * CLUSTER,
    }
}

/// Each cluster's reference count (of a file of `total` clusters whose
/// tables start at cluster `first`).
fn refcounts(entries: &Entries, first: u64, total: u64) -> Vec<u16> {
    // Every table cluster and the header are used once; a data cluster
    // once, or once per compressed cluster whose sectors touch it.
    let mut refs = vec![0u16; total as usize];
    refs[0] = 1;
    for r in &mut refs[first as usize..] {
        *r = 1;
    }
    for e in entries.values() {
        match *e {
            Entry::Data(h) => refs[h as usize] += 1,
            Entry::Compressed { offset, len } => {
                let (s, more) = Entry::sectors(offset, len);
                for c in (s * 512) / CLUSTER..=((s + more) * 512 + 511) / CLUSTER {
                    refs[c as usize] += 1;
                }
            }
            _ => {}
        }
    }
    refs
}

/// The header cluster (version 3, 16-bit refcounts) with the tables'
/// places.
fn header(size: u64, l1_entries: u64, l1_at: u64, rt_at: u64, rt_clusters: u64) -> Vec<u8> {
    let mut header = vec![0u8; CLUSTER as usize];
    header[..4].copy_from_slice(MAGIC);
    put32(&mut header, 4, 3);
    put32(&mut header, 20, CLUSTER_BITS);
    put64(&mut header, 24, size);
    put32(&mut header, 36, l1_entries as u32);
    put64(&mut header, 40, l1_at * CLUSTER);
    put64(&mut header, 48, rt_at * CLUSTER);
    put32(&mut header, 56, rt_clusters as u32);
    put32(&mut header, 96, 4); // refcount_order: 16-bit refcounts
    put32(&mut header, 100, HEADER_LEN);
    header
}

/// The header extension naming the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// Where the backing file's name goes in the header cluster.
const BACKING_NAME_AT: usize = 1024;

/// A file as its non-zero pieces `(offset, bytes)` and its length.
pub type Sparse = (Vec<(u64, Vec<u8>)>, u64);

/// An overlay: a qcow2 image of `size` bytes, every cluster unallocated,
/// reading through to `backing` (a path, relative to the overlay's
/// directory or absolute) of format `format`. Returns the file's non-zero
/// pieces `(offset, bytes)` and its length (the rest reads as zeros).
pub fn overlay(size: u64, backing: &str, format: &str) -> Result<Sparse, String> {
    if backing.is_empty() || backing.len() > 1023 || format.len() > 16 {
        return Err(format!(
            "backing file name of {} bytes (1..1023 fit)",
            backing.len()
        ));
    }
    let t = tables(size, &Entries::new(), CLUSTER);
    let mut h = t.header;
    put64(&mut h, 8, BACKING_NAME_AT as u64);
    put32(&mut h, 16, backing.len() as u32);
    put32(&mut h, HEADER_LEN as usize, EXT_BACKING_FORMAT);
    put32(&mut h, HEADER_LEN as usize + 4, format.len() as u32);
    let at = HEADER_LEN as usize + 8;
    h[at..at + format.len()].copy_from_slice(format.as_bytes());
    // Then the end of the extensions (type 0, length 0): zeros.
    h[BACKING_NAME_AT..BACKING_NAME_AT + backing.len()].copy_from_slice(backing.as_bytes());
    let mut pieces = vec![(0, h[..BACKING_NAME_AT + backing.len()].to_vec())];
    pieces.extend(
        crate::sys::nonzero_blocks(&t.bytes, t.first * CLUSTER)
            .into_iter()
            .map(|(at, b)| (at, b.to_vec())),
    );
    Ok((pieces, t.file_len))
}

/// A flat qcow2 image opened for reading.
pub struct Reader {
    pub size: u64,
    l1: Vec<u64>,
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("qcow2: {what}"))
}

impl Reader {
    /// `read_at(offset, len)` reads the file.
    pub fn open(read_at: &mut dyn FnMut(u64, usize) -> io::Result<Vec<u8>>) -> io::Result<Reader> {
        let h = read_at(0, HEADER_LEN as usize)?;
        if h.len() < HEADER_LEN as usize || &h[..4] != MAGIC {
            return Err(bad("no qcow2 magic"));
        }
        let u32at = |o: usize| u32::from_be_bytes(h[o..o + 4].try_into().expect("4 bytes"));
        let u64at = |o: usize| u64::from_be_bytes(h[o..o + 8].try_into().expect("8 bytes"));
        let version = u32at(4);
        if !(2..=3).contains(&version) {
            return Err(bad(&format!("version {version}")));
        }
        if u64at(8) != 0 {
            return Err(bad("a backing file (an overlay) is not a whole image"));
        }
        if u32at(20) != CLUSTER_BITS {
            return Err(bad("only 64 KiB clusters are read here"));
        }
        if u32at(32) != 0 {
            return Err(bad("encrypted"));
        }
        if version == 3 && u64at(72) != 0 {
            return Err(bad(
                "incompatible features (compression type, external data…)",
            ));
        }
        let size = u64at(24);
        let l1_entries = u32at(36) as u64;
        if l1_entries != size.div_ceil(CLUSTER).div_ceil(L2_ENTRIES) {
            return Err(bad("L1 size does not match the virtual size"));
        }
        // QEMU's own limit (QCOW_MAX_L1_SIZE): 32 MiB of L1 table.
        if l1_entries * 8 > 32 << 20 {
            return Err(bad("an L1 table larger than 32 MiB"));
        }
        let l1b = read_at(u64at(40), (l1_entries * 8) as usize)?;
        let l1 = l1b
            .chunks(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        Ok(Reader { size, l1 })
    }

    /// Where guest cluster `i` is: its entry.
    pub fn entry(
        &self,
        i: u64,
        read_at: &mut dyn FnMut(u64, usize) -> io::Result<Vec<u8>>,
    ) -> io::Result<Entry> {
        let l2 = self.l1.get((i / L2_ENTRIES) as usize).copied().unwrap_or(0) & OFFSET_MASK;
        if l2 == 0 {
            return Ok(Entry::Unallocated);
        }
        let e = read_at(l2 + (i % L2_ENTRIES) * 8, 8)?;
        let e = u64::from_be_bytes(e.try_into().map_err(|_| bad("short L2 table"))?);
        if e & COMPRESSED != 0 {
            let offset = e & ((1 << CSIZE_SHIFT) - 1);
            let more = (e >> CSIZE_SHIFT) & CSIZE_MASK;
            let len = (offset / 512 + more + 1) * 512 - offset;
            return Ok(Entry::Compressed { offset, len });
        }
        Ok(if e & ZERO != 0 {
            Entry::Zero
        } else if e & OFFSET_MASK == 0 {
            Entry::Unallocated
        } else {
            Entry::Data((e & OFFSET_MASK) / CLUSTER)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(entries: &[Entry], data_end: u64, size: u64) -> Vec<u8> {
        let sparse: Entries = (0..).zip(entries.iter().copied()).collect();
        let t = tables(size, &sparse, data_end);
        let mut f = vec![0u8; t.file_len as usize];
        f[..t.header.len()].copy_from_slice(&t.header);
        let at = (t.first * CLUSTER) as usize;
        f[at..at + t.bytes.len()].copy_from_slice(&t.bytes);
        f
    }

    fn read(f: &[u8]) -> impl FnMut(u64, usize) -> io::Result<Vec<u8>> + '_ {
        move |o, n| {
            o.checked_add(n as u64)
                .and_then(|e| f.get(o as usize..usize::try_from(e).ok()?))
                .map(<[u8]>::to_vec)
                .ok_or_else(|| io::Error::other("past the end"))
        }
    }

    #[test]
    fn entries_read_back() {
        let size = 5 * CLUSTER + 100;
        let e = [
            Entry::Data(1),
            Entry::Unallocated,
            Entry::Zero,
            Entry::Compressed {
                offset: 2 * CLUSTER + 700,
                len: 3000,
            },
            Entry::Data(4),
            Entry::Unallocated,
        ];
        let f = image(&e, 5 * CLUSTER, size);
        let mut r = read(&f);
        let q = Reader::open(&mut r).unwrap();
        assert_eq!(q.size, size);
        let got: Vec<Entry> = (0..6).map(|i| q.entry(i, &mut r).unwrap()).collect();
        assert_eq!(got[..3], e[..3]);
        // A compressed length reads back to the end of its last sector.
        // (Sectors 257..=263 hold bytes 131772..134772: 3396 bytes from the offset.)
        assert_eq!(
            got[3],
            Entry::Compressed {
                offset: 2 * CLUSTER + 700,
                len: 264 * 512 - (2 * CLUSTER + 700)
            }
        );
        assert_eq!(got[4..], e[4..]);
    }

    #[test]
    fn arbitrary_and_mutated_qcow2_never_panic() {
        let base = image(
            &[Entry::Data(1), Entry::Zero, Entry::Unallocated],
            2 * CLUSTER,
            3 * CLUSTER,
        );
        crate::fuzz::run("qcow2::Reader", 2000, |r| {
            let mut b = base.clone();
            // Mutate the header and the tables, where the numbers are.
            for _ in 0..r.below(6) {
                let i = if r.below(2) == 0 {
                    r.below(104)
                } else {
                    r.below(b.len())
                };
                b[i] = r.word() as u8;
            }
            let mut rd = read(&b);
            if let Ok(q) = Reader::open(&mut rd) {
                for i in 0..4 {
                    let _ = q.entry(i, &mut rd);
                }
            }
        });
    }
}
