//! What one device does with the stream, in an order chosen so that the
//! disk never looks valid while it is not:
//! 1. zeros over the old backup GPT header at the end, then the old head,
//!    synced: from here on no tool finds the old table;
//! 2. every chunk past the first MiB as it comes, except the image's own
//!    backup GPT header (a backup alone lets `sgdisk` rebuild a table);
//! 3. synced, the moved backup's entries, then the first MiB, synced;
//! 4. the backup headers, synced; then the read-back.
//!
//! On any failure or interruption both ends are zeroed again.

use anyhow::{anyhow, bail, Context, Result};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;
use xxhash_rust::xxh3::xxh3_128;

use super::gpt_move::{backup_header, relocate_gpt};
use super::verify::{verify, Mismatch};
use super::{Interrupted, Msg, Options, Outcome, Unit, ALIGN, HEAD};
use crate::device::{transfer, BlockDevice, Short};
use crate::personal::{Bytes, Personal};
use crate::source::Source;
use crate::Meter;
use formats::sys::Aligned;

/// Write `data` (sector-padded) at `off`, through an aligned bounce buffer
/// when `data` itself is not aligned.
fn put(sink: &dyn BlockDevice, bounce: &mut Aligned, data: &[u8], off: u64) -> Result<()> {
    if data.is_empty() {
        return Ok(());
    }
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
fn write_exact(sink: &dyn BlockDevice, b: &[u8], off: u64) -> Result<()> {
    let lbs = sink.sector_size() as usize;
    let name = sink.name();
    transfer(b.len(), lbs, |done| sink.write_at(&b[done..], off + done as u64)).map_err(|e| {
        match e {
            Short::Stuck { done } => anyhow!(
                "writing {name} at byte {}: short write: the device took {done} of {} bytes and then nothing",
                off + done as u64,
                b.len()
            ),
            Short::Unaligned { done, n } => anyhow!(
                "writing {name} at byte {}: short write of {n} bytes, not whole {lbs}-byte sectors",
                off + done as u64
            ),
            Short::Failed { done, err } => {
                anyhow::Error::from(err).context(format!("writing {name} at byte {}", off + done as u64))
            }
        }
    })
}

/// Zeros over where tables live: first the disk's last 4 KiB (the backup
/// GPT header at either sector size), then the first MiB (MBR, primary
/// GPT, boot code); synced. Between the two writes the disk is still the
/// old one, whole but for its backup header; after the second, neither
/// table is there, and no tool (sfdisk, sgdisk, blkid, the kernel) finds
/// one.
fn zero_ends(sink: &dyn BlockDevice) -> Result<()> {
    let (size, lbs) = (sink.size(), sink.sector_size());
    let mut zeros = Aligned::new(HEAD as usize);
    let tail = lbs.max(4096).min(size);
    write_exact(sink, zeros.slice(tail as usize), size - tail)?;
    write_exact(sink, zeros.slice(HEAD.min(size) as usize), 0)?;
    sink.sync()
        .with_context(|| format!("syncing {}", sink.name()))
}

/// Best effort, after a failure: nothing bootable and no table is left,
/// and the kernel drops the old partitions' nodes (no `flash list` or
/// automounter still sees them).
pub(super) fn wipe(sink: &dyn BlockDevice) {
    let _ = zero_ends(sink);
    sink.announce();
}

/// Write `bytes` (whole sectors) at `at`, except the sectors of `held`,
/// which are copied to `stash` instead (to be written later).
fn put_around(
    sink: &dyn BlockDevice,
    bounce: &mut Aligned,
    bytes: &[u8],
    at: u64,
    held: Option<(u64, u64)>,
    stash: &mut Option<Vec<u8>>,
) -> Result<()> {
    let end = at + bytes.len() as u64;
    match held {
        Some((ho, hl)) if ho < end && ho + hl > at => {
            let a = (ho.max(at) - at) as usize;
            let b = ((ho + hl).min(end) - at) as usize;
            put(sink, bounce, &bytes[..a], at)?;
            *stash = Some(bytes[a..b].to_vec());
            put(sink, bounce, &bytes[b..], at + b as u64)
        }
        _ => put(sink, bounce, bytes, at),
    }
}

/// One device's part of a run.
pub(super) struct Job<'a> {
    pub sink: &'a dyn BlockDevice,
    /// This device's own bytes, written instead of the image's in their range.
    pub personal: Option<&'a Personal>,
    pub src: &'a Source,
    pub total: u64,
    pub opts: &'a Options,
    pub write: bool,
}

impl Job<'_> {
    /// What one device does with the stream: write (or, verifying only,
    /// just collect the first MiB), then read everything back.
    pub(super) fn run(&self, rx: Receiver<Msg>, meter: &dyn Meter) -> Result<Outcome> {
        let start = Instant::now();
        let mut d = Writer::new(self, meter);
        let streamed = d.stream(rx);
        let finished = streamed.and_then(|global| {
            let mut units: Vec<Unit> = global
                .iter()
                .filter(|u| !replaced(self.personal, u.off, u.off + u.len as u64))
                .cloned()
                .collect();
            d.own_bytes(&mut units)?;
            let gpt_moved = d.tables_last(&mut units)?;
            Ok((units, gpt_moved))
        });
        let (units, gpt_moved) = finished.map_err(|e| d.failed(e))?;
        let mut verified = 0;
        if self.opts.verify {
            verified = verify(self.sink, self.src, units, meter, &self.opts.stop)
                .map_err(|e| d.unverified(e))?;
        }
        if self.write {
            self.sink.announce();
        }
        let seconds = start.elapsed().as_secs_f64();
        meter.finish("done");
        let (write, written, size) = (self.write, d.written, self.src.size);
        Ok(Outcome {
            device: d.name,
            written: if write { written } else { 0 },
            skipped: if write { size - written.min(size) } else { 0 },
            verified,
            seconds,
            mb_per_s: written as f64 / seconds.max(1e-3) / 1e6,
            gpt_moved: write && gpt_moved,
        })
    }
}

fn replaced(p: Option<&Personal>, off: u64, end: u64) -> bool {
    p.is_some_and(|p| off >= p.replace.0 && end <= p.replace.1)
}

/// One device's writer as it goes: the first MiB collected (written
/// last), the image's backup GPT header held back, bytes written.
struct Writer<'j> {
    job: &'j Job<'j>,
    meter: &'j dyn Meter,
    name: String,
    lbs: u64,
    head: Vec<u8>,
    head_mapped: Vec<(u64, u64)>,
    bounce: Aligned,
    written: u64,
    /// The image's own backup GPT header, widened to this disk's sectors.
    held: Option<(u64, u64)>,
    /// Its bytes, when the stream brought them.
    stash: Option<Vec<u8>>,
}

impl<'j> Writer<'j> {
    fn new(job: &'j Job<'j>, meter: &'j dyn Meter) -> Self {
        let (sink, src) = (job.sink, job.src);
        let lbs = sink.sector_size();
        let held = backup_header(src.first_mib(), src.size)
            .map(|(o, l)| (o / lbs * lbs, (o + l).div_ceil(lbs) * lbs - o / lbs * lbs))
            .filter(|&(o, l)| !replaced(job.personal, o, o + l));
        Writer {
            job,
            meter,
            name: sink.name().to_string(),
            lbs,
            head: vec![0u8; HEAD.min(src.size) as usize],
            head_mapped: Vec::new(),
            bounce: Aligned::new(HEAD as usize),
            written: 0,
            held,
            stash: None,
        }
    }

    fn stopped(&self) -> Result<()> {
        if self.job.opts.stop.load(Ordering::Relaxed) {
            return Err(Interrupted.into());
        }
        Ok(())
    }

    /// The old tables zeroed, then the image's chunks as they come (the
    /// first MiB kept for last); the units to verify when it ends.
    fn stream(&mut self, rx: Receiver<Msg>) -> Result<Arc<Vec<Unit>>> {
        let (job, meter) = (self.job, self.meter);
        if job.write {
            zero_ends(job.sink)
                .with_context(|| format!("clearing the old tables on {}", self.name))?;
            meter.reached("cleared");
        }
        meter.phase(if job.write { "writing" } else { "reading" }, job.total);
        let mut body = false;
        loop {
            self.stopped()?;
            let c = match rx.recv() {
                Ok(Msg::Chunk(c)) => c,
                Ok(Msg::Finish(units)) => return Ok(units),
                Ok(Msg::Abort(e)) => bail!("{e}"),
                Err(_) => bail!("the source stopped"),
            };
            let end = c.off + c.len as u64;
            if replaced(job.personal, c.off, end) {
                // This device gets its own bytes here (no chunk crosses
                // the range's edges).
                meter.add(c.len as u64);
                continue;
            }
            let mut from = 0;
            if c.off < HEAD {
                // Stash what falls in the first MiB; it is written last.
                let cut = (HEAD.min(end) - c.off) as usize;
                self.head[c.off as usize..c.off as usize + cut].copy_from_slice(c.buf.get(cut));
                self.head_mapped.push((c.off, cut as u64));
                from = cut;
            }
            if job.write && from < c.len {
                let at = c.off + from as u64;
                let bytes = c.padded(from, self.lbs);
                put_around(
                    job.sink,
                    &mut self.bounce,
                    bytes,
                    at,
                    self.held,
                    &mut self.stash,
                )?;
                if !body {
                    body = true;
                    meter.reached("body");
                }
            }
            self.written += c.len as u64;
            meter.add(c.len as u64);
        }
    }

    /// The device's own state filesystem, after the image's body.
    fn own_bytes(&mut self, units: &mut Vec<Unit>) -> Result<()> {
        let Some(p) = self.job.personal else {
            return Ok(());
        };
        let (sink, write) = (self.job.sink, self.job.write);
        let mut zeros: Vec<(usize, Arc<Vec<u8>>, u128)> = Vec::new();
        for (o, b) in &p.extents {
            let (bytes, sum) = match b {
                Bytes::Data(d) => {
                    if write {
                        put(sink, &mut self.bounce, d, *o)?;
                    }
                    (d.clone(), xxh3_128(d))
                }
                Bytes::Zeros(n) => {
                    if write {
                        sink.write_zeroes(*o, *n as u64)
                            .with_context(|| format!("zeroing {} at byte {o}", self.name))?;
                    }
                    // One buffer and hash per length, shared.
                    let z = match zeros.iter().find(|z| z.0 == *n) {
                        Some(z) => z.clone(),
                        None => {
                            let v = Arc::new(vec![0u8; *n]);
                            let h = xxh3_128(&v);
                            zeros.push((*n, v, h));
                            zeros.last().expect("just pushed").clone()
                        }
                    };
                    (z.1, z.2)
                }
            };
            self.written += b.len() as u64;
            units.push(Unit {
                off: *o,
                len: b.len(),
                sum,
                bytes: Some(bytes),
            });
        }
        Ok(())
    }

    /// The tables, last: a moved backup GPT's entries, then the first
    /// MiB, then the backup headers (each usable alone: written after
    /// the head it backs up). Whether the backup GPT moved.
    fn tables_last(&mut self, units: &mut Vec<Unit>) -> Result<bool> {
        let (job, lbs) = (self.job, self.lbs);
        let gpt = match job
            .personal
            .and_then(|p| p.head.as_ref().map(|h| (h, &p.backup)))
        {
            Some((h, Some((boff, backup)))) => Some((h.clone(), *boff, backup.clone())),
            Some((h, None)) => {
                // An MBR with the state partition's new size.
                self.head[..h.len()].copy_from_slice(h);
                self.head_mapped.push((0, h.len() as u64));
                None
            }
            None => relocate_gpt(&self.head, job.src.size, job.sink.size(), lbs),
        };
        let mut headers: Vec<(u64, Vec<u8>)> = Vec::new();
        if let (Some((ho, _)), Some(b)) = (self.held, self.stash.take()) {
            headers.push((ho, b));
        }
        if let Some((primary, boff, backup)) = &gpt {
            // A GPT image on a larger disk: the backup table moves to the end.
            let entries = backup.len() - lbs as usize;
            if job.write {
                put(job.sink, &mut self.bounce, &backup[..entries], *boff)?;
            }
            headers.push((*boff + entries as u64, backup[entries..].to_vec()));
            units.push(Unit {
                off: *boff,
                len: backup.len(),
                sum: xxh3_128(backup),
                bytes: Some(Arc::new(backup.clone())),
            });
            self.head[..primary.len()].copy_from_slice(primary);
            self.head_mapped.push((0, primary.len() as u64));
        }
        if job.write {
            self.sync()?;
            self.meter.reached("head");
            self.stopped()?;
        }
        self.head_pieces(units)?;
        if job.write {
            self.sync()?;
            for (o, b) in headers {
                put(job.sink, &mut self.bounce, &b, o)?;
            }
            self.sync()?;
        }
        Ok(gpt.is_some())
    }

    /// The first MiB, in the sector-aligned pieces that were mapped.
    fn head_pieces(&mut self, units: &mut Vec<Unit>) -> Result<()> {
        let lbs = self.lbs;
        let mapped = merge_sectors(self.head_mapped.clone(), lbs, self.head.len() as u64);
        for (o, l) in mapped {
            let piece = self.head[o as usize..(o + l) as usize].to_vec();
            if self.job.write {
                let mut padded = piece.clone();
                padded.resize(l.div_ceil(lbs) as usize * lbs as usize, 0);
                put(self.job.sink, &mut self.bounce, &padded, o)?;
            }
            units.push(Unit {
                off: o,
                len: piece.len(),
                sum: xxh3_128(&piece),
                bytes: Some(Arc::new(piece)),
            });
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.job
            .sink
            .sync()
            .with_context(|| format!("syncing {}", self.name))
    }

    /// A failure before the read-back: the disk's ends wiped if written.
    fn failed(&self, e: anyhow::Error) -> anyhow::Error {
        if self.job.write {
            wipe(self.job.sink);
        }
        self.meter.finish("failed");
        if self.job.write {
            e.context(format!(
                "{}: nothing bootable was left (partition tables wiped)",
                self.name
            ))
        } else {
            e
        }
    }

    /// The read-back failed or found a difference: wiped likewise.
    fn unverified(&self, e: anyhow::Error) -> anyhow::Error {
        match e.downcast::<Mismatch>() {
            Ok(mut m) => {
                if self.job.write {
                    wipe(self.job.sink);
                    m.wiped = "; nothing bootable was left (partition tables wiped)";
                }
                self.meter.finish("failed");
                m.into()
            }
            Err(e) => self.failed(e),
        }
    }
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
