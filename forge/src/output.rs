//! All-or-nothing output files. Each is written to an unnamed file in the
//! target's directory (O_TMPFILE), which no signal or crash can leave
//! behind, and is given its name only when complete. An image and its
//! sidecars (bmap, layout manifest) are committed together by
//! [`commit_together`]: under a lock on their directory, so concurrent
//! runs on one output cannot interleave, stale sidecars go first, then
//! the image takes its name, then each sidecar. Readers (flash, inspect)
//! check that a sidecar names its image (size, disk id, first MiB).
//!
//! Where the filesystem has no O_TMPFILE, a named `.NAME.PID.XXXXXX.tmp`
//! is used instead; later runs remove those whose process is gone.

use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub struct AtomicOutput {
    file: File,
    /// None: an unnamed (O_TMPFILE) file; else its temporary name.
    named: Option<tempfile::TempPath>,
    target: PathBuf,
    dir: PathBuf,
}

fn dir_of(target: &Path) -> &Path {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `.NAME.` — the prefix of every temporary name for `target`.
fn temp_prefix(target: &Path) -> Result<String> {
    let name = target
        .file_name()
        .with_context(|| format!("{}: not a file name", target.display()))?;
    Ok(format!(".{}.", name.to_string_lossy()))
}

/// Remove `.NAME.PID[.XXXXXX].tmp` files and directories of `target`
/// whose process is gone (left by a killed run: a named temporary where
/// O_TMPFILE was not available, a staging directory of `forge oci`).
pub fn remove_stale(target: &Path) -> Result<()> {
    let prefix = temp_prefix(target)?;
    let Ok(entries) = std::fs::read_dir(dir_of(target)) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = n.strip_prefix(&prefix).and_then(|r| r.strip_suffix(".tmp")) else {
            continue;
        };
        let Some(pid) = rest.split('.').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let p = e.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_file(p)
            };
        }
    }
    Ok(())
}

/// The directory `target` goes into must be there: named when it is not
/// (rather than the temporary file that could not be made in it).
pub fn check_dir(target: &Path) -> Result<()> {
    let d = dir_of(target);
    if !d.is_dir() {
        bail!("output directory {}: no such directory", d.display());
    }
    Ok(())
}

/// The directory [`make_parents`] created for an output, removed again
/// (when still empty) unless [`MadeDirs::keep`] is called: a failed run
/// leaves no directory behind either.
#[must_use]
pub struct MadeDirs(Vec<PathBuf>);

impl MadeDirs {
    pub fn keep(mut self) {
        self.0.clear();
    }
}

impl Drop for MadeDirs {
    fn drop(&mut self) {
        // Innermost first; remove_dir fails, harmlessly, on one not empty.
        for d in self.0.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Create the directory `target` goes into when it is missing but its own
/// parent exists (one level, as `mkdir`: a Nix builder has no mkdir to make
/// `$out` with, and a mistyped path deeper down is still an error).
pub fn make_parents(target: &Path) -> Result<MadeDirs> {
    let d = dir_of(target);
    let mut made = MadeDirs(Vec::new());
    if std::fs::symlink_metadata(d).is_err() {
        let up = match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if std::fs::metadata(up).is_ok_and(|m| m.is_dir()) {
            std::fs::create_dir(d).with_context(|| format!("output directory {}", d.display()))?;
            made.0.push(d.to_owned());
        }
    }
    Ok(made)
}

impl AtomicOutput {
    /// Created 0666 less the umask, as any other output file.
    pub fn create(target: &Path) -> Result<Self> {
        Self::create_mode(target, 0o666)
    }

    /// For an output holding a secret (a private host key): 0600 whatever
    /// the umask, from its creation on (never readable by others, not
    /// even while it is written).
    pub fn create_private(target: &Path) -> Result<Self> {
        let out = Self::create_mode(target, 0o600)?;
        out.file
            .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .with_context(|| format!("making {} private", target.display()))?;
        Ok(out)
    }

    fn create_mode(target: &Path, mode: u32) -> Result<Self> {
        let dir = dir_of(target);
        temp_prefix(target)?;
        check_dir(target)?;
        if target.is_dir() {
            bail!("{}: is a directory", target.display());
        }
        remove_stale(target)?;
        let unnamed = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .mode(mode)
            .custom_flags(libc::O_TMPFILE)
            .open(dir);
        let (file, named) = match unnamed {
            Ok(f) => (f, None),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL | libc::ENOENT)
                ) && dir.is_dir() =>
            {
                let t = tempfile::Builder::new()
                    .prefix(&format!("{}{}.", temp_prefix(target)?, std::process::id()))
                    .suffix(".tmp")
                    .permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
                    .tempfile_in(dir)
                    .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
                let (f, p) = t.into_parts();
                (f, Some(p))
            }
            Err(e) => {
                return Err(e).with_context(|| format!("creating {}", target.display()));
            }
        };
        Ok(AtomicOutput {
            file,
            named,
            target: target.to_owned(),
            dir: dir.to_owned(),
        })
    }

    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// A path that opens the file being written (to reopen it with other
    /// flags): its temporary name, or its /proc/self/fd entry.
    pub fn temp_path(&self) -> PathBuf {
        match &self.named {
            Some(p) => p.to_path_buf(),
            None => PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd())),
        }
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Flush to disk and give the file its name (replacing what had it).
    pub fn commit(self) -> Result<()> {
        let _lock = lock_dir(&self.dir)?;
        self.commit_locked()
    }

    fn commit_locked(self) -> Result<()> {
        let target = self.target.clone();
        self.file
            .sync_all()
            .with_context(|| format!("syncing {}", target.display()))?;
        let named = match self.named {
            Some(p) => p,
            None => {
                // Link the unnamed file under a temporary name, then
                // rename that over the target (linkat cannot replace).
                let tmp = tempfile::Builder::new()
                    .prefix(&format!("{}{}.", temp_prefix(&target)?, std::process::id()))
                    .suffix(".tmp")
                    .make_in(&self.dir, |p| {
                        nix::unistd::linkat(
                            nix::fcntl::AT_FDCWD,
                            Path::new(&format!("/proc/self/fd/{}", self.file.as_raw_fd())),
                            nix::fcntl::AT_FDCWD,
                            p,
                            nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
                        )
                        .map_err(std::io::Error::from)
                    })
                    .with_context(|| format!("naming {}", target.display()))?;
                tmp.into_temp_path()
            }
        };
        named
            .persist(&target)
            .with_context(|| format!("renaming into {}", target.display()))?;
        Ok(())
    }
}

/// A whole run's hold on a directory (`forge vm` on a fleet): no other
/// run commits into it, or starts working on it, until this is dropped.
/// `waiting` is called once when another run holds it.
pub struct DirLock(#[allow(dead_code)] nix::fcntl::Flock<File>);

pub fn lock_for_run(dir: &Path, waiting: impl FnOnce()) -> Result<DirLock> {
    let f = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(DirLock(l)),
        Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
            waiting();
            nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
                .map(DirLock)
                .map_err(|(_, e)| e)
                .with_context(|| format!("locking {}", dir.display()))
        }
        Err((_, e)) => Err(e).with_context(|| format!("locking {}", dir.display())),
    }
}

/// Whether a process (QEMU) holds an image lock on `path`: QEMU takes
/// open-file-description locks on bytes 100..300 of every image it uses.
pub fn locked(path: &Path) -> Result<bool> {
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

/// An ext4 filesystem of `tree` into an output in container `kind`.
/// An exclusive lock on `dir`, held while the value lives: commits into
/// one directory happen one at a time.
fn lock_dir(dir: &Path) -> Result<nix::fcntl::Flock<File>> {
    let f = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .with_context(|| format!("locking {}", dir.display()))
}

/// Commit several outputs of one directory in order, under the run's
/// hold of its lock (a concurrent run's commits cannot interleave).
pub fn commit_all(outputs: Vec<AtomicOutput>, _held: &DirLock) -> Result<()> {
    for o in outputs {
        o.commit_locked()?;
    }
    Ok(())
}

/// Commit an image and its sidecars as one unit (see the module doc):
/// under the directory's lock, remove the sidecars' old files, rename the
/// image into place, then each sidecar in order.
pub fn commit_together(image: AtomicOutput, sidecars: Vec<AtomicOutput>) -> Result<()> {
    let _lock = lock_dir(&image.dir)?;
    for s in &sidecars {
        match std::fs::remove_file(&s.target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("removing the old {}", s.target.display()))
            }
        }
    }
    image.commit_locked()?;
    for s in sidecars {
        s.commit_locked()?;
    }
    Ok(())
}

/// `NAME` + `suffix`, beside `path`.
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s: OsString = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn stale_named_temporaries_of_dead_runs_are_removed_and_live_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("x.img");
        let dead = d.path().join(".x.img.4194999.abc123.tmp");
        let live = d
            .path()
            .join(format!(".x.img.{}.def456.tmp", std::process::id()));
        let other = d.path().join(".y.img.4194999.abc123.tmp");
        for p in [&dead, &live, &other] {
            std::fs::write(p, b"partial").unwrap();
        }
        let mut out = AtomicOutput::create(&target).unwrap();
        assert!(!dead.exists(), "a dead run's temporary is removed");
        assert!(live.exists() && other.exists());
        out.file().write_all(b"whole").unwrap();
        out.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"whole");
        let mut names: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                format!(".x.img.{}.def456.tmp", std::process::id()),
                ".y.img.4194999.abc123.tmp".into(),
                "x.img".into()
            ]
        );
    }

    #[test]
    fn an_uncommitted_output_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let mut out = AtomicOutput::create(&d.path().join("x.img")).unwrap();
        out.file().write_all(b"half").unwrap();
        drop(out);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
