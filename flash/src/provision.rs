//! Provisioning at the bench: which identity goes to which device, each
//! device's own bytes (identity, a state partition that fills it), and the
//! fake-capacity probe. All decided, shown and checked before any write
//! (the binary's `--identity`, `--fill`… options fill [`Provisioning`]).

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

use crate::personal::{self, Manifest, Personal, Request};
use crate::preflight::Target;
use crate::refusal::{Check, Refused};

/// How each device gets its own bytes, and whether it is probed.
#[derive(Debug, Clone, Default)]
pub struct Provisioning {
    /// `DIR` for the one device, or `DEV=DIR` (`DEV=none`) per device:
    /// DEV a path or a serial number.
    pub identity: Vec<String>,
    /// One identity directory per device, in name order.
    pub identities: Option<PathBuf>,
    /// One `identity` for several devices, on purpose.
    pub same_identity: bool,
    pub hostname: Option<String>,
    pub generate_host_keys: bool,
    /// Grow the state partition to the end of each device.
    pub fill: bool,
    /// Probe disks not marked removable too.
    pub probe: bool,
    pub no_probe: bool,
}

impl Provisioning {
    pub fn wanted(&self) -> bool {
        !self.identity.is_empty()
            || self.identities.is_some()
            || self.hostname.is_some()
            || self.generate_host_keys
            || self.fill
    }
}

/// Which device matches DEV: the same disk (a path), or its serial.
fn matches(t: &Target, dev: &str) -> bool {
    if !t.disk.serial.is_empty() && t.disk.serial == dev {
        return true;
    }
    let p = Path::new(dev);
    p == t.given || p == t.disk.path || std::fs::canonicalize(p).is_ok_and(|c| c == t.disk.path)
}

/// The identity directory of each device (in the devices' order), and
/// notes for the mapping (hidden entries of --identities skipped).
pub fn assign(a: &Provisioning, targets: &[Target]) -> Result<(Vec<Option<PathBuf>>, Vec<String>)> {
    let (mut out, none, plain) = named(a, targets)?;
    let mut notes = Vec::new();
    let free: Vec<usize> = (0..targets.len())
        .filter(|&i| out[i].is_none() && !none[i])
        .collect();
    if let Some(dir) = &a.identities {
        let (subs, hidden) = identity_dirs(dir)?;
        if !hidden.is_empty() {
            notes.push(format!(
                "--identities {}: skipped hidden {}",
                dir.display(),
                hidden.join(", ")
            ));
        }
        if subs.len() != free.len() {
            let extra = subs
                .get(free.len()..)
                .map(|x| {
                    let names: Vec<String> = x.iter().map(|p| name_of(p)).collect();
                    format!(" (left over: {})", names.join(", "))
                })
                .unwrap_or_default();
            bail!(
                "--identities {}: {} identities for {} devices{extra}; one each (or DEV=DIR for those that get one)",
                dir.display(),
                subs.len(),
                free.len()
            );
        }
        for (i, s) in free.iter().zip(subs) {
            out[*i] = Some(s);
        }
    } else {
        unnamed(a, targets, &mut out, &free, &plain)?;
    }
    distinct(&out, targets, a.same_identity)?;
    if a.hostname.is_some() && targets.len() > 1 {
        bail!("--hostname names one machine; for several devices put a hostname file in each identity");
    }
    Ok((out, notes))
}

/// The identities given as DEV=DIR (or DEV=none), by device; and the
/// ones given without DEV=.
#[allow(clippy::type_complexity)]
fn named(
    a: &Provisioning,
    targets: &[Target],
) -> Result<(Vec<Option<PathBuf>>, Vec<bool>, Vec<PathBuf>)> {
    let mut out: Vec<Option<PathBuf>> = vec![None; targets.len()];
    let mut none = vec![false; targets.len()];
    let mut plain = Vec::new();
    for spec in &a.identity {
        match spec.split_once('=') {
            Some((dev, dir)) => {
                let Some(i) = targets.iter().position(|t| matches(t, dev)) else {
                    bail!("--identity {spec}: {dev} is none of the devices given (a path or a serial)");
                };
                if out[i].is_some() || none[i] {
                    bail!(
                        "--identity {spec}: {} already has an identity",
                        targets[i].given.display()
                    );
                }
                if dir == "none" {
                    none[i] = true;
                } else {
                    out[i] = Some(PathBuf::from(dir));
                }
            }
            None => plain.push(PathBuf::from(spec)),
        }
    }
    Ok((out, none, plain))
}

/// `--identity DIR` without DEV=: one directory for the devices left
/// (several only with --same-identity); none while others have one is
/// refused unless said with DEV=none.
fn unnamed(
    a: &Provisioning,
    targets: &[Target],
    out: &mut [Option<PathBuf>],
    free: &[usize],
    plain: &[PathBuf],
) -> Result<()> {
    if let [one] = plain {
        if free.len() > 1 && !a.same_identity {
            bail!(
                "--identity {}: one identity for {} devices; give DEV=DIR per device, or --same-identity on purpose",
                one.display(),
                free.len()
            );
        }
        for &i in free {
            out[i] = Some(one.clone());
        }
    } else if plain.len() > 1 {
        bail!(
            "--identity given {} times without DEV=; name the device of each (DEV=DIR)",
            plain.len()
        );
    } else if out.iter().any(Option::is_some) {
        if let Some(&i) = free.first() {
            let dev = targets[i].given.display();
            bail!("{dev} has no identity while others do: give --identity {dev}=DIR, or {dev}=none on purpose");
        }
    }
    Ok(())
}

pub(crate) fn name_of(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The identity directories in `dir`, in name order, and the hidden
/// entries (`.git`…) left out.
pub(crate) fn identity_dirs(dir: &Path) -> Result<(Vec<PathBuf>, Vec<String>)> {
    let mut subs = Vec::new();
    let mut hidden = Vec::new();
    let entries = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("--identities {}: {e}", dir.display()))?;
    for e in entries {
        let e = e.map_err(|e| anyhow::anyhow!("--identities {}: {e}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !e.path().is_dir() {
            continue;
        }
        if name.starts_with('.') {
            hidden.push(name);
        } else {
            subs.push(e.path());
        }
    }
    subs.sort();
    hidden.sort();
    Ok((subs, hidden))
}

/// Every identity is a directory, and no directory reaches two devices
/// (by another path or a symlink) unless --same-identity says so.
fn distinct(out: &[Option<PathBuf>], targets: &[Target], same: bool) -> Result<()> {
    let mut seen: Vec<(PathBuf, usize)> = Vec::new();
    for (i, d) in out.iter().enumerate() {
        let Some(d) = d else { continue };
        match std::fs::metadata(d) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => bail!("identity {}: not a directory", d.display()),
            Err(e) => bail!("identity {}: {e}", d.display()),
        }
        let real = std::fs::canonicalize(d)
            .map_err(|e| anyhow::anyhow!("identity {}: {e}", d.display()))?;
        if let Some((_, j)) = seen.iter().find(|(r, _)| *r == real) {
            if !same {
                bail!(
                    "identity {} reaches both {} and {} (both are {}): each device needs its own, or pass --same-identity on purpose",
                    d.display(),
                    targets[*j].given.display(),
                    targets[i].given.display(),
                    real.display()
                );
            }
        }
        seen.push((real, i));
    }
    Ok(())
}

/// Each device's own bytes, planned for its size (nothing is written).
pub fn plan(
    a: &Provisioning,
    src: &crate::source::Source,
    targets: &[Target],
    dirs: &[Option<PathBuf>],
) -> Result<Vec<Option<Personal>>> {
    if !a.wanted() {
        return Ok(targets.iter().map(|_| None).collect());
    }
    let m: Manifest = personal::manifest(src)?;
    let head = src.first_mib();
    let epoch = formats::time::source_date_epoch().map_err(anyhow::Error::msg)?;
    targets
        .iter()
        .zip(dirs)
        .map(|(t, dir)| {
            let with_identity = dir.is_some() || a.hostname.is_some() || a.generate_host_keys;
            if !with_identity && !a.fill {
                return Ok(None);
            }
            let req = Request {
                identity: dir.clone(),
                hostname: a.hostname.clone(),
                host_key: a.generate_host_keys,
                fill: a.fill,
                epoch,
                generate_machine_id: with_identity,
            };
            let lbs = u64::from(t.disk.logical_sector_size);
            personal::plan(&m, head, t.disk.size, lbs, &req)
                .map(Some)
                .map_err(|e| {
                    Refused::write(t.given.display(), Check::Provisioning, format!("{e:#}")).into()
                })
        })
        .collect()
}

/// Whether a device is probed: removable ones unless --no-probe; others
/// with --probe.
pub fn probes(a: &Provisioning, t: &Target) -> bool {
    !a.no_probe && (a.probe || t.disk.removable)
}

/// The line shown (and confirmed) per device.
pub fn mapping(
    a: &Provisioning,
    t: &Target,
    dir: Option<&Path>,
    p: Option<&Personal>,
    probe: bool,
) -> String {
    let mut s = t.disk.describe();
    match dir {
        Some(d) => s.push_str(&format!("\n    identity: {}", d.display())),
        None if !a.identity.is_empty() || a.identities.is_some() => {
            s.push_str("\n    identity: none")
        }
        None => {}
    }
    if let Some(p) = p {
        s.push_str(&format!("\n    state partition: {} bytes", p.state_size));
    }
    if probe {
        s.push_str("\n    probed for fake capacity before writing");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::Disk;

    /// Devices /dev/sdb, /dev/sdc… with serials S0, S1….
    fn targets(n: usize) -> Vec<Target> {
        (0..n)
            .map(|i| {
                let path = PathBuf::from(format!("/dev/sd{}", (b'b' + i as u8) as char));
                Target {
                    given: path.clone(),
                    disk: Disk {
                        path,
                        serial: format!("S{i}"),
                        ..Default::default()
                    },
                }
            })
            .collect()
    }

    fn dirs(root: &Path, names: &[&str]) {
        for n in names {
            std::fs::create_dir_all(root.join(n)).unwrap();
        }
    }

    fn with(identity: &[String]) -> Provisioning {
        Provisioning {
            identity: identity.to_vec(),
            ..Default::default()
        }
    }

    fn err(p: &Provisioning, n: usize) -> String {
        format!("{:#}", assign(p, &targets(n)).expect_err("refused"))
    }

    #[test]
    fn identities_go_to_devices_in_name_order_hidden_ones_skipped() {
        let t = tempfile::tempdir().unwrap();
        dirs(t.path(), &["b", "a", ".git"]);
        let p = Provisioning {
            identities: Some(t.path().into()),
            ..Default::default()
        };
        let (out, notes) = assign(&p, &targets(2)).unwrap();
        assert_eq!(out, [Some(t.path().join("a")), Some(t.path().join("b"))]);
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("skipped hidden .git"), "{notes:?}");
        let e = err(&p, 1);
        assert!(
            e.contains("2 identities for 1 devices (left over: b)"),
            "{e}"
        );
    }

    #[test]
    fn dev_equals_dir_by_path_or_serial_and_none_on_purpose() {
        let t = tempfile::tempdir().unwrap();
        dirs(t.path(), &["x", "y"]);
        let x = t.path().join("x").display().to_string();
        let y = t.path().join("y").display().to_string();
        let p = with(&[
            format!("S1={x}"),
            format!("/dev/sdb={y}"),
            "/dev/sdd=none".into(),
        ]);
        let (out, _) = assign(&p, &targets(3)).unwrap();
        assert_eq!(out, [Some(y.clone().into()), Some(x.clone().into()), None]);
        let e = err(&with(&[format!("S1={x}")]), 2);
        assert!(
            e.contains("/dev/sdb has no identity while others do"),
            "{e}"
        );
        let e = err(&with(&[format!("S9={x}")]), 2);
        assert!(e.contains("S9 is none of the devices given"), "{e}");
        let e = err(&with(&[format!("S0={x}"), format!("/dev/sdb={y}")]), 2);
        assert!(e.contains("already has an identity"), "{e}");
    }

    #[test]
    fn one_directory_for_several_devices_only_on_purpose() {
        let t = tempfile::tempdir().unwrap();
        dirs(t.path(), &["x"]);
        let x = t.path().join("x");
        let e = err(&with(&[x.display().to_string()]), 2);
        assert!(e.contains("one identity for 2 devices"), "{e}");
        // The same directory by another name (a symlink) is the same.
        std::os::unix::fs::symlink(&x, t.path().join("alias")).unwrap();
        let alias = t.path().join("alias").display().to_string();
        let p = with(&[format!("S0={}", x.display()), format!("S1={alias}")]);
        let e = err(&p, 2);
        assert!(e.contains("reaches both /dev/sdb and /dev/sdc"), "{e}");
        let same = Provisioning {
            same_identity: true,
            ..p
        };
        assert!(assign(&same, &targets(2)).is_ok());
    }

    #[test]
    fn a_missing_identity_or_a_hostname_for_many_is_refused() {
        let e = err(&with(&["/nonexistent/id".into()]), 1);
        assert!(e.contains("identity /nonexistent/id: No such file"), "{e}");
        let p = Provisioning {
            hostname: Some("h".into()),
            ..Default::default()
        };
        assert!(err(&p, 2).contains("--hostname names one machine"));
        assert!(assign(&p, &targets(1)).is_ok());
    }
}
