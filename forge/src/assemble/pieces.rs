//! The bmap piece cutter: each sealed chunk's touched blocks join the open
//! piece, which ends at an unmapped block and at a 64 MiB window's end, so
//! a piece never spans two workers (each worker owns whole windows).

use super::chunk::Chunk;
use formats::bmap::{BLOCK, MAX_RANGE_BLOCKS};

/// Bytes of the image per worker assignment: a bmap piece at most.
pub(super) const WINDOW: u64 = MAX_RANGE_BLOCKS * BLOCK;

/// A piece that ended: (worker, id, first block, last block).
pub(super) type Closed = (usize, u64, u64, u64);

#[derive(Default)]
pub(super) struct Pieces {
    /// (id, first block, blocks so far, worker)
    open: Option<(u64, u64, u64, usize)>,
    next_id: u64,
    /// The block after the last one fed.
    next_block: u64,
    /// Pieces closed by the last feed.
    pub(super) closed: Vec<Closed>,
}

impl Pieces {
    pub(super) fn close(&mut self) {
        if let Some((id, first, count, w)) = self.open.take() {
            self.closed.push((w, id, first, first + count - 1));
        }
    }

    /// The parts `(piece id, lo, hi)` of chunk `c` (its first `len` bytes)
    /// to hash, for the worker `w` of its window.
    pub(super) fn feed(&mut self, c: &Chunk, len: usize, w: usize) -> Vec<(u64, usize, usize)> {
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

#[cfg(test)]
mod tests {
    use super::super::chunk::{Chunk, CHUNK};
    use super::*;

    fn chunk(off: u64, touched: &[usize]) -> Box<Chunk> {
        let mut c = Chunk::new();
        c.off = off;
        for &b in touched {
            c.touched[b] = true;
        }
        c
    }

    #[test]
    fn pieces_end_at_gaps_and_window_edges_and_span_chunks_otherwise() {
        let mut p = Pieces::default();
        let bs = BLOCK as usize;
        // Blocks 0-1 and 3 of the first chunk: two pieces, both ended
        // by the gaps after them.
        let parts = p.feed(&chunk(0, &[0, 1, 3]), CHUNK, 0);
        assert_eq!(parts, vec![(0, 0, 2 * bs), (1, 3 * bs, 4 * bs)]);
        assert_eq!(p.closed, vec![(0, 0, 0, 1), (0, 1, 3, 3)]);
        p.closed.clear();
        // The last block of the first window and the first of the next
        // (another worker's): two pieces, cut at the window's edge.
        let last = (WINDOW as usize - CHUNK) as u64;
        p.feed(&chunk(last, &[BLOCKS_LAST]), CHUNK, 0);
        assert!(p.closed.is_empty(), "piece 2 runs to the chunk's end");
        p.feed(&chunk(WINDOW, &[0, BLOCKS_LAST]), CHUNK, 1);
        let first = WINDOW / BLOCK;
        let tail = first + BLOCKS_LAST as u64;
        assert_eq!(
            p.closed,
            vec![(0, 2, first - 1, first - 1), (1, 3, first, first)]
        );
        p.closed.clear();
        // Within a window a piece runs on across chunks.
        p.feed(&chunk(WINDOW + CHUNK as u64, &[0]), CHUNK, 1);
        assert_eq!(p.closed, vec![(1, 4, tail, tail + 1)]);
    }

    const BLOCKS_LAST: usize = CHUNK / BLOCK as usize - 1;
}
