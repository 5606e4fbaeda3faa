//! Immutable VM fleets: from one read-only base (a flat qcow2), per VM a
//! boot overlay backed by the base, a /var disk (qcow2, ext4 labelled
//! `state`, created once, never rewritten), a small read-only identity
//! disk (a sparse raw image, ext4 labelled `identity`, mounted at
//! /var/identity; regenerated on every upgrade) and a libvirt domain
//! (`domain.rs`). Filesystems come from our ext4 writer, so zero ranges
//! (the journal) are zero clusters or holes and a fresh VM's files take
//! about 230 KiB on the host.
//!
//! All outputs of a call are written unnamed and committed together at
//! the end, so a failure leaves nothing; an upgrade refuses disks that a
//! running QEMU holds (its image locks).

pub mod domain;

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
use formats::identity::{self, Generate, HostKey, MachineId};
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

/// The base's virtual size: a flat qcow2 image.
fn base_size(base: &Path) -> Result<u64> {
    let f = File::open(base).with_context(|| format!("--base {}", base.display()))?;
    let mut read = |o: u64, n: usize| -> std::io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        f.read_exact_at(&mut b, o)?;
        Ok(b)
    };
    let r = formats::qcow2::Reader::open(&mut read)
        .map_err(|e| anyhow::anyhow!("--base {}: not a flat qcow2 image ({e})", base.display()))?;
    Ok(r.size)
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

/// Whether a process (QEMU) holds an image lock on `path`: QEMU takes
/// open-file-description locks on bytes 100..300 of every image it uses.
fn locked(path: &Path) -> Result<bool> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| path.display().to_string()),
    };
    let mut l = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 100,
        l_len: 200,
        l_pid: 0,
    };
    nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_OFD_GETLK(&mut l))
        .with_context(|| format!("checking the locks of {}", path.display()))?;
    Ok(l.l_type != libc::F_UNLCK as i16)
}

/// The host key pair inside an existing identity disk, if any.
fn old_host_key(disk: &Path) -> Option<(Vec<u8>, String)> {
    let (f, _) = crate::unpack::open(disk).ok()?;
    let fs = ext4_view::Ext4::load(Box::new(crate::inspect::Region { f, off: 0 })).ok()?;
    let private = fs.read("/ssh_host_ed25519_key").ok()?;
    let public = String::from_utf8(fs.read("/ssh_host_ed25519_key.pub").ok()?).ok()?;
    Some((private, public))
}

/// An ext4 filesystem of `tree` into an output in container `kind`.
fn ext4_disk(
    path: &Path,
    kind: Kind,
    tree: &Tree,
    opts: &ext4::Options,
    s: &Settings,
) -> Result<AtomicOutput> {
    let plan = ext4::plan(tree, opts).with_context(|| format!("planning {}", path.display()))?;
    let mut out = AtomicOutput::create(path)?;
    out.write_image_as(kind, s, plan.size_bytes(), plan.mapped(), |w| {
        plan.write(w, 0)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    })?;
    Ok(out)
}

fn text_of(tree: &Tree, name: &[u8]) -> Option<String> {
    use formats::tree::{Content, Kind as K, ROOT};
    let K::Dir { children } = &tree.nodes[ROOT].kind else {
        return None;
    };
    match &tree.nodes[*children.get(name)?].kind {
        K::File {
            content: Content::Bytes(b),
            ..
        } => Some(String::from_utf8_lossy(b).trim().to_string()),
        K::File {
            content: Content::Host { path, .. },
            ..
        } => std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim().to_string()),
        _ => None,
    }
}

/// Make (or upgrade) every machine; all outputs appear together or none.
pub fn build(o: &Options, progress: &dyn Progress) -> Result<Report> {
    let base =
        std::fs::canonicalize(&o.base).with_context(|| format!("--base {}", o.base.display()))?;
    let size = base_size(&base)?;
    let out_dir =
        std::fs::canonicalize(&o.out).with_context(|| format!("-o {}", o.out.display()))?;
    if !out_dir.is_dir() {
        bail!("-o {}: not a directory", o.out.display());
    }
    if o.machines.is_empty() {
        bail!("no VM named: give NAME, or --identities DIR with one directory per VM");
    }
    let mut seen = std::collections::BTreeSet::new();
    for m in &o.machines {
        check_name(&m.name)?;
        if !seen.insert(&m.name) {
            bail!("VM {} is named twice", m.name);
        }
        let p = paths(&out_dir, &m.name);
        let exists = [&p.boot, &p.identity, &p.xml, &p.var]
            .into_iter()
            .find(|f| f.exists());
        if let Some(f) = exists {
            if !o.upgrade && !o.force {
                bail!("{}: exists; pass --upgrade to move VM {} onto a new base (its /var kept), or --force", f.display(), m.name);
            }
        }
        for f in [&p.boot, &p.var, &p.identity] {
            if locked(f)? {
                bail!(
                    "{}: in use by a running VM (a process holds its image lock); stop VM {} first",
                    f.display(),
                    m.name
                );
            }
        }
    }
    let backing = relative(&out_dir, &base);
    let backing = backing.to_string_lossy().into_owned();
    let mut outputs: Vec<AtomicOutput> = Vec::new();
    let mut reports = Vec::new();
    for m in &o.machines {
        let p = paths(&out_dir, &m.name);
        let seed = format!("{}:vm:{}", o.seed, m.name);
        let settings = Settings {
            unix_time: o.epoch,
            uuid: formats::seed::uuid(&seed, "image:uuid"),
            ..Settings::default()
        };
        // Identity: the directory, plus what was asked for. A host key
        // generated before stays (also without --generate-host-keys),
        // unless the directory now brings its own.
        let own_key = m
            .identity
            .as_ref()
            .is_some_and(|d| d.join("ssh_host_ed25519_key").exists());
        let kept = if own_key {
            None
        } else {
            old_host_key(&p.identity)
        };
        let gen = Generate {
            hostname: o.hostname.then(|| m.name.clone()),
            machine_id: Some(MachineId::Seeded {
                seed: o.seed.clone(),
                purpose: format!("vm:{}", m.name),
            }),
            host_key: o.host_keys || kept.is_some(),
            keep_host_key: kept,
        };
        let id = identity::build(m.identity.as_deref(), &gen)
            .with_context(|| format!("the identity of VM {}", m.name))?;
        let id_opts = ext4::Options::from_seed(
            &seed,
            "identity",
            Size::Auto {
                slack: Slack::bytes(1 << 20),
            },
            false,
            o.epoch,
        );
        outputs.push(ext4_disk(
            &p.identity,
            Kind::Raw,
            &id.tree,
            &id_opts,
            &settings,
        )?);
        // /var: created once.
        let var_kept = p.var.exists();
        if !var_kept {
            let var_opts =
                ext4::Options::from_seed(&seed, "state", Size::Fixed(o.var_size), true, o.epoch);
            outputs.push(ext4_disk(
                &p.var,
                Kind::Qcow2,
                &Tree::new(0o755),
                &var_opts,
                &settings,
            )?);
        }
        // The boot overlay.
        let (pieces, len) = formats::qcow2::overlay(size, &backing, "qcow2")
            .map_err(|e| anyhow::anyhow!("--base {}: {e}", base.display()))?;
        let mut boot = AtomicOutput::create(&p.boot)?;
        boot.file().set_len(len)?;
        for (at, b) in pieces {
            boot.file()
                .write_all_at(&b, at)
                .with_context(|| format!("writing {}", p.boot.display()))?;
        }
        outputs.push(boot);
        let domain = Domain {
            name: m.name.clone(),
            memory_mib: o.memory_mib,
            vcpus: o.vcpus,
            disks: vec![
                Disk {
                    file: p.boot.clone(),
                    format: "qcow2",
                    backing: Some((base.clone(), "qcow2")),
                    read_only: false,
                    target: "vda".into(),
                },
                Disk {
                    file: p.var.clone(),
                    format: "qcow2",
                    backing: None,
                    read_only: false,
                    target: "vdb".into(),
                },
                Disk {
                    file: p.identity.clone(),
                    format: "raw",
                    backing: None,
                    read_only: true,
                    target: "vdc".into(),
                },
            ],
            network: o.network.clone(),
            loader: o.loader.clone(),
            nvram: o.nvram.clone(),
            secure_boot: false,
        };
        let mut xml = AtomicOutput::create(&p.xml)?;
        xml.file()
            .write_all(domain.xml().as_bytes())
            .with_context(|| format!("writing {}", p.xml.display()))?;
        outputs.push(xml);
        progress.stage(&format!(
            "VM {}: {}{}",
            m.name,
            if var_kept {
                "upgraded, /var kept"
            } else {
                "made"
            },
            id.host_key
                .as_ref()
                .map(|k| format!(", host key {}", k.fingerprint))
                .unwrap_or_default()
        ));
        reports.push(MachineReport {
            name: m.name.clone(),
            machine_id: text_of(&id.tree, b"machine-id"),
            host_key: id.host_key,
            boot: p.boot,
            var: p.var,
            identity: p.identity,
            xml: p.xml,
            var_kept,
            domain,
        });
    }
    // All the VMs' files, under one hold of the directory's lock.
    crate::output::commit_all(outputs)?;
    Ok(Report {
        base,
        base_size: size,
        machines: reports,
    })
}
