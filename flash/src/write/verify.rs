//! Reading a device back past the page cache and comparing it with what
//! was written; on a mismatch, the first differing byte.

use anyhow::{anyhow, Context, Result};
use std::sync::Arc;
use xxhash_rust::xxh3::xxh3_128;

use super::{Interrupted, Unit, CHUNK};
use crate::device::{transfer, BlockDevice, Short};
use crate::source::Source;
use crate::Meter;
use formats::sys::Aligned;
use std::sync::atomic::{AtomicBool, Ordering};

/// A verify failure (its own exit code): the first byte that differs.
#[derive(Debug, thiserror::Error)]
#[error("verifying {device}: byte {offset} reads {got} from the device but the image has {want} (the first difference){wiped}")]
pub struct Mismatch {
    pub device: String,
    pub offset: u64,
    pub got: String,
    pub want: String,
    /// What else to say: that the tables were wiped, or a hint.
    pub wiped: &'static str,
}

/// Read every unit (at most a chunk each) back with O_DIRECT after a sync
/// and BLKFLSBUF (never from the page cache), on every core; on a
/// mismatch, find the first differing byte.
pub(super) fn verify(
    sink: &dyn BlockDevice,
    src: &Source,
    mut units: Vec<Unit>,
    meter: &dyn Meter,
    stop: &AtomicBool,
) -> Result<u64> {
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
                if stop.load(Ordering::Relaxed) {
                    return Err(Interrupted.into());
                }
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

/// A device's first MiB (or all of a smaller one), read past the cache.
pub fn read_head(sink: &dyn BlockDevice) -> Result<Vec<u8>> {
    let n = super::HEAD.min(sink.size() / sink.sector_size() * sink.sector_size()) as usize;
    let mut buf = Aligned::new(n.max(1));
    read_exact(sink, buf.slice(n), 0)?;
    Ok(buf.get(n).to_vec())
}

fn read_exact(sink: &dyn BlockDevice, b: &mut [u8], off: u64) -> Result<()> {
    let len = b.len();
    transfer(len, 1, |done| {
        sink.read_at(&mut b[done..], off + done as u64)
    })
    .map_err(|e| {
        let at =
            |done: usize| format!("reading {} back at byte {}", sink.name(), off + done as u64);
        match e {
            Short::Stuck { done } => anyhow!("{}: the device ended", at(done)),
            Short::Unaligned { done, .. } => anyhow!("{}: a short read", at(done)),
            Short::Failed { done, err } => anyhow::Error::from(err).context(at(done)),
        }
    })
}

/// The first byte of a mismatching unit that differs from the image.
fn locate(sink: &dyn BlockDevice, src: &Source, u: &Unit) -> Result<Mismatch> {
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
