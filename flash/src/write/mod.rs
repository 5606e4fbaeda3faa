//! Writing an image to devices: one read of the source feeds hashers,
//! which hand each chunk to a writer thread per device (`job.rs`); each
//! zeroes its disk's ends, writes exclusively and directly, the first MiB
//! and then the backup GPT header last, moves a GPT's backup to its disk's
//! end (`gpt_move.rs`), then reads everything back past the page cache
//! (`verify.rs`). A stop flag ends every writer, which zeroes its ends.
//!
//! Devices are reached through [`BlockDevice`], so tests can use an
//! in-memory disk and inject the faults a real block device here cannot
//! produce (an I/O error at a chosen offset, a short write, corruption
//! between write and verify).

mod gpt_move;
mod job;
mod verify;

use anyhow::{anyhow, Result};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use xxhash_rust::xxh3::Xxh3Default;

use crate::device::BlockDevice;
use crate::personal::Personal;
use crate::source::{RangeCheck, Source};
use crate::Progress;
use formats::sys::{Aligned, Lease, Pool};
pub use verify::{read_head, Mismatch};

/// What stays unwritten until everything else is on the device: the
/// partition table and boot sectors live here.
pub const HEAD: u64 = 1 << 20;
const CHUNK: usize = 4 << 20;
const ALIGN: usize = formats::sys::DIRECT_ALIGN;
/// Chunks in flight per writer.
const DEPTH: usize = 3;
/// The longest range checked whole before any of it is handed to the
/// writers: what a hasher may queue (forge's bmap ranges are no longer).
pub const MAX_HELD: u64 = formats::bmap::MAX_RANGE_BLOCKS * formats::bmap::BLOCK;

#[derive(Serialize, Debug)]
pub struct Outcome {
    pub device: String,
    pub written: u64,
    pub skipped: u64,
    pub verified: u64,
    pub seconds: f64,
    pub mb_per_s: f64,
    pub gpt_moved: bool,
}

pub struct Options {
    pub verify: bool,
    /// Set (e.g. by a signal handler) to stop every writer: each zeroes
    /// its disk's ends and returns [`Interrupted`].
    pub stop: Arc<AtomicBool>,
}

impl Options {
    pub fn verifying(verify: bool) -> Options {
        Options {
            verify,
            stop: Arc::default(),
        }
    }
}

/// The run was stopped through [`Options::stop`].
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// A chunk from the pool: filled by one thread, then shared read-only by
/// every writer; back to the pool when the last lets go.
type Leased = Lease<Box<Chunk>>;
type Shared = Arc<Leased>;

/// A piece of the source, shared by every writer (and the hasher).
struct Chunk {
    off: u64,
    len: usize,
    /// Which source range it belongs to, and whether it ends that range.
    range: usize,
    last: bool,
    /// Whether `buf` holds the bytes yet (the hasher reads raw sources).
    filled: bool,
    buf: Aligned,
}

impl Chunk {
    /// The bytes, zero-padded to whole `lbs` sectors (the buffer is zeroed
    /// up to the next 4 KiB by the reader).
    fn padded(&self, from: usize, lbs: u64) -> &[u8] {
        let end = (self.len as u64).div_ceil(lbs) * lbs;
        &self.buf.get(end as usize)[from..]
    }
}

/// A range to read back and what it must hash to. The read-back check is
/// XXH3-128: it guards against a device returning other bytes than it was
/// given, not against an adversary (the source itself is held to the
/// bmap's SHA-256 while it streams), and it hashes at memory speed, so
/// verifying costs the reading. `bytes` is kept for what only this run
/// knows (the first MiB, a moved GPT); everything else is read from the
/// source again only to locate a mismatch.
#[derive(Clone)]
struct Unit {
    off: u64,
    len: usize,
    sum: u128,
    bytes: Option<Arc<Vec<u8>>>,
}

enum Msg {
    Chunk(Shared),
    /// The source is complete: what the part past the first MiB hashes to.
    Finish(Arc<Vec<Unit>>),
    /// The source failed; nothing more will come.
    Abort(Arc<String>),
}

/// Write `src` to every device at once: one read of the source, a writer
/// per device; a device that fails does not stop the others. Each result
/// is that device's.
pub fn flash(
    src: &Source,
    devs: Vec<Box<dyn BlockDevice>>,
    opts: &Options,
    progress: &dyn Progress,
) -> Vec<Result<Outcome>> {
    let targets = devs.into_iter().map(|d| (d, None)).collect();
    run(src, targets, opts, true, progress)
}

/// As [`flash`], each device with its own bytes (its identity, a state
/// partition grown to its end) where it has a [`Personal`].
pub fn flash_personal(
    src: &Source,
    targets: Vec<(Box<dyn BlockDevice>, Option<Personal>)>,
    opts: &Options,
    progress: &dyn Progress,
) -> Vec<Result<Outcome>> {
    run(src, targets, opts, true, progress)
}

/// Only verify: compare one device with the image (no writes); with a
/// [`Personal`] (see [`crate::personal::as_found`]), its replaced range
/// is not compared and its table stands for the image's.
pub fn verify_only(
    src: &Source,
    dev: Box<dyn BlockDevice>,
    personal: Option<Personal>,
    progress: &dyn Progress,
) -> Result<u64> {
    let opts = Options::verifying(true);
    run(src, vec![(dev, personal)], &opts, false, progress)
        .pop()
        .expect("one result per device")
        .map(|o| o.verified)
}

fn run(
    src: &Source,
    devs: Vec<(Box<dyn BlockDevice>, Option<Personal>)>,
    opts: &Options,
    write: bool,
    progress: &dyn Progress,
) -> Vec<Result<Outcome>> {
    let total: u64 = src.ranges().iter().map(|r| r.1).sum();
    // No chunk crosses a replaced range's edge: a device skips whole chunks.
    let cuts: Vec<u64> = devs
        .iter()
        .filter_map(|d| d.1.as_ref())
        .flat_map(|p| [p.replace.0, p.replace.1])
        .collect();
    // `gone` marks a device whose writer failed (the others go on).
    let gone: &Vec<AtomicBool> = &devs.iter().map(|_| AtomicBool::new(false)).collect();
    std::thread::scope(|s| {
        // A writer per device.
        let (wtxs, writers): (Vec<SyncSender<Msg>>, Vec<_>) = devs
            .into_iter()
            .map(|(dev, personal)| {
                let (tx, rx) = sync_channel::<Msg>(DEPTH);
                let meter = progress.meter(dev.name());
                let h = s.spawn(move || {
                    let job = job::Job {
                        sink: &*dev,
                        personal: personal.as_ref(),
                        src,
                        total,
                        opts,
                        write,
                    };
                    job.run(rx, &*meter)
                });
                (tx, h)
            })
            .unzip();
        // Hashers, one per core: each reads its chunks (raw sources), checks
        // whole bmap ranges against their SHA-256 (a range's chunks go to
        // one hasher, in order), notes what every chunk past the first MiB
        // must read back as, and hands the chunk to the writers.
        let n = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4));
        let depth = hasher_depth(src);
        let (htxs, hashers): (Vec<_>, Vec<_>) = (0..n)
            .map(|_| {
                let (tx, rx) = sync_channel::<Leased>(depth);
                let wtxs = wtxs.clone();
                (tx, s.spawn(move || hash_chunks(src, rx, &wtxs, gone)))
            })
            .unzip();
        let read = read_source(src, &htxs, depth, gone, &opts.stop, cuts);
        drop(htxs);
        let end = units_or_error(hashers, read);
        for tx in wtxs {
            let _ = tx.send(match &end {
                Ok(u) => Msg::Finish(u.clone()),
                Err(e) => Msg::Abort(e.clone()),
            });
        }
        writers
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("a writer thread panicked")))
            })
            .collect()
    })
}

/// What the writers are told at the end: every unit to verify, or why
/// the stream stopped. A hasher's own error (a range that fails its
/// checksum, a read that fails) explains why the reader could not hand
/// it more, so it comes first.
fn units_or_error(
    hashers: Vec<std::thread::ScopedJoinHandle<'_, Result<Vec<Unit>>>>,
    read: Result<()>,
) -> Result<Arc<Vec<Unit>>, Arc<String>> {
    let hashed: Result<Vec<Unit>> = hashers.into_iter().try_fold(Vec::new(), |mut all, h| {
        all.extend(
            h.join()
                .map_err(|_| anyhow!("a hashing thread panicked"))??,
        );
        Ok(all)
    });
    match (hashed, read) {
        (Ok(units), Ok(())) => Ok(Arc::new(units)),
        (Err(e), _) | (_, Err(e)) => Err(Arc::new(format!("{e:#}"))),
    }
}

/// Chunks a hasher may have queued. A checked range goes to one hasher
/// whole (SHA-256 is sequential), so while one hashes a range the reader
/// must be able to queue all of it and go on to the next range for
/// another hasher; with a shallow queue the others would mostly wait.
/// Ranges up to 64 MiB (forge's bmap pieces) are queued whole; longer ones
/// (bmaptool's) cannot be hashed in parallel anyway.
fn hasher_depth(src: &Source) -> usize {
    let longest = src
        .ranges()
        .iter()
        .filter(|r| r.2.is_some())
        .map(|r| r.1.div_ceil(CHUNK as u64) as usize)
        .max()
        .unwrap_or(0);
    longest.clamp(DEPTH, MAX_HELD as usize / CHUNK)
}

/// Bytes hashed at a time by both of a hasher's hashes.
const SLICE: usize = 64 << 10;

/// One hasher: read the chunks it is given (unless the reader did),
/// check the ranges against the bmap, hash each chunk past the first MiB
/// for the read-back, and hand every chunk to the live writers; a
/// checked range's chunks only once the whole range has matched (ranges
/// up to [`MAX_HELD`], which the reader can queue whole),
/// so no byte of a range that fails its checksum reaches a device.
fn hash_chunks(
    src: &Source,
    rx: Receiver<Leased>,
    writers: &[SyncSender<Msg>],
    gone: &[AtomicBool],
) -> Result<Vec<Unit>> {
    let file = if src.sequential() {
        None
    } else {
        Some(src.piece_reader()?)
    };
    let mut units = Vec::new();
    let mut check: Option<(usize, RangeCheck)> = None;
    let mut held: Vec<Leased> = Vec::new();
    for mut c in rx {
        if check.as_ref().is_none_or(|(r, _)| *r != c.range) {
            check = Some((c.range, src.range_check(c.range)));
        }
        // Read (where the reader did not), then both hashes, slice by
        // slice while the slice is in cache: one trip through memory
        // instead of three (measured: flash + verify 2.2 → 1.6 s on the
        // bench image).
        let from = HEAD.saturating_sub(c.off).min(c.len as u64) as usize;
        let (off, len, filled) = (c.off, c.len, c.filled);
        let mut x = Xxh3Default::new();
        let mut at = 0;
        while at < len {
            let end = (at + SLICE).min(len);
            let slice = &mut c.buf.slice(len)[at..end];
            if !filled {
                if let Some(f) = &file {
                    f.read(slice, off + at as u64)?;
                }
            }
            if let Some((_, k)) = check.as_mut() {
                k.update(slice);
            }
            if end > from {
                x.update(&slice[from.saturating_sub(at)..]);
            }
            at = end;
        }
        if from < len {
            units.push(Unit {
                off: off + from as u64,
                len: len - from,
                sum: x.digest128(),
                bytes: None,
            });
        }
        if c.last {
            if let Some((_, k)) = check.take() {
                k.finish()?;
            }
        }
        let (_, range_len, sum) = &src.ranges()[c.range];
        if sum.is_some() && *range_len <= MAX_HELD && !c.last {
            held.push(c); // handed on once the whole range checks
            continue;
        }
        for c in held.drain(..).chain([c]) {
            let c = Arc::new(c);
            for (tx, gone) in writers.iter().zip(gone) {
                if !gone.load(Ordering::Relaxed) && tx.send(Msg::Chunk(c.clone())).is_err() {
                    gone.store(true, Ordering::Relaxed); // that writer failed
                }
            }
        }
    }
    Ok(units)
}

/// Walk the source once, handing every chunk to a hasher (a checked
/// range's chunks all to the same one), which reads it (raw sources) or
/// gets it decompressed from here (a compressed source). Buffers come back to the pool
/// when the last writer is done with them.
fn read_source(
    src: &Source,
    hashers: &[SyncSender<Leased>],
    hasher_depth: usize,
    gone: &[AtomicBool],
    stop: &AtomicBool,
    cuts: Vec<u64>,
) -> Result<()> {
    let mut reader = src.reader(false)?;
    reader.cut_at(cuts);
    let mut pool = Pool::new(DEPTH * gone.len() + hasher_depth * hashers.len() + 4);
    let mut seq = 0usize;
    loop {
        if gone.iter().all(|g| g.load(Ordering::Relaxed)) {
            return Ok(()); // every device failed; each says why
        }
        if stop.load(Ordering::Relaxed) {
            return Err(Interrupted.into());
        }
        let mut c = pool.take(|| {
            Box::new(Chunk {
                off: 0,
                len: 0,
                range: 0,
                last: false,
                filled: false,
                buf: Aligned::new(CHUNK),
            })
        });
        let Some(p) = reader.next_piece(c.buf.slice(CHUNK))? else {
            return Ok(());
        };
        // Zero the tail of the last 4 KiB, for sector-padded writes.
        let end = p.len.div_ceil(ALIGN) * ALIGN;
        c.buf.slice(end)[p.len..].fill(0);
        (c.off, c.len, c.range, c.last, c.filled) = (p.off, p.len, p.range, p.last, p.filled);
        let h = if src.ranges()[p.range].2.is_some() {
            p.range
        } else {
            seq
        };
        seq += 1;
        hashers[h % hashers.len()]
            .send(c)
            .map_err(|_| anyhow!("a hashing thread stopped"))?;
    }
}

#[cfg(test)]
pub(crate) mod tests;
