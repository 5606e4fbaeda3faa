//! VMDK, streamOptimized (`formats::vmdk`), written as one stream in
//! image order: the header and descriptor, then a chunk's grains holding
//! anything but zeros, compressed (zlib) on every core and written in
//! order behind their markers; each grain table after the grains it
//! covers, once the image moves past its 32 MiB; the directory, footer
//! and end-of-stream marker last.

use libdeflater::{CompressionLvl, Compressor};
use rayon::prelude::*;
use std::cell::RefCell;
use std::fs::File;
use std::io::{self, BufWriter, Write};

use super::{Chunk, Container, Held};
use formats::vmdk::{self, GRAIN, GT_ENTRIES, GT_SPAN, SECTOR};

pub(crate) struct Vmdk {
    out: BufWriter<File>,
    /// The name the descriptor gives the extent (the file's own).
    name: String,
    cid: u32,
    size: u64,
    /// Bytes written so far.
    pos: u64,
    /// Grains stored.
    grains: u64,
    /// The grain table being filled: its index and entries.
    table: Option<(u64, Vec<u32>)>,
    directory: Vec<u32>,
}

impl Vmdk {
    pub(super) fn open(file: &File, name: String, uuid: [u8; 16]) -> io::Result<Vmdk> {
        Ok(Vmdk {
            out: BufWriter::with_capacity(4 << 20, file.try_clone()?),
            name,
            cid: u32::from_le_bytes(uuid[..4].try_into().expect("4 bytes")),
            size: 0,
            pos: 0,
            grains: 0,
            table: None,
            directory: Vec::new(),
        })
    }

    /// The stream's length and the bytes of disk its grains hold.
    pub(super) fn written(&self) -> (u64, u64) {
        (self.pos, self.grains * GRAIN)
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    /// Zeros up to the next whole sector.
    fn pad(&mut self) -> io::Result<()> {
        let n = self.pos.next_multiple_of(SECTOR) - self.pos;
        self.put(&formats::sys::ZEROS[..n as usize])
    }

    /// The table being filled, written (if any grain of it was) after
    /// its marker.
    fn close_table(&mut self) -> io::Result<()> {
        let Some((i, entries)) = self.table.take() else {
            return Ok(());
        };
        let t = vmdk::sectors_table(&entries);
        self.put(&vmdk::marker(t.len() as u64 / SECTOR, vmdk::MARKER_GT))?;
        self.directory[i as usize] = sector(self.pos)?;
        self.put(&t)
    }

    /// Grain `g` (its image offset / GRAIN), compressed, behind its marker.
    fn grain(&mut self, g: u64, z: &[u8]) -> io::Result<()> {
        let gt = g / GT_ENTRIES;
        if self.table.as_ref().is_some_and(|t| t.0 != gt) {
            self.close_table()?;
        }
        let at = sector(self.pos)?;
        let table = self
            .table
            .get_or_insert_with(|| (gt, vec![0; GT_ENTRIES as usize]));
        table.1[(g % GT_ENTRIES) as usize] = at;
        self.grains += 1;
        self.put(&vmdk::grain_marker(g * GRAIN / SECTOR, z.len() as u32))?;
        self.put(z)?;
        self.pad()
    }
}

/// A byte offset as the sector number tables hold (u32).
fn sector(pos: u64) -> io::Result<u32> {
    u32::try_from(pos / SECTOR)
        .map_err(|_| io::Error::other("VMDK: the stream is larger than 2 TiB of compressed data"))
}

/// A grain, zlib-compressed (what VMware and qemu inflate), by libdeflate
/// at its default level: a grain is one whole buffer, which libdeflate
/// compresses faster than zlib and smaller (8.0–8.5 against 10.8 s for the
/// 2 GiB corpus, 2.6 % smaller; BENCHMARKS.md). One compressor a thread.
fn compress(grain: &[u8]) -> io::Result<Vec<u8>> {
    thread_local! {
        static Z: RefCell<Compressor> = RefCell::new(Compressor::new(CompressionLvl::default()));
    }
    Z.with_borrow_mut(|z| {
        let mut out = vec![0u8; z.zlib_compress_bound(grain.len())];
        let n = z
            .zlib_compress(grain, &mut out)
            .map_err(|e| io::Error::other(format!("deflate: {e}")))?;
        out.truncate(n);
        Ok(out)
    })
}

impl Container for Vmdk {
    fn ordered(&self) -> bool {
        true
    }

    fn begin(&mut self, size: u64, _map: &[(u64, u64)]) -> io::Result<()> {
        vmdk::check_size(size)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        self.size = size;
        self.directory = vec![0; vmdk::tables(size) as usize];
        self.put(&vmdk::header(size, None))?;
        self.put(&vmdk::descriptor(size, &self.name, self.cid))?;
        let n = vmdk::DATA_AT - self.pos;
        self.put(&vec![0u8; n as usize])
    }

    fn chunk(&mut self, c: &Chunk, n: usize) -> io::Result<()> {
        let jobs: Vec<(u64, Vec<u8>)> = super::held(c, n, GRAIN)
            .into_iter()
            .filter_map(|(k, h)| match h {
                Held::Data(runs) => Some((
                    (c.off + k as u64 * GRAIN) / GRAIN,
                    super::cluster_bytes(c, k, GRAIN, &runs),
                )),
                _ => None,
            })
            .collect();
        let done: Vec<(u64, io::Result<Vec<u8>>)> = jobs
            .into_par_iter()
            .map(|(g, buf)| (g, compress(&buf)))
            .collect();
        debug_assert!(
            c.off % GT_SPAN + n as u64 <= GT_SPAN,
            "a chunk within a table"
        );
        for (g, z) in done {
            self.grain(g, &z?)?;
        }
        Ok(())
    }

    fn finish(&mut self) -> io::Result<()> {
        self.close_table()?;
        let tail = vmdk::tail(self.size, &self.directory, self.pos);
        self.put(&tail)?;
        self.out.flush()
    }
}
