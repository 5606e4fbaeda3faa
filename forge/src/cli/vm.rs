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
    /// Size of each new /var disk (an existing one is never touched).
    #[arg(long, default_value = "1G")]
    var_size: String,
    /// Memory of the libvirt domain.
    #[arg(long, default_value = "1G")]
    memory: String,
    /// vCPUs of the libvirt domain.
    #[arg(long, default_value_t = 2)]
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
    /// Move existing VMs onto --base: new boot overlay and identity disk; the
    /// /var disk is kept. Refused while QEMU holds the VM's disks.
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

pub fn run(a: VmArgs) -> Result<()> {
    let bytes = |s: &str, what: &str| super::parse_bytes(s).with_context(|| format!("{what} {s}"));
    let machines = match (&a.name, &a.identities) {
        (Some(_), Some(d)) => bail!("give a NAME or --identities {}, not both", d.display()),
        (None, None) => bail!("give the VM's NAME, or --identities DIR (one directory per VM)"),
        (Some(n), None) => vec![Machine {
            name: n.clone(),
            identity: a.identity.clone(),
        }],
        (None, Some(d)) => {
            let mut v = Vec::new();
            for e in
                std::fs::read_dir(d).with_context(|| format!("--identities {}", d.display()))?
            {
                let e = e.with_context(|| format!("--identities {}", d.display()))?;
                if e.file_type()?.is_dir() {
                    v.push(Machine {
                        name: e.file_name().to_string_lossy().into_owned(),
                        identity: Some(e.path()),
                    });
                }
            }
            v.sort_by(|x, y| x.name.cmp(&y.name));
            v
        }
    };
    let opts = vm::Options {
        base: a.base,
        out: a.output,
        machines,
        var_size: bytes(&a.var_size, "--var-size")?,
        memory_mib: bytes(&a.memory, "--memory")? >> 20,
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
    let r = vm::build(&opts, &super::Stages::new())?;
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
