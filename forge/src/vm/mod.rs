//! Immutable VM fleets: from one read-only base (a flat qcow2), per VM a
//! boot overlay backed by the base, a /var disk (qcow2, ext4 labelled
//! `state`, created once, never rewritten), a small read-only identity
//! disk (a sparse raw image, ext4 labelled `identity`, mounted at
//! /var/identity; 0600 when it holds a private key; rewritten on every
//! upgrade, its files kept unless a new identity is given) and a libvirt domain
//! (`domain.rs`). Filesystems come from our ext4 writer, so zero ranges
//! are zero clusters or holes (the /var disk's journal, lazy, is not
//! written at all: a new file reads zeros) and a fresh VM's files take
//! about 230 KiB on the host.
//!
//! All outputs of a call are written unnamed and committed together at
//! the end, so a failure leaves nothing; the fleet directory is locked
//! for the whole run; an upgrade refuses disks that a running QEMU holds
//! (its image locks). A base with a state partition of its own is
//! refused: the guest would mount it as /var, and its writes would land
//! in the boot overlay that an upgrade replaces.

pub mod domain;
mod identity;

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::container::{Kind, Settings};
use crate::output::AtomicOutput;
use crate::Progress;
use domain::{Disk, Domain};
use formats::ext4::{self, Size, Slack};
use formats::identity::HostKey;
use formats::tree::Tree;

pub struct Machine {
    pub name: String,
    /// The identity directory (files as they are; generated ones added).
    pub identity: Option<PathBuf>,
}

pub struct Options {
    pub base: PathBuf,
    pub out: PathBuf,
    pub machines: Vec<Machine>,
    pub var_size: u64,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub network: Option<String>,
    /// A `hostname` file with the machine's name (unless it has one).
    pub hostname: bool,
    /// An ed25519 host key pair, kept across upgrades.
    pub host_keys: bool,
    /// Move existing VMs onto `base`: new boot overlay and identity disk,
    /// the /var disk untouched.
    pub upgrade: bool,
    /// Replace existing boot overlays, identity disks and domains (never
    /// a /var disk).
    pub force: bool,
    pub seed: String,
    pub epoch: u32,
    pub loader: Option<PathBuf>,
    pub nvram: Option<PathBuf>,
}

#[derive(serde::Serialize)]
pub struct MachineReport {
    pub name: String,
    pub boot: PathBuf,
    pub var: PathBuf,
    pub identity: PathBuf,
    pub xml: PathBuf,
    /// Whether the /var disk was there already (and left as it was).
    pub var_kept: bool,
    pub machine_id: Option<String>,
    pub host_key: Option<HostKey>,
    #[serde(skip)]
    pub domain: Domain,
}

#[derive(serde::Serialize)]
pub struct Report {
    pub base: PathBuf,
    pub base_size: u64,
    pub machines: Vec<MachineReport>,
}

/// Where one machine's files go.
struct Paths {
    boot: PathBuf,
    var: PathBuf,
    identity: PathBuf,
    xml: PathBuf,
}

fn paths(out: &Path, name: &str) -> Paths {
    Paths {
        boot: out.join(format!("{name}-boot.qcow2")),
        var: out.join(format!("{name}-var.qcow2")),
        identity: out.join(format!("{name}-identity.img")),
        xml: out.join(format!("{name}.xml")),
    }
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !ok {
        bail!("VM name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.' (no '/')");
    }
    Ok(())
}

/// The base's virtual size: a flat qcow2 image, whose table holds no
/// state partition of its own (the guest would mount that as /var, and
/// its writes would go into the boot overlay an upgrade replaces).
fn base_size(base: &Path) -> Result<u64> {
    let f = File::open(base).with_context(|| format!("--base {}", base.display()))?;
    let (head, size) = crate::unpack::qcow_head(&f, 1 << 20)
        .map_err(|e| anyhow::anyhow!("--base {}: not a flat qcow2 image ({e})", base.display()))?;
    for ss in [512u64, 4096] {
        let mut read = |o: u64, n: usize| -> std::io::Result<Vec<u8>> {
            o.checked_add(n as u64)
                .and_then(|e| head.get(o as usize..usize::try_from(e).ok()?))
                .map(<[u8]>::to_vec)
                .ok_or_else(|| std::io::Error::other("past the first MiB"))
        };
        let Ok(Some(gpt)) = formats::gpt::Gpt::parse(&mut read, ss, size) else {
            continue;
        };
        let var = formats::seed::parse_uuid(formats::gpt::types::VAR).expect("a GUID");
        if let Some((i, p)) = gpt
            .partitions
            .iter()
            .enumerate()
            .find(|(_, p)| p.type_guid == var)
        {
            bail!(
                "--base {}: partition {} ({:?}) is a state partition; a VM's /var is its own disk, so its base must have none (forge image --state-size none)",
                base.display(),
                i + 1,
                p.name
            );
        }
    }
    Ok(size)
}

/// `to` relative to the directory `from` (both absolute).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let a: Vec<_> = from.components().collect();
    let b: Vec<_> = to.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut r = PathBuf::new();
    for _ in common..a.len() {
        r.push("..");
    }
    for c in &b[common..] {
        r.push(c);
    }
    r
}

/// A disk holding a secret (a private host key) is made 0600.
fn ext4_disk(
    path: &Path,
    kind: Kind,
    tree: &Tree,
    opts: &ext4::Options,
    s: &Settings,
    private: bool,
) -> Result<AtomicOutput> {
    let plan = ext4::plan(tree, opts).with_context(|| format!("planning {}", path.display()))?;
    let mut out = if private {
        AtomicOutput::create_private(path)?
    } else {
        AtomicOutput::create(path)?
    };
    crate::container::write_image(&mut out, kind, s, plan.size_bytes(), plan.mapped(), |w| {
        plan.write(w, 0)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    })?;
    Ok(out)
}

/// Every machine's name and files checked before anything is made: a
/// valid name, named once; files there only with --upgrade or --force,
/// and with --upgrade, there; none held by a running QEMU.
fn check_machines(o: &Options, out_dir: &Path) -> Result<()> {
    if o.machines.is_empty() {
        bail!("no VM named: give NAME, or --identities DIR with one directory per VM");
    }
    let mut seen = std::collections::BTreeSet::new();
    for m in &o.machines {
        check_name(&m.name)?;
        if !seen.insert(&m.name) {
            bail!("VM {} is named twice", m.name);
        }
        let p = paths(out_dir, &m.name);
        let exists = [&p.boot, &p.identity, &p.xml, &p.var]
            .into_iter()
            .find(|f| f.exists());
        match exists {
            Some(f) if !o.upgrade && !o.force => bail!(
                "{}: exists; pass --upgrade to move VM {} onto a new base (its /var kept), or --force",
                f.display(),
                m.name
            ),
            None if o.upgrade => bail!(
                "VM {}: nothing to upgrade (no {} in {}); leave out --upgrade to make it",
                m.name,
                p.boot.file_name().unwrap_or_default().to_string_lossy(),
                out_dir.display()
            ),
            _ => {}
        }
        for f in [&p.boot, &p.var, &p.identity] {
            if crate::output::locked(f)? {
                bail!(
                    "{}: in use by a running VM (a process holds its image lock); stop VM {} first",
                    f.display(),
                    m.name
                );
            }
        }
    }
    Ok(())
}

/// Make (or upgrade) every machine; all outputs appear together or none.
/// The fleet directory is held for the whole run: a second run into it
/// waits, then sees what this one made.
pub fn build(o: &Options, progress: &dyn Progress) -> Result<Report> {
    let base =
        std::fs::canonicalize(&o.base).with_context(|| format!("--base {}", o.base.display()))?;
    let size = base_size(&base)?;
    let out_dir =
        std::fs::canonicalize(&o.out).with_context(|| format!("-o {}", o.out.display()))?;
    if !out_dir.is_dir() {
        bail!("-o {}: not a directory", o.out.display());
    }
    let held = crate::output::lock_for_run(&out_dir, || {
        progress.stage(&format!(
            "waiting for another forge run in {}",
            out_dir.display()
        ))
    })?;
    check_machines(o, &out_dir)?;
    let backing = relative(&out_dir, &base);
    let fleet = Fleet {
        o,
        base: &base,
        size,
        backing: backing.to_string_lossy().into_owned(),
        out_dir: &out_dir,
    };
    let mut outputs: Vec<AtomicOutput> = Vec::new();
    let mut reports = Vec::new();
    let bar = progress.items(&format!("VMs in {}", out_dir.display()), "VMs");
    if let Some(b) = &bar {
        b.total(o.machines.len() as u64);
    }
    for m in &o.machines {
        let r = fleet.machine(m, &mut outputs)?;
        if let Some(b) = &bar {
            b.add(1);
        }
        progress.stage(&format!(
            "VM {}: {}{}",
            m.name,
            if r.var_kept {
                "upgraded, /var kept"
            } else {
                "made"
            },
            r.host_key
                .as_ref()
                .map(|k| format!(", host key {}", k.fingerprint))
                .unwrap_or_default()
        ));
        reports.push(r);
    }
    if let Some(b) = &bar {
        b.done();
    }
    crate::output::commit_all(outputs, &held)?;
    Ok(Report {
        base,
        base_size: size,
        machines: reports,
    })
}

/// What every machine of one run shares.
struct Fleet<'a> {
    o: &'a Options,
    base: &'a Path,
    size: u64,
    /// The base, relative to the fleet directory.
    backing: String,
    out_dir: &'a Path,
}

impl Fleet<'_> {
    /// One machine's files, made unnamed into `outputs`.
    fn machine(&self, m: &Machine, outputs: &mut Vec<AtomicOutput>) -> Result<MachineReport> {
        let o = self.o;
        let p = paths(self.out_dir, &m.name);
        let seed = format!("{}:vm:{}", o.seed, m.name);
        let settings = Settings {
            unix_time: o.epoch,
            uuid: formats::seed::uuid(&seed, "image:uuid"),
            ..Settings::default()
        };
        let id = identity::of(o, m, &p.identity)?;
        let id_opts = ext4::Options::from_seed(
            &seed,
            "identity",
            Size::Auto {
                slack: Slack::bytes(1 << 20),
            },
            false,
            o.epoch,
        );
        let secret = formats::identity::holds_private_key(&id.tree);
        outputs.push(ext4_disk(
            &p.identity,
            Kind::Raw,
            &id.tree,
            &id_opts,
            &settings,
            secret,
        )?);
        // /var: created once.
        let var_kept = p.var.exists();
        if !var_kept {
            let mut var_opts =
                ext4::Options::from_seed(&seed, "state", Size::Fixed(o.var_size), true, o.epoch);
            // A new file reads zeros wherever nothing is written, so the
            // journal's blocks need not be (32 MiB of zeros per 1 GiB
            // disk, most of `forge vm`'s time); no stale transaction can
            // be there, so its sequence may come from the seed.
            let s = formats::seed::derive(&seed, "state:journal");
            var_opts.journal = ext4::Journal::Lazy {
                sequence: u32::from_le_bytes([s[0], s[1], s[2], s[3]]).max(1),
            };
            let empty = Tree::new(0o755);
            outputs.push(ext4_disk(
                &p.var,
                Kind::Qcow2,
                &empty,
                &var_opts,
                &settings,
                false,
            )?);
        }
        outputs.push(self.overlay(&p.boot)?);
        let domain = self.domain(m, &p);
        let mut xml = AtomicOutput::create(&p.xml)?;
        xml.file()
            .write_all(domain.xml().as_bytes())
            .with_context(|| format!("writing {}", p.xml.display()))?;
        outputs.push(xml);
        Ok(MachineReport {
            name: m.name.clone(),
            machine_id: formats::identity::text_of(&id.tree, b"machine-id"),
            host_key: id.host_key,
            boot: p.boot,
            var: p.var,
            identity: p.identity,
            xml: p.xml,
            var_kept,
            domain,
        })
    }

    /// A boot overlay backed by the base.
    fn overlay(&self, path: &Path) -> Result<AtomicOutput> {
        let (pieces, len) = formats::qcow2::overlay(self.size, &self.backing, "qcow2")
            .map_err(|e| anyhow::anyhow!("--base {}: {e}", self.base.display()))?;
        let mut boot = AtomicOutput::create(path)?;
        boot.file().set_len(len)?;
        for (at, b) in pieces {
            boot.file()
                .write_all_at(&b, at)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(boot)
    }

    fn domain(&self, m: &Machine, p: &Paths) -> Domain {
        let disk = |file: &Path, format, read_only, target: &str| Disk {
            file: file.to_owned(),
            format,
            backing: None,
            read_only,
            target: target.into(),
        };
        Domain {
            name: m.name.clone(),
            memory_mib: self.o.memory_mib,
            vcpus: self.o.vcpus,
            disks: vec![
                Disk {
                    backing: Some((self.base.to_owned(), "qcow2")),
                    ..disk(&p.boot, "qcow2", false, "vda")
                },
                disk(&p.var, "qcow2", false, "vdb"),
                disk(&p.identity, "raw", true, "vdc"),
            ],
            network: self.o.network.clone(),
            loader: self.o.loader.clone(),
            nvram: self.o.nvram.clone(),
            secure_boot: false,
        }
    }
}
