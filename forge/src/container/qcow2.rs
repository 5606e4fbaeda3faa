//! qcow2 (version 3, 64 KiB clusters; `formats::qcow2`). Chunks come in
//! image order; each guest cluster the filesystems wrote becomes, in one
//! ascending pass, either a zero cluster (everything written there is
//! zeros: the journal, zeroed tables) or data. Clusters nothing wrote stay
//! unallocated. The tables follow the data and the header goes to
//! cluster 0 last.
//!
//! Plain: each data cluster is the next host cluster, written with
//! O_DIRECT (touched blocks only: the rest of a fresh file reads as
//! zeros). `--compression deflate`: a chunk's clusters are compressed on
//! every core (raw deflate, 4 KiB window, as QEMU reads it), packed one
//! after another at any byte offset; a cluster that does not shrink is
//! stored plain, at the next cluster boundary.

use flate2::{Compress, Compression, FlushCompress};
use rayon::prelude::*;
use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{Chunk, Container, Held};
use formats::bmap::BLOCK;
use formats::qcow2::{self, Entry, CLUSTER};

pub(super) struct Qcow2 {
    /// Plain data clusters (O_DIRECT where the filesystem allows).
    data: File,
    /// Compressed data, in order (through the page cache).
    packed: Option<BufWriter<File>>,
    /// Tables and header.
    meta: File,
    size: u64,
    entries: qcow2::Entries,
    /// Where the next data goes: a byte offset (cluster 0 is the header's).
    pos: u64,
}

impl Qcow2 {
    pub(super) fn open(file: &File, path: &Path, compress: bool) -> io::Result<Qcow2> {
        let data = match formats::sys::open_direct_write(path)? {
            Some(f) => f,
            None => file.try_clone()?,
        };
        let packed = if compress {
            let mut f = file.try_clone()?;
            f.seek(SeekFrom::Start(CLUSTER))?;
            Some(BufWriter::with_capacity(4 << 20, f))
        } else {
            None
        };
        Ok(Qcow2 {
            data,
            packed,
            meta: file.try_clone()?,
            size: 0,
            entries: qcow2::Entries::new(),
            pos: CLUSTER,
        })
    }
}

/// A cluster as raw deflate with QEMU's 4 KiB window, if that is smaller.
fn deflate(cluster: &[u8]) -> Option<Vec<u8>> {
    let mut c =
        Compress::new_with_window_bits(Compression::default(), false, qcow2::DEFLATE_WINDOW_BITS);
    let mut out = Vec::with_capacity(cluster.len());
    match c.compress_vec(cluster, &mut out, FlushCompress::Finish) {
        Ok(flate2::Status::StreamEnd) if out.len() < cluster.len() => Some(out),
        _ => None,
    }
}

impl Qcow2 {
    /// Plain: each data cluster's touched, non-zero blocks at the next host
    /// cluster; blocks contiguous both in the chunk and in the file go in
    /// one write.
    fn put_plain(&mut self, c: &Chunk, held: &[(usize, Held)]) -> io::Result<()> {
        let per = (CLUSTER / BLOCK) as usize;
        // (file offset, chunk byte range), merged as they come.
        let mut writes: Vec<(u64, usize, usize)> = Vec::new();
        for (k, h) in held {
            let Held::Data(runs) = h else { continue };
            let host = self.pos / CLUSTER;
            self.pos += CLUSTER;
            self.entries
                .insert((c.off + *k as u64 * CLUSTER) / CLUSTER, Entry::Data(host));
            // Block by block: a block of zeros stays a hole (a fresh file
            // reads as zeros), taking no room on the host.
            for blk in runs.iter().flat_map(|r| r.0..r.1) {
                let at = host * CLUSTER + (blk as u64) * BLOCK;
                let a = (k * per + blk) * BLOCK as usize;
                let b = a + BLOCK as usize;
                if formats::sys::is_zero(&c.bytes()[a..b]) {
                    continue;
                }
                match writes.last_mut() {
                    Some(w) if w.0 + (w.2 - w.1) as u64 == at && w.2 == a => w.2 = b,
                    _ => writes.push((at, a, b)),
                }
            }
        }
        for (at, a, b) in writes {
            self.data
                .write_all_at(&c.bytes()[a..b], at)
                .map_err(|e| io::Error::new(e.kind(), format!("writing at byte {at}: {e}")))?;
        }
        Ok(())
    }

    /// Compressed: every data cluster of the chunk compressed in
    /// parallel, then packed in order.
    fn put_packed(&mut self, c: &Chunk, held: &[(usize, Held)]) -> io::Result<()> {
        let jobs: Vec<(usize, Vec<u8>)> = held
            .iter()
            .filter_map(|(k, h)| match h {
                Held::Data(runs) => Some((*k, super::cluster_bytes(c, *k, CLUSTER, runs))),
                _ => None,
            })
            .collect();
        let done: Vec<(usize, Vec<u8>, Option<Vec<u8>>)> = jobs
            .into_par_iter()
            .map(|(k, buf)| {
                let z = deflate(&buf);
                (k, buf, z)
            })
            .collect();
        let w = self
            .packed
            .as_mut()
            .ok_or_else(|| io::Error::other("internal: qcow2: not compressing"))?;
        for (k, buf, z) in done {
            let guest = (c.off + k as u64 * CLUSTER) / CLUSTER;
            match z {
                Some(z) => {
                    w.write_all(&z)?;
                    self.entries.insert(
                        guest,
                        Entry::Compressed {
                            offset: self.pos,
                            len: z.len() as u64,
                        },
                    );
                    self.pos += z.len() as u64;
                }
                None => {
                    let pad = self.pos.next_multiple_of(CLUSTER) - self.pos;
                    w.write_all(&formats::sys::ZEROS[..pad as usize])?;
                    self.pos += pad;
                    w.write_all(&buf)?;
                    self.entries.insert(guest, Entry::Data(self.pos / CLUSTER));
                    self.pos += CLUSTER;
                }
            }
        }
        Ok(())
    }
}

impl Container for Qcow2 {
    fn ordered(&self) -> bool {
        true
    }

    fn begin(&mut self, size: u64, _map: &[(u64, u64)]) -> io::Result<()> {
        self.size = size;
        self.entries.clear();
        Ok(())
    }

    fn chunk(&mut self, c: &Chunk, n: usize) -> io::Result<()> {
        let held = super::held(c, n, CLUSTER);
        for (k, h) in &held {
            if let Held::Zeros = h {
                self.entries
                    .insert((c.off + *k as u64 * CLUSTER) / CLUSTER, Entry::Zero);
            }
        }
        if self.packed.is_some() {
            return self.put_packed(c, &held);
        }
        self.put_plain(c, &held)
    }

    fn finish(&mut self) -> io::Result<()> {
        if let Some(mut w) = self.packed.take() {
            w.flush()?;
        }
        let t = qcow2::tables(self.size, &self.entries, self.pos);
        self.meta.set_len(t.file_len)?;
        // Tables and header are mostly zeros: those blocks stay holes.
        for (at, b) in formats::sys::nonzero_blocks(&t.bytes, t.first * CLUSTER) {
            self.meta.write_all_at(b, at)?;
        }
        for (at, b) in formats::sys::nonzero_blocks(&t.header, 0) {
            self.meta.write_all_at(b, at)?;
        }
        Ok(())
    }
}
