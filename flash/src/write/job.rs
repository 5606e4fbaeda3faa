//! What one device does with the stream: write every chunk past the first
//! MiB as it comes, then the moved backup GPT, then the first MiB; on any
//! failure, wipe the head so nothing bootable is left.

use anyhow::{bail, Context, Result};
use std::io;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;
use xxhash_rust::xxh3::xxh3_128;

use super::gpt_move::relocate_gpt;
use super::verify::{verify, Mismatch};
use super::{Msg, Options, Outcome, Unit, ALIGN, HEAD};
use crate::device::BlockDevice;
use crate::source::Source;
use crate::Meter;
use formats::sys::Aligned;

/// Write `data` (sector-padded) at `off`, through an aligned bounce buffer
/// when `data` itself is not aligned.
fn put(sink: &dyn BlockDevice, bounce: &mut Aligned, data: &[u8], off: u64) -> Result<()> {
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
pub(super) fn wipe_head(sink: &dyn BlockDevice) {
    let mut buf = Aligned::new(HEAD as usize);
    let n = HEAD.min(sink.size()) as usize;
    let _ = sink.write_at(buf.slice(n), 0);
    let _ = sink.sync();
}

/// What one device does with the stream: write (or, verifying only, just
/// collect the first MiB), then read everything back.
pub(super) fn device_job(
    sink: &dyn BlockDevice,
    rx: Receiver<Msg>,
    src: &Source,
    total: u64,
    opts: &Options,
    write: bool,
    meter: &dyn Meter,
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
