//! Property tests of the parsers on arbitrary and mutated bytes: a small
//! deterministic generator and a budget. `make test` runs each for a few
//! thousand cases; `make fuzz` sets `NIXFORGE_FUZZ_SECS` to run each for
//! that long, with a fresh seed per run (printed, and taken from
//! `NIXFORGE_FUZZ_SEED` to replay one).

use std::time::{Duration, Instant};

/// xorshift64*: plenty for producing test bytes.
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value; xorshift needs one bit set).
    pub fn seeded(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn word(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.word() % n as u64) as usize
        }
    }
    /// `b` with up to `max` bytes set to random values, and maybe cut short.
    pub fn mutate(&mut self, b: &mut Vec<u8>, max: usize) {
        for _ in 0..self.below(max + 1) {
            if b.is_empty() {
                break;
            }
            let i = self.below(b.len());
            b[i] = self.word() as u8;
        }
        if self.below(4) == 0 {
            let n = self.below(b.len() + 1);
            b.truncate(n);
        }
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.word() as u8).collect()
    }
}

/// Run `case` `rounds` times, or for `NIXFORGE_FUZZ_SECS` seconds when set.
pub fn run(name: &str, rounds: usize, mut case: impl FnMut(&mut Rng)) {
    let secs: Option<u64> = std::env::var("NIXFORGE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok());
    let seed = std::env::var("NIXFORGE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| match secs {
            Some(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64 | 1),
            None => 0x9E37_79B9_7F4A_7C15,
        });
    let mut rng = Rng(seed);
    let start = Instant::now();
    let mut n = 0u64;
    loop {
        case(&mut rng);
        n += 1;
        match secs {
            Some(s) if start.elapsed() >= Duration::from_secs(s) => break,
            Some(_) => {}
            None if n >= rounds as u64 => break,
            None => {}
        }
    }
    if secs.is_some() {
        eprintln!("fuzz {name}: {n} cases, seed {seed} (NIXFORGE_FUZZ_SEED to replay)");
    }
}
