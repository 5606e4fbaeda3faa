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

    /// Where the logical path `logical` leads, as a physical path: every
    /// symlink on the way followed inside this store's root (an absolute
    /// target is a logical path), so the answer is the same whether the
    /// store lies at `/` or under `--root`. None when it leads nowhere.
    pub fn follow(&self, logical: &str) -> Option<PathBuf> {
        let mut todo: Vec<String> = logical.split('/').rev().map(String::from).collect();
        let mut at = PathBuf::from("/");
        let mut hops = 0;
        while let Some(c) = todo.pop() {
            match c.as_str() {
                "" | "." => continue,
                ".." => {
                    at.pop();
                    continue;
                }
                _ => {}
            }
            let next = at.join(&c);
            let phys = self.physical(next.to_str()?);
            let md = std::fs::symlink_metadata(&phys).ok()?;
            if !md.file_type().is_symlink() {
                at = next;
                continue;
            }
            hops += 1;
            if hops > 40 {
                return None;
            }
            let target = std::fs::read_link(&phys).ok()?;
            if target.is_absolute() {
                at = PathBuf::from("/");
            }
            let t = target.to_str()?.to_string();
            todo.extend(t.split('/').rev().map(String::from));
        }
        Some(self.physical(at.to_str()?))
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
    fn links_are_followed_inside_the_root_not_through_the_hosts_nix() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::new(d.path());
        let s = d.path().join("nix/store");
        std::fs::create_dir_all(s.join("b-path/bin")).unwrap();
        std::fs::create_dir_all(s.join("a-sys")).unwrap();
        std::os::unix::fs::symlink("/nix/store/b-path", s.join("a-sys/sw")).unwrap();
        std::os::unix::fs::symlink("../a-sys/sw/bin", s.join("a-sys/rel")).unwrap();
        std::os::unix::fs::symlink("loop", s.join("a-sys/loop")).unwrap();
        let bin = s.join("b-path/bin");
        assert_eq!(store.follow("/nix/store/a-sys/sw/bin"), Some(bin.clone()));
        assert_eq!(store.follow("/nix/store/a-sys/rel"), Some(bin));
        assert_eq!(store.follow("/nix/store/a-sys/missing"), None);
        assert_eq!(store.follow("/nix/store/a-sys/loop"), None);
        // The host's own /nix is never reached: the plain join misses.
        assert!(!store.physical("/nix/store/a-sys/sw/bin").is_dir());
    }

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
