//! `forge`: the command line. Parses arguments, calls the library, prints
//! errors as a one-line context chain and exits non-zero on failure.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

mod cli;

#[derive(Parser)]
#[command(
    name = "forge",
    version,
    about = "Compile a NixOS system closure into bootable disk images"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show a system's closure: every store path with its NAR hash, size and references.
    Closure(ClosureArgs),
    /// Write an ext4 filesystem image from a directory tree.
    Ext4(cli::ext4::Ext4Args),
    /// Write a FAT32 volume image from a directory tree.
    Fat(cli::fat::FatArgs),
    /// Compile a system into a bootable disk image.
    Image(cli::image::ImageArgs),
    /// Read a raw disk image back: table, partitions, filesystems, boot entries.
    Inspect {
        image: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct ClosureArgs {
    /// Toplevel store path of the system, or a link to one (e.g. ./result).
    system: PathBuf,
    /// Physical root of the store: logical /nix/store/… lives at DIR/nix/store/….
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// nixpkgs closureInfo output (store-paths, registration) to take references from.
    #[arg(long, value_name = "DIR")]
    closure_info: Option<PathBuf>,
    /// Print the closure as JSON.
    #[arg(long)]
    json: bool,
    /// Print the registration text (`nix-store --load-db` input) instead.
    #[arg(long, conflicts_with = "json")]
    registration: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Closure(a) => closure(a),
        Cmd::Ext4(a) => cli::ext4::run(a),
        Cmd::Fat(a) => cli::fat::run(a),
        Cmd::Image(a) => cli::image::run(a),
        Cmd::Inspect { image, json } => {
            let r = forge::inspect::inspect(&image)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", forge::inspect::render(&r));
            }
            Ok(())
        }
    }
}

fn closure(a: ClosureArgs) -> Result<()> {
    let c = forge::closure::read(
        &a.system,
        &forge::closure::Options {
            root: a.root,
            closure_info: a.closure_info,
        },
    )
    .with_context(|| format!("reading the closure of {}", a.system.display()))?;
    for w in &c.warnings {
        eprintln!("warning: {w}");
    }
    if c.bootspec.synthesized {
        eprintln!(
            "note: {} has no boot.json; bootspec synthesized from kernel, initrd, init and kernel-params",
            c.toplevel
        );
    }
    let mut out = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer_pretty(&mut out, &c)?;
        writeln!(out)?;
    } else if a.registration {
        out.write_all(c.registration().as_bytes())?;
    } else {
        writeln!(out, "toplevel: {}", c.toplevel)?;
        writeln!(out, "system:   {}", c.bootspec.spec.system)?;
        writeln!(out, "label:    {}", c.bootspec.spec.label)?;
        writeln!(out, "kernel:   {}", c.bootspec.spec.kernel)?;
        writeln!(
            out,
            "closure:  {} paths, {} bytes (NAR), references from {:?}",
            c.paths.len(),
            c.total_nar_size(),
            c.source
        )?;
        for p in &c.paths {
            writeln!(
                out,
                "{}  {:>12}  {}",
                formats::nar::format_hash(&p.nar_hash),
                p.nar_size,
                p.path
            )?;
        }
    }
    Ok(())
}
