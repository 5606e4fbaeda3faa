//! One flash run, in the order that keeps devices safe. [`prepare`]
//! makes every decision (the source examined, its SHA-256, each device's
//! checks, no disk twice, identities, each device's own bytes) without
//! opening a device for writing; the caller shows [`Session::mapping`]
//! and asks; [`Session::open`] opens every device and probes it; only
//! then does [`Session::write`] write. Every error before the first
//! write is [`NothingWritten`] (exit 2), a probe that could not restore
//! a card is [`crate::probe::ProbeError`] (exit 4): see [`exit_code`].

use anyhow::{bail, Result};
use std::path::PathBuf;

use crate::device::{BlockDevice, Device};
use crate::examine::{examine, Unfit};
use crate::personal::Personal;
use crate::preflight::{self, Host, Need, Target};
use crate::probe::ProbeError;
use crate::provision::{self, Provisioning};
use crate::refusal::{Check, Refused};
use crate::source::{BmapChoice, Source};
use crate::trust::{Signed, Trust};
use crate::write::{self, Mismatch, Outcome};
use crate::Progress;

/// What to write where, as asked.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// A file, a URL, or `-` (stdin).
    pub image: PathBuf,
    pub bmap: BmapChoice,
    /// The (decompressed) image's size, for a stream without a bmap.
    pub size: Option<u64>,
    /// A source without a partition table, on purpose.
    pub raw: bool,
    /// The whole image's expected SHA-256 (hex).
    pub sha256: Option<String>,
    pub devices: Vec<PathBuf>,
    pub allow_non_removable: bool,
    pub provisioning: Provisioning,
    /// The keys an image must be signed by (none: signatures unchecked).
    pub trust: Trust,
}

/// Nothing was written: refused or failed before the first write.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
pub struct NothingWritten(pub anyhow::Error);

/// `e` as an error before the first write (exit 2), unless it says more.
pub fn nothing_written(e: anyhow::Error) -> anyhow::Error {
    if e.is::<NothingWritten>() || e.is::<ProbeError>() {
        e
    } else {
        NothingWritten(e).into()
    }
}

/// The process exit status an error stands for: 2 nothing written, 3 a
/// verify found a difference, 4 a probe could not restore a card, 1 a
/// write failed (the tables wiped).
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.is::<ProbeError>() {
        4
    } else if e.is::<Refused>() || e.is::<Unfit>() || e.is::<NothingWritten>() {
        2
    } else if e.is::<Mismatch>() {
        3
    } else {
        1
    }
}

/// One device, checked and planned.
pub struct Planned {
    pub target: Target,
    /// Its identity directory.
    pub identity: Option<PathBuf>,
    /// Its own bytes (identity, a grown state partition).
    pub personal: Option<Personal>,
    /// Probed for fake capacity before writing.
    pub probe: bool,
}

/// Every decision of a run, made before any device is opened to write.
pub struct Session {
    pub src: Source,
    pub devices: Vec<Planned>,
    /// Said of the identities (hidden entries skipped…).
    pub notes: Vec<String>,
    /// Who signed the image, when keys are trusted.
    pub signed: Option<Signed>,
    provisioning: Provisioning,
}

/// Every check and plan, in order; any error is [`NothingWritten`].
pub fn prepare(req: &Request, host: &Host) -> Result<Session> {
    checked(req, host).map_err(|e| NothingWritten(e).into())
}

/// The source of a request, opened and checked (its signature, its own
/// checks, `--sha256`): the part of [`prepare`] that needs no device
/// (`flash station` runs it once at its start). Also returns who signed
/// it and the sector size its table is for.
pub fn source(req: &Request) -> Result<(Source, Option<Signed>, Option<u32>)> {
    let mut src = Source::open_sized(&req.image, req.bmap.clone(), req.size)?;
    let signed = crate::trust::check(&mut src, &req.trust)?;
    let sector = examine(&src, req.raw, signed.is_some())?.sector;
    match &req.sha256 {
        // A stream is read once: its SHA-256 is checked as it is written
        // (a difference fails the write, its tables wiped).
        Some(want) if src.is_stream() => src.expect_sha256(want),
        Some(want) => check_sha256(&req.image, want)?,
        None => {}
    }
    Ok((src, signed, sector))
}

fn checked(req: &Request, host: &Host) -> Result<Session> {
    let (src, signed, sector) = source(req)?;
    let need = Need {
        size: src.size,
        sector,
        allow_non_removable: req.allow_non_removable,
    };
    let targets = distinct_targets(req, host, need)?;
    let prov = &req.provisioning;
    let (dirs, notes) = provision::assign(prov, &targets)
        .map_err(|e| Refused::write(shown(&req.devices), Check::Identities, format!("{e:#}")))?;
    let personals = provision::plan(prov, &src, &targets, &dirs)?;
    let devices = targets
        .into_iter()
        .zip(dirs)
        .zip(personals)
        .map(|((target, identity), personal)| Planned {
            probe: provision::probes(prov, &target),
            target,
            identity,
            personal,
        })
        .collect();
    Ok(Session {
        src,
        devices,
        notes,
        signed,
        provisioning: prov.clone(),
    })
}

/// The devices as given, for a refusal of all of them.
fn shown(devices: &[PathBuf]) -> String {
    let all: Vec<String> = devices.iter().map(|d| d.display().to_string()).collect();
    all.join(", ")
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
fn distinct_targets(req: &Request, host: &Host, need: Need) -> Result<Vec<Target>> {
    let mut targets: Vec<Target> = Vec::new();
    for d in &req.devices {
        let t = preflight::check(host, d, need)?;
        if let Some(same) = targets.iter().find(|o| o.disk.devnum == t.disk.devnum) {
            let detail = format!(
                "the same disk as {} (device {})",
                same.given.display(),
                t.disk.devnum
            );
            return Err(Refused::write(d.display(), Check::Distinct, detail).into());
        }
        targets.push(t);
    }
    Ok(targets)
}

/// What provisioning made on a device, for its report.
pub struct Provisioned {
    pub host_key: Option<formats::identity::HostKey>,
    pub machine_id: Option<String>,
    pub state_size: u64,
    pub files: usize,
}

/// One device after the run.
pub struct Written {
    pub target: Target,
    pub identity: Option<PathBuf>,
    pub provisioned: Option<Provisioned>,
    pub probed: bool,
    pub result: Result<Outcome>,
}

impl Session {
    /// The line shown (and confirmed) per device.
    pub fn mapping(&self) -> Vec<String> {
        let p = &self.provisioning;
        self.devices
            .iter()
            .map(|d| {
                let dir = d.identity.as_deref();
                provision::mapping(p, &d.target, dir, d.personal.as_ref(), d.probe)
            })
            .collect()
    }

    /// Whether the mapping is worth showing without a question (the
    /// devices get their own bytes).
    pub fn provisions(&self) -> bool {
        self.provisioning.wanted()
    }

    /// Every device refused for want of confirmation (`detail` says why).
    pub fn unconfirmed(&self, detail: &str) -> anyhow::Error {
        let all: Vec<PathBuf> = self
            .devices
            .iter()
            .map(|d| d.target.given.clone())
            .collect();
        NothingWritten(Refused::write(shown(&all), Check::Confirmed, detail).into()).into()
    }

    /// Every device opened (its identity re-checked), one that cannot be
    /// opened failing alone; then the fake-capacity probe, after every
    /// other check: a device that fails it refuses the whole run, and
    /// every device is as before.
    pub fn open(&self) -> Result<Vec<Result<Box<dyn BlockDevice>>>> {
        let opened: Vec<Result<Box<dyn BlockDevice>>> = self
            .devices
            .iter()
            .map(|d| {
                Device::open(&d.target, true)
                    .map(|d| Box::new(d) as Box<dyn BlockDevice>)
                    .map_err(|e| NothingWritten(e).into())
            })
            .collect();
        let nonce = {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b)
                .map_err(|e| NothingWritten(anyhow::anyhow!("the OS's randomness: {e}")))?;
            u64::from_le_bytes(b)
        };
        for (o, d) in opened.iter().zip(&self.devices) {
            if let (Ok(dev), true) = (o, d.probe) {
                crate::probe::probe(&**dev, nonce).map_err(|e| match e {
                    ProbeError::Restore { .. } => anyhow::Error::from(e),
                    e => {
                        let given = d.target.given.display();
                        NothingWritten(
                            Refused::write(given, Check::RealCapacity, e.to_string()).into(),
                        )
                        .into()
                    }
                })?;
            }
        }
        Ok(opened)
    }

    /// Write the image to every device `open` opened, each with its own
    /// bytes; one result per device, in the order given.
    pub fn write(
        self,
        opened: Vec<Result<Box<dyn BlockDevice>>>,
        opts: &write::Options,
        progress: &dyn Progress,
    ) -> Vec<Written> {
        let mut sinks = Vec::new();
        let mut results: Vec<Option<Result<Outcome>>> = Vec::new();
        let mut planned = Vec::new();
        for (o, d) in opened.into_iter().zip(self.devices) {
            let provisioned = d.personal.as_ref().map(|p| Provisioned {
                host_key: p.host_key.clone(),
                machine_id: p.machine_id.clone(),
                state_size: p.state_size,
                files: p.identity_files,
            });
            match o {
                Ok(s) => {
                    sinks.push((s, d.personal));
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
            planned.push((d.target, d.identity, provisioned, d.probe));
        }
        let mut outs = write::flash_personal(&self.src, sinks, opts, progress).into_iter();
        planned
            .into_iter()
            .zip(results)
            .map(|((target, identity, provisioned, probed), r)| Written {
                target,
                identity,
                provisioned,
                probed,
                result: r.unwrap_or_else(|| outs.next().expect("one result per device written")),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refusal::Refusal;

    fn refusal(e: &anyhow::Error) -> Option<&Refusal> {
        let NothingWritten(inner) = e.downcast_ref::<NothingWritten>()?;
        inner.downcast_ref::<Refused>().map(|r| &r.refusal)
    }

    #[test]
    fn every_refusal_before_a_write_is_nothing_written_exit_2() {
        let t = tempfile::tempdir().unwrap();
        let (image, _, _) = crate::write::tests::image(t.path(), 512, true);
        let file = t.path().join("not-a-disk");
        std::fs::write(&file, b"keep").unwrap();
        let req = Request {
            image: image.clone(),
            devices: vec![file.clone()],
            ..Default::default()
        };
        let e = prepare(&req, &Host::default()).err().unwrap();
        assert_eq!(refusal(&e).unwrap().check, Check::BlockDevice);
        assert_eq!(exit_code(&e), 2);
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
        // A wrong --sha256 is refused before any device is looked at.
        let req = Request {
            sha256: Some("0".repeat(64)),
            devices: vec![t.path().join("missing")],
            ..req
        };
        let e = prepare(&req, &Host::default()).err().unwrap();
        assert!(format!("{e:#}").contains("SHA-256 is"), "{e:#}");
        assert_eq!(exit_code(&e), 2);
        // Not a disk image at all.
        let req = Request {
            image: file.clone(),
            sha256: None,
            ..req
        };
        let e = prepare(&req, &Host::default()).err().unwrap();
        assert!(format!("{e:#}").contains("not-a-disk"), "{e:#}");
        assert_eq!(exit_code(&e), 2);
    }

    #[test]
    fn exit_codes_name_what_happened() {
        let mismatch = anyhow::Error::from(Mismatch {
            device: "/dev/sdb".into(),
            offset: 4096,
            got: "00".into(),
            want: "01".into(),
            wiped: "",
        });
        assert_eq!(exit_code(&mismatch), 3);
        assert_eq!(exit_code(&anyhow::anyhow!("write failed")), 1);
        let unconfirmed = Refused::write("/dev/sdb", Check::Confirmed, "not confirmed");
        assert_eq!(exit_code(&unconfirmed.into()), 2);
        let restore = ProbeError::Restore {
            dev: "/dev/sdb".into(),
            at: 0,
            err: std::io::Error::other("EIO"),
        };
        let restore = anyhow::Error::from(restore);
        assert_eq!(
            exit_code(&nothing_written(restore)),
            4,
            "a failed restore stays 4"
        );
        let asking = nothing_written(anyhow::anyhow!("reading the answer: stdin closed"));
        assert_eq!(exit_code(&asking), 2);
    }
}
