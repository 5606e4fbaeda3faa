//! The image hasher (only for --json): every byte of each watched range
//! (the whole image, the partitions), in image order, gaps as zeros.

use sha2::{Digest, Sha256};
use std::sync::mpsc::Receiver;

use super::chunk::{InOrder, ZEROS};
use super::{ToWatch, Watched};

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

pub(super) fn hash_watched(rx: Receiver<ToWatch>) -> Vec<Watched> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watched_ranges_hash_their_bytes_across_feeds_and_gaps() {
        let mut w = Watches::default();
        w.list.push((2, 10, Sha256::new()));
        w.list.push((0, 3, Sha256::new()));
        w.feed(b"abcd");
        w.gap_to(8);
        w.feed(b"xyzw");
        let got: Vec<String> = w
            .list
            .into_iter()
            .map(|(_, _, h)| format!("{:x}", h.finalize()))
            .collect();
        let sha = |b: &[u8]| format!("{:x}", Sha256::digest(b));
        assert_eq!(got, vec![sha(b"cd\0\0\0\0xyzw"), sha(b"abc")]);
    }
}
