//! 4 MiB of the image being assembled, and the order chunks are handed on in.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;

use formats::bmap::BLOCK;
use formats::sys::{Aligned, Lease};

pub(crate) const CHUNK: usize = 4 << 20;
pub(crate) const BLOCKS: usize = CHUNK / BLOCK as usize;

pub(crate) use formats::sys::ZEROS;

/// Bytes of a chunk that come from a host file.
pub(super) struct Fill {
    /// Where in the chunk, how many.
    pub(super) at: usize,
    pub(super) len: usize,
    pub(super) path: Arc<Path>,
    /// Where in the file, and the file's size as planned.
    pub(super) off: u64,
    pub(super) size: u64,
}

/// 4 MiB of the image. Only touched blocks hold image bytes (a touched
/// block's unwritten bytes are zeroed when it is first written; `fills`
/// are read in by the worker); the others hold whatever an earlier use
/// left and are never read: they are zeros in the image.
pub struct Chunk {
    /// Image offset, a multiple of CHUNK.
    pub off: u64,
    pub(super) buf: Aligned,
    /// Which 4 KiB blocks were written.
    pub(super) touched: [bool; BLOCKS],
    pub(super) fills: Vec<Fill>,
}

impl Chunk {
    pub(super) fn new() -> Box<Chunk> {
        Box::new(Chunk {
            off: 0,
            buf: Aligned::new(CHUNK),
            touched: [false; BLOCKS],
            fills: Vec::new(),
        })
    }

    /// The whole buffer; only touched blocks are the image's.
    pub fn bytes(&self) -> &[u8] {
        self.buf.get(CHUNK)
    }

    /// The chunk's first `n` bytes as the image has them, in order, in
    /// pieces: untouched runs as zeros.
    pub fn image_bytes(&self, n: usize, mut each: impl FnMut(&[u8])) {
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

    /// Runs of touched blocks `(first, past_last)` in the whole chunk.
    pub fn touched_runs(&self) -> impl Iterator<Item = (usize, usize)> {
        self.runs(BLOCKS)
            .into_iter()
            .filter(|r| r.2)
            .map(|r| (r.0, r.1))
    }

    /// Runs of blocks `(first, past_last, touched)` in `[0, blocks)`.
    pub(super) fn runs(&self, blocks: usize) -> Vec<(usize, usize, bool)> {
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

pub(super) type Leased = Lease<Box<Chunk>>;
/// A finished chunk, shared by the stages; the last to drop it hands it
/// back for reuse.
pub(super) type Shared = Arc<Leased>;

/// Chunks that arrive from several workers, given back in image order.
#[derive(Default)]
pub(super) struct InOrder {
    order: VecDeque<(u64, usize)>,
    pending: HashMap<u64, Shared>,
}

impl InOrder {
    /// The next chunk in image order is at `off`, `n` bytes long.
    pub(super) fn next(&mut self, off: u64, n: usize) {
        self.order.push_back((off, n));
    }
    pub(super) fn arrive(&mut self, c: Shared) {
        self.pending.insert(c.off, c);
    }
    /// The next chunk in order, with its length, once it has arrived.
    pub(super) fn ready(&mut self) -> Option<(Shared, usize)> {
        let &(off, n) = self.order.front()?;
        let c = self.pending.remove(&off)?;
        self.order.pop_front();
        Some((c, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untouched_blocks_read_as_zeros_whatever_the_buffer_holds() {
        let mut c = Chunk::new();
        c.buf.slice(CHUNK).fill(0xEE);
        c.touched[1] = true;
        c.touched[2] = true;
        let mut got = Vec::new();
        c.image_bytes(4 * BLOCK as usize - 10, |b| got.extend_from_slice(b));
        assert_eq!(got.len(), 4 * BLOCK as usize - 10);
        let bs = BLOCK as usize;
        assert!(got[..bs].iter().all(|&b| b == 0));
        assert!(got[bs..3 * bs].iter().all(|&b| b == 0xEE));
        assert!(got[3 * bs..].iter().all(|&b| b == 0));
        assert_eq!(c.touched_runs().collect::<Vec<_>>(), vec![(1, 3)]);
    }

    #[test]
    fn chunks_come_back_in_image_order() {
        let (tx, _rx) = std::sync::mpsc::channel();
        let mut o = InOrder::default();
        o.next(0, 5);
        o.next(CHUNK as u64, 7);
        let mut late = Chunk::new();
        late.off = CHUNK as u64;
        o.arrive(Arc::new(Lease::new(late, tx.clone())));
        assert!(o.ready().is_none(), "the first chunk has not arrived");
        o.arrive(Arc::new(Lease::new(Chunk::new(), tx)));
        assert_eq!(o.ready().map(|(c, n)| (c.off, n)), Some((0, 5)));
        assert_eq!(o.ready().map(|(c, n)| (c.off, n)), Some((CHUNK as u64, 7)));
    }
}
