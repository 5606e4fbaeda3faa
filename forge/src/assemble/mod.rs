//! Where an image is written: assembled in memory, then filled, hashed
//! and shipped by other threads at once.
//!
//! The layouts write in ascending order (each filesystem writer does; the
//! layouts write their tables in order, the backup GPT last), so
//! everything below the write cursor is final. [`ImageOut`] assembles the
//! image in aligned 4 MiB chunks (`chunk.rs`) and seals each as soon as a
//! write lands beyond it. Host file contents (the closure's files) are
//! not copied by the writer: it notes where they come from
//! ([`Sink::put_host`]) and the chunk's worker reads them in.
//!
//! ```text
//! layout → ImageOut ─→ worker of the chunk's 64 MiB window (work.rs): reads
//!           (assembles,  the host bytes in and hashes the bmap pieces
//!            cuts bmap   (pieces.rs) slice by slice while in cache
//!            pieces)   ─→ disk thread: the container (crate::container),
//!                         given the size and block map first, then the
//!                         chunks (in order if it streams)
//!                      ─→ image hasher (watch.rs; only for --json): the
//!                         whole image's SHA-256 and the partitions'.
//! ```
//!
//! Chunks go back to the pool, to be filled again, when the last stage
//! lets go. The bmap lists exactly the 4 KiB blocks something was written
//! to; the layout checks they are the blocks it planned. Nothing is read
//! back. Durability comes from the fsync when the output is committed.

mod chunk;
mod pieces;
mod watch;
mod work;

use std::io::{self, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

pub use chunk::Chunk;
use chunk::{InOrder, Leased, Shared, BLOCKS, CHUNK};
use formats::bmap::BLOCK;
use formats::sink::Sink;
use formats::sys::Pool;
use pieces::{Pieces, WINDOW};
use work::ToWork;

/// Chunks allocated at most for an unordered container with bmap
/// hashing: enough for two workers to each hold a window (16 chunks)
/// while the disk thread writes.
const POOL: usize = 32;
/// Without bmap hashing, or behind a streaming container (zstd is slower
/// than hashing), a few chunks ahead suffice.
const POOL_SMALL: usize = 8;

/// The image's bytes leave through one of these (`crate::container`
/// has them all), on the image output's disk thread.
pub trait Container: Send {
    /// Whether chunks must arrive in image order (a stream); otherwise
    /// they come as they are ready.
    fn ordered(&self) -> bool;
    /// Before any chunk: the image's size and every byte range that will
    /// be written (sorted, merged); all else is zeros.
    fn begin(&mut self, size: u64, map: &[(u64, u64)]) -> io::Result<()>;
    /// The chunk's first `n` bytes are the image's, at `chunk.off`;
    /// blocks it does not mark touched are zeros.
    fn chunk(&mut self, chunk: &Chunk, n: usize) -> io::Result<()>;
    /// Everything has been given.
    fn finish(&mut self) -> io::Result<()>;
}

/// What the image's bytes are hashed for (nothing, for a bare filesystem).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Hashes {
    /// The bmap's pieces.
    pub(crate) bmap: bool,
    /// The watched ranges (the partitions, for --json).
    pub(crate) partitions: bool,
    /// The whole image (holes as zeros), for its manifest (--json too).
    pub(crate) image: bool,
}

/// A bmap piece: its blocks and hashes.
pub(crate) use formats::bmap::Piece;

/// (offset, length, SHA-256 hex) of a watched range.
pub(crate) type Watched = (u64, u64, String);

/// What the threads computed: the bmap's pieces in order, the watched
/// ranges' hashes in watch order, the whole image's SHA-256.
pub(crate) struct Finished {
    pub(crate) pieces: Vec<Piece>,
    pub(crate) watched: Vec<Watched>,
    pub(crate) image_sha256: Option<String>,
}

/// Why a stage thread stopped early.
#[derive(Debug)]
pub(super) enum Stopped {
    /// Its own error.
    Failed(io::Error),
    /// The stage it feeds stopped first: that stage has the story.
    Elsewhere,
}

/// A worker's hashed pieces, or why it stopped.
type WorkResult = Result<Vec<Piece>, Stopped>;

pub(super) enum ToDisk {
    /// The image's size and the ranges that will be written.
    Begin(u64, Vec<(u64, u64)>),
    /// The next chunk in image order is at this offset, `n` bytes long
    /// (sent by the assembler; the chunk itself comes from its worker).
    Next(u64, usize),
    Chunk(Shared),
    End,
}

pub(super) enum ToWatch {
    Watch(u64, u64),
    Next(u64, usize),
    Chunk(Shared),
    End(u64),
}

pub(crate) struct ImageOut {
    cursor: u64,
    /// End of the last write.
    pos: u64,
    len: u64,
    cur: Option<Leased>,
    pool: Pool<Box<Chunk>>,
    disk: Option<SyncSender<ToDisk>>,
    workers: Vec<SyncSender<ToWork>>,
    pieces: Option<Pieces>,
    watch: Option<SyncSender<ToWatch>>,
    disk_thread: Option<JoinHandle<io::Result<()>>>,
    work_threads: Vec<Option<JoinHandle<WorkResult>>>,
    watch_thread: Option<JoinHandle<Vec<Watched>>>,
    failed: Option<(io::ErrorKind, String)>,
    hashes: Hashes,
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
    /// Ship the image through `container`, hashing what `hashes` asks for.
    pub(crate) fn new(container: Box<dyn Container>, hashes: Hashes) -> io::Result<ImageOut> {
        let (disk, to_disk) = sync_channel::<ToDisk>(POOL);
        let pool = if !container.ordered() && hashes.bmap {
            POOL
        } else {
            POOL_SMALL
        };
        let disk_thread = spawn("image-disk", move || drive(container, to_disk))?;
        let (watch, watch_thread) = if hashes.partitions || hashes.image {
            let (tx, rx) = sync_channel::<ToWatch>(POOL);
            (
                Some(tx),
                Some(spawn("image-watch", move || watch::hash_watched(rx))?),
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
            work_threads.push(Some(spawn("image-work", move || {
                work::work(rx, disk, watch)
            })?));
        }
        Ok(ImageOut {
            cursor: 0,
            pos: 0,
            len: 0,
            cur: None,
            pool: Pool::new(pool),
            disk: Some(disk),
            workers,
            pieces: hashes.bmap.then(Pieces::default),
            watch,
            disk_thread: Some(disk_thread),
            work_threads,
            watch_thread,
            failed: None,
            hashes,
        })
    }

    /// The error of a stage that stopped early (worker `w`, or the disk
    /// thread), kept to be told again to every later call.
    fn stopped(&mut self, w: Option<usize>) -> io::Error {
        if self.failed.is_none() {
            let own = match w
                .and_then(|w| self.work_threads[w].take())
                .map(JoinHandle::join)
            {
                Some(Ok(Err(Stopped::Failed(e)))) => Some(e),
                _ => None,
            };
            let err = own.unwrap_or_else(|| {
                // The disk thread (whose receiver is gone) has the story.
                self.disk = None;
                self.workers.clear();
                match self.disk_thread.take().map(JoinHandle::join) {
                    Some(Ok(Err(e))) => e,
                    _ => internal("an image thread stopped"),
                }
            });
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
    fn fresh(&mut self, off: u64) -> Leased {
        let mut c = self.pool.take(Chunk::new);
        c.off = off;
        // Untouched blocks are never read, so their bytes can stay.
        c.touched = [false; BLOCKS];
        c.fills.clear();
        c
    }

    /// The chunk being filled goes to its window's worker.
    fn seal(&mut self) -> io::Result<()> {
        let Some(chunk) = self.cur.take() else {
            return Ok(());
        };
        let n = (self.len.saturating_sub(chunk.off) as usize).min(CHUNK);
        let w = ((chunk.off / WINDOW) % self.workers.len().max(1) as u64) as usize;
        let parts = match self.pieces.as_mut() {
            Some(p) => p.feed(&chunk, n, w),
            None => Vec::new(),
        };
        self.send_disk(ToDisk::Next(chunk.off, n))?;
        self.send_watch(ToWatch::Next(chunk.off, n))?;
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
                Some(Ok(Err(Stopped::Failed(e)))) => return Err(e),
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
        let mut watched = match self.watch_thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| internal("the partition hashing thread failed"))?,
            None => Vec::new(),
        };
        // The whole image was the first range watched (by `begin`).
        let image_sha256 = (self.hashes.image && !watched.is_empty()).then(|| watched.remove(0).2);
        Ok(Finished {
            pieces,
            watched,
            image_sha256,
        })
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
            return Err(internal(&format!(
                "a write at byte {} after byte {} (image writes must ascend)",
                self.cursor, self.pos
            )));
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
                self.cur = Some(self.fresh(base));
            }
            let c: &mut Chunk = self.cur.as_mut().expect("a chunk is being filled");
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

    /// The image's size and every range that will be written (sorted,
    /// merged); called before any write.
    pub(crate) fn begin(&mut self, size: u64, map: Vec<(u64, u64)>) -> io::Result<()> {
        self.len = size;
        if self.hashes.image {
            self.send_watch(ToWatch::Watch(0, size))?;
        }
        self.send_disk(ToDisk::Begin(size, map))
    }

    /// A byte range (a partition) whose SHA-256 is wanted, if partitions
    /// are hashed; given before any of its bytes is written.
    pub(crate) fn watch(&mut self, off: u64, len: u64) -> io::Result<()> {
        if !self.hashes.partitions {
            return Ok(());
        }
        self.send_watch(ToWatch::Watch(off, len))
    }
}

/// The disk thread: the container gets the map, then the chunks (put in
/// image order first if it streams, else as they come), then the end.
fn drive(mut c: Box<dyn Container>, rx: Receiver<ToDisk>) -> io::Result<()> {
    let ordered = c.ordered();
    let mut order = InOrder::default();
    let mut lens = std::collections::HashMap::new();
    for m in rx {
        match m {
            ToDisk::Begin(size, map) => c.begin(size, &map)?,
            ToDisk::Next(off, n) if ordered => order.next(off, n),
            ToDisk::Next(off, n) => drop(lens.insert(off, n)),
            ToDisk::Chunk(chunk) if ordered => order.arrive(chunk),
            ToDisk::Chunk(chunk) => {
                let n = lens.remove(&chunk.off).unwrap_or(CHUNK);
                c.chunk(&chunk, n)?
            }
            ToDisk::End => return c.finish(),
        }
        while let Some((chunk, n)) = order.ready() {
            c.chunk(&chunk, n)?;
        }
    }
    Ok(())
}

impl crate::layout::Target for ImageOut {
    fn begin(&mut self, size: u64, map: Vec<(u64, u64)>) -> io::Result<()> {
        ImageOut::begin(self, size, map)
    }
    fn watch(&mut self, off: u64, len: u64) -> io::Result<()> {
        ImageOut::watch(self, off, len)
    }
    fn sink(&mut self) -> &mut dyn Sink {
        self
    }
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
    ) -> io::Result<()> {
        let path: Arc<Path> = Arc::from(path);
        self.place(span, |c, at, n, done| {
            let from_file = (len.saturating_sub(done) as usize).min(n);
            if from_file > 0 {
                c.fills.push(chunk::Fill {
                    at,
                    len: from_file,
                    path: path.clone(),
                    off: off + done,
                    size,
                });
            }
            c.buf.slice(CHUNK)[at + from_file..at + n].fill(0);
        })
    }
}

#[cfg(test)]
mod tests;
