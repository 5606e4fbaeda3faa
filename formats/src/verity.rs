//! dm-verity hash devices, as `veritysetup format` writes them: format 1,
//! SHA-256, 4096-byte data and hash blocks, a salt, and the superblock
//! first. [`Hasher`] is a [`Sink`] a filesystem writer writes into (in
//! ascending order; what it skips is zeros), hashing each data block as
//! it arrives; [`Hasher::finish`] builds the tree above them.
//!
//! The tree: level 0 holds the digest of every data block, each level
//! above the digests of the blocks of the one below, 128 to a block
//! (zero-padded), up to a level of one block, whose digest is the root
//! hash. A digest is SHA-256(salt ‖ block) (format 1 puts the salt
//! first). The device holds the superblock (its own 4096-byte block),
//! then the levels from the top one down.

use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::io::{self, Seek, SeekFrom, Write};

use crate::sink::Sink;

/// Data and hash block size.
pub const BLOCK: usize = 4096;
const DIGEST: usize = 32;
/// Digests per hash block (2^7).
const PER_BLOCK_BITS: u32 = 7;
/// The salt's size (`veritysetup format`'s default).
pub const SALT: usize = 32;
/// Data hashed at once, on every core.
const BATCH: usize = 8 << 20;

/// What a hash device is made with (besides the data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub salt: [u8; SALT],
    /// The superblock's UUID, in the order its text form reads.
    pub uuid: [u8; 16],
}

/// The number of hash blocks at each level for `data_blocks` blocks,
/// level 0 (the data blocks' digests) first; none for a single block
/// (its digest is the root hash).
fn levels(data_blocks: u64) -> Vec<u64> {
    let mut n = 0;
    while PER_BLOCK_BITS * n < 64 && (data_blocks.saturating_sub(1)) >> (PER_BLOCK_BITS * n) != 0 {
        n += 1;
    }
    (0..n)
        .map(|i| data_blocks.div_ceil(1u64 << (PER_BLOCK_BITS * (i + 1)).min(63)))
        .collect()
}

/// The hash device's size for `data_blocks` data blocks: the superblock
/// and every level.
pub fn hash_size(data_blocks: u64) -> u64 {
    (1 + levels(data_blocks).iter().sum::<u64>()) * BLOCK as u64
}

/// A hash device, whole.
#[derive(Clone, Debug)]
pub struct Tree {
    pub params: Params,
    pub root_hash: [u8; DIGEST],
    pub data_blocks: u64,
    /// The superblock and the levels: `hash_size(data_blocks)` bytes.
    pub bytes: Vec<u8>,
}

impl Tree {
    pub fn root_hex(&self) -> String {
        hex(&self.root_hash)
    }

    /// What its first two blocks say (as [`read`] finds it).
    pub fn found(&self) -> Found {
        Found {
            params: self.params,
            data_blocks: self.data_blocks,
            root_hash: self.root_hash,
        }
    }
}

/// Hashes data blocks as a writer writes them: full batches go to a
/// thread that hashes them on every core while the writer reads on.
pub struct Hasher {
    params: Params,
    /// SHA-256 with the salt already in.
    salted: Sha256,
    /// Blocks handed to the hashing thread.
    sent: u64,
    /// Bytes not yet sent (fewer than a batch).
    pending: Vec<u8>,
    /// The write position, at or past the end of what was given.
    pos: u64,
    zero_digest: [u8; DIGEST],
    worker: Worker,
}

/// What the hashing thread is given, in order.
enum Batch {
    /// Whole blocks.
    Data(Vec<u8>),
    /// This many zero blocks.
    Zeros(u64),
}

/// The hashing thread: level 0 in order, and spent buffers back.
struct Worker {
    tx: std::sync::mpsc::SyncSender<Batch>,
    spent: std::sync::mpsc::Receiver<Vec<u8>>,
    done: std::thread::JoinHandle<Vec<[u8; DIGEST]>>,
}

impl Worker {
    fn start(salted: Sha256, zero: [u8; DIGEST]) -> Worker {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(2);
        let (back, spent) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        let done = std::thread::spawn(move || {
            let mut digests: Vec<[u8; DIGEST]> = Vec::new();
            for batch in rx {
                match batch {
                    Batch::Data(b) => {
                        let new: Vec<[u8; DIGEST]> = b
                            .par_chunks(BLOCK)
                            .map(|c| salted.clone().chain_update(c).finalize().into())
                            .collect();
                        digests.extend(new);
                        let _ = back.try_send(b);
                    }
                    Batch::Zeros(n) => digests.extend(std::iter::repeat_n(zero, n as usize)),
                }
            }
            digests
        });
        Worker { tx, spent, done }
    }
}

impl Hasher {
    pub fn new(params: Params) -> Hasher {
        let salted = Sha256::new_with_prefix(params.salt);
        let zero_digest = salted.clone().chain_update([0u8; BLOCK]).finalize().into();
        Hasher {
            params,
            worker: Worker::start(salted.clone(), zero_digest),
            salted,
            sent: 0,
            pending: Vec::with_capacity(BATCH),
            pos: 0,
            zero_digest,
        }
    }

    /// Where what was given ends.
    fn given(&self) -> u64 {
        self.sent * BLOCK as u64 + self.pending.len() as u64
    }

    fn send(&mut self, b: Batch) {
        // The thread ends only when the sender goes: it is there.
        self.worker.tx.send(b).expect("the verity hashing thread");
    }

    /// Send every whole block pending; keep the rest.
    fn hash_pending(&mut self) {
        let whole = self.pending.len() / BLOCK * BLOCK;
        if whole == 0 {
            return;
        }
        let mut next = self.worker.spent.try_recv().unwrap_or_default();
        next.clear();
        next.extend_from_slice(&self.pending[whole..]);
        let mut full = std::mem::replace(&mut self.pending, next);
        full.truncate(whole);
        self.sent += (whole / BLOCK) as u64;
        self.send(Batch::Data(full));
    }

    /// Writes go on at the write position: a gap before it is zeros; a
    /// position before what was given is an error.
    fn catch_up(&mut self) -> io::Result<()> {
        let given = self.given();
        if self.pos < given {
            return Err(io::Error::other(format!(
                "verity: a write at byte {} goes back before byte {given}",
                self.pos
            )));
        }
        if self.pos > given {
            self.zeros_to(self.pos);
        }
        Ok(())
    }

    /// Zeros from where the data given ends up to `to`: whole zero
    /// blocks by their one digest, never held.
    fn zeros_to(&mut self, to: u64) {
        let bs = BLOCK as u64;
        let mut at = self.given();
        if !at.is_multiple_of(bs) {
            let n = (bs - at % bs).min(to - at);
            self.pending.resize(self.pending.len() + n as usize, 0);
            at += n;
        }
        if at.is_multiple_of(bs) {
            self.hash_pending();
            let whole = (to - at) / bs;
            if whole > 0 {
                self.sent += whole;
                self.send(Batch::Zeros(whole));
            }
            at += whole * bs;
        }
        self.pending
            .resize(self.pending.len() + (to - at) as usize, 0);
    }

    /// The tree over the data written, taken to be `size` bytes (a whole
    /// number of blocks; what was not written is zeros).
    pub fn finish(mut self, size: u64) -> io::Result<Tree> {
        if !size.is_multiple_of(BLOCK as u64) || self.given().max(self.pos) > size {
            return Err(io::Error::other(format!(
                "verity: {size} bytes of data is not whole {BLOCK}-byte blocks, or less than was written"
            )));
        }
        self.zeros_to(size);
        self.hash_pending();
        let data_blocks = size / BLOCK as u64;
        let Hasher { worker, .. } = self;
        drop(worker.tx);
        let mut below = worker.done.join().expect("the verity hashing thread");
        let mut stored: Vec<Vec<u8>> = Vec::new();
        for _ in levels(data_blocks) {
            let level: Vec<u8> = below
                .chunks(BLOCK / DIGEST)
                .flat_map(|c| {
                    let mut b = c.concat();
                    b.resize(BLOCK, 0);
                    b
                })
                .collect();
            below = level
                .par_chunks(BLOCK)
                .map(|b| self.salted.clone().chain_update(b).finalize().into())
                .collect();
            stored.push(level);
        }
        let root_hash = below.first().copied().unwrap_or(self.zero_digest);
        let mut bytes = superblock(&self.params, data_blocks);
        for level in stored.iter().rev() {
            bytes.extend_from_slice(level);
        }
        Ok(Tree {
            params: self.params,
            root_hash,
            data_blocks,
            bytes,
        })
    }
}

/// The superblock, in its own block.
fn superblock(p: &Params, data_blocks: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[..8].copy_from_slice(b"verity\0\0");
    b[8..12].copy_from_slice(&1u32.to_le_bytes()); // version
    b[12..16].copy_from_slice(&1u32.to_le_bytes()); // hash type: format 1
    b[16..32].copy_from_slice(&p.uuid);
    b[32..38].copy_from_slice(b"sha256");
    b[64..68].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    b[68..72].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    b[72..80].copy_from_slice(&data_blocks.to_le_bytes());
    b[80..82].copy_from_slice(&(SALT as u16).to_le_bytes());
    b[88..88 + SALT].copy_from_slice(&p.salt);
    b
}

/// What a hash device's first two blocks say: its parameters, the data
/// size, and the root hash (the digest of the top level's one block).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub params: Params,
    pub data_blocks: u64,
    pub root_hash: [u8; DIGEST],
}

/// Read a hash device's superblock and top level (its first 8 KiB) as
/// forge and `veritysetup format` write them (format 1, SHA-256, 4096-byte
/// blocks, a 32-byte salt); None for anything else, or a device of one
/// data block (whose root hash is the data's).
pub fn read(head: &[u8]) -> Option<Found> {
    let sb = head.get(..BLOCK)?;
    let u32_at = |o: usize| u32::from_le_bytes(sb[o..o + 4].try_into().expect("4 bytes"));
    let plain = &sb[..8] == b"verity\0\0"
        && u32_at(8) == 1
        && u32_at(12) == 1
        && sb[32..64].split(|&b| b == 0).next() == Some(b"sha256".as_slice())
        && u32_at(64) == BLOCK as u32
        && u32_at(68) == BLOCK as u32
        && u16::from_le_bytes([sb[80], sb[81]]) == SALT as u16;
    let data_blocks = u64::from_le_bytes(sb[72..80].try_into().expect("8 bytes"));
    if !plain || data_blocks < 2 {
        return None;
    }
    let params = Params {
        salt: sb[88..88 + SALT].try_into().expect("32 bytes"),
        uuid: sb[16..32].try_into().expect("16 bytes"),
    };
    let top = head.get(BLOCK..2 * BLOCK)?;
    let root_hash = Sha256::new_with_prefix(params.salt)
        .chain_update(top)
        .finalize()
        .into();
    Some(Found {
        params,
        data_blocks,
        root_hash,
    })
}

impl Found {
    /// As the layout manifest says it.
    pub fn manifest(&self) -> crate::manifest::Verity {
        crate::manifest::Verity {
            root_hash: hex(&self.root_hash),
            salt: hex(&self.params.salt),
            data_blocks: self.data_blocks,
            hash: "sha256".into(),
            block_size: BLOCK as u32,
        }
    }
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Write for Hasher {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.catch_up()?;
        self.pending.extend_from_slice(b);
        self.pos += b.len() as u64;
        if self.pending.len() >= BATCH {
            self.hash_pending();
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Hasher {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = crate::sink::seek_in(self.pos, to, "verity")?;
        Ok(self.pos)
    }
}

impl Sink for Hasher {}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Params {
        Params {
            salt: [7; SALT],
            uuid: [1; 16],
        }
    }

    /// The tree of `data` computed the plain way: every level in full.
    fn plain(data: &[u8], p: &Params) -> ([u8; 32], Vec<u8>) {
        let h = |b: &[u8]| -> [u8; 32] {
            Sha256::new_with_prefix(p.salt)
                .chain_update(b)
                .finalize()
                .into()
        };
        let mut below: Vec<[u8; 32]> = data.chunks(BLOCK).map(h).collect();
        let mut levels = Vec::new();
        while below.len() > 1 {
            let mut level = Vec::new();
            for c in below.chunks(128) {
                let mut b = c.concat();
                b.resize(BLOCK, 0);
                level.extend(b);
            }
            below = level.chunks(BLOCK).map(h).collect();
            levels.push(level);
        }
        let mut bytes = superblock(p, (data.len() / BLOCK) as u64);
        for l in levels.iter().rev() {
            bytes.extend_from_slice(l);
        }
        (below[0], bytes)
    }

    #[test]
    fn gaps_are_zeros_and_the_tree_is_the_plain_one_at_every_depth() {
        for blocks in [1usize, 2, 128, 129, 128 * 128 + 3] {
            let mut data = vec![0u8; blocks * BLOCK];
            for (i, b) in data.iter_mut().enumerate().step_by(4093) {
                *b = (i % 251) as u8 + 1;
            }
            // The last half block is never written: zeros.
            let end = data.len() - BLOCK / 2;
            data[end..].fill(0);
            let mut h = Hasher::new(params());
            // Written in pieces, skipping a zero run (a seek forward).
            let cut = data.len() / 3;
            h.write_all(&data[..cut]).unwrap();
            let skip = data[cut..end].iter().take_while(|&&b| b == 0).count();
            h.seek(SeekFrom::Start((cut + skip) as u64)).unwrap();
            h.write_all(&data[cut + skip..end]).unwrap();
            let t = h.finish(data.len() as u64).unwrap();
            let (root, bytes) = plain(&data, &params());
            assert_eq!(t.root_hash, root, "{blocks} blocks");
            assert_eq!(t.bytes, bytes, "{blocks} blocks");
            assert_eq!(t.bytes.len() as u64, hash_size(blocks as u64));
        }
    }

    #[test]
    fn host_file_bytes_hash_as_written_ones() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        let data: Vec<u8> = (0..3 * BLOCK + 100).map(|i| (i % 241) as u8).collect();
        std::fs::write(&f, &data).unwrap();
        let mut by_host = Hasher::new(params());
        by_host.seek(SeekFrom::Start(BLOCK as u64)).unwrap();
        by_host
            .put_host(
                &f,
                0,
                data.len() as u64,
                4 * BLOCK as u64,
                data.len() as u64,
            )
            .unwrap();
        let mut by_write = Hasher::new(params());
        by_write.seek(SeekFrom::Start(BLOCK as u64)).unwrap();
        by_write.write_all(&data).unwrap();
        let size = 6 * BLOCK as u64;
        let (a, b) = (
            by_host.finish(size).unwrap(),
            by_write.finish(size).unwrap(),
        );
        assert_eq!(a.root_hash, b.root_hash);
        assert_eq!(a.bytes, b.bytes);
    }

    #[test]
    fn a_hash_device_reads_back_its_parameters_and_root_hash() {
        let mut h = Hasher::new(params());
        h.write_all(&[3; 3 * BLOCK]).unwrap();
        let t = h.finish(3 * BLOCK as u64).unwrap();
        let found = read(&t.bytes).unwrap();
        assert_eq!(found.params, params());
        assert_eq!(found.data_blocks, 3);
        assert_eq!(found.root_hash, t.root_hash);
        let mut other = t.bytes.clone();
        other[12] = 0; // hash type 0 (Chrome OS): not ours
        assert_eq!(read(&other), None);
        assert_eq!(read(&t.bytes[..100]), None);
    }

    #[test]
    fn a_write_that_goes_back_or_data_past_the_size_is_an_error() {
        let mut h = Hasher::new(params());
        h.write_all(&[1; 100]).unwrap();
        h.seek(SeekFrom::Start(50)).unwrap();
        assert!(h.write_all(&[1]).is_err());
        let mut h = Hasher::new(params());
        h.write_all(&[1; 5000]).unwrap();
        assert!(h.finish(4096).is_err());
    }
}
