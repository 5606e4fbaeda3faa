//! `flash station`'s live table on a terminal: one row per card in flight
//! (device, identity, phase, progress, rate), redrawn in place a few
//! times a second; a card's row with its result is printed above the
//! table once it is done (so fifty cards do not outgrow the screen), as
//! are other lines. Without a terminal, plain lines (a card's result), no
//! escape codes.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const EVERY: Duration = Duration::from_millis(250);

struct Row {
    device: String,
    identity: String,
    phase: &'static str,
    done: u64,
    total: u64,
    start: Instant,
    result: Option<String>,
}

impl Row {
    fn line(&self) -> String {
        let pct = (self.done * 100)
            .checked_div(self.total)
            .unwrap_or(0)
            .min(100);
        let fill = (pct / 5) as usize;
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let rate = self.done as f64 / secs / 1e6;
        format!(
            "{:<14} {:<12} {:<9} [{}{}] {pct:>3}% {rate:>6.0} MB/s  {}",
            self.device,
            self.identity,
            self.phase,
            "=".repeat(fill),
            " ".repeat(20 - fill),
            self.result.as_deref().unwrap_or("")
        )
    }
}

#[derive(Default)]
struct State {
    /// The cards in flight, by when they started.
    rows: std::collections::BTreeMap<usize, Row>,
    next: usize,
    /// Lines of the table now on the screen.
    drawn: usize,
}

impl State {
    fn clear(&mut self, out: &mut impl Write) {
        for _ in 0..self.drawn {
            let _ = write!(out, "\x1b[1A\x1b[2K");
        }
        let _ = write!(out, "\r");
        self.drawn = 0;
    }
    fn draw(&mut self, out: &mut impl Write) {
        self.clear(out);
        for r in self.rows.values() {
            let _ = writeln!(out, "{}", r.line());
        }
        self.drawn = self.rows.len();
        let _ = out.flush();
    }
}

pub struct Table {
    tty: bool,
    state: Arc<Mutex<State>>,
    done: Arc<AtomicBool>,
    /// Tests only (see `progress::pause_point`): each card is held at
    /// this point until `stop` is set.
    pause: Option<String>,
    stop: Arc<AtomicBool>,
}

impl Table {
    /// A table on stderr, redrawn by its own thread when stderr is a
    /// terminal; `stop` is the run's stop flag.
    pub fn new(stop: Arc<AtomicBool>) -> Table {
        let t = Table {
            tty: std::io::stderr().is_terminal(),
            state: Arc::default(),
            done: Arc::default(),
            pause: super::progress::pause_point(),
            stop,
        };
        if t.tty {
            let (state, done) = (t.state.clone(), t.done.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    lock(&state).draw(&mut std::io::stderr().lock());
                    std::thread::sleep(EVERY);
                }
            });
        }
        t
    }

    /// A line above the table.
    pub fn println(&self, line: &str) {
        let mut s = lock(&self.state);
        let mut err = std::io::stderr().lock();
        if self.tty {
            s.clear(&mut err);
        }
        let _ = writeln!(err, "{line}");
        if self.tty {
            s.draw(&mut err);
        }
    }

    /// The last drawing, left on the screen.
    pub fn finish(&self) {
        self.done.store(true, Ordering::Relaxed);
        if self.tty {
            lock(&self.state).draw(&mut std::io::stderr().lock());
        }
    }
}

fn lock(s: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// One card's row.
struct RowMeter {
    state: Arc<Mutex<State>>,
    index: usize,
    tty: bool,
    pause: Option<String>,
    stop: Arc<AtomicBool>,
}

impl flash::Progress for Table {
    /// `device` is "DEVICE IDENTITY" (as the station labels it).
    fn meter(&self, device: &str) -> Box<dyn flash::Meter> {
        let (dev, id) = device.split_once(' ').unwrap_or((device, ""));
        let mut s = lock(&self.state);
        let index = s.next;
        s.next += 1;
        s.rows.insert(
            index,
            Row {
                device: dev.to_string(),
                identity: id.to_string(),
                phase: "opening",
                done: 0,
                total: 0,
                start: Instant::now(),
                result: None,
            },
        );
        Box::new(RowMeter {
            state: self.state.clone(),
            index,
            tty: self.tty,
            pause: self.pause.clone(),
            stop: self.stop.clone(),
        })
    }
}

impl flash::Meter for RowMeter {
    fn phase(&self, phase: &'static str, total: u64) {
        if let Some(r) = lock(&self.state).rows.get_mut(&self.index) {
            (r.phase, r.total, r.done, r.start) = (phase, total, 0, Instant::now());
        }
    }
    fn add(&self, n: u64) {
        if let Some(r) = lock(&self.state).rows.get_mut(&self.index) {
            r.done += n;
        }
    }
    fn reached(&self, point: &'static str) {
        if self.pause.as_deref() != Some(point) {
            return;
        }
        eprintln!("flash station: paused at {point}");
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The card's row, with its result, leaves the table for good.
    fn finish(&self, how: &str) {
        let mut s = lock(&self.state);
        let Some(mut r) = s.rows.remove(&self.index) else {
            return;
        };
        r.result = Some(how.to_string());
        let mut err = std::io::stderr().lock();
        if self.tty {
            s.clear(&mut err);
            let _ = writeln!(err, "{}", r.line());
            s.draw(&mut err);
        } else {
            let _ = writeln!(err, "flash station: {} {}: {how}", r.device, r.identity);
        }
    }
}
