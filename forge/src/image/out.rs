//! Where `lay` writes an image: assembled in memory, then filled, hashed
//! and written by other threads at once.
//!
//! The layouts write in ascending order (each filesystem writer does; the
//! layouts write their tables in order, the backup GPT last), so
//! everything below the write cursor is final. [`ImageOut`] assembles the
//! image in aligned 4 MiB chunks and seals each as soon as a write lands
//! beyond it. Host file contents (the closure's files) are not copied by
//! the writer: it notes where they come from ([`Sink::put_host`]) and the
//! chunk's worker reads them in.
//!
//! ```text
//! lay() → ImageOut ─→ worker of the chunk's 64 MiB window: reads the host
//!          (assembles)  bytes in, 64 KiB at a time, and hashes each slice
//!                       for the bmap while it is in cache
//!                     ─→ disk stage: the raw file with O_DIRECT (touched
//!                        blocks only, so it stays sparse; any order), or
//!                        zstd (in order, gaps as zeros)
//!                     ─→ partition hasher (only for --json; in order)
//! ```
//!
//! A chunk belongs to exactly one worker, so bmap pieces are cut at 64 MiB
//! windows of the image (and at every unmapped block). Chunks go back,
//! to be filled again, when the last stage lets go. The bmap lists exactly
//! the 4 KiB blocks something was written to; `super::build` checks they
//! are the blocks the filesystems say they use. Nothing is read back.
//! Buffered writes plus fsync ran at 410 MB/s on the CI VM against 2 GB/s
//! with O_DIRECT; where the filesystem refuses O_DIRECT (EINVAL) the raw
//! file is written through the page cache. Hashing 64 MiB buffers ran at
//! 1.1 GB/s here against 1.7 GB/s for 64 KiB slices just read: hence the
//! slices. Durability comes from the fsync when the output is committed.

use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use formats::bmap::{BLOCK, MAX_RANGE_BLOCKS};
use formats::sink::Sink;
use formats::sys::{Aligned, Lease};

const CHUNK: usize = 4 << 20;
const BLOCKS: usize = CHUNK / BLOCK as usize;
/// Bytes of the image per worker assignment: a bmap piece at most.
const WINDOW: u64 = MAX_RANGE_BLOCKS * BLOCK;
/// Bytes read and hashed at a time.
const SLICE: usize = 64 << 10;
/// Chunks allocated at most for a raw image: enough for two workers to
/// each hold a window (16 chunks) while the disk stage writes.
const POOL: usize = 32;
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

/// A bmap piece: first block, last block, SHA-256 hex.
type Piece = (u64, u64, String);

/// (offset, length, SHA-256 hex) of a watched range.
pub(crate) type Watched = (u64, u64, String);

/// What the threads computed: the bmap's pieces (first block, last block,
/// SHA-256 hex) in order, and the watched ranges' hashes in watch order.
pub(crate) struct Finished {
    pub(crate) pieces: Vec<Piece>,
    pub(crate) watched: Vec<Watched>,
}

/// Bytes of a chunk that come from a host file.
struct Fill {
    /// Where in the chunk, how many.
    at: usize,
    len: usize,
    path: Arc<Path>,
    /// Where in the file, and the file's size as planned.
    off: u64,
    size: u64,
}

/// 4 MiB of the image. Only touched blocks hold image bytes (a touched
/// block's unwritten bytes are zeroed when it is first written; `fills`
/// are read in by the worker); the others hold whatever an earlier use
/// left and are never read: they are zeros in the image.
struct Chunk {
    /// Image offset, a multiple of CHUNK.
    off: u64,
    buf: Aligned,
    /// Which 4 KiB blocks were written.
    touched: [bool; BLOCKS],
    fills: Vec<Fill>,
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

type Leased = Lease<Box<Chunk>>;
/// A finished chunk, shared by the stages; the last to drop it hands it
/// back for reuse.
type Shared = Arc<Leased>;

enum ToDisk {
    Len(u64),
    /// The next chunk in image order is at this offset, `n` bytes long
    /// (sent by the writer; the chunk itself comes from its worker).
    Next(u64, usize),
    Chunk(Shared),
    End,
}

enum ToWork {
    /// A sealed chunk: its first `n` bytes are the image's; `parts` are
    /// the byte ranges `(piece, lo, hi)` to hash, in order.
    Chunk {
        chunk: Leased,
        n: usize,
        parts: Vec<(u64, usize, usize)>,
    },
    /// Piece `id` is complete: blocks `first..=last`.
    Close { id: u64, first: u64, last: u64 },
}

enum ToWatch {
    Watch(u64, u64),
    Next(u64, usize),
    Chunk(Shared),
    End(u64),
}

/// Chunks that arrive from several workers, given back in image order.
#[derive(Default)]
struct InOrder {
    order: VecDeque<(u64, usize)>,
    pending: HashMap<u64, Shared>,
}

impl InOrder {
    fn next(&mut self, off: u64, n: usize) {
        self.order.push_back((off, n));
    }
    fn arrive(&mut self, c: Shared) {
        self.pending.insert(c.off, c);
    }
    /// The next chunk in order, with its length, once it has arrived.
    fn ready(&mut self) -> Option<(Shared, usize)> {
        let &(off, n) = self.order.front()?;
        let c = self.pending.remove(&off)?;
        self.order.pop_front();
        Some((c, n))
    }
}

/// Cuts each sealed chunk's touched blocks into bmap pieces: a piece ends
/// at an unmapped block and at a window's end, so it never spans workers.
#[derive(Default)]
struct Pieces {
    /// (id, first block, blocks so far, worker)
    open: Option<(u64, u64, u64, usize)>,
    next_id: u64,
    /// The block after the last one fed.
    next_block: u64,
    /// Pieces closed by the last feed: (worker, id, first, last).
    closed: Vec<(usize, u64, u64, u64)>,
}

impl Pieces {
    fn close(&mut self) {
        if let Some((id, first, count, w)) = self.open.take() {
            self.closed.push((w, id, first, first + count - 1));
        }
    }

    /// The parts of chunk `c` (its first `len` bytes) to hash, for the
    /// worker `w` of its window.
    fn feed(&mut self, c: &Chunk, len: usize, w: usize) -> Vec<(u64, usize, usize)> {
        let base = c.off / BLOCK;
        if base != self.next_block || c.off.is_multiple_of(WINDOW) {
            self.close();
        }
        let blocks = len.div_ceil(BLOCK as usize);
        let mut parts = Vec::new();
        for (a, b, touched) in c.runs(blocks) {
            if !touched {
                self.close();
                continue;
            }
            let next_id = self.next_id;
            let (id, _, count, _) = self.open.get_or_insert((next_id, base + a as u64, 0, w));
            if *id == next_id {
                self.next_id += 1;
            }
            *count += (b - a) as u64;
            parts.push((*id, a * BLOCK as usize, (b * BLOCK as usize).min(len)));
        }
        self.next_block = base + blocks as u64;
        parts
    }
}

/// The error a worker returns when the disk stage stopped first (that
/// stage's own error is the one to tell).
const DISK_GONE: &str = "the disk stage stopped";

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
    workers: Vec<SyncSender<ToWork>>,
    pieces: Option<Pieces>,
    watch: Option<SyncSender<ToWatch>>,
    disk_thread: Option<JoinHandle<io::Result<()>>>,
    work_threads: Vec<Option<JoinHandle<io::Result<Vec<Piece>>>>>,
    watch_thread: Option<JoinHandle<Vec<Watched>>>,
    failed: Option<(io::ErrorKind, String)>,
}

fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<JoinHandle<T>> {
    std::thread::Builder::new().name(name.into()).spawn(f)
}

fn internal(what: &str) -> io::Error {
    io::Error::other(format!("internal: {what}"))
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
        let (watch, watch_thread) = if hashes.partitions {
            let (tx, rx) = sync_channel::<ToWatch>(POOL);
            (
                Some(tx),
                Some(spawn("image-watch", move || hash_watched(rx))?),
            )
        } else {
            (None, None)
        };
        let n = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4));
        let mut workers = Vec::new();
        let mut work_threads = Vec::new();
        for _ in 0..n {
            let (tx, rx) = sync_channel::<ToWork>(POOL);
            let (disk, watch) = (disk.clone(), watch.clone());
            workers.push(tx);
            work_threads.push(Some(spawn("image-work", move || work(rx, disk, watch))?));
        }
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
            workers,
            pieces: hashes.bmap.then(Pieces::default),
            watch,
            disk_thread: Some(disk_thread),
            work_threads,
            watch_thread,
            failed: None,
        })
    }

    /// The error of a stage that stopped early (worker `w`, or the disk
    /// stage), kept to be told again to every later call.
    fn stopped(&mut self, w: Option<usize>) -> io::Error {
        if self.failed.is_none() {
            let mut err = internal("an image thread stopped");
            if let Some(t) = w.and_then(|w| self.work_threads[w].take()) {
                match t.join() {
                    Ok(Err(e)) if e.to_string() != DISK_GONE => err = e,
                    _ => {}
                }
            }
            if err.to_string().starts_with("internal:") {
                // The disk stage (whose receiver is gone) has the story.
                self.disk = None;
                self.workers.clear();
                if let Some(Ok(Err(e))) = self.disk_thread.take().map(JoinHandle::join) {
                    err = e;
                }
            }
            self.failed = Some((err.kind(), err.to_string()));
        }
        let (kind, msg) = self.failed.clone().expect("set above");
        io::Error::new(kind, msg)
    }

    fn send_disk(&mut self, m: ToDisk) -> io::Result<()> {
        match self.disk.as_ref().map(|tx| tx.send(m)) {
            Some(Ok(())) => Ok(()),
            _ => Err(self.stopped(None)),
        }
    }

    fn send_watch(&mut self, m: ToWatch) -> io::Result<()> {
        match self.watch.as_ref().map(|tx| tx.send(m)) {
            None | Some(Ok(())) => Ok(()),
            Some(Err(_)) => Err(self.stopped(None)),
        }
    }

    fn send_work(&mut self, w: usize, m: ToWork) -> io::Result<()> {
        match self.workers.get(w).map(|tx| tx.send(m)) {
            Some(Ok(())) => Ok(()),
            _ => Err(self.stopped(Some(w))),
        }
    }

    /// Close messages for the pieces that just ended, to their workers.
    fn send_closes(&mut self) -> io::Result<()> {
        let closed = match self.pieces.as_mut() {
            Some(p) => std::mem::take(&mut p.closed),
            None => return Ok(()),
        };
        for (w, id, first, last) in closed {
            self.send_work(w, ToWork::Close { id, first, last })?;
        }
        Ok(())
    }

    /// A chunk for the image offset `off`, untouched.
    fn fresh(&mut self, off: u64) -> io::Result<Box<Chunk>> {
        let mut c = match self.free.try_recv() {
            Ok(c) => c,
            Err(_) if self.allocated < self.pool => {
                self.allocated += 1;
                Box::new(Chunk {
                    off: 0,
                    buf: Aligned::new(CHUNK),
                    touched: [false; BLOCKS],
                    fills: Vec::new(),
                })
            }
            Err(_) => match self.free.recv() {
                Ok(c) => c,
                Err(_) => return Err(self.stopped(None)),
            },
        };
        c.off = off;
        // Untouched blocks are never read, so their bytes can stay.
        c.touched = [false; BLOCKS];
        c.fills.clear();
        Ok(c)
    }

    /// The chunk being filled goes to its window's worker.
    fn seal(&mut self) -> io::Result<()> {
        let Some(c) = self.cur.take() else {
            return Ok(());
        };
        let n = (self.len.saturating_sub(c.off) as usize).min(CHUNK);
        let w = ((c.off / WINDOW) % self.workers.len().max(1) as u64) as usize;
        let parts = match self.pieces.as_mut() {
            Some(p) => p.feed(&c, n, w),
            None => Vec::new(),
        };
        self.send_disk(ToDisk::Next(c.off, n))?;
        self.send_watch(ToWatch::Next(c.off, n))?;
        let chunk = Lease::new(c, self.back.clone());
        self.send_work(w, ToWork::Chunk { chunk, n, parts })?;
        self.send_closes()
    }

    /// Everything written and hashed.
    pub(crate) fn finish(mut self) -> io::Result<Finished> {
        self.seal()?;
        if let Some(p) = self.pieces.as_mut() {
            p.close();
        }
        self.send_closes()?;
        self.workers.clear();
        let mut pieces = Vec::new();
        for w in 0..self.work_threads.len() {
            match self.work_threads[w].take().map(JoinHandle::join) {
                Some(Ok(Ok(p))) => pieces.extend(p),
                Some(Ok(Err(e))) if e.to_string() != DISK_GONE => return Err(e),
                _ => return Err(self.stopped(None)),
            }
        }
        pieces.sort();
        let len = self.len;
        self.send_disk(ToDisk::End)?;
        self.send_watch(ToWatch::End(len))?;
        self.disk = None;
        self.watch = None;
        match self.disk_thread.take().map(JoinHandle::join) {
            Some(Ok(Ok(()))) => {}
            Some(Ok(Err(e))) => return Err(e),
            _ => return Err(internal("the image writing thread failed")),
        }
        let watched = match self.watch_thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| internal("the partition hashing thread failed"))?,
            None => Vec::new(),
        };
        Ok(Finished { pieces, watched })
    }

    /// Walk `len` bytes from the cursor chunk by chunk: `each(chunk, at,
    /// n, done)` for bytes `at..at + n` of the chunk, `done` bytes in.
    /// Blocks touched for the first time are zeros around what `each`
    /// puts there.
    fn place(
        &mut self,
        len: u64,
        mut each: impl FnMut(&mut Chunk, usize, usize, u64),
    ) -> io::Result<()> {
        if self.cursor < self.pos {
            return Err(not_ascending(self.cursor, self.pos));
        }
        if self.cursor + len > self.len {
            return Err(internal(&format!(
                "a write of {len} bytes at byte {} goes past the image's end ({})",
                self.cursor, self.len
            )));
        }
        let mut done = 0u64;
        while done < len {
            let base = self.cursor / CHUNK as u64 * CHUNK as u64;
            if self.cur.as_ref().is_some_and(|c| c.off != base) {
                self.seal()?;
            }
            if self.cur.is_none() {
                self.cur = Some(self.fresh(base)?);
            }
            let c = self.cur.as_mut().expect("a chunk is being filled");
            let at = (self.cursor - base) as usize;
            let n = ((len - done) as usize).min(CHUNK - at);
            let bs = BLOCK as usize;
            let (b0, b1) = (at / bs, (at + n).div_ceil(bs));
            let buf = c.buf.slice(CHUNK);
            if !c.touched[b0] {
                buf[b0 * bs..at].fill(0);
            }
            if !c.touched[b1 - 1] {
                buf[at + n..b1 * bs].fill(0);
            }
            c.touched[b0..b1].fill(true);
            each(c, at, n, done);
            self.cursor += n as u64;
            done += n as u64;
        }
        self.pos = self.cursor;
        Ok(())
    }

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

/// A worker: reads each of its chunks' host bytes in and hashes its
/// pieces, slice by slice, then hands the chunk on.
fn work(
    rx: Receiver<ToWork>,
    disk: SyncSender<ToDisk>,
    watch: Option<SyncSender<ToWatch>>,
) -> io::Result<Vec<Piece>> {
    let mut open: Vec<(u64, Sha256)> = Vec::new();
    let mut done = Vec::new();
    let mut file: Option<(Arc<Path>, File)> = None;
    for m in rx {
        let (mut chunk, n, parts) = match m {
            ToWork::Chunk { chunk, n, parts } => (chunk, n, parts),
            ToWork::Close { id, first, last } => {
                if let Some(i) = open.iter().position(|o| o.0 == id) {
                    let (_, h) = open.swap_remove(i);
                    done.push((first, last, format!("{:x}", h.finalize())));
                }
                continue;
            }
        };
        let Chunk { buf, fills, .. } = &mut **chunk;
        let buf = buf.slice(CHUNK);
        let mut s = 0;
        while s < n {
            let e = (s + SLICE).min(n);
            for f in fills.iter().filter(|f| f.at < e && f.at + f.len > s) {
                let (a, b) = (s.max(f.at), e.min(f.at + f.len));
                read_host(&mut file, f, &mut buf[a..b], f.off + (a - f.at) as u64)?;
            }
            for &(id, lo, hi) in parts.iter().filter(|p| p.1 < e && p.2 > s) {
                let h = match open.iter().position(|o| o.0 == id) {
                    Some(i) => &mut open[i].1,
                    None => {
                        open.push((id, Sha256::new()));
                        &mut open.last_mut().expect("just pushed").1
                    }
                };
                h.update(&buf[s.max(lo)..e.min(hi)]);
            }
            s = e;
        }
        let shared = Arc::new(chunk);
        if let Some(w) = &watch {
            if w.send(ToWatch::Chunk(shared.clone())).is_err() {
                return Err(io::Error::other(DISK_GONE));
            }
        }
        if disk.send(ToDisk::Chunk(shared)).is_err() {
            return Err(io::Error::other(DISK_GONE));
        }
    }
    Ok(done)
}

/// Bytes of a host file at `at`, through the last file opened when it is
/// the same one. A file whose size is not the planned one has changed
/// since the image was planned: an error naming it.
fn read_host(
    file: &mut Option<(Arc<Path>, File)>,
    f: &Fill,
    into: &mut [u8],
    at: u64,
) -> io::Result<()> {
    let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", f.path.display()));
    let changed = || {
        io::Error::other(format!(
            "{}: file changed size while it was read (expected {} bytes)",
            f.path.display(),
            f.size
        ))
    };
    if file.as_ref().is_none_or(|(p, _)| !Arc::ptr_eq(p, &f.path)) {
        let h = File::open(&f.path).map_err(named)?;
        if h.metadata().map_err(named)?.len() != f.size {
            return Err(changed());
        }
        *file = Some((f.path.clone(), h));
    }
    let (_, h) = file.as_ref().expect("opened above");
    match h.read_exact_at(into, at) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(changed()),
        r => r.map_err(named),
    }
}

/// The raw disk stage: touched blocks of each chunk at their offsets, in
/// whatever order the workers finish them; whole blocks, so the file is
/// cut back to the image's size at the end.
fn write_raw(disk: File, rx: Receiver<ToDisk>) -> io::Result<()> {
    let mut len = 0;
    for m in rx {
        match m {
            ToDisk::Len(n) => {
                len = n;
                disk.set_len(n)?;
            }
            ToDisk::Next(..) => {}
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

/// The zstd disk stage: every byte up to the image's size, in order, gaps
/// as zeros.
fn write_zstd(out: File, level: i32, rx: Receiver<ToDisk>) -> io::Result<()> {
    let mut enc = zstd::stream::write::Encoder::new(BufWriter::with_capacity(4 << 20, out), level)?;
    // One zstd worker per core: zstd's output does not depend on the
    // worker count (checked here with the zstd CLI at -T1, -T2 and -T4).
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
    enc.multithread(workers as u32)?;
    // Levels up to 19 use windows of at most 2^23: readers need no --long.
    enc.include_checksum(true)?;
    let (mut len, mut pos) = (0u64, 0u64);
    let mut order = InOrder::default();
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
            ToDisk::Next(off, n) => order.next(off, n),
            ToDisk::Chunk(c) => order.arrive(c),
            ToDisk::End => {
                zeros_to(&mut enc, &mut pos, len)?;
                return enc.finish()?.flush();
            }
        }
        while let Some((c, n)) = order.ready() {
            zeros_to(&mut enc, &mut pos, c.off)?;
            let mut r = Ok(());
            c.image_bytes(n, |b| {
                if r.is_ok() {
                    r = enc.write_all(b);
                }
            });
            r?;
            pos += n as u64;
        }
    }
    Ok(())
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
    let mut order = InOrder::default();
    for m in rx {
        match m {
            ToWatch::Watch(off, len) => w.list.push((off, len, Sha256::new())),
            ToWatch::Next(off, n) => order.next(off, n),
            ToWatch::Chunk(c) => order.arrive(c),
            ToWatch::End(len) => {
                w.gap_to(len);
                break;
            }
        }
        while let Some((c, n)) = order.ready() {
            w.gap_to(c.off);
            c.image_bytes(n, |b| w.feed(b));
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
        self.place(data.len() as u64, |c, at, n, done| {
            let d = done as usize;
            c.buf.slice(CHUNK)[at..at + n].copy_from_slice(&data[d..d + n]);
        })?;
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

impl Sink for ImageOut {
    /// Host bytes are noted, not copied: the chunk's worker reads them.
    fn put_host(
        &mut self,
        path: &Path,
        off: u64,
        len: u64,
        span: u64,
        size: u64,
    ) -> io::Result<bool> {
        let path: Arc<Path> = Arc::from(path);
        self.place(span, |c, at, n, done| {
            let from_file = (len.saturating_sub(done) as usize).min(n);
            if from_file > 0 {
                c.fills.push(Fill {
                    at,
                    len: from_file,
                    path: path.clone(),
                    off: off + done,
                    size,
                });
            }
            c.buf.slice(CHUNK)[at + from_file..at + n].fill(0);
        })?;
        Ok(true)
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
    /// A host file of `HOST` random bytes, for put_host.
    const HOST: u64 = 9 * CHUNK as u64 + 1000;

    fn random(seed: u64, n: usize) -> Vec<u8> {
        let mut rng = seed | 1;
        (0..n)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng as u8
            })
            .collect()
    }

    /// Writes that exercise every edge: partial blocks, two writes in one
    /// block, a write across chunks, gaps inside a chunk and between
    /// chunks, host bytes by reference across chunks and a window edge
    /// (with a zero tail, and from a file offset), an image size that is
    /// not a multiple of the block. Returns the mapped byte ranges.
    fn lay(w: &mut ImageOut, len: u64, host: &Path) -> Vec<(u64, u64)> {
        let mut seed = 7;
        let mut bytes = |n: usize| {
            seed += 1;
            random(seed, n)
        };
        let mut writes: Vec<(u64, usize)> = vec![
            (0, 512),
            (1024, 100),
            (3 * 4096 + 7, 20_000),
            (CHUNK as u64 - 4096, 3 * 4096),
            (3 * CHUNK as u64, 5 * CHUNK),
        ];
        let host_at = 8 * CHUNK as u64;
        let span = HOST.next_multiple_of(BLOCK);
        let part_at = host_at + span;
        // Bytes 4096..4096+5000 of the host file, in 3 blocks.
        let rest_at = part_at + 3 * BLOCK;
        writes.push((rest_at, (20 * CHUNK as u64 - rest_at) as usize));
        writes.push((21 * CHUNK as u64 + 8192, 10));
        // Small writes into chunks reused after the long run (stale bytes
        // around them must read as zeros).
        for k in 22..30u64 {
            writes.push((k * CHUNK as u64 + k * 4096 + 5, 10));
        }
        writes.push((len - 300, 300));
        w.set_len(len).unwrap();
        w.watch(0, 2 * CHUNK as u64).unwrap();
        w.watch(3 * CHUNK as u64, len - 3 * CHUNK as u64).unwrap();
        let mut hosted = false;
        for &(off, n) in &writes {
            if off > host_at && !hosted {
                w.seek(SeekFrom::Start(host_at)).unwrap();
                assert!(w.put_host(host, 0, HOST, span, HOST).unwrap());
                assert!(w.put_host(host, 4096, 5000, 3 * BLOCK, HOST).unwrap());
                hosted = true;
            }
            w.seek(SeekFrom::Start(off)).unwrap();
            w.write_all(&bytes(n)).unwrap();
        }
        let mut mapped: Vec<(u64, u64)> = writes.iter().map(|&(o, n)| (o, n as u64)).collect();
        mapped.push((host_at, span + 3 * BLOCK));
        mapped
    }

    fn host_file(dir: &Path) -> std::path::PathBuf {
        let p = dir.join("host");
        std::fs::write(&p, random(99, HOST as usize)).unwrap();
        p
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
        let host = host_file(dir.path());
        let mapped = lay(&mut w, len, &host);
        let got = w.finish().unwrap();

        // The reference: bmap::create reads the finished file back.
        assert_eq!(raw.metadata().unwrap().len(), len);
        let want = bmap::create(&raw, len, &mapped).unwrap();
        assert_eq!(bmap::render(len, &got.pieces), want);
        assert!(got.pieces.len() > 3, "{:?}", got.pieces);
        let image = std::fs::read(&raw_path).unwrap();
        // The host bytes landed where they were put, zeros after them.
        let h = std::fs::read(&host).unwrap();
        let at = 8 * CHUNK;
        assert!(image[at..at + h.len()] == h[..]);
        let span = (HOST as usize).next_multiple_of(4096);
        assert!(image[at + h.len()..at + span].iter().all(|&b| b == 0));
        assert!(image[at + span..at + span + 5000] == h[4096..4096 + 5000]);
        assert!(image[at + span + 5000..at + span + 3 * 4096]
            .iter()
            .all(|&b| b == 0));
        let w0 = &got.watched;
        assert_eq!(w0[0].2, sha(&image[..2 * CHUNK]));
        assert_eq!(w0[1].2, sha(&image[3 * CHUNK..]));
        // Unwritten blocks stay holes.
        use std::os::unix::fs::MetadataExt;
        assert!(raw.metadata().unwrap().blocks() * 512 < 20 * CHUNK as u64);

        let zst_path = dir.path().join("x.img.zst");
        let zst = File::create(&zst_path).unwrap();
        let mut w = ImageOut::new(&zst, Stage::Zstd(3), ALL).unwrap();
        lay(&mut w, len, &host);
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
    fn a_host_file_that_changed_size_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let host = host_file(dir.path());
        let p = dir.path().join("x.img");
        let f = File::create(&p).unwrap();
        let mut w = ImageOut::new(&f, Stage::Raw(p), ALL).unwrap();
        w.set_len(64 << 20).unwrap();
        // Planned as one byte longer than it is.
        let span = (HOST + 1).next_multiple_of(BLOCK);
        // The worker's error comes back at the next call that reaches it:
        // a later chunk of this same put_host, or finish.
        let e = match w.put_host(&host, 0, HOST + 1, span, HOST + 1) {
            Err(e) => e,
            Ok(_) => w.finish().err().expect("the size changed"),
        };
        let want = format!(
            "{}: file changed size while it was read (expected {} bytes)",
            host.display(),
            HOST + 1
        );
        assert_eq!(e.to_string(), want);
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
