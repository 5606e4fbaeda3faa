//! The workers: each owns whole 64 MiB windows of the image. For each of
//! its chunks it reads the host bytes in (the closure's files, noted but
//! not copied by the writers), 64 KiB at a time, and hashes the bmap
//! pieces (SHA-256 and BLAKE3) slice by slice while the slice is in cache, then hands the
//! chunk on. Hashing 64 MiB buffers ran at 1.1 GB/s here against 1.7 GB/s
//! for 64 KiB slices just read: hence the slices.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;

use super::chunk::{Chunk, Fill, Leased, CHUNK};
use super::{Piece, Stopped, ToDisk, ToWatch};
use formats::bmap::PieceHash;
use formats::sink::{changed, named};

/// Bytes read and hashed at a time.
const SLICE: usize = 64 << 10;

pub(super) enum ToWork {
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

/// A worker's loop: its pieces, hashed, when its channel closes.
pub(super) fn work(
    rx: Receiver<ToWork>,
    disk: SyncSender<ToDisk>,
    watch: Option<SyncSender<ToWatch>>,
) -> Result<Vec<Piece>, Stopped> {
    let mut open: Vec<(u64, PieceHash)> = Vec::new();
    let mut done = Vec::new();
    let mut file: Option<(Arc<Path>, File)> = None;
    for m in rx {
        let (mut chunk, n, parts) = match m {
            ToWork::Chunk { chunk, n, parts } => (chunk, n, parts),
            ToWork::Close { id, first, last } => {
                if let Some(i) = open.iter().position(|o| o.0 == id) {
                    let (_, h) = open.swap_remove(i);
                    done.push(h.finish(first, last));
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
                read_host(&mut file, f, &mut buf[a..b], f.off + (a - f.at) as u64)
                    .map_err(Stopped::Failed)?;
            }
            for &(id, lo, hi) in parts.iter().filter(|p| p.1 < e && p.2 > s) {
                let h = match open.iter().position(|o| o.0 == id) {
                    Some(i) => &mut open[i].1,
                    None => {
                        open.push((id, PieceHash::default()));
                        &mut open.last_mut().expect("just pushed").1
                    }
                };
                h.update(&buf[s.max(lo)..e.min(hi)]);
            }
            s = e;
        }
        let shared = Arc::new(chunk);
        if let Some(w) = &watch {
            w.send(ToWatch::Chunk(shared.clone()))
                .map_err(|_| Stopped::Elsewhere)?;
        }
        disk.send(ToDisk::Chunk(shared))
            .map_err(|_| Stopped::Elsewhere)?;
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
    if file.as_ref().is_none_or(|(p, _)| !Arc::ptr_eq(p, &f.path)) {
        let h = File::open(&f.path).map_err(|e| named(&f.path, e))?;
        if h.metadata().map_err(|e| named(&f.path, e))?.len() != f.size {
            return Err(changed(&f.path, f.size));
        }
        *file = Some((f.path.clone(), h));
    }
    let (_, h) = file.as_ref().expect("opened above");
    match h.read_exact_at(into, at) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(changed(&f.path, f.size)),
        r => r.map_err(|e| named(&f.path, e)),
    }
}
