//! Store paths and where they live on disk.
//!
//! Logical paths are always `/nix/store/<hash>-<name>`; physically they
//! live under `root` (`--root DIR`), so a store built with
//! `nix-build --store DIR` is read at `DIR/nix/store/…`.

use std::path::{Path, PathBuf};

use formats::nar::HASH_LEN;
use formats::nixbase32;

pub const STORE_DIR: &str = "/nix/store";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}: not a store path (expected {STORE_DIR}/<32-char hash>-<name>)")]
    NotStorePath(String),
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{0}: too many levels of symbolic links")]
    Loop(PathBuf),
}

#[derive(Clone, Debug)]
pub struct Store {
    pub root: PathBuf,
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Store { root: root.into() }
    }

    /// Where a logical absolute path is on this machine.
    pub fn physical(&self, logical: &str) -> PathBuf {
        self.root.join(logical.trim_start_matches('/'))
    }

    pub fn store_dir_physical(&self) -> PathBuf {
        self.physical(STORE_DIR)
    }

    /// Resolve `system` (a store path, a physical path to one, or a chain of
    /// links such as `./result`) to the logical store path it names.
    /// Links are read, not followed through the host's `/nix`, so a store
    /// rooted elsewhere works.
    pub fn resolve_toplevel(&self, system: &Path) -> Result<String, StoreError> {
        let mut p = system.to_path_buf();
        for _ in 0..40 {
            if let Some(logical) = self.as_logical(&p) {
                let top = store_path_of(&logical)
                    .ok_or_else(|| StoreError::NotStorePath(system.display().to_string()))?;
                if top != logical {
                    return Err(StoreError::NotStorePath(format!(
                        "{} (inside {top})",
                        system.display()
                    )));
                }
                return Ok(top);
            }
            let phys = if p.is_absolute() {
                p.clone()
            } else {
                std::env::current_dir()
                    .map_err(|err| StoreError::Io {
                        path: p.clone(),
                        err,
                    })?
                    .join(&p)
            };
            let md = std::fs::symlink_metadata(&phys).map_err(|err| StoreError::Io {
                path: phys.clone(),
                err,
            })?;
            if !md.file_type().is_symlink() {
                return Err(StoreError::NotStorePath(system.display().to_string()));
            }
            let target = std::fs::read_link(&phys).map_err(|err| StoreError::Io {
                path: phys.clone(),
                err,
            })?;
            p = if target.is_absolute() {
                target
            } else {
                phys.parent().unwrap_or(Path::new("/")).join(target)
            };
        }
        Err(StoreError::Loop(system.to_path_buf()))
    }

    /// `p` as a logical path if it is in the store, by either its logical
    /// or its physical spelling.
    fn as_logical(&self, p: &Path) -> Option<String> {
        let s = p.to_str()?;
        let phys_store = self.store_dir_physical();
        if let Ok(rest) = p.strip_prefix(&phys_store) {
            return Some(format!("{STORE_DIR}/{}", rest.to_str()?));
        }
        if s.starts_with(&format!("{STORE_DIR}/")) {
            return Some(s.to_string());
        }
        None
    }
}

/// The store path (`/nix/store/<hash>-<name>`) that `p` is or lies in.
pub fn store_path_of(p: &str) -> Option<String> {
    let rest = p.strip_prefix(STORE_DIR)?.strip_prefix('/')?;
    let base = rest.split('/').next()?;
    parse_base_name(base)?;
    Some(format!("{STORE_DIR}/{base}"))
}

/// Split `<hash>-<name>` and check both parts.
pub fn parse_base_name(base: &str) -> Option<([u8; HASH_LEN], &str)> {
    let b = base.as_bytes();
    if b.len() < HASH_LEN + 2 || b[HASH_LEN] != b'-' {
        return None;
    }
    if !b[..HASH_LEN].iter().all(|&c| nixbase32::is_char(c)) {
        return None;
    }
    let name = &base[HASH_LEN + 1..];
    if !name.bytes().all(formats::nar::is_name_char) || name.starts_with('.') {
        return None;
    }
    let mut h = [0u8; HASH_LEN];
    h.copy_from_slice(&b[..HASH_LEN]);
    Some((h, name))
}

/// The base name of a logical store path.
pub fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_path_parsing() {
        let p = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello-2.12";
        assert_eq!(store_path_of(p).as_deref(), Some(p));
        assert_eq!(store_path_of(&format!("{p}/bin/hello")).as_deref(), Some(p));
        assert_eq!(store_path_of("/nix/store/short-x"), None);
        assert_eq!(store_path_of("/usr/bin"), None);
        // 'e' is not in Nix's base-32 alphabet.
        assert_eq!(
            store_path_of("/nix/store/e123456789abcdfghijklmnpqrsvwxyz-x"),
            None
        );
    }

    #[test]
    fn resolves_links_into_a_rooted_store() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::new(d.path());
        let base = "0123456789abcdfghijklmnpqrsvwxyz-sys";
        std::fs::create_dir_all(store.store_dir_physical().join(base)).unwrap();
        let link = d.path().join("result");
        std::os::unix::fs::symlink(format!("/nix/store/{base}"), &link).unwrap();
        assert_eq!(
            store.resolve_toplevel(&link).unwrap(),
            format!("/nix/store/{base}")
        );
        let plain = d.path().join("plain");
        std::fs::create_dir(&plain).unwrap();
        assert!(matches!(
            store.resolve_toplevel(&plain),
            Err(StoreError::NotStorePath(_))
        ));
    }
}
