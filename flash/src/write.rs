//! Writing an image to a device: exclusive, direct, first MiB last,
//! verified by reading back past the page cache.

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::IsTerminal;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::Instant;

use crate::ioctl;
use crate::preflight::Target;
use crate::source::Source;
use formats::gpt::Gpt;

/// What stays unwritten until everything else is on the device: the
/// partition table and boot sectors live here.
pub const HEAD: u64 = 1 << 20;
const CHUNK: usize = 4 << 20;
const ALIGN: usize = 4096;

/// A heap buffer whose usable slice starts on a 4 KiB boundary (O_DIRECT).
struct Aligned {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let raw = vec![0u8; len + ALIGN];
        let off = raw.as_ptr().align_offset(ALIGN);
        Aligned { raw, off, len }
    }
    fn slice(&mut self, n: usize) -> &mut [u8] {
        assert!(n <= self.len);
        &mut self.raw[self.off..self.off + n]
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

/// Exit codes: a refused target, a failed write, a failed verify.
#[derive(Debug, thiserror::Error)]
#[error("verifying {device}: the device differs from the image in the {len} bytes at byte {offset} (the first mismatching range)")]
pub struct Mismatch {
    pub device: String,
    pub offset: u64,
    pub len: usize,
}

struct Progress {
    dev: String,
    total: u64,
    done: u64,
    start: Instant,
    last: Instant,
    tty: bool,
    quiet: bool,
}

impl Progress {
    fn add(&mut self, n: u64, what: &str) {
        self.done += n;
        if self.quiet || self.last.elapsed().as_millis() < 1000 {
            return;
        }
        self.last = Instant::now();
        let s = self.start.elapsed().as_secs_f64().max(1e-3);
        let rate = self.done as f64 / s;
        let eta = (self.total.saturating_sub(self.done)) as f64 / rate.max(1.0);
        let line = format!(
            "flash: {}: {what} {:.1} of {:.1} MiB, {:.0} MB/s, ETA {:.0} s",
            self.dev,
            self.done as f64 / 1048576.0,
            self.total as f64 / 1048576.0,
            rate / 1e6,
            eta
        );
        if self.tty {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    }
    fn end(&self) {
        if self.tty && !self.quiet {
            eprintln!();
        }
    }
}

/// Only verify: compare the device with the image, reading both.
pub fn verify_only(src: &Source, t: &Target, quiet: bool) -> Result<u64> {
    let name = t.disk.path.display().to_string();
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&t.disk.path)
        .with_context(|| format!("opening {name}"))?;
    let size = ioctl::size(&f).with_context(|| format!("size of {name}"))?;
    let lbs =
        ioctl::logical_sector_size(&f).with_context(|| format!("sector size of {name}"))? as u64;
    let mut hashes: Hashes = Vec::new();
    let mut head_chunks: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut head = vec![0u8; HEAD.min(src.size) as usize];
    src.stream(CHUNK, &mut |off, data| {
        if off < HEAD {
            let cut = (HEAD.min(off + data.len() as u64) - off) as usize;
            head[off as usize..off as usize + cut].copy_from_slice(&data[..cut]);
            head_chunks.push((off, data.to_vec()));
        } else {
            hashes.push((off, data.len(), Sha256::digest(data).into()));
        }
        Ok(())
    })?;
    // What flash wrote on a larger disk: the relocated GPT.
    if let Some((primary, boff, backup)) = relocate_gpt(&head, src.size, size, lbs) {
        for (off, data) in &mut head_chunks {
            let (o, end) = (*off as usize, *off as usize + data.len());
            if o < primary.len() {
                let stop = end.min(primary.len());
                data[..stop - o].copy_from_slice(&primary[o..stop]);
            }
        }
        hashes.push((boff, backup.len(), Sha256::digest(&backup).into()));
    }
    for (off, data) in head_chunks {
        hashes.push((off, data.len(), Sha256::digest(&data).into()));
    }
    verify_hashes(&f, &name, &hashes, quiet)
}

/// Write `src` to the target and (unless `verify` is false) read it back.
pub fn flash(src: &Source, t: &Target, verify: bool, quiet: bool) -> Result<Outcome> {
    let dev = t.disk.path.clone();
    let name = dev.display().to_string();
    let start = Instant::now();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_EXCL | libc::O_DIRECT)
        .open(&dev)
        .with_context(|| format!("opening {name} exclusively"))?;
    // An exclusive lock keeps udev from probing the disk mid-write.
    let f = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| anyhow!("locking {name}: {e}"))?;
    // Identity re-check right before the first write.
    let size = ioctl::size(&f).with_context(|| format!("size of {name}"))?;
    let lbs = ioctl::logical_sector_size(&f).with_context(|| format!("sector size of {name}"))?;
    let model = std::fs::read_to_string(format!(
        "/sys/block/{}/device/model",
        dev.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ))
    .map(|m| m.trim().to_string())
    .unwrap_or_default();
    if size != t.disk.size || lbs != t.disk.logical_sector_size || model != t.disk.model {
        bail!("refusing to write to {name}: identity: the device changed since the checks (now {size} bytes, {lbs}-byte sectors, model {model:?})");
    }
    let mut p = Progress {
        dev: name.clone(),
        total: src.ranges().iter().map(|r| r.1).sum(),
        done: 0,
        start,
        last: Instant::now(),
        tty: std::io::stderr().is_terminal(),
        quiet,
    };
    let result = write_all(src, &f, &name, size, lbs as u64, &mut p);
    p.end();
    let (written, gpt_moved, hashes) = match result {
        Ok(r) => r,
        Err(e) => {
            wipe_head(&f, size);
            return Err(e.context(format!(
                "{name}: nothing bootable was left (first MiB wiped)"
            )));
        }
    };
    let mut verified = 0;
    if verify {
        verified = verify_hashes(&f, &name, &hashes, quiet)?;
    }
    let _ = ioctl::reread_partitions(&f);
    drop(f);
    expose_partitions(&name);
    let seconds = start.elapsed().as_secs_f64();
    Ok(Outcome {
        device: name,
        written,
        skipped: src.size - written.min(src.size),
        verified,
        seconds,
        mb_per_s: written as f64 / seconds.max(1e-3) / 1e6,
        gpt_moved,
    })
}

type Hashes = Vec<(u64, usize, [u8; 32])>;

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

fn write_direct(
    f: &File,
    name: &str,
    buf: &mut Aligned,
    off: u64,
    data: &[u8],
    lbs: u64,
) -> Result<()> {
    let n = data.len();
    let padded = (n as u64).div_ceil(lbs) * lbs;
    let b = buf.slice(padded as usize);
    b[..n].copy_from_slice(data);
    b[n..].fill(0);
    f.write_all_at(b, off)
        .with_context(|| format!("writing {name} at byte {off}"))
}

fn write_all(
    src: &Source,
    f: &File,
    name: &str,
    size: u64,
    lbs: u64,
    p: &mut Progress,
) -> Result<(u64, bool, Hashes)> {
    let mut buf = Aligned::new(CHUNK + HEAD as usize);
    let mut head = vec![0u8; HEAD.min(src.size) as usize];
    let mut head_mapped: Vec<(u64, u64)> = Vec::new();
    let mut hashes: Hashes = Vec::new();
    let mut written = 0u64;
    // Chunks written past the first MiB are hashed on another core.
    let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>)>(4);
    let hasher = std::thread::spawn(move || {
        rx.into_iter()
            .map(|(off, d)| (off, d.len(), <[u8; 32]>::from(Sha256::digest(&d))))
            .collect::<Hashes>()
    });
    let streamed = src.stream(CHUNK, &mut |off, data| {
        let end = off + data.len() as u64;
        if off < HEAD {
            // Stash what falls in the first MiB; it is written last.
            let cut = (HEAD.min(end) - off) as usize;
            head[off as usize..off as usize + cut].copy_from_slice(&data[..cut]);
            head_mapped.push((off, cut as u64));
            if cut < data.len() {
                write_direct(f, name, &mut buf, HEAD, &data[cut..], lbs)?;
                tx.send((HEAD, data[cut..].to_vec()))
                    .map_err(|_| anyhow!("the hashing thread stopped"))?;
            }
        } else {
            write_direct(f, name, &mut buf, off, data, lbs)?;
            tx.send((off, data.to_vec()))
                .map_err(|_| anyhow!("the hashing thread stopped"))?;
        }
        written += data.len() as u64;
        p.add(data.len() as u64, "written");
        Ok(())
    });
    drop(tx);
    hashes.extend(
        hasher
            .join()
            .map_err(|_| anyhow!("the hashing thread panicked"))?,
    );
    streamed?;
    f.sync_all().with_context(|| format!("syncing {name}"))?;
    // A GPT image on a larger disk: the backup table moves to the end.
    let mut gpt_moved = false;
    if let Some((primary, boff, backup)) = relocate_gpt(&head, src.size, size, lbs) {
        write_direct(f, name, &mut buf, boff, &backup, lbs)?;
        hashes.push((boff, backup.len(), Sha256::digest(&backup).into()));
        head[..primary.len()].copy_from_slice(&primary);
        head_mapped.push((0, primary.len() as u64));
        gpt_moved = true;
        f.sync_all().with_context(|| format!("syncing {name}"))?;
    }
    // Last: the first MiB, in the block-aligned pieces that were mapped.
    head_mapped.sort();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (o, l) in head_mapped {
        let (o2, e2) = (o / lbs * lbs, (o + l).div_ceil(lbs) * lbs);
        match merged.last_mut() {
            Some(m) if o2 <= m.0 + m.1 => m.1 = m.1.max(e2 - m.0),
            _ => merged.push((o2, e2 - o2)),
        }
    }
    for (o, l) in merged {
        let l = l.min(head.len() as u64 - o);
        let piece = head[o as usize..(o + l) as usize].to_vec();
        write_direct(f, name, &mut buf, o, &piece, lbs)?;
        hashes.push((o, piece.len(), Sha256::digest(&piece).into()));
    }
    f.sync_all().with_context(|| format!("syncing {name}"))?;
    Ok((written, gpt_moved, hashes))
}

/// Best effort: zeros over the first MiB, so a failed flash never boots.
fn wipe_head(f: &File, size: u64) {
    let mut buf = Aligned::new(HEAD as usize);
    let n = HEAD.min(size) as usize;
    let _ = f.write_all_at(buf.slice(n), 0);
    let _ = f.sync_all();
}

/// Read every written range back with O_DIRECT (never the page cache)
/// and compare; report the first differing 4 KiB block's offset.
fn verify_hashes(f: &File, name: &str, hashes: &Hashes, quiet: bool) -> Result<u64> {
    use rayon::prelude::*;
    let lbs =
        ioctl::logical_sector_size(f).with_context(|| format!("sector size of {name}"))? as usize;
    let _ = ioctl::flush_buffers(f);
    let mut sorted = hashes.clone();
    sorted.sort();
    // Chunks are read (O_DIRECT) and hashed on every core; the first
    // mismatch in device order is reported.
    let bad = sorted
        .par_iter()
        .map_init(
            || Aligned::new(CHUNK + HEAD as usize),
            |buf, &(off, len, want)| -> Result<Option<(u64, usize)>> {
                // O_DIRECT wants whole logical sectors, and the last range may
                // end at the device's end: pad to the sector, not further.
                let padded = len.div_ceil(lbs) * lbs;
                let b = buf.slice(padded);
                f.read_exact_at(b, off)
                    .with_context(|| format!("reading {name} back at byte {off}"))?;
                let got: [u8; 32] = Sha256::digest(&b[..len]).into();
                Ok((got != want).then_some((off, len)))
            },
        )
        .collect::<Result<Vec<_>>>()?;
    if let Some((offset, len)) = bad.into_iter().flatten().min() {
        return Err(Mismatch {
            device: name.to_string(),
            offset,
            len,
        }
        .into());
    }
    let total: u64 = sorted.iter().map(|h| h.1 as u64).sum();
    if !quiet {
        eprintln!("flash: {name}: verified {total} bytes by reading them back");
    }
    Ok(total)
}

/// Make the kernel see the new partitions: BLKRRPART above, and where the
/// kernel has no partition parsers, BLKPG through partx.
fn expose_partitions(name: &str) {
    let _ = std::process::Command::new("partx")
        .args(["-a", name])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}
