//! Reference scanning as Nix does it: look for the 32-character hash part
//! of any candidate store path anywhere in the NAR byte stream.
//!
//! The search skips like Nix's `RefScanSink`: test the last character of a
//! 32-byte window first; a non-base-32 byte at position j lets the window
//! jump past it. Matches across `feed` calls are found by keeping the last
//! bytes of the previous chunk.
//!
//! Besides matches against known candidates it records *unknown* hashes that
//! stand in store-path position (`/nix/store/<hash>-<name>`): those are
//! references to paths missing from the store.

use crate::nixbase32::is_char;
use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

pub const HASH_LEN: usize = 32;
const STORE_PREFIX: &[u8] = b"/nix/store/";
/// Bytes kept between chunks: a prefix, a hash, the dash and a name.
const TAIL: usize = 11 + HASH_LEN + 1 + 211;

pub struct RefScanner {
    candidates: Arc<HashSet<[u8; HASH_LEN]>>,
    pub found: BTreeSet<[u8; HASH_LEN]>,
    /// Store paths (`<hash>-<name>`) seen in the stream whose hash is not a candidate.
    pub missing: BTreeSet<Vec<u8>>,
    tail: Vec<u8>,
    joined: Vec<u8>,
}

impl RefScanner {
    pub fn new(candidates: Arc<HashSet<[u8; HASH_LEN]>>) -> Self {
        RefScanner {
            candidates,
            found: BTreeSet::new(),
            missing: BTreeSet::new(),
            tail: Vec::new(),
            joined: Vec::new(),
        }
    }

    pub fn feed(&mut self, data: &[u8]) {
        // Windows that straddle the previous chunk: scan tail + head of data.
        if !self.tail.is_empty() {
            let head = &data[..data.len().min(TAIL)];
            let mut joined = std::mem::take(&mut self.joined);
            joined.clear();
            joined.extend_from_slice(&self.tail);
            joined.extend_from_slice(head);
            // Only windows that start inside the tail are new here.
            self.scan(&joined, self.tail.len());
            self.joined = joined;
        }
        self.scan(data, usize::MAX);
        // Keep the last TAIL bytes of everything seen so far.
        if data.len() >= TAIL {
            self.tail.clear();
            self.tail.extend_from_slice(&data[data.len() - TAIL..]);
        } else {
            self.tail.extend_from_slice(data);
            if self.tail.len() > TAIL {
                let cut = self.tail.len() - TAIL;
                self.tail.drain(..cut);
            }
        }
    }

    /// Scan `s` for windows starting before `start_limit`.
    fn scan(&mut self, s: &[u8], start_limit: usize) {
        let mut i = 0;
        while i + HASH_LEN <= s.len() && i < start_limit {
            let mut j = HASH_LEN;
            let mut all = true;
            while j > 0 {
                if !is_char(s[i + j - 1]) {
                    all = false;
                    break;
                }
                j -= 1;
            }
            if !all {
                i += j;
                continue;
            }
            let mut h = [0u8; HASH_LEN];
            h.copy_from_slice(&s[i..i + HASH_LEN]);
            if self.candidates.contains(&h) {
                self.found.insert(h);
            } else if i >= STORE_PREFIX.len()
                && &s[i - STORE_PREFIX.len()..i] == STORE_PREFIX
                && s.get(i + HASH_LEN) == Some(&b'-')
            {
                let name_end = s[i + HASH_LEN + 1..]
                    .iter()
                    .position(|&c| !is_name_char(c))
                    .map(|p| i + HASH_LEN + 1 + p);
                // Only a name that ends inside this buffer is certain.
                if let Some(end) = name_end {
                    if end > i + HASH_LEN + 1 {
                        self.missing.insert(s[i..end].to_vec());
                    }
                }
            }
            i += 1;
        }
    }
}

/// Characters Nix allows in a store path name.
pub fn is_name_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"+-._?=".contains(&c)
}
