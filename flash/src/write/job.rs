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
        device_job(self, rx, meter)
    }
}

fn replaced(p: Option<&Personal>, off: u64, end: u64) -> bool {
    p.is_some_and(|p| off >= p.replace.0 && end <= p.replace.1)
}

fn device_job(job: &Job, rx: Receiver<Msg>, meter: &dyn Meter) -> Result<Outcome> {
    let Job {
        sink,
        personal,
        src,
        total,
        opts,
        write,
    } = *job;
    let start = Instant::now();
    let name = sink.name().to_string();
    let lbs = sink.sector_size();
    let mut head = vec![0u8; HEAD.min(src.size) as usize];
    let mut head_mapped: Vec<(u64, u64)> = Vec::new();
    let mut bounce = Aligned::new(HEAD as usize);
    let mut written = 0u64;
    // The image's own backup GPT header, widened to this disk's sectors.
    let held = backup_header(src.first_mib(), src.size)
        .map(|(o, l)| (o / lbs * lbs, (o + l).div_ceil(lbs) * lbs - o / lbs * lbs))
        .filter(|&(o, l)| !replaced(personal, o, o + l));
    let mut stash: Option<Vec<u8>> = None;
    let streamed = (|| -> Result<Arc<Vec<Unit>>> {
        if write {
            zero_ends(sink).with_context(|| format!("clearing the old tables on {name}"))?;
            meter.reached("cleared");
        }
        meter.phase(if write { "writing" } else { "reading" }, total);
        let mut body = false;
        loop {
            if opts.stop.load(Ordering::Relaxed) {
                return Err(Interrupted.into());
            }
            let c = match rx.recv() {
                Ok(Msg::Chunk(c)) => c,
                Ok(Msg::Finish(units)) => return Ok(units),
                Ok(Msg::Abort(e)) => bail!("{e}"),
                Err(_) => bail!("the source stopped"),
            };
            let end = c.off + c.len as u64;
            if replaced(personal, c.off, end) {
                // This device gets its own bytes here (no chunk crosses
                // the range's edges).
                meter.add(c.len as u64);
                continue;
            }
            let mut from = 0;
            if c.off < HEAD {
                // Stash what falls in the first MiB; it is written last.
                let cut = (HEAD.min(end) - c.off) as usize;
                head[c.off as usize..c.off as usize + cut].copy_from_slice(c.buf.get(cut));
                head_mapped.push((c.off, cut as u64));
                from = cut;
            }
            if write && from < c.len {
                let at = c.off + from as u64;
                put_around(sink, &mut bounce, c.padded(from, lbs), at, held, &mut stash)?;
                if !body {
                    body = true;
                    meter.reached("body");
                }
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
                "{name}: nothing bootable was left (partition tables wiped)"
            ))
        } else {
            e
        }
    };
    let finished = streamed.and_then(|global| {
        let mut units: Vec<Unit> = global
            .iter()
            .filter(|u| !replaced(personal, u.off, u.off + u.len as u64))
            .cloned()
            .collect();
        if let Some(p) = personal {
            // The device's own state filesystem, after the image's body.
            let mut zeros: Vec<(usize, Arc<Vec<u8>>, u128)> = Vec::new();
            for (o, b) in &p.extents {
                let (bytes, sum) = match b {
                    Bytes::Data(d) => {
                        if write {
                            put(sink, &mut bounce, d, *o)?;
                        }
                        (d.clone(), xxh3_128(d))
                    }
                    Bytes::Zeros(n) => {
                        if write {
                            sink.write_zeroes(*o, *n as u64)
                                .with_context(|| format!("zeroing {name} at byte {o}"))?;
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
                written += b.len() as u64;
                units.push(Unit {
                    off: *o,
                    len: b.len(),
                    sum,
                    bytes: Some(bytes),
                });
            }
        }
        let gpt = match personal.and_then(|p| p.head.as_ref().map(|h| (h, &p.backup))) {
            Some((h, Some((boff, backup)))) => Some((h.clone(), *boff, backup.clone())),
            Some((h, None)) => {
                // An MBR with the state partition's new size.
                head[..h.len()].copy_from_slice(h);
                head_mapped.push((0, h.len() as u64));
                None
            }
            None => relocate_gpt(&head, src.size, sink.size(), lbs),
        };
        // A backup header is usable alone: each is written after the
        // head it backs up.
        let mut headers: Vec<(u64, &[u8])> = Vec::new();
        if let (Some((ho, _)), Some(b)) = (held, &stash) {
            headers.push((ho, b));
        }
        if let Some((primary, boff, backup)) = &gpt {
            // A GPT image on a larger disk: the backup table moves to the end.
            let entries = backup.len() - lbs as usize;
            if write {
                put(sink, &mut bounce, &backup[..entries], *boff)?;
            }
            headers.push((*boff + entries as u64, &backup[entries..]));
            units.push(Unit {
                off: *boff,
                len: backup.len(),
                sum: xxh3_128(backup),
                bytes: Some(Arc::new(backup.clone())),
            });
            head[..primary.len()].copy_from_slice(primary);
            head_mapped.push((0, primary.len() as u64));
        }
        if write {
            sink.sync().with_context(|| format!("syncing {name}"))?;
            meter.reached("head");
            if opts.stop.load(Ordering::Relaxed) {
                return Err(Interrupted.into());
            }
        }
        // Then the first MiB, in the sector-aligned pieces that were mapped.
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
            for (o, b) in headers {
                put(sink, &mut bounce, b, o)?;
            }
            sink.sync().with_context(|| format!("syncing {name}"))?;
        }
        Ok((units, gpt.is_some()))
    });
    let (units, gpt_moved) = match finished {
        Ok(r) => r,
        Err(e) => {
            if write {
                wipe(sink);
            }
            return Err(fail(e, write));
        }
    };
    let mut verified = 0;
    if opts.verify {
        if let Err(e) = verify(sink, src, units, meter, &opts.stop).map(|n| verified = n) {
            if write {
                wipe(sink);
            }
            return Err(match e.downcast::<Mismatch>() {
                Ok(mut m) => {
                    if write {
                        m.wiped = "; nothing bootable was left (partition tables wiped)";
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
    Ok(Outcome {
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
    })
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
