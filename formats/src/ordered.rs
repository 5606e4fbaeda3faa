//! Work on every core, results taken in order: [`map_in_order`] runs
//! `work(0..n)` on `threads` threads, each taking the next index as it
//! finishes one (no batch waits for its slowest member), and hands the
//! results to `take` on the calling thread in index order. A worker starts
//! index `i` only while `ahead(taken, i)` allows it (`taken`: the index
//! `take` waits for, which always starts), which bounds the results held. The results, and what `take` sees, do not
//! depend on the thread count.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

struct State<T> {
    /// Indexes below this were taken.
    taken: usize,
    /// Finished results not yet taken.
    ready: BTreeMap<usize, io::Result<T>>,
    /// `take` or a worker failed: the workers stop.
    stop: bool,
}

/// `take(i, work(i))` for every `i` in `0..n`, in order; the first error
/// (of `work`, in index order, or of `take`) ends the run and is returned.
pub fn map_in_order<T: Send>(
    n: usize,
    threads: usize,
    ahead: impl Fn(usize, usize) -> bool + Sync,
    work: impl Fn(usize) -> io::Result<T> + Sync,
    mut take: impl FnMut(usize, T) -> io::Result<()>,
) -> io::Result<()> {
    let next = AtomicUsize::new(0);
    let state = Mutex::new(State {
        taken: 0,
        ready: BTreeMap::new(),
        stop: false,
    });
    let cv = Condvar::new();
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let mut g = lock();
                while i > g.taken && !ahead(g.taken, i) && !g.stop {
                    g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                if g.stop {
                    return;
                }
                drop(g);
                let r = work(i);
                let mut g = lock();
                g.ready.insert(i, r);
                cv.notify_all();
            });
        }
        let result = (0..n).try_for_each(|i| {
            let mut g = lock();
            let r = loop {
                if let Some(r) = g.ready.remove(&i) {
                    break r;
                }
                g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
            };
            g.taken = i + 1;
            cv.notify_all();
            drop(g);
            r.and_then(|t| take(i, t))
        });
        let mut g = lock();
        g.stop = true;
        cv.notify_all();
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_in_order_for_any_thread_count() {
        for threads in [1, 2, 5] {
            let mut got = Vec::new();
            map_in_order(
                100,
                threads,
                |taken, i| i < taken + 3,
                |i| {
                    // Later indexes finish first now and then.
                    std::thread::sleep(std::time::Duration::from_micros((100 - i as u64) % 7 * 50));
                    Ok(i * i)
                },
                |i, v| {
                    got.push((i, v));
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(got, (0..100).map(|i| (i, i * i)).collect::<Vec<_>>());
        }
    }

    #[test]
    fn the_first_error_in_order_ends_the_run() {
        let mut took = 0;
        let r = map_in_order(
            50,
            2,
            |taken, i| i < taken + 4,
            |i| match i {
                7 | 20 => Err(io::Error::other(format!("unit {i}"))),
                _ => Ok(i),
            },
            |_, _| {
                took += 1;
                Ok(())
            },
        );
        assert_eq!(r.unwrap_err().to_string(), "unit 7");
        assert_eq!(took, 7);
        let r = map_in_order(
            10,
            2,
            |_, _| false,
            Ok,
            |i, _| match i {
                3 => Err(io::Error::other("take 3")),
                _ => Ok(()),
            },
        );
        assert_eq!(r.unwrap_err().to_string(), "take 3");
    }
}
