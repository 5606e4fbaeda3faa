//! `forge`: the command line. Parses arguments, calls the library, prints
//! errors as a one-line context chain and exits non-zero on failure.

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

mod cli;

#[derive(Parser)]
#[command(
    name = "forge",
    version,
    about = "Compile a NixOS system closure into bootable disk images",
    after_help = "\
Examples:
  forge image ./result --format raw-efi -o disk.img
  forge image ./result --format raw-efi --disk-size 8G -o vm.img
  forge image ./result --format sd-aarch64 --firmware ./pi-firmware -o nixos.img.zst
  forge image ./result --format raw-efi --state-size none -o base.qcow2
  forge image ./result --uki --slots 2 --version 1 -o ab.img
  forge update ./result --uki --version 2 --source https://updates.example -o publish/
  forge image ./result -o nixos.ova
  forge lxc ./result -o lxc/
  forge vm --base base.qcow2 --identities machines/ --generate-host-keys -o vms/
  forge inspect nixos.img.zst
  forge closure ./result --json

Outputs appear whole or not at all: an image with its IMAGE.bmap and
IMAGE.layout.json, renamed into place together; an interrupted run
leaves nothing. Every UUID, GUID and timestamp derives from the inputs,
--seed and SOURCE_DATE_EPOCH.

Exit status: 0 done, 1 failed (one line on stderr says why), 2 bad arguments"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// No stage lines or progress bars (warnings and errors are still
    /// printed). On a terminal long steps show a bar; piped, a line per
    /// stage.
    #[arg(long, global = true)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show a system's closure: every store path with its NAR hash, size and references.
    Closure(ClosureArgs),
    /// Write an ext4 filesystem image from a directory tree.
    Ext4(cli::ext4::Ext4Args),
    /// Write an EROFS (read-only) filesystem image from a directory tree.
    Erofs(cli::erofs::ErofsArgs),
    /// Write a FAT32 volume image from a directory tree.
    Fat(cli::fat::FatArgs),
    /// Compile a system into a bootable disk image.
    Image(cli::image::ImageArgs),
    /// Write a version's update artefacts for `forge image --slots 2`
    /// machines: the root filesystem (and verity) as partition images, the
    /// UKI, SHA256SUMS, and systemd-sysupdate's transfer definitions.
    Update(cli::update::UpdateArgs),
    /// Sign an image built without keys (keys stay out of the Nix store):
    /// systemd-boot and the UKIs for Secure Boot, the root hash into its
    /// root-verity-sig partition; every other byte unchanged.
    Sign(cli::sign::SignArgs),
    /// Make an OCI container image of any store path's closure: a layer
    /// per store path, stable digests; a layout directory or a .tar archive.
    Oci(cli::oci::OciArgs),
    /// Make an LXC image of a system (Incus, LXD, Proxmox): rootfs.tar.xz
    /// and metadata.tar.xz.
    Lxc(cli::lxc::LxcArgs),
    /// Make VMs from one read-only base: a boot overlay, a /var disk, an
    /// identity disk and a libvirt domain each; --upgrade keeps /var.
    Vm(cli::vm::VmArgs),
    /// Print the shell completion script for SHELL.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write a man page per command (forge.1, forge-image.1, …) into DIR.
    Man {
        /// The directory to write the pages into.
        dir: PathBuf,
    },
    /// Read a disk image back (raw, .zst, a VM disk or a block device): table,
    /// partitions, filesystems, boot entries; warns when it is shorter than
    /// its table or its layout manifest is another image's.
    Inspect {
        /// A disk image (raw, .zst, .xz, .gz, .bz2, .qcow2, .vhd, .vhdx,
        /// .vmdk, .ova, a GCE .tar.gz) or a block device.
        image: PathBuf,
        /// Print the layout as JSON (the layout manifest's fields).
        #[arg(long)]
        json: bool,
        /// Check the dm-verity root whole (its hash tree made again, the
        /// GUIDs, the root hash's signature); exit 1 naming what differs.
        #[arg(long)]
        verify: bool,
        /// A Nix public key (NAME:BASE64) IMAGE.sig must verify with (over
        /// the layout manifest beside the image); repeatable. Exit 1 when none does.
        #[arg(long, value_name = "PUBKEY")]
        trust: Vec<PathBuf>,
    },
}

#[derive(clap::Args)]
struct ClosureArgs {
    /// Toplevel store path of the system, or a link to one (e.g. ./result).
    system: PathBuf,
    #[command(flatten)]
    src: cli::ClosureSource,
    /// Print the closure as JSON.
    #[arg(long)]
    json: bool,
    /// Print the registration text (`nix-store --load-db` input) instead.
    #[arg(long, conflicts_with = "json")]
    registration: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::stages::set_quiet(cli.quiet);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that stopped early (`forge closure … | head`) is not
        // a failure of forge's: stop quietly, as `cat` would.
        Err(e) if broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Closure(a) => closure(a),
        Cmd::Ext4(a) => cli::ext4::run(a),
        Cmd::Erofs(a) => cli::erofs::run(a),
        Cmd::Fat(a) => cli::fat::run(a),
        Cmd::Image(a) => cli::image::run(a),
        Cmd::Vm(a) => cli::vm::run(a),
        Cmd::Oci(a) => cli::oci::run(a),
        Cmd::Lxc(a) => cli::lxc::run(a),
        Cmd::Sign(a) => cli::sign::run(a),
        Cmd::Update(a) => cli::update::run(a),
        Cmd::Completions { shell } => Ok(cli::docs::completions(Cli::command(), shell)?),
        Cmd::Man { dir } => {
            cli::docs::man_pages(Cli::command(), &dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?;
            Ok(())
        }
        Cmd::Inspect {
            image,
            json,
            verify,
            trust,
        } => {
            let mut r = forge::inspect::inspect(&image)?;
            let trusted: Vec<_> = trust
                .iter()
                .map(|p| forge::sign::manifest::load_public(p))
                .collect::<Result<_>>()?;
            r.signature = forge::sign::manifest::describe(&image, &trusted)?;
            if verify {
                r.verified = Some(forge::verity_check::check(&image, &r)?);
            }
            if json {
                crate::out!("{}", serde_json::to_string_pretty(&r)?)?;
            } else {
                std::io::stdout()
                    .lock()
                    .write_all(forge::inspect::render(&r).as_bytes())?;
            }
            Ok(())
        }
    }
}

fn closure(a: ClosureArgs) -> Result<()> {
    let c = forge::closure::read(
        &a.system,
        &forge::closure::Options {
            root: a.src.root,
            closure_info: a.src.closure_info,
            verify_nar: a.src.verify_nar,
            sizes_later: false,
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
