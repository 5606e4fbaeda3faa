//! Where `lay` writes an image: assembled in memory, then written and
//! hashed by other threads at once.
//!
//! The layouts write in ascending order (each filesystem writer does; the
//! layouts write their tables in order, the backup GPT last), so
//! everything below the write cursor is final. [`ImageOut`] assembles the
//! image in aligned 4 MiB chunks and seals each as soon as a write lands
//! beyond it. A sealed chunk is shared (never copied) by:
//!
//! ```text
//!             ┌→ disk stage: the raw file with O_DIRECT (touched blocks
//!             │  only, so it stays sparse), or zstd (gaps as zeros)
//! lay() → ImageOut ─→ hash workers: each bmap piece's SHA-256 on one of
//!             │  several threads (pieces are independent)
//!             └→ partition hasher (only for --json): each partition's SHA-256
//! ```
//!
//! and goes back, zeroed, to be filled again when the last of them lets
//! go. The bmap lists exactly the 4 KiB blocks something was written to;
//! `super::build` checks they are the blocks the filesystems say they use.
//! Nothing is read back. Buffered writes plus fsync ran at 410 MB/s on the
//! CI VM against 2 GB/s with O_DIRECT; where the filesystem refuses
//! O_DIRECT (EINVAL) the raw file is written through the page cache.
//! Durability comes from the fsync when the output is committed.

use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use formats::bmap::{BLOCK, MAX_RANGE_BLOCKS};
use formats::sys::{Aligned, Lease};

const CHUNK: usize = 4 << 20;
const BLOCKS: usize = CHUNK / BLOCK as usize;
/// Chunks allocated at most for a raw image: enough for two hash workers
/// to each hold a piece (16 chunks) while the disk stage writes ahead.
const POOL: usize = 24;
/// Without bmap hashing, or behind zstd (slower than hashing), a few
/// chunks ahead suffice.
const POOL_SMALL: usize = 8;

static ZEROS: [u8; 1 << 16] = [0; 1 << 16];

/// How the image leaves: a raw (sparse) file, or a zstd stream.
pub(crate) enum Stage {
    /// The output file, and its path (to open it again with O_DIRECT).
    Raw(std::path::PathBuf),
    /// The zstd level.
    Zstd(i32),
}

/// What the image's bytes are hashed for (nothing, for a bare filesystem).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Hashes {
    /// The bmap's pieces.
    pub(crate) bmap: bool,
    /// The watched ranges (the partitions, for --json).
    pub(crate) partitions: bool,
}

/// (offset, length, SHA-256 hex) of a watched range.
pub(crate) type Watched = (u64, u64, String);

/// What the threads computed: the bmap's pieces (first block, last block,
/// SHA-256 hex) in order, and the watched ranges' hashes in watch order.
pub(crate) struct Finished {
    pub(crate) pieces: Vec<(u64, u64, String)>,
    pub(crate) watched: Vec<Watched>,
}

/// 4 MiB of the image. Only touched blocks hold image bytes (a touched
/// block's unwritten bytes are zeroed when it is first written); the
/// others hold whatever an earlier use left and are never read: they are
/// zeros in the image.
struct Chunk {
    /// Image offset, a multiple of CHUNK.
    off: u64,
    buf: Aligned,
    /// Which 4 KiB blocks were written.
    touched: [bool; BLOCKS],
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        self.buf.get(CHUNK)
    }

    /// The chunk's first `n` bytes as the image has them, in order, in
    /// pieces: untouched runs as zeros.
    fn image_bytes(&self, n: usize, mut each: impl FnMut(&[u8])) {
        for (a, b, touched) in self.runs(n.div_ceil(BLOCK as usize)) {
            let (lo, hi) = (a * BLOCK as usize, (b * BLOCK as usize).min(n));
            if touched {
                each(&self.bytes()[lo..hi]);
            } else {
                let mut at = lo;
                while at < hi {
                    let k = (hi - at).min(ZEROS.len());
                    each(&ZEROS[..k]);
                    at += k;
                }
            }
        }
    }

    /// Runs of blocks `(first, past_last, touched)` in `[0, blocks)`.
    fn runs(&self, blocks: usize) -> Vec<(usize, usize, bool)> {
        let mut runs: Vec<(usize, usize, bool)> = Vec::new();
        for (i, &t) in self.touched[..blocks].iter().enumerate() {
            match runs.last_mut() {
                Some(r) if r.2 == t => r.1 = i + 1,
                _ => runs.push((i, i + 1, t)),
            }
        }
        runs
    }
}

/// A sealed chunk, shared by the threads; the last to drop it hands it
/// back for reuse.
type Shared = Arc<Lease<Box<Chunk>>>;

enum ToDisk {
    Len(u64),
    Chunk(Shared),
    End,
}

enum ToHash {
    /// Bytes `lo..hi` of a chunk, next in piece `id`.
    Part {
        id: u64,
        data: Shared,
        lo: usize,
        hi: usize,
    },
    /// Piece `id` is complete: blocks `first..=last`.
    Close { id: u64, first: u64, last: u64 },
}

enum ToWatch {
    Watch(u64, u64),
    /// A chunk's first `n` bytes.
    Chunk(Shared, usize),
    End(u64),
}

/// The open bmap piece and where the hash workers are.
struct Pieces {
    workers: Vec<SyncSender<ToHash>>,
    /// (id, first block, blocks so far)
    open: Option<(u64, u64, u64)>,
    next_id: u64,
    /// The block after the last one fed.
    next_block: u64,
}

impl Pieces {
    fn worker(&self, id: u64) -> &SyncSender<ToHash> {
        &self.workers[(id % self.workers.len() as u64) as usize]
    }

    fn close(&mut self) -> Result<(), ()> {
        if self.workers.is_empty() {
            return Ok(());
        }
        if let Some((id, first, count)) = self.open.take() {
            let last = first + count - 1;
            self.worker(id)
                .send(ToHash::Close { id, first, last })
                .map_err(drop)?;
        }
        Ok(())
    }

    /// A chunk's first `len` bytes, cut into pieces of touched blocks.
    fn feed(&mut self, c: &Shared, len: usize) -> Result<(), ()> {
        if self.workers.is_empty() {
            return Ok(());
        }
        let base = c.off / BLOCK;
        if base != self.next_block {
            self.close()?;
        }
        let blocks = len.div_ceil(BLOCK as usize);
        for (a, b, touched) in c.runs(blocks) {
            if !touched {
                self.close()?;
                continue;
            }
            let mut at = a;
            while at < b {
                let next_id = self.next_id;
                let (id, _, count) = self.open.get_or_insert((next_id, base + at as u64, 0));
                if *id == next_id {
                    self.next_id += 1;
                }
                let id = *id;
                let take = ((b - at) as u64).min(MAX_RANGE_BLOCKS - *count) as usize;
                *count += take as u64;
                let full = *count == MAX_RANGE_BLOCKS;
                let (lo, hi) = (at * BLOCK as usize, ((at + take) * BLOCK as usize).min(len));
                self.worker(id)
                    .send(ToHash::Part {
                        id,
                        data: c.clone(),
                        lo,
                        hi,
                    })
                    .map_err(drop)?;
                at += take;
                if full {
                    self.close()?;
                }
            }
        }
        self.next_block = base + blocks as u64;
        Ok(())
    }
}

pub(crate) struct ImageOut {
    cursor: u64,
    /// End of the last write.
    pos: u64,
    len: u64,
    cur: Option<Box<Chunk>>,
    /// Chunks allocated, and how many may be.
    allocated: usize,
    pool: usize,
    free: Receiver<Box<Chunk>>,
    back: Sender<Box<Chunk>>,
    disk: Option<SyncSender<ToDisk>>,
    pieces: Pieces,
    watch: Option<SyncSender<ToWatch>>,
    disk_thread: Option<JoinHandle<io::Result<()>>>,
    hash_threads: Vec<JoinHandle<Vec<(u64, u64, String)>>>,
    watch_thread: Option<JoinHandle<Vec<Watched>>>,
    failed: Option<(io::ErrorKind, String)>,
}

fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<JoinHandle<T>> {
    std::thread::Builder::new().name(name.into()).spawn(f)
}

impl ImageOut {
    /// Write into `file` (created empty) as `stage` says, hashing what
    /// `hashes` asks for.
    pub(crate) fn new(file: &File, stage: Stage, hashes: Hashes) -> io::Result<ImageOut> {
        let (disk, to_disk) = sync_channel::<ToDisk>(POOL);
        let pool = match stage {
            Stage::Raw(_) if hashes.bmap => POOL,
            _ => POOL_SMALL,
        };
        let disk_thread = match stage {
            Stage::Raw(path) => {
                let f = match formats::sys::open_direct_write(&path)? {
                    Some(f) => f,
                    None => file.try_clone()?,
                };
                spawn("image-write", move || write_raw(f, to_disk))?
            }
            Stage::Zstd(level) => {
                let f = file.try_clone()?;
                spawn("image-zstd", move || write_zstd(f, level, to_disk))?
            }
        };
        let n = match hashes.bmap {
            true => std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4)),
            false => 0,
        };
        let mut workers = Vec::new();
        let mut hash_threads = Vec::new();
        for _ in 0..n {
            let (tx, rx) = sync_channel::<ToHash>(4 * POOL);
            workers.push(tx);
            hash_threads.push(spawn("image-hash", move || hash_pieces(rx))?);
        }
        let (watch, watch_thread) = if hashes.partitions {
            let (tx, rx) = sync_channel::<ToWatch>(POOL);
            (
                Some(tx),
                Some(spawn("image-watch", move || hash_watched(rx))?),
            )
        } else {
            (None, None)
        };
        let (back, free) = channel();
        Ok(ImageOut {
            cursor: 0,
            pos: 0,
            len: 0,
            cur: None,
            allocated: 0,
            pool,
            free,
            back,
            disk: Some(disk),
            pieces: Pieces {
                workers,
                open: None,
                next_id: 0,
                next_block: 0,
            },
            watch,
            disk_thread: Some(disk_thread),
            hash_threads,
            watch_thread,
            failed: None,
        })
    }

    /// The error of a thread that stopped early (the disk stage is the
    /// only one that can fail), kept to be told again to every later call.
    fn stopped(&mut self) -> io::Error {
        self.disk = None;
        if let Some(t) = self.disk_thread.take() {
            self.failed = Some(match t.join() {
                Ok(Err(e)) => (e.kind(), e.to_string()),
                _ => (
                    io::ErrorKind::Other,
                    "internal: an image thread stopped".into(),
                ),
            });
        }
        let (kind, msg) = self.failed.clone().unwrap_or((
            io::ErrorKind::Other,
            "internal: an image thread stopped".into(),
        ));
        io::Error::new(kind, msg)
    }

    fn send_disk(&mut self, m: ToDisk) -> io::Result<()> {
        match self.disk.as_ref().map(|tx| tx.send(m)) {
            Some(Ok(())) => Ok(()),
            _ => Err(self.stopped()),
        }
    }

    fn send_watch(&mut self, m: ToWatch) -> io::Result<()> {
        match self.watch.as_ref().map(|tx| tx.send(m)) {
            None | Some(Ok(())) => Ok(()),
            Some(Err(_)) => Err(self.stopped()),
        }
    }

    /// A zeroed chunk for the image offset `off`.
    fn fresh(&mut self, off: u64) -> io::Result<Box<Chunk>> {
        let mut c = match self.free.try_recv() {
            Ok(c) => c,
            Err(_) if self.allocated < self.pool => {
                self.allocated += 1;
                Box::new(Chunk {
                    off: 0,
                    buf: Aligned::new(CHUNK),
                    touched: [false; BLOCKS],
                })
            }
            Err(_) => match self.free.recv() {
                Ok(c) => c,
                Err(_) => return Err(self.stopped()),
            },
        };
        c.off = off;
        // Untouched blocks are never read, so their bytes can stay.
        c.touched = [false; BLOCKS];
        Ok(c)
    }

    /// The chunk being filled goes to every thread.
    fn seal(&mut self) -> io::Result<()> {
        let Some(c) = self.cur.take() else {
            return Ok(());
        };
        let n = (self.len.saturating_sub(c.off) as usize).min(CHUNK);
        let shared = Arc::new(Lease::new(c, self.back.clone()));
        if self.pieces.feed(&shared, n).is_err() {
            return Err(self.stopped());
        }
        if self.watch.is_some() {
            self.send_watch(ToWatch::Chunk(shared.clone(), n))?;
        }
        self.send_disk(ToDisk::Chunk(shared))
    }

    /// Everything written and hashed.
    pub(crate) fn finish(mut self) -> io::Result<Finished> {
        self.seal()?;
        if self.pieces.close().is_err() {
            return Err(self.stopped());
        }
        let len = self.len;
        self.send_disk(ToDisk::End)?;
        self.send_watch(ToWatch::End(len))?;
        self.disk = None;
        self.watch = None;
        self.pieces.workers.clear();
        match self.disk_thread.take().map(JoinHandle::join) {
            Some(Ok(Ok(()))) => {}
            Some(Ok(Err(e))) => return Err(e),
            _ => return Err(self.stopped()),
        }
        let internal = || io::Error::other("internal: an image hashing thread failed");
        let mut pieces = Vec::new();
        for t in self.hash_threads.drain(..) {
            pieces.extend(t.join().map_err(|_| internal())?);
        }
        pieces.sort();
        let watched = match self.watch_thread.take() {
            Some(t) => t.join().map_err(|_| internal())?,
            None => Vec::new(),
        };
        Ok(Finished { pieces, watched })
    }
}

/// The raw disk stage: touched blocks of each chunk at their offsets;
/// whole blocks, so the file is cut back to the image's size at the end.
fn write_raw(disk: File, rx: Receiver<ToDisk>) -> io::Result<()> {
    let mut len = 0;
    for m in rx {
        match m {
            ToDisk::Len(n) => {
                len = n;
                disk.set_len(n)?;
            }
            ToDisk::Chunk(c) => {
                for (a, b, touched) in c.runs(BLOCKS) {
                    if touched {
                        let at = c.off + a as u64 * BLOCK;
                        let (lo, hi) = (a * BLOCK as usize, b * BLOCK as usize);
                        disk.write_all_at(&c.bytes()[lo..hi], at).map_err(|e| {
                            io::Error::new(e.kind(), format!("writing at byte {at}: {e}"))
                        })?;
                    }
                }
            }
            ToDisk::End => return disk.set_len(len),
        }
    }
    Ok(())
}

/// The zstd disk stage: every byte up to the image's size, gaps as zeros.
fn write_zstd(out: File, level: i32, rx: Receiver<ToDisk>) -> io::Result<()> {
    let mut enc = zstd::stream::write::Encoder::new(BufWriter::with_capacity(4 << 20, out), level)?;
    // Multithreaded: the output is the same for any worker count.
    enc.multithread(2)?;
    // Levels up to 19 use windows of at most 2^23: readers need no --long.
    enc.include_checksum(true)?;
    let (mut len, mut pos) = (0u64, 0u64);
    let zeros_to = |enc: &mut zstd::stream::write::Encoder<_>, pos: &mut u64, to: u64| {
        while *pos < to {
            let n = (to - *pos).min(ZEROS.len() as u64) as usize;
            enc.write_all(&ZEROS[..n])?;
            *pos += n as u64;
        }
        io::Result::Ok(())
    };
    for m in rx {
        match m {
            ToDisk::Len(n) => {
                len = n;
                enc.set_pledged_src_size(Some(n))?;
            }
            ToDisk::Chunk(c) => {
                zeros_to(&mut enc, &mut pos, c.off)?;
                let n = ((len - c.off) as usize).min(CHUNK);
                let mut r = Ok(());
                c.image_bytes(n, |b| {
                    if r.is_ok() {
                        r = enc.write_all(b);
                    }
                });
                r?;
                pos += n as u64;
            }
            ToDisk::End => {
                zeros_to(&mut enc, &mut pos, len)?;
                return enc.finish()?.flush();
            }
        }
    }
    Ok(())
}

/// A hash worker: the pieces sent to it, each hashed as its parts arrive.
fn hash_pieces(rx: Receiver<ToHash>) -> Vec<(u64, u64, String)> {
    let mut open: Vec<(u64, Sha256)> = Vec::new();
    let mut done = Vec::new();
    for m in rx {
        match m {
            ToHash::Part { id, data, lo, hi } => {
                let i = match open.iter().position(|o| o.0 == id) {
                    Some(i) => i,
                    None => {
                        open.push((id, Sha256::new()));
                        open.len() - 1
                    }
                };
                open[i].1.update(&data.bytes()[lo..hi]);
            }
            ToHash::Close { id, first, last } => {
                if let Some(i) = open.iter().position(|o| o.0 == id) {
                    let (_, h) = open.swap_remove(i);
                    done.push((first, last, format!("{:x}", h.finalize())));
                }
            }
        }
    }
    done
}

/// Watched ranges and their running hashes, fed the image's bytes in
/// order.
#[derive(Default)]
struct Watches {
    list: Vec<(u64, u64, Sha256)>,
    pos: u64,
}

impl Watches {
    fn feed(&mut self, data: &[u8]) {
        let (s, e) = (self.pos, self.pos + data.len() as u64);
        for (off, len, h) in &mut self.list {
            let (a, b) = (s.max(*off), e.min(*off + *len));
            if a < b {
                h.update(&data[(a - s) as usize..(b - s) as usize]);
            }
        }
        self.pos = e;
    }

    /// Zeros nobody wrote, up to byte `to`.
    fn gap_to(&mut self, to: u64) {
        while self.pos < to {
            let n = (to - self.pos).min(ZEROS.len() as u64) as usize;
            self.feed(&ZEROS[..n]);
        }
    }
}

/// The partition hasher: every byte of each watched range, in order.
fn hash_watched(rx: Receiver<ToWatch>) -> Vec<Watched> {
    let mut w = Watches::default();
    for m in rx {
        match m {
            ToWatch::Watch(off, len) => w.list.push((off, len, Sha256::new())),
            ToWatch::Chunk(c, n) => {
                w.gap_to(c.off);
                c.image_bytes(n, |b| w.feed(b));
            }
            ToWatch::End(len) => {
                w.gap_to(len);
                break;
            }
        }
    }
    w.list
        .into_iter()
        .map(|(o, l, h)| (o, l, format!("{:x}", h.finalize())))
        .collect()
}

/// The error for a write below what was already written.
fn not_ascending(at: u64, after: u64) -> io::Error {
    io::Error::other(format!(
        "internal: a write at byte {at} after byte {after} (image writes must ascend)"
    ))
}

impl Write for ImageOut {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.cursor < self.pos {
            return Err(not_ascending(self.cursor, self.pos));
        }
        if self.cursor + data.len() as u64 > self.len {
            return Err(io::Error::other(format!(
                "internal: a write of {} bytes at byte {} goes past the image's end ({})",
                data.len(),
                self.cursor,
                self.len
            )));
        }
        let mut rest = data;
        while !rest.is_empty() {
            let base = self.cursor / CHUNK as u64 * CHUNK as u64;
            if self.cur.as_ref().is_some_and(|c| c.off != base) {
                self.seal()?;
            }
            if self.cur.is_none() {
                self.cur = Some(self.fresh(base)?);
            }
            let c = self.cur.as_mut().expect("a chunk is being filled");
            let at = (self.cursor - base) as usize;
            let n = rest.len().min(CHUNK - at);
            let bs = BLOCK as usize;
            let (b0, b1) = (at / bs, (at + n).div_ceil(bs));
            let buf = c.buf.slice(CHUNK);
            // A block written for the first time is zeros around the write.
            if !c.touched[b0] {
                buf[b0 * bs..at].fill(0);
            }
            if !c.touched[b1 - 1] {
                buf[at + n..b1 * bs].fill(0);
            }
            buf[at..at + n].copy_from_slice(&rest[..n]);
            c.touched[b0..b1].fill(true);
            self.cursor += n as u64;
            rest = &rest[n..];
        }
        self.pos = self.cursor;
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for ImageOut {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let before = || io::Error::other("seek before the start");
        self.cursor = match to {
            SeekFrom::Start(n) => n,
            SeekFrom::Current(d) => self.cursor.checked_add_signed(d).ok_or_else(before)?,
            SeekFrom::End(d) => self.len.checked_add_signed(d).ok_or_else(before)?,
        };
        Ok(self.cursor)
    }
}

impl ImageOut {
    /// The image's size; called before any write.
    pub(crate) fn set_len(&mut self, n: u64) -> io::Result<()> {
        self.len = n;
        self.send_disk(ToDisk::Len(n))
    }

    /// A byte range (a partition) whose SHA-256 is wanted, if partitions
    /// are hashed; given before any of its bytes is written.
    pub(crate) fn watch(&mut self, off: u64, len: u64) -> io::Result<()> {
        self.send_watch(ToWatch::Watch(off, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use formats::bmap;
    use std::io::Read;

    /// Writes that exercise every edge: partial blocks, two writes in one
    /// block, a write across chunks, gaps inside a chunk and between
    /// chunks, a run longer than a bmap piece, an image size that is not
    /// a multiple of the block.
    fn lay(w: &mut ImageOut, len: u64) -> Vec<(u64, u64)> {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut bytes = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng as u8
                })
                .collect()
        };
        let mut writes: Vec<(u64, usize)> = vec![
            (0, 512),
            (1024, 100),
            (3 * 4096 + 7, 20_000),
            (CHUNK as u64 - 4096, 3 * 4096),
            (3 * CHUNK as u64, 17 * CHUNK),
            (21 * CHUNK as u64 + 8192, 10),
        ];
        // Small writes into chunks reused after the long run (stale bytes
        // around them must read as zeros).
        for k in 22..30u64 {
            writes.push((k * CHUNK as u64 + k * 4096 + 5, 10));
        }
        writes.push((len - 300, 300));
        w.set_len(len).unwrap();
        w.watch(0, 2 * CHUNK as u64).unwrap();
        w.watch(3 * CHUNK as u64, len - 3 * CHUNK as u64).unwrap();
        for &(off, n) in &writes {
            w.seek(SeekFrom::Start(off)).unwrap();
            w.write_all(&bytes(n)).unwrap();
        }
        writes.iter().map(|&(o, n)| (o, n as u64)).collect()
    }

    const ALL: Hashes = Hashes {
        bmap: true,
        partitions: true,
    };

    fn sha(data: &[u8]) -> String {
        format!("{:x}", Sha256::digest(data))
    }

    #[test]
    fn pieces_and_hashes_match_a_read_back_and_zstd_matches_raw() {
        let len = 30 * CHUNK as u64 + 1234;
        let dir = tempfile::tempdir().unwrap();
        let raw_path = dir.path().join("x.img");
        let raw = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&raw_path)
            .unwrap();
        let mut w = ImageOut::new(&raw, Stage::Raw(raw_path.clone()), ALL).unwrap();
        let mapped = lay(&mut w, len);
        let got = w.finish().unwrap();

        // The reference: bmap::create reads the finished file back.
        assert_eq!(raw.metadata().unwrap().len(), len);
        let want = bmap::create(&raw, len, &mapped).unwrap();
        assert_eq!(bmap::render(len, &got.pieces), want);
        assert!(got.pieces.len() > 3, "{:?}", got.pieces);
        let image = std::fs::read(&raw_path).unwrap();
        let w0 = &got.watched;
        assert_eq!(w0[0].2, sha(&image[..2 * CHUNK]));
        assert_eq!(w0[1].2, sha(&image[3 * CHUNK..]));
        // Unwritten blocks stay holes.
        use std::os::unix::fs::MetadataExt;
        assert!(raw.metadata().unwrap().blocks() * 512 < 20 * CHUNK as u64);

        let zst_path = dir.path().join("x.img.zst");
        let zst = File::create(&zst_path).unwrap();
        let mut w = ImageOut::new(&zst, Stage::Zstd(3), ALL).unwrap();
        lay(&mut w, len);
        let got_z = w.finish().unwrap();
        assert_eq!(got_z.pieces, got.pieces);
        assert_eq!(got_z.watched, got.watched);
        let mut out = Vec::new();
        zstd::stream::read::Decoder::new(File::open(&zst_path).unwrap())
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert!(out == image, "the .zst decompresses to the raw image");
    }

    #[test]
    fn writes_must_ascend_and_stay_inside() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.img");
        let f = File::create(&p).unwrap();
        let mut w = ImageOut::new(&f, Stage::Raw(p), Hashes::default()).unwrap();
        w.set_len(1 << 20).unwrap();
        w.seek(SeekFrom::Start(8192)).unwrap();
        w.write_all(b"later").unwrap();
        w.seek(SeekFrom::Start(4096)).unwrap();
        let e = w.write_all(b"earlier").unwrap_err();
        assert!(
            e.to_string()
                .contains("a write at byte 4096 after byte 8197"),
            "{e}"
        );
        w.seek(SeekFrom::Start((1 << 20) - 2)).unwrap();
        let e = w.write_all(b"past").unwrap_err();
        assert!(e.to_string().contains("goes past the image's end"), "{e}");
    }
}
