//! `flash station`: the library's [`flash::station`] with a row per card
//! (indicatif on a terminal, plain lines otherwise) and one JSON line per
//! card appended to `--report`.

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use flash::preflight::Host;
use flash::provision::Provisioning;
use flash::session::{self, Request};
use flash::station::{self, Event, Station};
use flash::write;

use super::table::Table;
use super::{bmap_choice, on_signals, report, TrustArgs};

/// Flash every block device that appears after the start, each with the
/// next unused identity, several at once; Ctrl-C stops (cards in flight
/// are stopped, their tables wiped).
#[derive(clap::Args)]
pub struct StationArgs {
    /// Image: a file or an http:// or https:// URL, read for each card.
    image: PathBuf,
    /// A directory of identity directories, one per card, taken in name
    /// order (those the report already gave to a card are skipped).
    #[arg(long, value_name = "DIR")]
    identities: PathBuf,
    /// Only devices whose name (sdb, loop3), /dev/disk/by-id name or card
    /// key (serial, mmc:CID, usb:SERIAL, loop:BACKING-FILE) matches GLOB
    /// (* and ?); repeatable. Auto-flashing is only safe on a reader
    /// chosen for it.
    #[arg(long = "match", value_name = "GLOB")]
    matches: Vec<String>,
    /// Stop once N cards are written.
    #[arg(long, value_name = "N")]
    count: Option<usize>,
    /// Append one JSON line per card to FILE; cards it lists as written
    /// (by card key, see --match) are not flashed again.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Flash a card the report already lists as written.
    #[arg(long)]
    reflash: bool,
    /// Do not ask once at the start.
    #[arg(long)]
    yes: bool,
    /// Allow disks that are not marked removable.
    #[arg(long)]
    allow_non_removable: bool,
    /// Skip reading each card back.
    #[arg(long)]
    no_verify: bool,
    /// Grow each card's state partition to its end.
    #[arg(long)]
    fill: bool,
    /// Generate an ed25519 SSH host key per card (reported).
    #[arg(long)]
    generate_host_keys: bool,
    /// Do not probe cards for fake capacity.
    #[arg(long)]
    no_probe: bool,
    /// Block map to use (default: beside the image).
    #[arg(long, conflicts_with = "no_bmap")]
    bmap: Option<PathBuf>,
    /// Write every byte of the image.
    #[arg(long)]
    no_bmap: bool,
    #[command(flatten)]
    trust: TrustArgs,
}

/// Cards the report lists as written: card → identity name.
fn provisioned(report: Option<&Path>) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let Some(p) = report else { return Ok(out) };
    let text = match std::fs::read_to_string(p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| p.display().to_string()),
    };
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}: line {}: not JSON", p.display(), i + 1))?;
        if let (Some(true), Some(card)) = (v["ok"].as_bool(), v["card"].as_str()) {
            let id = v["identity"]
                .as_str()
                .map(|s| s.rsplit('/').next().unwrap_or(s));
            out.insert(card.to_string(), id.unwrap_or_default().to_string());
        }
    }
    Ok(out)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn run(a: StationArgs) -> Result<ExitCode> {
    let request = Request {
        image: a.image.clone(),
        bmap: bmap_choice(a.bmap.clone(), a.no_bmap),
        allow_non_removable: a.allow_non_removable,
        provisioning: Provisioning {
            generate_host_keys: a.generate_host_keys,
            fill: a.fill,
            no_probe: a.no_probe,
            ..Provisioning::default()
        },
        trust: a.trust.load()?,
        ..Request::default()
    };
    // The image checked once before any card: a bad one stops here.
    let (src, signed, _) = session::source(&request).map_err(session::nothing_written)?;
    let image = serde_json::json!({
        "image": a.image,
        "size": src.size,
        "bmap_sha256": src.bmap_sha256,
        "signed": signed,
    });
    drop(src);
    let st = Station {
        request,
        identities: a.identities.clone(),
        matches: a.matches.clone(),
        count: a.count,
        reflash: a.reflash,
        provisioned: provisioned(a.report.as_deref()).map_err(session::nothing_written)?,
    };
    let what = if a.matches.is_empty() {
        "every new device".to_string()
    } else {
        format!("every new device matching {}", a.matches.join(" or "))
    };
    confirm_once(&a, &what)?;
    let mut out = open_report(a.report.as_deref())?;
    let opts = write::Options::verifying(!a.no_verify);
    let signal = on_signals(&opts.stop)?;
    let bars = Table::new(opts.stop.clone());
    let report = Mutex::new(out.as_mut());
    let line = |v: serde_json::Value| {
        if let Some(f) = report.lock().expect("not poisoned").as_mut() {
            let _ = writeln!(f, "{v}").and_then(|_| f.flush());
        }
    };
    let on = |e: Event| shown(e, &bars, &line, &image);
    eprintln!(
        "flash station: waiting for {what} (devices present now are never written); Ctrl-C stops"
    );
    let n = station::run(&st, &Host::default(), &opts, &bars, &on);
    bars.finish();
    let n = n?;
    eprintln!(
        "flash station: {n} card{} written",
        if n == 1 { "" } else { "s" }
    );
    let sig = signal.load(Ordering::Relaxed);
    Ok(if sig != 0 {
        ExitCode::from(128 + sig as u8)
    } else {
        ExitCode::SUCCESS
    })
}

/// Without `--yes`, one question at the start (never per card).
fn confirm_once(a: &StationArgs, what: &str) -> Result<()> {
    if a.yes {
        return Ok(());
    }
    let refuse = |why: &str| session::nothing_written(anyhow::anyhow!("flash station: {why}"));
    if !std::io::stdin().is_terminal() {
        return Err(refuse("no terminal to ask on; pass --yes"));
    }
    eprint!(
        "flash station: {what} will be overwritten with {} and the next identity of {}. Type yes: ",
        a.image.display(),
        a.identities.display()
    );
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if answer.trim() != "yes" {
        return Err(refuse("not confirmed"));
    }
    Ok(())
}

/// `--report FILE`, opened to append one line per card.
fn open_report(p: Option<&Path>) -> Result<Option<std::fs::File>> {
    p.map(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .with_context(|| p.display().to_string())
    })
    .transpose()
}

/// An event as a line above the rows and a JSON line in the report.
fn shown(e: Event, bars: &Table, line: &dyn Fn(serde_json::Value), image: &serde_json::Value) {
    let base = |dev: &Path, card: &str| serde_json::json!({ "device": dev, "card": card, "image": image, "time": now() });
    match e {
        Event::Skipped { disk, card, why } => {
            bars.println(&format!(
                "flash station: {}: skipped: {why}",
                disk.path.display()
            ));
            let mut v = base(&disk.path, card);
            v["ok"] = false.into();
            v["skipped"] = why.into();
            line(v);
        }
        Event::Started { disk, identity } => {
            bars.println(&format!(
                "flash station: {}: flashing with identity {}",
                disk.path.display(),
                identity.display()
            ));
        }
        Event::Failed {
            disk,
            card,
            identity,
            error,
        } => {
            bars.println(&format!(
                "flash station: {}: {error:#}",
                disk.path.display()
            ));
            let mut v = base(&disk.path, card);
            v["ok"] = false.into();
            v["identity"] = identity.display().to_string().into();
            v["refused"] = (session::exit_code(&error) == 2).into();
            v["error"] = format!("{error:#}").into();
            line(v);
        }
        Event::Written { card, written } => {
            let dev = written.target.disk.path.clone();
            let mut v = match &written.result {
                Ok(o) => report::done(&written, o, None, &|l| bars.println(l)),
                Err(e) => {
                    bars.println(&format!("flash station: {}: {e:#}", dev.display()));
                    serde_json::json!({ "ok": false, "identity": written.identity, "error": format!("{e:#}") })
                }
            };
            for (k, x) in base(&dev, card).as_object().expect("an object") {
                v[k] = x.clone();
            }
            line(v);
        }
    }
}
