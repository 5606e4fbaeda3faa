//! How forge shows its progress: a line per stage on stderr with the time
//! since the start; on a terminal also a bar for each long step (bytes,
//! rate, ETA); nothing but warnings and errors with `--quiet`.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

static QUIET: AtomicBool = AtomicBool::new(false);

/// `--quiet`: no stage lines, no bars.
pub fn set_quiet(q: bool) {
    QUIET.store(q, Ordering::Relaxed);
}

/// Whether this binary has the test hooks: built by `make test-bins`
/// with `NIXFORGE_TEST_HOOKS=1` in the build's environment (never by
/// `make build`, `make install` or the Nix package; cargo rebuilds only
/// the binary when it changes). With them `NIXFORGE_FORGE_PAUSE=TEXT`
/// holds the run at the first stage whose line contains TEXT (to
/// interrupt it at a known moment); without, the name is not in the
/// binary.
const TEST_HOOKS: bool = option_env!("NIXFORGE_TEST_HOOKS").is_some();

/// Stage lines, bars and (test binaries only) the pause point.
pub struct Stages {
    start: std::time::Instant,
    pause: Option<String>,
    quiet: bool,
    bars: bool,
    /// The bar being drawn, which stage lines go above.
    bar: Mutex<Option<ProgressBar>>,
}

impl Stages {
    pub fn new() -> Stages {
        let pause = match TEST_HOOKS {
            true => std::env::var("NIXFORGE_FORGE_PAUSE").ok(),
            false => None,
        };
        let quiet = QUIET.load(Ordering::Relaxed);
        Stages {
            start: std::time::Instant::now(),
            pause,
            quiet,
            bars: !quiet && std::io::stderr().is_terminal(),
            bar: Mutex::new(None),
        }
    }

    fn say(&self, line: &str) {
        match self.bar.lock().ok().and_then(|b| b.clone()) {
            Some(b) if !b.is_finished() => b.println(line),
            _ => eprintln!("{line}"),
        }
    }
}

/// A bar's bytes.
struct Bar(ProgressBar);

impl forge::Meter for Bar {
    fn total(&self, n: u64) {
        self.0.set_length(n);
        self.0.reset_eta();
    }
    fn add(&self, n: u64) {
        self.0.inc(n);
    }
    fn done(&self) {
        self.0.finish();
    }
}

impl forge::Progress for Stages {
    fn scratch(&self, dir: Option<&std::path::Path>) {
        if dir.is_some() {
            super::watch_signals();
        }
        if let Ok(mut s) = super::SCRATCH.lock() {
            *s = dir.map(|d| d.to_path_buf());
        }
    }

    fn warn(&self, what: &str) {
        self.say(&format!("warning: {what}"));
    }

    fn stage(&self, what: &str) {
        if !self.quiet {
            let secs = self.start.elapsed().as_secs_f64();
            self.say(&format!("forge: [{secs:6.2}s] {what}"));
        }
        if self.pause.as_deref().is_some_and(|p| what.contains(p)) {
            eprintln!("forge: paused");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(60));
            }
        }
    }

    fn bytes(&self, what: &str) -> Option<Arc<dyn forge::Meter>> {
        self.bar(
            what,
            "forge: {msg} [{bar:30}] {bytes:>10}/{total_bytes:10} {bytes_per_sec:>12} ETA {eta}",
        )
    }

    fn items(&self, what: &str, unit: &str) -> Option<Arc<dyn forge::Meter>> {
        self.bar(
            what,
            &format!(
                "forge: {{msg}} [{{bar:30}}] {{pos:>4}}/{{len}} {unit} {{per_sec:>12}} ETA {{eta}}"
            ),
        )
    }
}

impl Stages {
    /// A bar drawn with `template`, the one stage lines now go above.
    fn bar(&self, what: &str, template: &str) -> Option<Arc<dyn forge::Meter>> {
        if !self.bars {
            return None;
        }
        let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        b.set_style(
            ProgressStyle::with_template(template)
                .expect("a valid template")
                .progress_chars("=> "),
        );
        b.set_message(what.to_string());
        if let Ok(mut cur) = self.bar.lock() {
            *cur = Some(b.clone());
        }
        Some(Arc::new(Bar(b)))
    }
}
