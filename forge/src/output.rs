//! All-or-nothing output files: written to a temporary file beside the
//! target and renamed into place only when complete, so a failure leaves
//! nothing behind.

use anyhow::{Context, Result};
use std::fs::File;

use crate::image::out::{Hashes, ImageOut};
use std::path::{Path, PathBuf};

pub struct AtomicOutput {
    tmp: tempfile::NamedTempFile,
    target: PathBuf,
}

impl AtomicOutput {
    pub fn create(target: &Path) -> Result<Self> {
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let name = target
            .file_name()
            .with_context(|| format!("{}: not a file name", target.display()))?;
        // Created 0666 less the umask, as any other output file (the
        // temporary file's default, 0600, would follow it into place).
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{}.", name.to_string_lossy()))
            .suffix(".tmp")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .tempfile_in(dir)
            .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
        Ok(AtomicOutput {
            tmp,
            target: target.to_owned(),
        })
    }

    pub fn file(&mut self) -> &mut File {
        self.tmp.as_file_mut()
    }

    pub fn temp_path(&self) -> &Path {
        self.tmp.path()
    }

    /// Fill the file with one filesystem of `size` bytes that writes
    /// `map`, the way `forge image` writes images: in ascending order,
    /// sparse, O_DIRECT.
    pub fn write_image(
        &mut self,
        size: u64,
        map: Vec<(u64, u64)>,
        write: impl FnOnce(&mut dyn formats::sink::Sink) -> Result<()>,
    ) -> Result<()> {
        let tmp = self.tmp.path().to_owned();
        let what = || format!("writing {}", tmp.display());
        let raw = crate::container::Kind::Raw
            .open(self.tmp.as_file(), &tmp, 0)
            .with_context(what)?;
        let mut w = ImageOut::new(raw, Hashes::default()).with_context(what)?;
        w.begin(size, map).with_context(what)?;
        write(&mut w)?;
        w.finish().with_context(what)?;
        Ok(())
    }

    /// Flush to disk and move into place.
    pub fn commit(self) -> Result<()> {
        self.tmp
            .as_file()
            .sync_all()
            .with_context(|| format!("syncing {}", self.tmp.path().display()))?;
        self.tmp
            .persist(&self.target)
            .with_context(|| format!("renaming into {}", self.target.display()))?;
        Ok(())
    }
}
