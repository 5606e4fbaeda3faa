//! The command line: parses arguments, calls the library, prints errors
//! as a one-line context chain and exits non-zero on failure: 1 a failed
//! write, 2 refused before the first write (nothing written), 3 a failed
//! verify, 4 a probe that could not restore what it sampled.

// The same completions and man pages as forge's, from one place.
#[path = "../../../forge/src/cli/docs.rs"]
mod docs;
mod progress;
mod provision;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM};

use flash::device::{BlockDevice, Device};
use flash::examine::{examine, Unfit};
use flash::preflight::{self, Refused};
use flash::source::{BmapChoice, Source};
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

Before the first byte every check runs: the source is a disk image (a
partition table; --raw otherwise), whole (a .zst's frames, the table's
reach), with its own bmap and layout manifest; every device is a whole,
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
    /// Image: raw or zstd-compressed (recognized by content).
    #[arg(required = true)]
    image: Option<PathBuf>,
    /// Whole-disk block devices (symlinks such as /dev/disk/by-id are resolved).
    #[arg(required = true)]
    devices: Vec<PathBuf>,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
    /// Block map to use (default: IMAGE.bmap or the .bmap beside a .zst).
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
    /// Expected SHA-256 of the whole (decompressed) image.
    #[arg(long, value_name = "HEX", value_parser = sha256_hex)]
    sha256: Option<String>,
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
        /// Image: raw or zstd-compressed (recognized by content).
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
    },
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

/// The documented exit codes (`--help`, README).
fn exit_code(e: &anyhow::Error) -> ExitCode {
    if e.downcast_ref::<flash::probe::ProbeError>().is_some() {
        ExitCode::from(4)
    } else if e.downcast_ref::<Refused>().is_some()
        || e.downcast_ref::<Unfit>().is_some()
        || e.downcast_ref::<NothingWritten>().is_some()
    {
        ExitCode::from(2)
    } else if e.downcast_ref::<Mismatch>().is_some() {
        ExitCode::from(3)
    } else {
        ExitCode::FAILURE
    }
}

fn bmap_choice(bmap: Option<PathBuf>, no_bmap: bool) -> BmapChoice {
    match (bmap, no_bmap) {
        (_, true) => BmapChoice::None,
        (Some(p), _) => BmapChoice::File(p),
        (None, false) => BmapChoice::Auto,
    }
}

/// A refusal of every named device for want of confirmation.
fn unconfirmed(devices: &[PathBuf], detail: &str) -> anyhow::Error {
    let device = devices
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    Refused {
        verb: flash::preflight::WRITE,
        device,
        refusal: flash::devices::Refusal {
            check: "confirmed",
            detail: detail.into(),
            readable: false,
        },
    }
    .into()
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
        }) => {
            let src = Source::open(&image, bmap_choice(bmap, no_bmap))?;
            let t = preflight::check_to_read(&device, src.size, allow_non_removable)?;
            let dev = Box::new(Device::open(&t, false)?);
            let own = if except_state {
                let m = flash::personal::manifest(&image)?;
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
                // A provisioned or booted card differs in its state
                // partition (and, --fill'ed, its table) by design.
                let has_state = flash::personal::manifest(&image).is_ok_and(|m| m.state.is_some());
                if let (Some(m), false, true) =
                    (e.downcast_mut::<Mismatch>(), except_state, has_state)
                {
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

/// Nothing was written: an error before the first write (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
struct NothingWritten(anyhow::Error);

/// Everything decided before the first write.
struct Ready {
    src: Source,
    targets: Vec<preflight::Target>,
    dirs: Vec<Option<PathBuf>>,
    personals: Vec<Option<flash::personal::Personal>>,
    probing: Vec<bool>,
    /// Each device opened for writing, or why it could not be.
    opened: Vec<Result<Box<dyn BlockDevice>>>,
}

fn write_cmd(a: WriteArgs) -> Result<ExitCode> {
    // A probe that could not put a card's blocks back keeps its own
    // error (exit 4): the card may hold changed bytes.
    let ready = prepare(&a).map_err(|e| {
        if e.is::<flash::probe::ProbeError>() {
            e
        } else {
            NothingWritten(e).into()
        }
    })?;
    write_ready(&a, ready)
}

/// Every check, the identities, the confirmation, the devices opened and
/// probed: all before any byte of the image is written.
fn prepare(a: &WriteArgs) -> Result<Ready> {
    let image = a.image.clone().expect("clap requires IMAGE");
    let src = Source::open(&image, bmap_choice(a.bmap.clone(), a.no_bmap))?;
    let sector = examine(&src, a.raw)?.sector;
    if let Some(want) = &a.sha256 {
        check_sha256(&image, want)?;
    }
    let targets = preflight_all(a, &src, sector)?;
    // Each device's identity and own bytes, planned before anything is
    // opened for writing; shown with the confirmation.
    let (dirs, notes) = provision::assign(&a.prov, &targets)
        .map_err(|e| refused_all(a, "identities", format!("{e:#}")))?;
    let personals = provision::plan(&a.prov, &image, src.first_mib(), &targets, &dirs)?;
    let probing: Vec<bool> = targets
        .iter()
        .map(|t| provision::probes(&a.prov, t))
        .collect();
    let lines: Vec<String> = targets
        .iter()
        .zip(&dirs)
        .zip(&personals)
        .zip(&probing)
        .map(|(((t, d), p), &pr)| provision::mapping(&a.prov, t, d.as_deref(), p.as_ref(), pr))
        .collect();
    if !a.quiet {
        for n in &notes {
            eprintln!("flash: {n}");
        }
    }
    confirm(a, &lines)?;
    let opened = open_and_probe(&targets, &probing)?;
    Ok(Ready {
        src,
        targets,
        dirs,
        personals,
        probing,
        opened,
    })
}

/// The whole image's SHA-256 is the one given.
fn check_sha256(image: &std::path::Path, want: &str) -> Result<()> {
    let mut h = <sha2::Sha256 as sha2::Digest>::new();
    let full = Source::open(image, BmapChoice::None)?;
    full.stream(4 << 20, &mut |_, d| {
        sha2::Digest::update(&mut h, d);
        Ok(())
    })?;
    let got = format!("{:x}", sha2::Digest::finalize(h));
    if !got.eq_ignore_ascii_case(want) {
        bail!(
            "{}: SHA-256 is {got}, not the expected {want}",
            image.display()
        );
    }
    Ok(())
}

/// Every check on every device, and no disk given twice.
fn preflight_all(
    a: &WriteArgs,
    src: &Source,
    sector: Option<u32>,
) -> Result<Vec<preflight::Target>> {
    let mut targets: Vec<preflight::Target> = Vec::new();
    for d in &a.devices {
        let t = preflight::check(d, src.size, sector, a.allow_non_removable)?;
        if let Some(same) = targets.iter().find(|o| o.disk.devnum == t.disk.devnum) {
            return Err(Refused {
                verb: flash::preflight::WRITE,
                device: d.display().to_string(),
                refusal: flash::devices::Refusal {
                    check: "distinct",
                    detail: format!(
                        "the same disk as {} (device {})",
                        same.given.display(),
                        t.disk.devnum
                    ),
                    readable: false,
                },
            }
            .into());
        }
        targets.push(t);
    }
    Ok(targets)
}

/// A refusal of every device given, by the check `check`.
fn refused_all(a: &WriteArgs, check: &'static str, detail: String) -> anyhow::Error {
    Refused {
        verb: flash::preflight::WRITE,
        device: a
            .devices
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        refusal: flash::devices::Refusal {
            check,
            detail,
            readable: false,
        },
    }
    .into()
}

/// The mapping shown, and "yes" typed, unless --yes.
fn confirm(a: &WriteArgs, lines: &[String]) -> Result<()> {
    if a.prov.wanted() && a.yes && !a.quiet && !a.json {
        for l in lines {
            eprintln!("{l}");
        }
    }
    if a.yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(unconfirmed(&a.devices, "no terminal to ask on; pass --yes"));
    }
    for l in lines {
        eprintln!("{l}");
    }
    eprint!("Everything on these disks will be overwritten. Type yes to continue: ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if answer.trim() != "yes" {
        return Err(unconfirmed(&a.devices, "not confirmed"));
    }
    Ok(())
}

/// Every device opened (its identity re-checked) before any write, one
/// that cannot be opened failing alone; then the fake-capacity probe,
/// after every other check: a device that fails it refuses the whole run,
/// and every device is as before.
fn open_and_probe(
    targets: &[preflight::Target],
    probing: &[bool],
) -> Result<Vec<Result<Box<dyn BlockDevice>>>> {
    let opened: Vec<Result<Box<dyn BlockDevice>>> = targets
        .iter()
        .map(|t| {
            Device::open(t, true)
                .map(|d| Box::new(d) as Box<dyn BlockDevice>)
                .map_err(|e| NothingWritten(e).into())
        })
        .collect();
    let nonce = {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("the OS's randomness: {e}"))?;
        u64::from_le_bytes(b)
    };
    for ((o, t), &pr) in opened.iter().zip(targets).zip(probing) {
        if let (Ok(dev), true) = (o, pr) {
            flash::probe::probe(&**dev, nonce).map_err(|e| match e {
                flash::probe::ProbeError::Restore { .. } => anyhow::Error::from(e),
                e => Refused {
                    verb: flash::preflight::WRITE,
                    device: t.given.display().to_string(),
                    refusal: flash::devices::Refusal {
                        check: "real capacity",
                        detail: e.to_string(),
                        readable: false,
                    },
                }
                .into(),
            })?;
        }
    }
    Ok(opened)
}

/// Write every opened device and report.
fn write_ready(a: &WriteArgs, r: Ready) -> Result<ExitCode> {
    let Ready {
        src,
        targets,
        dirs,
        personals,
        probing,
        opened,
    } = r;
    let mut results: Vec<Option<Result<write::Outcome>>> = Vec::new();
    let mut sinks = Vec::new();
    let mut personals = personals.into_iter();
    let mut infos = Vec::new();
    for o in opened {
        let p = personals.next().expect("one plan per device");
        infos.push(p.as_ref().map(|p| Provisioned {
            host_key: p.host_key.clone(),
            machine_id: p.machine_id.clone(),
            state_size: p.state_size,
            files: p.identity_files,
        }));
        match o {
            Ok(s) => {
                sinks.push((s, p));
                results.push(None);
            }
            Err(e) => results.push(Some(Err(e))),
        }
    }
    let opts = write::Options::verifying(!a.no_verify);
    let signal = on_signals(&opts.stop)?;
    let bars = Bars::stoppable(a.quiet || a.json, opts.stop.clone());
    let mut outs = write::flash_personal(&src, sinks, &opts, &bars).into_iter();
    let mut reports = Vec::new();
    let mut worst: Option<anyhow::Error> = None;
    for (i, (t, r)) in targets.iter().zip(results).enumerate() {
        let device = Reported {
            target: t,
            identity: dirs[i].as_deref(),
            provisioned: infos[i].as_ref(),
            probed: probing[i],
        };
        match r.or_else(|| outs.next()).expect("one result per device") {
            Ok(o) => reports.push(device.done(&o, &bars)),
            Err(e) => {
                eprintln!("error: {e:#}");
                reports.push(serde_json::json!({ "device": t.disk.path, "ok": false, "error": format!("{e:#}") }));
                worst.get_or_insert(e);
            }
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
            if targets.len() == 1 { "the disk" } else { "the disks" }
        );
        return Ok(ExitCode::from(128 + sig as u8));
    }
    Ok(match worst {
        Some(e) => exit_code(&e),
        None => ExitCode::SUCCESS,
    })
}

/// What a device's provisioning made, for its report.
struct Provisioned {
    host_key: Option<formats::identity::HostKey>,
    machine_id: Option<String>,
    state_size: u64,
    files: usize,
}

/// One device's report: its lines, and its JSON object.
struct Reported<'a> {
    target: &'a preflight::Target,
    identity: Option<&'a std::path::Path>,
    provisioned: Option<&'a Provisioned>,
    probed: bool,
}

impl Reported<'_> {
    fn done(&self, o: &write::Outcome, bars: &Bars) -> serde_json::Value {
        let probe = if self.probed { "passed" } else { "not probed" };
        if let Some(p) = self.provisioned {
            bars.println(&format!(
                "flash: {}: {}state partition {} bytes{}{}",
                o.device,
                self.identity
                    .map(|d| format!("identity {} ({} files), ", d.display(), p.files))
                    .unwrap_or_default(),
                p.state_size,
                p.machine_id
                    .as_ref()
                    .map(|m| format!(", machine-id {m}"))
                    .unwrap_or_default(),
                p.host_key
                    .as_ref()
                    .map(|k| format!(", host key {} ({})", k.fingerprint, k.public.trim()))
                    .unwrap_or_default()
            ));
        }
        bars.println(&format!(
            "flash: {}: wrote {} bytes, skipped {}, verified {}, {:.1} s, {:.0} MB/s, fake-capacity probe {probe}{}",
            o.device,
            o.written,
            o.skipped,
            o.verified,
            o.seconds,
            o.mb_per_s,
            if o.gpt_moved {
                ", backup GPT moved to the end of the disk"
            } else {
                ""
            }
        ));
        let t = self.target;
        serde_json::json!({
            "device": o.device,
            "ok": true,
            "model": t.disk.model,
            "serial": t.disk.serial,
            "size": t.disk.size,
            "identity": self.identity,
            "machine_id": self.provisioned.and_then(|p| p.machine_id.clone()),
            "host_key": self.provisioned.and_then(|p| p.host_key.clone()),
            "state_size": self.provisioned.map(|p| p.state_size),
            "probe": probe,
            "report": o,
        })
    }
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
    let disks: Vec<_> = flash::devices::list()
        .context("reading /sys/block")?
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
