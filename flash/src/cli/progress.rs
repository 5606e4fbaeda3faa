//! Progress per device: an indicatif bar each (rate, ETA) on a terminal,
//! plain lines every few seconds when stderr is piped, nothing when quiet.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PLAIN_EVERY: Duration = Duration::from_secs(2);

enum Mode {
    Bars(MultiProgress),
    Plain,
    Quiet,
}

pub struct Bars {
    mode: Mode,
    /// Tests only: `NIXFORGE_FLASH_PAUSE=POINT` holds each writer at that
    /// point (see [`flash::Meter::reached`]) until `stop` is set or the
    /// process is killed.
    pause: Option<String>,
    stop: Arc<AtomicBool>,
}

/// Whether this binary has the test hooks: built by `make test-bins`
/// with `NIXFORGE_TEST_HOOKS=1` in the build's environment (never by
/// `make build`, `make install` or the Nix package; cargo rebuilds only
/// the binary when it changes).
const TEST_HOOKS: bool = option_env!("NIXFORGE_TEST_HOOKS").is_some();

/// Test binaries only: `NIXFORGE_FLASH_PAUSE=POINT` (without the hooks
/// the name is not in the binary).
pub(super) fn pause_point() -> Option<String> {
    match TEST_HOOKS {
        true => std::env::var("NIXFORGE_FLASH_PAUSE").ok(),
        false => None,
    }
}

impl Bars {
    pub fn new(quiet: bool) -> Bars {
        Bars::stoppable(quiet, Arc::default())
    }

    pub fn stoppable(quiet: bool, stop: Arc<AtomicBool>) -> Bars {
        let mode = if quiet {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() {
            Mode::Bars(MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
        } else {
            Mode::Plain
        };
        Bars {
            mode,
            pause: pause_point(),
            stop,
        }
    }

    /// A meter for one device, labelled with its name.
    fn bar(&self, name: &str) -> Meter {
        let bar = match &self.mode {
            Mode::Bars(m) => {
                let b = m.add(ProgressBar::new(0));
                b.set_style(
                    ProgressStyle::with_template(
                        "{prefix} {msg:9} [{bar:30}] {bytes:>10}/{total_bytes:10} {bytes_per_sec:>12} ETA {eta}",
                    )
                    .expect("a valid template")
                    .progress_chars("=> "),
                );
                b.set_prefix(name.to_string());
                Some(b)
            }
            _ => None,
        };
        Meter {
            name: name.to_string(),
            pause: self.pause.clone(),
            stop: self.stop.clone(),
            bar,
            plain: matches!(self.mode, Mode::Plain),
            state: Mutex::new(Plain {
                phase: "",
                total: 0,
                done: 0,
                start: Instant::now(),
                last: Instant::now(),
            }),
        }
    }

    /// Print a line without tearing the bars.
    pub fn println(&self, line: &str) {
        match &self.mode {
            Mode::Bars(m) => {
                let _ = m.println(line);
            }
            Mode::Plain => eprintln!("{line}"),
            Mode::Quiet => {}
        }
    }
}

struct Plain {
    phase: &'static str,
    total: u64,
    done: u64,
    start: Instant,
    last: Instant,
}

/// Progress of one device; shared by the threads working on it.
pub struct Meter {
    name: String,
    pause: Option<String>,
    stop: Arc<AtomicBool>,
    bar: Option<ProgressBar>,
    plain: bool,
    state: Mutex<Plain>,
}

impl flash::Meter for Meter {
    /// Start a phase ("writing", "verifying") of `total` bytes.
    fn phase(&self, phase: &'static str, total: u64) {
        if let Some(b) = &self.bar {
            b.set_message(phase);
            b.set_length(total);
            b.set_position(0);
            b.reset_eta();
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *s = Plain {
            phase,
            total,
            done: 0,
            start: Instant::now(),
            last: Instant::now(),
        };
    }

    fn add(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
        if !self.plain {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.done += n;
        if s.last.elapsed() < PLAIN_EVERY {
            return;
        }
        s.last = Instant::now();
        let secs = s.start.elapsed().as_secs_f64().max(1e-3);
        let rate = s.done as f64 / secs;
        let eta = s.total.saturating_sub(s.done) as f64 / rate.max(1.0);
        eprintln!(
            "flash: {}: {} {:.0} of {:.0} MiB, {:.0} MB/s, ETA {:.0} s",
            self.name,
            s.phase,
            s.done as f64 / 1048576.0,
            s.total as f64 / 1048576.0,
            rate / 1e6,
            eta
        );
    }

    fn reached(&self, point: &'static str) {
        if self.pause.as_deref() != Some(point) {
            return;
        }
        eprintln!("flash: {}: paused at {point}", self.name);
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// End the bar with a closing message (kept on screen).
    fn finish(&self, msg: &str) {
        if let Some(b) = &self.bar {
            b.finish_with_message(msg.to_string());
        }
    }
}

impl flash::Progress for Bars {
    fn meter(&self, device: &str) -> Box<dyn flash::Meter> {
        Box::new(self.bar(device))
    }
}
