//! The bench station: one image flashed onto every block device that
//! appears after it starts, each with the next unused identity, several
//! at once. A device present at the start is never written; `--match`
//! narrows by device name, `/dev/disk/by-id` name or card key (glob). Each card is
//! known by its serial (a loop device by its backing file): a card the
//! report already holds as provisioned is not flashed again unless
//! `reflash`, so a finished card plugged back in does not consume an
//! identity. Each card is a whole flash run ([`crate::session`]): every
//! preflight check, its own refusal, its own result. Nothing here prints:
//! what happens goes to the caller as [`Event`]s.

use anyhow::{bail, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::devices::Disk;
use crate::preflight::Host;
use crate::provision::name_of;
use crate::session::{self, Request, Written};
use crate::write;
use crate::Progress;
use formats::glob::glob;

/// How often /sys/block is read for new devices.
const POLL: Duration = Duration::from_millis(250);

/// What the station is asked to do.
pub struct Station {
    /// Everything but the devices and the identity, as for one flash.
    pub request: Request,
    /// One identity directory per card, taken in name order.
    pub identities: PathBuf,
    /// Globs on the device's name (`sdb`, `loop3`) or a by-id name.
    pub matches: Vec<String>,
    /// Stop after this many cards are written.
    pub count: Option<usize>,
    /// Flash a card the report already holds as provisioned.
    pub reflash: bool,
    /// Cards provisioned in earlier runs: their key → identity name.
    pub provisioned: BTreeMap<String, String>,
}

/// What happened to a device that appeared.
pub enum Event<'a> {
    /// Appeared but not flashed (already provisioned, no identity left).
    Skipped {
        disk: &'a Disk,
        card: &'a str,
        why: String,
    },
    /// Being flashed with this identity.
    Started { disk: &'a Disk, identity: &'a Path },
    /// Refused before any write (preflight, sidecars, probe) or failed.
    Failed {
        disk: &'a Disk,
        card: &'a str,
        identity: &'a Path,
        error: anyhow::Error,
    },
    /// Written (the run's own result may still be an error).
    Written {
        card: &'a str,
        written: Box<Written>,
    },
}

/// A card's key: its serial (the disk's, an SD card's CID, or the USB
/// device's serial above a reader's disk), or a loop device's backing
/// file; else its path.
pub fn card_key(host: &Host, disk: &Disk) -> String {
    if !disk.serial.is_empty() {
        return disk.serial.clone();
    }
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let sys = host
        .root
        .join("sys/block")
        .join(disk.path.file_name().unwrap_or_default());
    if let Some(cid) = read(&sys.join("device/cid")) {
        return format!("mmc:{cid}");
    }
    // A USB reader's disk sits a few levels below the USB device, which
    // has the serial.
    if let Ok(dev) = std::fs::canonicalize(sys.join("device")) {
        let usb = dev
            .ancestors()
            .take(8)
            .find_map(|a| read(&a.join("serial")).filter(|_| a.join("idVendor").exists()));
        if let Some(s) = usb {
            return format!("usb:{s}");
        }
    }
    match read(&sys.join("loop/backing_file")) {
        Some(b) => format!("loop:{b}"),
        None => format!("device:{}", disk.path.display()),
    }
}

/// The names a device goes by: its own and its /dev/disk/by-id links.
fn names(host: &Host, disk: &Disk) -> Vec<String> {
    let mut out = vec![disk
        .path
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()];
    if let Ok(rd) = std::fs::read_dir(host.root.join("dev/disk/by-id")) {
        for e in rd.filter_map(|e| e.ok()) {
            if std::fs::canonicalize(e.path()).is_ok_and(|p| p == disk.path) {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    out
}

/// Whether `--match` takes the device: by its name, a by-id name, or
/// its card key (serial; `loop:BACKING` for a loop device).
fn wanted(st: &Station, host: &Host, disk: &Disk, card: &str) -> bool {
    let mut all = names(host, disk);
    all.push(card.to_string());
    st.matches.is_empty() || all.iter().any(|n| st.matches.iter().any(|m| glob(m, n)))
}

/// Identities: the ones not yet used, handed out once each.
struct Pool {
    free: Mutex<Vec<PathBuf>>,
}

impl Pool {
    fn take(&self) -> Option<PathBuf> {
        let mut f = self.free.lock().expect("not poisoned");
        (!f.is_empty()).then(|| f.remove(0))
    }
    /// A card that did not get it gives it back (first in line again).
    fn give_back(&self, p: PathBuf) {
        let mut f = self.free.lock().expect("not poisoned");
        f.push(p);
        f.sort();
    }
}

/// The devices there now, by path.
fn present(host: &Host) -> Result<BTreeMap<PathBuf, Disk>> {
    Ok(host
        .disks()?
        .into_iter()
        .map(|d| (d.path.clone(), d))
        .collect())
}

/// What the watch shares with each card's thread.
struct Watch<'a> {
    st: &'a Station,
    host: &'a Host,
    opts: &'a write::Options,
    progress: &'a dyn Progress,
    on: &'a (dyn Fn(Event) + Sync),
    pool: Pool,
    /// Cards written (this run and before), by key.
    flashed: Mutex<BTreeSet<String>>,
    done: AtomicUsize,
    in_flight: AtomicUsize,
}

/// Watch for devices until `stop` (or `count` cards written), flashing
/// each new one that is wanted; every card's fate goes to `on`. Returns
/// how many cards were written.
pub fn run(
    st: &Station,
    host: &Host,
    opts: &write::Options,
    progress: &dyn Progress,
    on: &(dyn Fn(Event) + Sync),
) -> Result<usize> {
    let used: BTreeSet<&String> = st.provisioned.values().collect();
    let free: Vec<PathBuf> = crate::provision::identity_dirs(&st.identities)?
        .0
        .into_iter()
        .filter(|p| !used.contains(&name_of(p)))
        .collect();
    if free.is_empty() {
        bail!(
            "--identities {}: every identity is used",
            st.identities.display()
        );
    }
    let w = Watch {
        st,
        host,
        opts,
        progress,
        on,
        pool: Pool {
            free: Mutex::new(free),
        },
        flashed: Mutex::new(st.provisioned.keys().cloned().collect()),
        done: AtomicUsize::new(0),
        in_flight: AtomicUsize::new(0),
    };
    let mut known: BTreeSet<PathBuf> = present(host)?.into_keys().collect();
    let n = |a: &AtomicUsize| a.load(Ordering::SeqCst);
    std::thread::scope(|s| -> Result<()> {
        loop {
            let stopping = opts.stop.load(Ordering::SeqCst);
            let left = st
                .count
                .map(|c| c.saturating_sub(n(&w.done) + n(&w.in_flight)));
            if (stopping || st.count.is_some_and(|c| n(&w.done) >= c)) && n(&w.in_flight) == 0 {
                return Ok(());
            }
            let now = present(host)?;
            known.retain(|p| now.contains_key(p)); // pulled out: new when back
            for (path, disk) in now {
                if known.contains(&path) || stopping || left == Some(0) {
                    continue;
                }
                known.insert(path);
                if let Some((card, identity)) = w.admit(&disk) {
                    w.in_flight.fetch_add(1, Ordering::SeqCst);
                    let w = &w;
                    s.spawn(move || w.flash(&disk, &card, identity));
                }
            }
            std::thread::sleep(POLL);
        }
    })?;
    Ok(n(&w.done))
}

impl Watch<'_> {
    /// A new device's card key and identity, if it is to be flashed
    /// (otherwise said why, unless `--match` leaves it out).
    fn admit(&self, disk: &Disk) -> Option<(String, PathBuf)> {
        let card = card_key(self.host, disk);
        if !wanted(self.st, self.host, disk, &card) {
            return None;
        }
        let skip = |why: &str| {
            (self.on)(Event::Skipped {
                disk,
                card: &card,
                why: why.into(),
            })
        };
        if !self.st.reflash && self.flashed.lock().expect("not poisoned").contains(&card) {
            skip("already provisioned (see the report; --reflash flashes it again)");
            return None;
        }
        let Some(identity) = self.pool.take() else {
            skip("no identity left");
            return None;
        };
        Some((card, identity))
    }

    /// One card's thread: its flash, its identity kept or given back.
    fn flash(&self, disk: &Disk, card: &str, identity: PathBuf) {
        (self.on)(Event::Started {
            disk,
            identity: &identity,
        });
        match flash_one(
            self.st,
            self.host,
            disk,
            &identity,
            self.opts,
            self.progress,
        ) {
            Ok(w) => {
                if w.result.is_ok() {
                    self.done.fetch_add(1, Ordering::SeqCst);
                    self.flashed
                        .lock()
                        .expect("not poisoned")
                        .insert(card.to_string());
                } else {
                    self.pool.give_back(identity.clone());
                }
                (self.on)(Event::Written {
                    card,
                    written: Box::new(w),
                });
            }
            Err(error) => {
                self.pool.give_back(identity.clone());
                (self.on)(Event::Failed {
                    disk,
                    card,
                    identity: &identity,
                    error,
                });
            }
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One card: a whole flash run with its identity.
fn flash_one(
    st: &Station,
    host: &Host,
    disk: &Disk,
    identity: &Path,
    opts: &write::Options,
    progress: &dyn Progress,
) -> Result<Written> {
    let mut req = st.request.clone();
    req.devices = vec![disk.path.clone()];
    req.provisioning.identity = vec![identity.display().to_string()];
    req.provisioning.identities = None;
    let s = session::prepare(&req, host)?;
    let opened = s.open()?;
    let labelled = Labelled {
        inner: progress,
        label: name_of(identity),
    };
    let mut out = s.write(opened, opts, &labelled);
    Ok(out.pop().expect("one device"))
}

/// A card's row names its identity beside its device.
struct Labelled<'a> {
    inner: &'a dyn Progress,
    label: String,
}

impl Progress for Labelled<'_> {
    fn meter(&self, device: &str) -> Box<dyn crate::Meter> {
        self.inner.meter(&format!("{device} {}", self.label))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk named `name` under a fake root, its sysfs `device` a link to
    /// `dev` (made, relative to the root).
    fn disk_at(root: &Path, name: &str, dev: &str) -> Disk {
        let block = root.join("sys/block").join(name);
        std::fs::create_dir_all(&block).unwrap();
        std::fs::create_dir_all(root.join(dev)).unwrap();
        std::os::unix::fs::symlink(root.join(dev), block.join("device")).unwrap();
        Disk {
            path: PathBuf::from("/dev").join(name),
            ..Disk::default()
        }
    }

    #[test]
    fn cards_are_known_by_the_sd_cid_the_usb_serial_or_the_loop_backing() {
        let t = tempfile::tempdir().unwrap();
        let host = Host {
            root: t.path().into(),
        };
        let mmc = "sys/devices/mmc0/mmc0:0001";
        let sd = disk_at(t.path(), "mmcblk0", mmc);
        std::fs::write(t.path().join(mmc).join("cid"), "035344534c33324780f3\n").unwrap();
        assert_eq!(card_key(&host, &sd), "mmc:035344534c33324780f3");
        let usb = "sys/devices/pci0/usb1/1-1";
        let below = format!("{usb}/1-1:1.0/host0/target0:0:0/0:0:0:0");
        let stick = disk_at(t.path(), "sdb", &below);
        std::fs::write(t.path().join(usb).join("serial"), "4C530001\n").unwrap();
        std::fs::write(t.path().join(usb).join("idVendor"), "0781\n").unwrap();
        assert_eq!(card_key(&host, &stick), "usb:4C530001");
        let lo = disk_at(t.path(), "loop3", "sys/devices/virtual/block/loop3");
        let backing = t.path().join("sys/block/loop3/loop");
        std::fs::create_dir_all(&backing).unwrap();
        std::fs::write(backing.join("backing_file"), "/srv/card.img\n").unwrap();
        assert_eq!(card_key(&host, &lo), "loop:/srv/card.img");
        let own = Disk {
            serial: "ABC".into(),
            ..stick
        };
        assert_eq!(card_key(&host, &own), "ABC");
    }
}
