//! `forge vm`: arguments for making and upgrading VMs from one base.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;

use forge::vm::{self, Machine};

#[derive(clap::Args)]
pub struct VmArgs {
    /// The VM's name (its files are NAME-boot.qcow2, NAME-var.qcow2,
    /// NAME-identity.img and NAME.xml); or use --identities.
    name: Option<String>,
    /// The read-only base: a flat qcow2 image (e.g. `forge image SYSTEM
    /// --format raw-efi --state-size none -o base.qcow2`).
    #[arg(long)]
    base: PathBuf,
    /// The directory the VMs' files go to.
    #[arg(short, long)]
    output: PathBuf,
    /// The VM's identity directory (its files appear in /var/identity).
    #[arg(long, value_name = "DIR", conflicts_with = "identities")]
    identity: Option<PathBuf>,
    /// One sub-directory per VM, named after it: several VMs in one call.
    #[arg(long, value_name = "DIR")]
    identities: Option<PathBuf>,
    /// Size of each new /var disk (an existing one is never touched), 16M
    /// to 16T.
    #[arg(long, default_value = "1G", value_parser = var_size)]
    var_size: u64,
    /// Memory of the libvirt domain (at least 1M; whole MiB).
    #[arg(long, default_value = "1G", value_parser = memory)]
    memory: u64,
    /// vCPUs of the libvirt domain (1 to 4096).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=4096))]
    vcpus: u32,
    /// A libvirt network to attach (e.g. `default`); none by default.
    #[arg(long, value_name = "NAME")]
    network: Option<String>,
    /// Add a `hostname` file holding the VM's name (unless the identity has one).
    #[arg(long)]
    hostname: bool,
    /// Add an ed25519 SSH host key pair from the OS's randomness, kept across
    /// --upgrade (its fingerprint is reported).
    #[arg(long)]
    generate_host_keys: bool,
    /// Move existing VMs onto --base: a new boot overlay; the /var disk is
    /// kept, and so are the identity disk's files unless --identity or
    /// --identities gives new ones. Refused while QEMU holds the VM's disks.
    #[arg(long)]
    upgrade: bool,
    /// Replace existing boot overlays, identity disks and domains (never a
    /// /var disk).
    #[arg(long)]
    force: bool,
    /// Seed of the machine-ids and filesystem UUIDs.
    #[arg(long, default_value = "nixforge")]
    seed: String,
    /// UEFI firmware for the domain (default: libvirt's choice of OVMF).
    #[arg(long, value_name = "FILE")]
    loader: Option<PathBuf>,
    /// The domain's UEFI variable store.
    #[arg(long, value_name = "FILE")]
    nvram: Option<PathBuf>,
    /// Print what was made as JSON.
    #[arg(long)]
    json: bool,
}

fn var_size(s: &str) -> Result<u64, String> {
    let n = super::size_arg(s)?;
    if !(16 << 20..=16 << 40).contains(&n) {
        return Err(format!("{s:?}: a /var disk is 16M to 16T"));
    }
    Ok(n)
}

fn memory(s: &str) -> Result<u64, String> {
    let n = super::size_arg(s)?;
    if n < 1 << 20 || n % (1 << 20) != 0 {
        return Err(format!("{s:?}: whole MiB, at least 1M"));
    }
    Ok(n >> 20)
}

/// The VMs of `--identities DIR`: one per directory in it, by name; a
/// hidden one (`.git`…) is no machine, and is said to be skipped.
fn machines_in(d: &std::path::Path, stages: &super::Stages) -> Result<Vec<Machine>> {
    let mut v = Vec::new();
    let mut hidden = Vec::new();
    for e in std::fs::read_dir(d).with_context(|| format!("--identities {}", d.display()))? {
        let e = e.with_context(|| format!("--identities {}", d.display()))?;
        if !e.file_type()?.is_dir() {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            hidden.push(name);
        } else {
            v.push(Machine {
                name,
                identity: Some(e.path()),
            });
        }
    }
    if !hidden.is_empty() {
        hidden.sort();
        forge::Progress::stage(
            stages,
            &format!(
                "--identities {}: skipped hidden {}",
                d.display(),
                hidden.join(", ")
            ),
        );
    }
    v.sort_by(|x, y| x.name.cmp(&y.name));
    Ok(v)
}

pub fn run(a: VmArgs) -> Result<()> {
    let stages = super::Stages::new();
    let machines = match (&a.name, &a.identities) {
        (Some(_), Some(d)) => bail!("give a NAME or --identities {}, not both", d.display()),
        (None, None) => bail!("give the VM's NAME, or --identities DIR (one directory per VM)"),
        (Some(n), None) => vec![Machine {
            name: n.clone(),
            identity: a.identity.clone(),
        }],
        (None, Some(d)) => machines_in(d, &stages)?,
    };
    let opts = vm::Options {
        base: a.base,
        out: a.output,
        machines,
        var_size: a.var_size,
        memory_mib: a.memory,
        vcpus: a.vcpus,
        network: a.network,
        hostname: a.hostname,
        host_keys: a.generate_host_keys,
        upgrade: a.upgrade,
        force: a.force,
        seed: a.seed,
        epoch: super::epoch()?,
        loader: a.loader,
        nvram: a.nvram,
    };
    let r = vm::build(&opts, &stages)?;
    if a.json {
        crate::out!("{}", serde_json::to_string_pretty(&r)?)?;
    } else {
        for m in &r.machines {
            crate::out!(
                "{}: {} {} {} {}{}",
                m.name,
                m.boot.display(),
                m.var.display(),
                m.identity.display(),
                m.xml.display(),
                m.host_key
                    .as_ref()
                    .map(|k| format!(" (host key {})", k.fingerprint))
                    .unwrap_or_default()
            )?;
        }
    }
    Ok(())
}
