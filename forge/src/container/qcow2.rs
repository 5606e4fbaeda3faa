//! qcow2 (version 3, 64 KiB clusters; `formats::qcow2`). Chunks come in
//! image order; each guest cluster the filesystems wrote becomes, in one
//! ascending pass, either a zero cluster (everything written there is
//! zeros: the journal, zeroed tables) or the next data cluster, written
//! with O_DIRECT (touched blocks only: the rest of a fresh file reads as
//! zeros). Clusters nothing wrote stay unallocated. The tables follow the
//! data and the header goes to cluster 0 last.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{Chunk, Container};
use formats::bmap::BLOCK;
use formats::qcow2::{self, Entry, CLUSTER};

pub(super) struct Qcow2 {
    /// Data clusters (O_DIRECT where the filesystem allows).
    data: File,
    /// Tables and header (through the page cache).
    meta: File,
    size: u64,
    entries: Vec<Entry>,
    /// The next free host cluster (0 is the header's).
    next: u64,
}

impl Qcow2 {
    pub(super) fn open(file: &File, path: &Path) -> io::Result<Qcow2> {
        let data = match formats::sys::open_direct_write(path)? {
            Some(f) => f,
            None => file.try_clone()?,
        };
        Ok(Qcow2 {
            data,
            meta: file.try_clone()?,
            size: 0,
            entries: Vec::new(),
            next: 1,
        })
    }
}

impl Container for Qcow2 {
    fn ordered(&self) -> bool {
        true
    }

    fn begin(&mut self, size: u64, _map: &[(u64, u64)]) -> io::Result<()> {
        self.size = size;
        self.entries = vec![Entry::Unallocated; size.div_ceil(CLUSTER) as usize];
        Ok(())
    }

    fn chunk(&mut self, c: &Chunk, n: usize) -> io::Result<()> {
        let per = (CLUSTER / BLOCK) as usize;
        let runs: Vec<(usize, usize)> = c.touched_runs().collect();
        let clusters = n.div_ceil(CLUSTER as usize);
        for k in 0..clusters {
            let (lo, hi) = (k * per, (k + 1) * per);
            // The touched block runs inside this cluster.
            let inside: Vec<(usize, usize)> = runs
                .iter()
                .filter(|r| r.0 < hi && r.1 > lo)
                .map(|r| (r.0.max(lo), r.1.min(hi)))
                .collect();
            if inside.is_empty() {
                continue;
            }
            let guest = ((c.off + k as u64 * CLUSTER) / CLUSTER) as usize;
            let bytes = |r: &(usize, usize)| &c.bytes()[r.0 * BLOCK as usize..r.1 * BLOCK as usize];
            if inside.iter().all(|r| bytes(r).iter().all(|&b| b == 0)) {
                self.entries[guest] = Entry::Zero;
                continue;
            }
            let host = self.next;
            self.next += 1;
            self.entries[guest] = Entry::Data(host);
            for r in &inside {
                let at = host * CLUSTER + ((r.0 - lo) as u64) * BLOCK;
                self.data.write_all_at(bytes(r), at).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("writing cluster {guest} at byte {at}: {e}"),
                    )
                })?;
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> io::Result<()> {
        let t = qcow2::tables(self.size, &self.entries, self.next);
        self.meta.set_len(t.file_len)?;
        self.meta.write_all_at(&t.bytes, t.first * CLUSTER)?;
        self.meta.write_all_at(&t.header, 0)
    }
}
