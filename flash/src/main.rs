//! `flash`: the command line. Parses arguments, calls the library, prints
//! errors as a one-line context chain and exits non-zero on failure.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "flash",
    version,
    about = "Write nixforge images to block devices, safely"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List candidate target disks and why any would be refused.
    List {
        /// Also show system and busy disks (marked).
        #[arg(long)]
        all: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::List { all, json } => {
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
                println!(
                    "{}{mark}  {:.1} GiB  {} {}  {}  sector {}  partitions: {}",
                    d.path.display(),
                    d.size as f64 / (1u64 << 30) as f64,
                    d.transport,
                    if d.model.is_empty() { "-" } else { &d.model },
                    if d.serial.is_empty() { "-" } else { &d.serial },
                    d.logical_sector_size,
                    if d.partitions.is_empty() {
                        "none".into()
                    } else {
                        d.partitions.join(",")
                    },
                );
                for r in &d.refusals {
                    println!("    refused: {r}");
                }
            }
            Ok(())
        }
    }
}
