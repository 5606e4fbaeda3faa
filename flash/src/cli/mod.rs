//! The command line: parses arguments, calls the library, prints errors
//! as a one-line context chain and exits non-zero on failure: 1 a failed
//! write, 2 refused before the first write (nothing written), 3 a failed
//! verify, 4 a probe that could not restore what it sampled.

// The same completions and man pages as forge's, from one place.
#[path = "../../../forge/src/cli/docs.rs"]
mod docs;
mod progress;
mod provision;
mod report;
mod station;
mod table;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM};

use flash::device::{BlockDevice, Device};
use flash::preflight::{self, Host, Need};
use flash::session::{self, Request, Session};
use flash::source::{BmapChoice, Source};
use flash::trust::Trust;
use flash::write::{self, Mismatch};
use progress::Bars;

#[derive(Parser)]
#[command(
    name = "flash",
    version,
    about = "Write nixforge images to block devices, safely",
    after_help = "\
Examples:
  flash list
  flash nixos.img.zst /dev/disk/by-id/usb-SanDisk_Ultra_4C53-0:0
  flash disk.img /dev/sdb /dev/sdc --yes --allow-non-removable
  flash verify disk.img /dev/sdb
  flash nixos.img.zst /dev/sdb --trust ci.pub      (only if CI signed it)
  flash https://example.org/raspios.img.xz /dev/sdb
  xz -dc disk.img.xz | flash - /dev/sdb --size 4G --yes
  flash station nixos.img --identities ids/ --match 'usb-Generic_SD*' --report cards.jsonl

Before the first byte every check runs: the source is a disk image (a
partition table; --raw otherwise), whole (a .zst's frames, the table's
reach), with its own bmap and layout manifest; with --trust (or keys in
/etc/nixforge/trusted-keys.d), signed by a trusted key, each range then
checked against its signed hash before it is written; every device is a whole,
writable, unmounted, removable disk large enough, each given once.
Old partition tables are wiped first and the new one is written last, so
an interrupted or failed flash leaves no table that anything would use.

Exit status:
  0    written (and verified)
  1    a write failed (the disk's tables are wiped)
  2    refused before writing: bad arguments, source, sidecars, --sha256,
       identities or device, a device that could not be opened (nothing
       written)
  3    verify found a difference (the disk's tables are wiped; flash verify:
       the device differs)
  4    the fake-capacity probe could not put a card's sampled blocks back:
       the card may hold changed bytes there (nothing of the image written)
  130  stopped by SIGINT, 143 by SIGTERM (the tables are wiped)",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    write: WriteArgs,
}

#[derive(clap::Args)]
struct WriteArgs {
    /// Image: a file, an http:// or https:// URL (streamed, resumed where
    /// the server allows), or - (stdin); raw, or zstd-, xz-, gzip- or
    /// bzip2-compressed (recognized by content).
    #[arg(required = true)]
    image: Option<PathBuf>,
    /// Whole-disk block devices (symlinks such as /dev/disk/by-id are resolved).
    #[arg(required = true)]
    devices: Vec<PathBuf>,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
    /// Block map to use (default: IMAGE.bmap, or NAME.bmap beside NAME.zst, .xz, .gz, .bz2).
    #[arg(long, conflicts_with = "no_bmap")]
    bmap: Option<PathBuf>,
    /// Write every byte of the image.
    #[arg(long)]
    no_bmap: bool,
    /// Skip reading the device back.
    #[arg(long)]
    no_verify: bool,
    /// Allow disks that are not marked removable.
    #[arg(long)]
    allow_non_removable: bool,
    /// Expected SHA-256 of the whole (decompressed) image (of a URL or
    /// stdin: checked as it is written; a difference fails the write).
    #[arg(long, value_name = "HEX", value_parser = sha256_hex)]
    sha256: Option<String>,
    /// The (decompressed) image's size in bytes (K, M, G suffixes): what
    /// stdin needs without a bmap; checked against the image's own.
    #[arg(long, value_name = "BYTES", value_parser = formats::size::parse)]
    size: Option<u64>,
    /// Write a source that has no partition table (or is some other
    /// format), byte for byte, on purpose.
    #[arg(long)]
    raw: bool,
    /// Print one JSON report per device on stdout (implies --quiet).
    #[arg(long)]
    json: bool,
    /// No progress bars or lines (errors are still printed).
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    prov: provision::ProvisionArgs,
    #[command(flatten)]
    trust: TrustArgs,
}

/// Signed images: the keys to trust.
#[derive(clap::Args)]
struct TrustArgs {
    /// Write only an image whose IMAGE.sig is this key's signature of its
    /// layout manifest (a Nix public key, NAME:BASE64, or an OpenSSH
    /// ssh-ed25519 one); repeatable. Default: the keys in
    /// /etc/nixforge/trusted-keys.d when that directory exists.
    #[arg(long, value_name = "PUBKEY")]
    trust: Vec<PathBuf>,
    /// A directory of trusted keys, one per file.
    #[arg(long, value_name = "DIR")]
    trusted_keys: Option<PathBuf>,
    /// With keys trusted, write an image that has no signature anyway (a
    /// signature that is there must still verify).
    #[arg(long)]
    allow_unsigned: bool,
}

impl TrustArgs {
    fn load(&self) -> Result<Trust> {
        Trust::load(
            &self.trust,
            self.trusted_keys.as_deref(),
            self.allow_unsigned,
        )
        .map_err(session::nothing_written)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// List candidate target disks and why any would be refused.
    List {
        /// Also show system and busy disks (marked).
        #[arg(long)]
        all: bool,
        /// Print the list as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Compare a device with an image by reading both (no writes); exit 3
    /// on the first difference, naming its byte.
    Verify {
        /// Image: raw, or zstd-, xz-, gzip- or bzip2-compressed (recognized by content).
        image: PathBuf,
        /// The whole-disk block device to read.
        device: PathBuf,
        /// Block map: compare only its ranges (default: IMAGE.bmap beside it).
        #[arg(long, conflicts_with = "no_bmap")]
        bmap: Option<PathBuf>,
        /// Compare every byte of the image.
        #[arg(long)]
        no_bmap: bool,
        /// Allow disks that are not marked removable.
        #[arg(long)]
        allow_non_removable: bool,
        /// Leave out the state partition, which is the device's own once
        /// provisioned (--identity, --fill) or booted; the partition
        /// table is then checked against what --fill writes for the
        /// partition's present size. Needs the image's layout manifest.
        #[arg(long)]
        except_state: bool,
        #[command(flatten)]
        trust: TrustArgs,
    },
    /// Flash every block device that appears after the start, each with
    /// the next unused identity, several at once (a bench station).
    Station(station::StationArgs),
    /// Print the shell completion script for SHELL.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write a man page per command (flash.1, flash-list.1, …) into DIR.
    Man {
        /// The directory to write the pages into.
        dir: PathBuf,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.cmd.is_none() && cli.write.json;
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            let code = exit_code(&e);
            if json {
                // A reader of --json gets an answer on stdout either way.
                let refused = code == ExitCode::from(2);
                println!(
                    "{}",
                    serde_json::json!({ "ok": false, "refused": refused, "error": format!("{e:#}") })
                );
            }
            code
        }
    }
}

/// `--sha256`: 64 hex digits, checked before anything is read.
fn sha256_hex(s: &str) -> Result<String, String> {
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(format!("{s:?} is not a SHA-256 (64 hex digits)"))
    }
}

/// The documented exit codes (`--help`, README): the library's.
fn exit_code(e: &anyhow::Error) -> ExitCode {
    ExitCode::from(session::exit_code(e))
}

fn bmap_choice(bmap: Option<PathBuf>, no_bmap: bool) -> BmapChoice {
    match (bmap, no_bmap) {
        (_, true) => BmapChoice::None,
        (Some(p), _) => BmapChoice::File(p),
        (None, false) => BmapChoice::Auto,
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Some(Cmd::List { all, json }) => list(all, json).map(|_| ExitCode::SUCCESS),
        Some(Cmd::Verify {
            image,
            device,
            bmap,
            no_bmap,
            allow_non_removable,
            except_state,
            trust,
        }) => {
            let mut src = Source::open(&image, bmap_choice(bmap, no_bmap))?;
            let signed =
                flash::trust::check(&mut src, &trust.load()?).map_err(session::nothing_written)?;
            if let Some(s) = &signed {
                eprintln!("flash: {}", signed_line(&image, s));
            }
            verify_cmd(&image, &device, src, allow_non_removable, except_state)
        }
        Some(Cmd::Station(a)) => station::run(a),
        Some(Cmd::Completions { shell }) => {
            docs::completions(Cli::command(), shell)?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Cmd::Man { dir }) => {
            docs::man_pages(Cli::command(), &dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        None => write_cmd(cli.write),
    }
}

/// `flash verify`: the device read and compared with the image.
fn verify_cmd(
    image: &Path,
    device: &Path,
    src: Source,
    allow_non_removable: bool,
    except_state: bool,
) -> Result<ExitCode> {
    let need = Need {
        size: src.size,
        sector: None,
        allow_non_removable,
    };
    let t = preflight::check_to_read(&Host::default(), device, need)?;
    let dev = Box::new(Device::open(&t, false)?);
    let own = if except_state {
        let m = flash::personal::manifest(&src)?;
        let dev_head = write::read_head(&*dev)?;
        let p = flash::personal::as_found(
            &m,
            src.first_mib(),
            &dev_head,
            dev.size(),
            dev.sector_size(),
        )
        .with_context(|| format!("{}: --except-state", t.disk.path.display()))?;
        Some(p)
    } else {
        None
    };
    let state = own.as_ref().map(|p| p.state_size);
    let n = write::verify_only(&src, dev, own, &Bars::new(false)).map_err(|mut e| {
        // A provisioned or booted card differs in its state partition
        // (and, --fill'ed, its table) by design.
        let has_state = flash::personal::manifest(&src).is_ok_and(|m| m.state.is_some());
        if let (Some(m), false, true) = (e.downcast_mut::<Mismatch>(), except_state, has_state) {
            m.wiped = " (a card flashed with --identity or --fill, or booted, differs in its state partition: compare the rest with --except-state)";
        }
        e
    })?;
    let except = match state {
        Some(s) => format!(" except its state partition ({s} bytes, the device's own)"),
        None => String::new(),
    };
    println!(
        "{}: matches {}{except} ({n} bytes compared)",
        t.disk.path.display(),
        image.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// A write: the library's session prepared, shown, confirmed, opened
/// and written; each device reported.
fn write_cmd(a: WriteArgs) -> Result<ExitCode> {
    let req = Request {
        image: a.image.clone().expect("clap requires IMAGE"),
        bmap: bmap_choice(a.bmap.clone(), a.no_bmap),
        size: a.size,
        raw: a.raw,
        sha256: a.sha256.clone(),
        devices: a.devices.clone(),
        allow_non_removable: a.allow_non_removable,
        provisioning: (&a.prov).into(),
        trust: a.trust.load()?,
    };
    let s = session::prepare(&req, &Host::default())?;
    if !a.quiet {
        for n in &s.notes {
            eprintln!("flash: {n}");
        }
        if let Some(signed) = &s.signed {
            eprintln!("flash: {}", signed_line(&req.image, signed));
        }
    }
    let signed = s.signed.clone();
    // Asking fails (no terminal, a closed stdin) before anything is written.
    confirm(&a, &s).map_err(session::nothing_written)?;
    let opened = s.open()?;
    let opts = write::Options::verifying(!a.no_verify);
    let signal = on_signals(&opts.stop)?;
    let bars = Bars::stoppable(a.quiet || a.json, opts.stop.clone());
    let n = s.devices.len();
    let mut reports = Vec::new();
    let mut worst: Option<anyhow::Error> = None;
    for w in s.write(opened, &opts, &bars) {
        match &w.result {
            Ok(o) => reports.push(report::done(&w, o, signed.as_ref(), &|l| bars.println(l))),
            Err(e) => {
                eprintln!("error: {e:#}");
                reports.push(serde_json::json!({ "device": w.target.disk.path, "ok": false, "error": format!("{e:#}") }));
            }
        }
        if let Err(e) = w.result {
            worst.get_or_insert(e);
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    let sig = signal.load(Ordering::Relaxed) as i32;
    if sig != 0 {
        eprintln!(
            "flash: stopped by {}: every write stopped and the partition tables were wiped; nothing on {} boots",
            if sig == SIGINT { "SIGINT" } else { "SIGTERM" },
            if n == 1 { "the disk" } else { "the disks" }
        );
        return Ok(ExitCode::from(128 + sig as u8));
    }
    Ok(match worst {
        Some(e) => exit_code(&e),
        None => ExitCode::SUCCESS,
    })
}

/// Who signed the image, said once before anything is written.
fn signed_line(image: &Path, s: &flash::trust::Signed) -> String {
    format!(
        "{}: signed by {} (trusted key {}){}",
        image.display(),
        s.key,
        s.anchor.display(),
        s.toplevel
            .as_ref()
            .map(|t| format!(", system {t}"))
            .unwrap_or_default()
            + &s.version
                .as_ref()
                .map(|v| format!(" (version {v})"))
                .unwrap_or_default()
    )
}

/// The mapping shown, and "yes" typed, unless --yes.
fn confirm(a: &WriteArgs, s: &Session) -> Result<()> {
    let lines = s.mapping();
    if s.provisions() && a.yes && !a.quiet && !a.json {
        for l in &lines {
            eprintln!("{l}");
        }
    }
    if a.yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(s.unconfirmed("no terminal to ask on; pass --yes"));
    }
    for l in &lines {
        eprintln!("{l}");
    }
    eprint!("Everything on these disks will be overwritten. Type yes to continue: ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if answer.trim() != "yes" {
        return Err(s.unconfirmed("not confirmed"));
    }
    Ok(())
}

/// From here on SIGINT and SIGTERM set `stop` (every writer stops and
/// wipes its disk's tables) and the returned signal number; a second one
/// ends the process at once (the tables are gone by then).
fn on_signals(stop: &Arc<AtomicBool>) -> Result<Arc<AtomicUsize>> {
    let which = Arc::new(AtomicUsize::new(0));
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, stop.clone())
            .and_then(|_| signal_hook::flag::register(sig, stop.clone()))
            .and_then(|_| signal_hook::flag::register_usize(sig, which.clone(), sig as usize))
            .context("installing the signal handlers")?;
    }
    Ok(which)
}

fn list(all: bool, json: bool) -> Result<()> {
    let disks: Vec<_> = Host::default()
        .disks()?
        .into_iter()
        .filter(|d| all || !d.system)
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&disks)?);
        return Ok(());
    }
    for d in &disks {
        let mark = if d.system { " [system]" } else { "" };
        println!("{}{mark}", d.describe());
        for r in &d.refusals {
            println!("    refused: {r}");
        }
    }
    Ok(())
}
