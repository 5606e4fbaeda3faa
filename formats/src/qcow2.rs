//! qcow2 version 3 (qemu's docs/interop/qcow2.rst) with 64 KiB clusters
//! and 16-bit refcounts: the metadata for an image whose data clusters are
//! already placed, and a reader of such images (flat: no backing file, no
//! snapshots, no compression, no encryption).
//!
//! The file: cluster 0 the header; the data clusters, in guest order; then
//! the L2 tables, the L1 table, the refcount table and the refcount blocks.
//! A guest cluster is unallocated (reads as zeros), a zero cluster (the L2
//! entry's "reads as zeros" flag), or data at a host cluster.

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
const ZERO: u64 = 1;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// One guest cluster's L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    Unallocated,
    Zero,
    /// Data at this host cluster index.
    Data(u64),
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

/// The tables for an image of `size` bytes whose guest clusters are
/// `entries` (one per cluster, `ceil(size / CLUSTER)` of them) and whose
/// data occupies host clusters `1..first_free`.
pub fn tables(size: u64, entries: &[Entry], first_free: u64) -> Tables {
    let guest = size.div_ceil(CLUSTER);
    debug_assert_eq!(entries.len() as u64, guest);
    let l1_entries = guest.div_ceil(L2_ENTRIES);
    let l2_used: Vec<u64> = (0..l1_entries)
        .filter(|&t| {
            let lo = (t * L2_ENTRIES) as usize;
            let hi = (((t + 1) * L2_ENTRIES) as usize).min(entries.len());
            entries[lo..hi].iter().any(|e| *e != Entry::Unallocated)
        })
        .collect();
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
        for k in 0..L2_ENTRIES {
            let v = match entries.get((lo + k) as usize) {
                Some(Entry::Data(h)) => (h * CLUSTER) | COPIED,
                Some(Entry::Zero) => ZERO,
                _ => 0,
            };
            put64(&mut bytes, base + (k * 8) as usize, v);
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
    // Every cluster of the file is used once.
    for c in 0..total {
        let o = at(rb_at) + (c * 2) as usize;
        bytes[o..o + 2].copy_from_slice(&1u16.to_be_bytes());
    }
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
    // No header extensions: the end marker (type 0, length 0) is zeros.
    Tables {
        first,
        bytes,
        header,
        file_len: total * CLUSTER,
    }
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
        if e & (1 << 62) != 0 {
            return Err(bad("compressed clusters are not read here"));
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
