//! Writing an image to devices: one read of the source feeds a writer
//! thread per device; each writes exclusively and directly, the first MiB
//! last, then reads everything back past the page cache.
//!
//! Devices are reached through [`Sink`], so tests can inject the faults a
//! real block device here cannot produce (an I/O error at a chosen offset,
//! a short write, corruption between write and verify).

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::time::Instant;
use xxhash_rust::xxh3::{xxh3_128, Xxh3Default};

use crate::ioctl;
use crate::preflight::{Refused, Target};
use crate::progress::{Meter, Progress};
use crate::source::{RangeCheck, Source};
use formats::gpt::Gpt;
use formats::sys::{Aligned, Lease};

/// What stays unwritten until everything else is on the device: the
/// partition table and boot sectors live here.
pub const HEAD: u64 = 1 << 20;
const CHUNK: usize = 4 << 20;
const ALIGN: usize = formats::sys::DIRECT_ALIGN;
/// Chunks in flight per writer.
const DEPTH: usize = 3;

/// Where an image goes: a block device, or in tests a device with faults.
pub trait Sink: Send + Sync {
    fn name(&self) -> &str;
    fn size(&self) -> u64;
    fn sector_size(&self) -> u64;
    /// One positional write of sector-aligned bytes from an aligned buffer;
    /// may write fewer bytes than given (a short write).
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<usize>;
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    fn sync(&self) -> io::Result<()>;
    /// Drop cached blocks so that reads reach the medium (BLKFLSBUF).
    fn drop_cache(&self) -> io::Result<()>;
    /// Make the kernel see the new partition table.
    fn announce(&self) {}
}

/// A whole-disk block device, opened O_DIRECT and locked.
pub struct Device {
    name: String,
    file: nix::fcntl::Flock<File>,
    size: u64,
    lbs: u64,
}

fn model_of(dev: &Path) -> String {
    let name = dev
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::fs::read_to_string(format!("/sys/block/{name}/device/model"))
        .map(|m| m.trim().to_string())
        .unwrap_or_default()
}

impl Device {
    /// Open a checked target. For writing: O_EXCL (no mounts, no other
    /// exclusive openers), an exclusive flock (keeps udev from probing
    /// mid-write), and the identity re-checked right before the first write.
    pub fn open(t: &Target, write: bool) -> Result<Device> {
        let path: PathBuf = t.disk.path.clone();
        let name = path.display().to_string();
        let mut o = OpenOptions::new();
        o.read(true);
        if write {
            o.write(true).custom_flags(libc::O_EXCL | libc::O_DIRECT);
        } else {
            o.custom_flags(libc::O_DIRECT);
        }
        let f = o.open(&path).with_context(|| {
            format!("opening {name}{}", if write { " exclusively" } else { "" })
        })?;
        let how = if write {
            nix::fcntl::FlockArg::LockExclusiveNonblock
        } else {
            nix::fcntl::FlockArg::LockSharedNonblock
        };
        let file =
            nix::fcntl::Flock::lock(f, how).map_err(|(_, e)| anyhow!("locking {name}: {e}"))?;
        let size = ioctl::size(&file).with_context(|| format!("size of {name}"))?;
        let lbs =
            ioctl::logical_sector_size(&file).with_context(|| format!("sector size of {name}"))?;
        let model = model_of(&path);
        if write
            && (size != t.disk.size || lbs != t.disk.logical_sector_size || model != t.disk.model)
        {
            return Err(Refused {
                device: name,
                refusal: crate::devices::Refusal {
                    check: "identity",
                    detail: format!(
                        "the device changed since the checks (now {size} bytes, {lbs}-byte sectors, model {model:?})"
                    ),
                },
            }
            .into());
        }
        Ok(Device {
            name,
            file,
            size,
            lbs: lbs as u64,
        })
    }
}

impl Sink for Device {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn sector_size(&self) -> u64 {
        self.lbs
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<usize> {
        self.file.write_at(buf, off)
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.file.read_at(buf, off)
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync_all()
    }
    fn drop_cache(&self) -> io::Result<()> {
        ioctl::flush_buffers(&self.file)
    }
    fn announce(&self) {
        // BLKRRPART, and where the kernel has no partition parsers, BLKPG
        // through partx.
        let _ = ioctl::reread_partitions(&self.file);
        let _ = std::process::Command::new("partx")
            .args(["-a", &self.name])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

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

/// A verify failure (its own exit code): the first byte that differs.
#[derive(Debug, thiserror::Error)]
#[error("verifying {device}: byte {offset} reads {got} from the device but the image has {want} (the first difference){wiped}")]
pub struct Mismatch {
    pub device: String,
    pub offset: u64,
    pub got: String,
    pub want: String,
    pub wiped: &'static str,
}

pub struct Options {
    pub verify: bool,
    pub quiet: bool,
}

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

/// Write `src` to every sink at once: one read of the source, a writer per
/// device; a device that fails does not stop the others. Each result is
/// that device's.
pub fn flash(src: &Source, sinks: Vec<Box<dyn Sink>>, opts: &Options) -> Vec<Result<Outcome>> {
    run(src, sinks, opts, true)
}

/// Only verify: compare one device with the image (no writes).
pub fn verify_only(src: &Source, sink: Box<dyn Sink>, quiet: bool) -> Result<u64> {
    let opts = Options {
        verify: true,
        quiet,
    };
    run(src, vec![sink], &opts, false)
        .pop()
        .expect("one result per sink")
        .map(|o| o.verified)
}

fn run(
    src: &Source,
    sinks: Vec<Box<dyn Sink>>,
    opts: &Options,
    write: bool,
) -> Vec<Result<Outcome>> {
    let progress = &Progress::new(opts.quiet);
    let total: u64 = src.ranges().iter().map(|r| r.1).sum();
    // `gone` marks a device whose writer failed (the others go on).
    let gone: &Vec<AtomicBool> = &sinks.iter().map(|_| AtomicBool::new(false)).collect();
    std::thread::scope(|s| {
        // A writer per device.
        let (wtxs, writers): (Vec<SyncSender<Msg>>, Vec<_>) = sinks
            .into_iter()
            .map(|sink| {
                let (tx, rx) = sync_channel::<Msg>(DEPTH);
                let meter = progress.meter(sink.name());
                let h = s.spawn(move || {
                    device_job(&*sink, rx, src, total, opts, write, &meter, progress)
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
        let read = read_source(src, &htxs, depth, gone);
        drop(htxs);
        // A hasher's own error (a range that fails its checksum, a read
        // that fails) explains why the reader could not hand it more, so
        // it comes first.
        let hashed: Result<Vec<Unit>> = hashers.into_iter().try_fold(Vec::new(), |mut all, h| {
            all.extend(
                h.join()
                    .map_err(|_| anyhow!("a hashing thread panicked"))??,
            );
            Ok(all)
        });
        let end: Result<Arc<Vec<Unit>>, Arc<String>> = match (hashed, read) {
            (Ok(units), Ok(())) => Ok(Arc::new(units)),
            (Err(e), _) | (_, Err(e)) => Err(Arc::new(format!("{e:#}"))),
        };
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
    longest.clamp(DEPTH, (64 << 20) / CHUNK)
}

/// Bytes hashed at a time by both of a hasher's hashes.
const SLICE: usize = 64 << 10;

/// One hasher: read the chunks it is given (unless the reader did),
/// check the ranges against the bmap, hash each chunk past the first MiB
/// for the read-back, and hand every chunk to the live writers.
fn hash_chunks(
    src: &Source,
    rx: Receiver<Leased>,
    writers: &[SyncSender<Msg>],
    gone: &[AtomicBool],
) -> Result<Vec<Unit>> {
    let file = if src.zstd {
        None
    } else {
        Some(src.piece_reader()?)
    };
    let mut units = Vec::new();
    let mut check: Option<(usize, RangeCheck)> = None;
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
        let c = Arc::new(c);
        for (tx, gone) in writers.iter().zip(gone) {
            if !gone.load(Ordering::Relaxed) && tx.send(Msg::Chunk(c.clone())).is_err() {
                gone.store(true, Ordering::Relaxed); // that writer failed
            }
        }
    }
    Ok(units)
}

/// Walk the source once, handing every chunk to a hasher (a checked
/// range's chunks all to the same one), which reads it (raw sources) or
/// gets it decompressed from here (zstd). Buffers come back to the pool
/// when the last writer is done with them.
fn read_source(
    src: &Source,
    hashers: &[SyncSender<Leased>],
    hasher_depth: usize,
    gone: &[AtomicBool],
) -> Result<()> {
    let mut reader = src.reader(false)?;
    let (back, free) = channel::<Box<Chunk>>();
    let cap = DEPTH * gone.len() + hasher_depth * hashers.len() + 4;
    let mut allocated = 0;
    let mut seq = 0usize;
    loop {
        if gone.iter().all(|g| g.load(Ordering::Relaxed)) {
            return Ok(()); // every device failed; each says why
        }
        let chunk = match free.try_recv() {
            Ok(c) => c,
            Err(_) if allocated < cap => {
                allocated += 1;
                Box::new(Chunk {
                    off: 0,
                    len: 0,
                    range: 0,
                    last: false,
                    filled: false,
                    buf: Aligned::new(CHUNK),
                })
            }
            // `back` is held here, so this waits for a buffer, never fails.
            Err(_) => free.recv().map_err(|_| anyhow!("the buffer pool closed"))?,
        };
        let mut c = Lease::new(chunk, back.clone());
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

/// Write `data` (sector-padded) at `off`, through an aligned bounce buffer
/// when `data` itself is not aligned.
fn put(sink: &dyn Sink, bounce: &mut Aligned, data: &[u8], off: u64) -> Result<()> {
    if (data.as_ptr() as usize).is_multiple_of(ALIGN) {
        return write_exact(sink, data, off);
    }
    for (i, piece) in data.chunks(bounce.len()).enumerate() {
        bounce.slice(piece.len()).copy_from_slice(piece);
        write_exact(
            sink,
            bounce.get(piece.len()),
            off + (i * bounce.len()) as u64,
        )?;
    }
    Ok(())
}

/// One write of `b` at `off`; short writes are continued while they stay
/// on sector boundaries, and a device that takes nothing more is an error.
fn write_exact(sink: &dyn Sink, b: &[u8], off: u64) -> Result<()> {
    let lbs = sink.sector_size() as usize;
    let name = sink.name();
    let mut done = 0;
    while done < b.len() {
        let pos = off + done as u64;
        match sink.write_at(&b[done..], pos) {
            Ok(0) => bail!(
                "writing {name} at byte {pos}: short write: the device took {done} of {} bytes and then nothing",
                b.len()
            ),
            Ok(n) if n % lbs != 0 => bail!(
                "writing {name} at byte {pos}: short write of {n} bytes, not whole {lbs}-byte sectors"
            ),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("writing {name} at byte {pos}")),
        }
    }
    Ok(())
}

/// Best effort: zeros over the first MiB, so a failed flash never boots.
fn wipe_head(sink: &dyn Sink) {
    let mut buf = Aligned::new(HEAD as usize);
    let n = HEAD.min(sink.size()) as usize;
    let _ = sink.write_at(buf.slice(n), 0);
    let _ = sink.sync();
}

/// For a GPT image on a larger device: the rewritten primary table (bytes
/// from offset 0) and the backup table moved to the device's end.
fn relocate_gpt(
    head: &[u8],
    image_size: u64,
    dev_size: u64,
    lbs: u64,
) -> Option<(Vec<u8>, u64, Vec<u8>)> {
    if dev_size <= image_size {
        return None;
    }
    let mut read = |o: u64, n: usize| -> std::io::Result<Vec<u8>> {
        head.get(o as usize..o as usize + n)
            .map(|s| s.to_vec())
            .ok_or_else(|| std::io::Error::other("outside the first MiB"))
    };
    let mut g = Gpt::parse(&mut read, lbs, image_size).ok()??;
    g.disk_sectors = dev_size / lbs;
    let (boff, backup) = g.backup();
    Some((g.primary(), boff, backup))
}

/// What one device does with the stream: write (or, verifying only, just
/// collect the first MiB), then read everything back.
#[allow(clippy::too_many_arguments)]
fn device_job(
    sink: &dyn Sink,
    rx: Receiver<Msg>,
    src: &Source,
    total: u64,
    opts: &Options,
    write: bool,
    meter: &Meter,
    progress: &Progress,
) -> Result<Outcome> {
    let start = Instant::now();
    let name = sink.name().to_string();
    let lbs = sink.sector_size();
    let mut head = vec![0u8; HEAD.min(src.size) as usize];
    let mut head_mapped: Vec<(u64, u64)> = Vec::new();
    let mut bounce = Aligned::new(HEAD as usize);
    let mut written = 0u64;
    meter.phase(if write { "writing" } else { "reading" }, total);
    let streamed = (|| -> Result<Arc<Vec<Unit>>> {
        loop {
            let c = match rx.recv() {
                Ok(Msg::Chunk(c)) => c,
                Ok(Msg::Finish(units)) => return Ok(units),
                Ok(Msg::Abort(e)) => bail!("{e}"),
                Err(_) => bail!("the source stopped"),
            };
            let end = c.off + c.len as u64;
            let mut from = 0;
            if c.off < HEAD {
                // Stash what falls in the first MiB; it is written last.
                let cut = (HEAD.min(end) - c.off) as usize;
                head[c.off as usize..c.off as usize + cut].copy_from_slice(c.buf.get(cut));
                head_mapped.push((c.off, cut as u64));
                from = cut;
            }
            if write && from < c.len {
                put(sink, &mut bounce, c.padded(from, lbs), c.off + from as u64)?;
            }
            written += c.len as u64;
            meter.add(c.len as u64);
        }
    })();
    drop(rx);
    let fail = |e: anyhow::Error, wiped: bool| -> anyhow::Error {
        meter.finish("failed");
        if wiped {
            e.context(format!(
                "{name}: nothing bootable was left (first MiB wiped)"
            ))
        } else {
            e
        }
    };
    let finished = streamed.and_then(|global| {
        let mut units: Vec<Unit> = global.to_vec();
        let gpt = relocate_gpt(&head, src.size, sink.size(), lbs);
        if write {
            sink.sync().with_context(|| format!("syncing {name}"))?;
        }
        if let Some((primary, boff, backup)) = &gpt {
            // A GPT image on a larger disk: the backup table moves to the end.
            if write {
                put(sink, &mut bounce, backup, *boff)?;
                sink.sync().with_context(|| format!("syncing {name}"))?;
            }
            units.push(Unit {
                off: *boff,
                len: backup.len(),
                sum: xxh3_128(backup),
                bytes: Some(Arc::new(backup.clone())),
            });
            head[..primary.len()].copy_from_slice(primary);
            head_mapped.push((0, primary.len() as u64));
        }
        // Last: the first MiB, in the sector-aligned pieces that were mapped.
        for (o, l) in merge_sectors(head_mapped.clone(), lbs, head.len() as u64) {
            let piece = head[o as usize..(o + l) as usize].to_vec();
            if write {
                let mut padded = piece.clone();
                padded.resize(l.div_ceil(lbs) as usize * lbs as usize, 0);
                put(sink, &mut bounce, &padded, o)?;
            }
            units.push(Unit {
                off: o,
                len: piece.len(),
                sum: xxh3_128(&piece),
                bytes: Some(Arc::new(piece)),
            });
        }
        if write {
            sink.sync().with_context(|| format!("syncing {name}"))?;
        }
        Ok((units, gpt.is_some()))
    });
    let (units, gpt_moved) = match finished {
        Ok(r) => r,
        Err(e) => {
            if write {
                wipe_head(sink);
            }
            return Err(fail(e, write));
        }
    };
    let mut verified = 0;
    if opts.verify {
        if let Err(e) = verify(sink, src, units, meter).map(|n| verified = n) {
            if write {
                wipe_head(sink);
            }
            return Err(match e.downcast::<Mismatch>() {
                Ok(mut m) => {
                    if write {
                        m.wiped = "; nothing bootable was left (first MiB wiped)";
                    }
                    meter.finish("failed");
                    m.into()
                }
                Err(e) => fail(e, write),
            });
        }
    }
    if write {
        sink.announce();
    }
    let seconds = start.elapsed().as_secs_f64();
    meter.finish("done");
    let o = Outcome {
        device: name,
        written: if write { written } else { 0 },
        skipped: if write {
            src.size - written.min(src.size)
        } else {
            0
        },
        verified,
        seconds,
        mb_per_s: written as f64 / seconds.max(1e-3) / 1e6,
        gpt_moved: write && gpt_moved,
    };
    if write {
        progress.println(&format!(
            "flash: {}: wrote {} bytes, skipped {}, verified {}, {:.1} s, {:.0} MB/s{}",
            o.device,
            o.written,
            o.skipped,
            o.verified,
            o.seconds,
            o.mb_per_s,
            if o.gpt_moved {
                ", backup GPT moved to the end of the disk"
            } else {
                ""
            }
        ));
    }
    Ok(o)
}

/// Byte ranges widened to whole sectors, merged, clipped to `limit`.
fn merge_sectors(mut ranges: Vec<(u64, u64)>, lbs: u64, limit: u64) -> Vec<(u64, u64)> {
    ranges.sort();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (o, l) in ranges {
        let (o2, e2) = (o / lbs * lbs, ((o + l).div_ceil(lbs) * lbs).min(limit));
        match merged.last_mut() {
            Some(m) if o2 <= m.0 + m.1 => m.1 = m.1.max(e2 - m.0),
            _ => merged.push((o2, e2 - o2)),
        }
    }
    merged
}

/// Read every unit (at most a chunk each) back with O_DIRECT after a sync
/// and BLKFLSBUF (never from the page cache), on every core; on a
/// mismatch, find the first differing byte.
fn verify(sink: &dyn Sink, src: &Source, mut units: Vec<Unit>, meter: &Meter) -> Result<u64> {
    use rayon::prelude::*;
    let name = sink.name();
    let lbs = sink.sector_size() as usize;
    sink.sync().with_context(|| format!("syncing {name}"))?;
    sink.drop_cache()
        .with_context(|| format!("dropping the buffer cache of {name}"))?;
    units.sort_by_key(|u| u.off);
    let total: u64 = units.iter().map(|u| u.len as u64).sum();
    meter.phase("verifying", total);
    let bad = units
        .par_iter()
        .map_init(
            || Aligned::new(CHUNK),
            |buf, u| -> Result<Option<Unit>> {
                // O_DIRECT reads whole sectors; the last range may end at
                // the device's end: pad to the sector, not further.
                let b = buf.slice(u.len.div_ceil(lbs) * lbs);
                read_exact(sink, b, u.off)?;
                meter.add(u.len as u64);
                Ok((xxh3_128(&b[..u.len]) != u.sum).then(|| u.clone()))
            },
        )
        .collect::<Result<Vec<_>>>()?;
    if let Some(u) = bad.into_iter().flatten().min_by_key(|u| u.off) {
        return Err(locate(sink, src, &u)?.into());
    }
    Ok(total)
}

fn read_exact(sink: &dyn Sink, b: &mut [u8], off: u64) -> Result<()> {
    let mut done = 0;
    while done < b.len() {
        match sink.read_at(&mut b[done..], off + done as u64) {
            Ok(0) => bail!(
                "reading {} back at byte {}: the device ended",
                sink.name(),
                off + done as u64
            ),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("reading {} back at byte {}", sink.name(), off + done as u64)
                })
            }
        }
    }
    Ok(())
}

/// The first byte of a mismatching unit that differs from the image.
fn locate(sink: &dyn Sink, src: &Source, u: &Unit) -> Result<Mismatch> {
    let want = match &u.bytes {
        Some(b) => b.clone(),
        None => Arc::new(src.read_range(u.off, u.len)?),
    };
    let lbs = sink.sector_size() as usize;
    let mut buf = Aligned::new(u.len.div_ceil(lbs) * lbs);
    let b = buf.slice(u.len.div_ceil(lbs) * lbs);
    read_exact(sink, b, u.off)?;
    let (offset, got, want) = match b[..u.len].iter().zip(want.iter()).position(|(g, w)| g != w) {
        Some(i) => (
            u.off + i as u64,
            format!("{:#04x}", b[i]),
            format!("{:#04x}", want[i]),
        ),
        // The hash differed but a second read matches: the device returns
        // different data on each read.
        None => (
            u.off,
            "different bytes on each read".into(),
            format!("{} stable bytes here", u.len),
        ),
    };
    Ok(Mismatch {
        device: sink.name().to_string(),
        offset,
        got,
        want,
        wiped: "",
    })
}
