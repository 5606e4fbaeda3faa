//! The fake-capacity probe: does the device keep what is written across
//! the whole of the capacity it claims? Cheap cards that lie map their
//! upper part back onto the lower part (or drop the writes), and corrupt
//! silently once filled.
//!
//! The probe saves the blocks it will sample, writes at each a pattern
//! that encodes its own offset and this run's nonce, flushes, reads them
//! all back past the page cache (the device is opened O_DIRECT; a cache
//! would hide the aliasing), and restores the saved blocks whatever it
//! found. A bounded number of I/Os: at most 2 x [`SAMPLES`] + 1 blocks
//! (see [`offsets`]), each read twice and written twice, two flushes.

use std::io;

use crate::device::{transfer, BlockDevice};
use formats::sys::Aligned;

/// At least this many blocks are sampled across the capacity (at most
/// twice as many, and the last block).
pub const SAMPLES: u64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "fake capacity: what was written at byte {written} was found at byte {found} \
         (the device holds less than the {size} bytes it claims; {dev} is as it was)"
    )]
    Aliased {
        dev: String,
        written: u64,
        found: u64,
        size: u64,
    },
    #[error(
        "fake capacity: a write at byte {at} did not stay (the device holds less than the \
         {size} bytes it claims; {dev} is as it was)"
    )]
    Lost { dev: String, at: u64, size: u64 },
    #[error("{dev}: probing at byte {at}: {err}")]
    Io {
        dev: String,
        at: u64,
        err: io::Error,
    },
    #[error(
        "{dev}: restoring the probed block at byte {at} failed ({err}); the device's contents \
         there are lost"
    )]
    Restore {
        dev: String,
        at: u64,
        err: io::Error,
    },
}

/// The sampled block offsets for a device of `size` bytes: every multiple
/// of the largest power of two that gives at least [`SAMPLES`] of them,
/// and the last `unit`-block. Flash chips come in powers of two, so a card
/// that wraps at its real capacity maps an upper sample onto a lower one
/// (onto block 0 if it holds less than one spacing), which then reads back
/// the wrong pattern.
pub fn offsets(size: u64, unit: u64) -> Vec<u64> {
    let step = (size / SAMPLES).max(unit);
    let step = 1u64 << (63 - step.leading_zeros());
    let mut v: Vec<u64> = (0..)
        .map(|i| i * step)
        .take_while(|o| o + unit <= size)
        .collect();
    if let Some(last) = (size / unit).checked_sub(1).map(|b| b * unit) {
        if v.last() != Some(&last) {
            v.push(last);
        }
    }
    v
}

/// The pattern for the block at `off`: a header naming it, then bytes
/// from a generator seeded by the nonce and the offset.
fn pattern(buf: &mut [u8], nonce: u64, off: u64) {
    let head = b"NIXFORGE-PROBE\0\0";
    buf[..16].copy_from_slice(head);
    buf[16..24].copy_from_slice(&nonce.to_le_bytes());
    buf[24..32].copy_from_slice(&off.to_le_bytes());
    let mut x = nonce ^ off.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for c in buf[32..].chunks_mut(8) {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
}

fn read_exact(dev: &dyn BlockDevice, buf: &mut [u8], at: u64) -> io::Result<()> {
    transfer(buf.len(), 1, |d| dev.read_at(&mut buf[d..], at + d as u64))
        .map_err(|e| e.into_io(io::ErrorKind::UnexpectedEof))
}

fn write_exact(dev: &dyn BlockDevice, buf: &[u8], at: u64) -> io::Result<()> {
    transfer(buf.len(), 1, |d| dev.write_at(&buf[d..], at + d as u64))
        .map_err(|e| e.into_io(io::ErrorKind::WriteZero))
}

/// Probe `dev`; its bytes are as before when this returns, whatever the
/// result (unless restoring fails, which is said).
pub fn probe(dev: &dyn BlockDevice, nonce: u64) -> Result<(), ProbeError> {
    let name = dev.name().to_string();
    let size = dev.size();
    let unit = dev.sector_size();
    let at = offsets(size, unit);
    let io_err = |at: u64| {
        let name = name.clone();
        move |err| ProbeError::Io { dev: name, at, err }
    };
    let mut saved = Vec::with_capacity(at.len());
    let mut buf = Aligned::new(unit as usize);
    for &o in &at {
        read_exact(dev, buf.slice(unit as usize), o).map_err(io_err(o))?;
        saved.push(buf.get(unit as usize).to_vec());
    }
    let outcome = (|| {
        for &o in &at {
            pattern(buf.slice(unit as usize), nonce, o);
            write_exact(dev, buf.get(unit as usize), o).map_err(io_err(o))?;
        }
        dev.sync().map_err(io_err(0))?;
        let _ = dev.drop_cache();
        let mut want = vec![0u8; unit as usize];
        for &o in &at {
            read_exact(dev, buf.slice(unit as usize), o).map_err(io_err(o))?;
            pattern(&mut want, nonce, o);
            let got = buf.get(unit as usize);
            if got == want.as_slice() {
                continue;
            }
            // Another sample's pattern here: the device wraps.
            if got[..16] == want[..16] && got[16..24] == want[16..24] {
                let written = u64::from_le_bytes(got[24..32].try_into().expect("8 bytes"));
                return Err(ProbeError::Aliased {
                    dev: name.clone(),
                    written,
                    found: o,
                    size,
                });
            }
            return Err(ProbeError::Lost {
                dev: name.clone(),
                at: o,
                size,
            });
        }
        Ok(())
    })();
    // Restore, in reverse: on a wrapping device the lower blocks' own
    // contents win, as they were.
    for (&o, b) in at.iter().zip(&saved).rev() {
        buf.slice(unit as usize).copy_from_slice(b);
        write_exact(dev, buf.get(unit as usize), o).map_err(|err| ProbeError::Restore {
            dev: name.clone(),
            at: o,
            err,
        })?;
    }
    dev.sync().map_err(|err| ProbeError::Restore {
        dev: name.clone(),
        at: 0,
        err,
    })?;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memdisk::{Event, Fault, MemDisk};

    #[test]
    fn an_honest_disk_passes_and_is_left_as_it_was_in_a_bounded_number_of_ios() {
        let d = MemDisk::new(64 << 20, 512, 0x5A);
        // Some old contents to keep.
        let before = {
            let mut b = d.bytes();
            for (i, x) in b.iter_mut().enumerate() {
                *x = (i % 251) as u8;
            }
            b
        };
        let d = MemDisk::from_bytes(before.clone(), 512);
        probe(&d, 42).unwrap();
        assert_eq!(d.bytes(), before);
        let n = offsets(64 << 20, 512).len() as u64;
        assert!((SAMPLES..=2 * SAMPLES + 1).contains(&n), "{n}");
        let writes = d
            .events()
            .iter()
            .filter(|e| matches!(e, Event::Write { .. }))
            .count() as u64;
        assert_eq!(writes, 2 * n);
        assert_eq!(d.reads(), 2 * n);
    }

    #[test]
    fn a_disk_whose_upper_part_wraps_onto_the_lower_is_caught_and_restored() {
        for real in [32 << 20, 16 << 20, 8 << 20, 1 << 20] {
            let d = MemDisk::new(64 << 20, 512, 0x11).with_fault(Fault::Aliases { real });
            let before = d.bytes();
            let e = probe(&d, 7).unwrap_err();
            assert!(matches!(e, ProbeError::Aliased { .. }), "{real}: {e}");
            assert!(e.to_string().contains("fake capacity"), "{e}");
            assert_eq!(d.bytes(), before, "{real}: restored");
        }
    }

    #[test]
    fn a_disk_that_drops_upper_writes_is_caught() {
        let d = MemDisk::new(64 << 20, 4096, 0).with_fault(Fault::DropsFrom(40 << 20));
        let e = probe(&d, 9).unwrap_err();
        assert!(
            matches!(e, ProbeError::Lost { at, .. } if at >= 40 << 20),
            "{e}"
        );
    }

    #[test]
    fn offsets_span_the_disk_aligned() {
        for size in [1u64 << 30, 31_914_983_424, (64 << 20) + 4096 * 3] {
            let o = offsets(size, 4096);
            assert!(
                o.len() as u64 >= SAMPLES && o.len() as u64 <= 2 * SAMPLES + 1,
                "{size}"
            );
            assert_eq!(o[0], 0);
            assert_eq!(*o.last().unwrap(), size / 4096 * 4096 - 4096);
            assert!(o.iter().all(|x| x % 4096 == 0));
        }
    }
}
