//! All-or-nothing output files: written to a temporary file beside the
//! target and renamed into place only when complete, so a failure leaves
//! nothing behind.

use anyhow::{Context, Result};
use std::fs::File;
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
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{}.", name.to_string_lossy()))
            .suffix(".tmp")
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
