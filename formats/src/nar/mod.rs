//! Nix ARchive (NAR) serialization, streamed.
//!
//! A NAR is Nix's canonical serialization of a store path: every string is
//! a little-endian u64 length followed by the bytes, zero-padded to 8.
//! Directory entries are sorted by name bytes; only the executable bit of a
//! mode is kept; symlinks are stored, never followed (a dangling symlink is
//! perfectly legal). `narHash` is the SHA-256 of this byte stream and
//! `narSize` its length; Nix finds a path's references by scanning the same
//! stream for the hash parts of other store paths, which [`RefScanner`]
//! reproduces.

mod scan;

pub use scan::{is_name_char, RefScanner, HASH_LEN};

use sha2::{Digest, Sha256};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::tree::{Kind, NodeId, Tree};

#[derive(Debug, thiserror::Error)]
pub enum NarError {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: io::Error },
    #[error("{path}: unsupported file type (NAR holds only files, directories and symlinks)")]
    FileType { path: PathBuf },
    #[error("{path}: file changed size while it was read (expected {expected} bytes)")]
    Changed { path: PathBuf, expected: u64 },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> NarError + '_ {
    move |err| NarError::Io {
        path: path.to_owned(),
        err,
    }
}

/// Writes NAR framing to `W`; errors name the object being serialized.
struct Framer<'a, W: Write> {
    out: &'a mut W,
    path_for_errors: PathBuf,
}

impl<W: Write> Framer<'_, W> {
    fn raw(&mut self, b: &[u8]) -> Result<(), NarError> {
        match self.out.write_all(b) {
            Ok(()) => Ok(()),
            Err(e) => Err(io_err(&self.path_for_errors)(e)),
        }
    }
    fn int(&mut self, n: u64) -> Result<(), NarError> {
        self.raw(&n.to_le_bytes())
    }
    fn pad(&mut self, len: u64) -> Result<(), NarError> {
        let p = (8 - (len % 8) as usize) % 8;
        self.raw(&[0u8; 8][..p])
    }
    fn str(&mut self, s: &[u8]) -> Result<(), NarError> {
        self.int(s.len() as u64)?;
        self.raw(s)?;
        self.pad(s.len() as u64)
    }
}

/// Serialize the file system object at `path` as a NAR into `out`.
/// `buf` is the read buffer (its capacity is reused between calls).
pub fn dump<W: Write>(path: &Path, out: &mut W, buf: &mut Vec<u8>) -> Result<(), NarError> {
    if buf.len() < 256 * 1024 {
        buf.resize(256 * 1024, 0);
    }
    let mut f = Framer {
        out,
        path_for_errors: path.to_owned(),
    };
    f.str(b"nix-archive-1")?;
    dump_node(path, &mut f, buf)
}

fn dump_node<W: Write>(path: &Path, f: &mut Framer<W>, buf: &mut [u8]) -> Result<(), NarError> {
    let md = fs::symlink_metadata(path).map_err(io_err(path))?;
    let ft = md.file_type();
    f.str(b"(")?;
    f.str(b"type")?;
    if ft.is_symlink() {
        let target = fs::read_link(path).map_err(io_err(path))?;
        f.str(b"symlink")?;
        f.str(b"target")?;
        f.str(target.as_os_str().as_bytes())?;
    } else if ft.is_file() {
        f.str(b"regular")?;
        if md.permissions().mode() & 0o100 != 0 {
            f.str(b"executable")?;
            f.str(b"")?;
        }
        f.str(b"contents")?;
        let size = md.len();
        f.int(size)?;
        let mut file = File::open(path).map_err(io_err(path))?;
        let mut left = size;
        while left > 0 {
            let want = buf.len().min(left as usize);
            let n = file.read(&mut buf[..want]).map_err(io_err(path))?;
            if n == 0 {
                return Err(NarError::Changed {
                    path: path.to_owned(),
                    expected: size,
                });
            }
            f.raw(&buf[..n])?;
            left -= n as u64;
        }
        f.pad(size)?;
    } else if ft.is_dir() {
        f.str(b"directory")?;
        for name in sorted_entries(path)? {
            let child = path.join(std::ffi::OsStr::from_bytes(&name));
            f.str(b"entry")?;
            f.str(b"(")?;
            f.str(b"name")?;
            f.str(&name)?;
            f.str(b"node")?;
            dump_node(&child, f, buf)?;
            f.str(b")")?;
        }
    } else {
        return Err(NarError::FileType {
            path: path.to_owned(),
        });
    }
    f.str(b")")
}

/// The length of the NAR of `path`, from its metadata alone (no file is
/// read): what `dump` would write.
pub fn size(path: &Path) -> Result<u64, NarError> {
    let md = fs::symlink_metadata(path).map_err(io_err(path))?;
    Ok(framed(13) + size_node(path, &md)?)
}

/// The length of the NAR of node `id` of `tree` (a tree read from the
/// host object at `host`, which names it in errors): what [`size`] gives
/// for that object, from the tree alone (no file system call).
pub fn tree_size(tree: &Tree, id: NodeId, host: &Path) -> Result<u64, NarError> {
    fn node(tree: &Tree, id: NodeId, at: &Path) -> Result<u64, NarError> {
        let n = tree.node(id);
        match &n.kind {
            Kind::Symlink { target } => Ok(symlink_node(target.len())),
            Kind::File { size, .. } => Ok(file_node(n.perm & 0o100 != 0, *size)),
            Kind::Dir { children } => {
                let mut t = dir_node();
                for (name, &child) in children {
                    t += dir_entry(
                        name.len(),
                        node(tree, child, &at.join(OsStr::from_bytes(name)))?,
                    );
                }
                Ok(t)
            }
            _ => Err(NarError::FileType {
                path: at.to_owned(),
            }),
        }
    }
    Ok(framed(13) + node(tree, id, host)?)
}

/// A framed string of `n` bytes: its length, itself, padding to 8.
fn framed(n: usize) -> u64 {
    8 + (n as u64).next_multiple_of(8)
}

/// A node's "(" "type" … ")" around what its kind adds.
fn node_of(kind: u64) -> u64 {
    framed(1) + framed(4) + kind + framed(1)
}

/// A symlink node whose target is `target_len` bytes.
fn symlink_node(target_len: usize) -> u64 {
    node_of(framed(7) + framed(6) + framed(target_len))
}

/// A regular file node of `len` bytes.
fn file_node(executable: bool, len: u64) -> u64 {
    let exec = if executable {
        framed(10) + framed(0)
    } else {
        0
    };
    node_of(framed(7) + exec + framed(8) + 8 + len.next_multiple_of(8))
}

/// A directory node with no entries yet.
fn dir_node() -> u64 {
    node_of(framed(9))
}

/// One entry of a directory: its name and its node, `child` bytes.
fn dir_entry(name_len: usize, child: u64) -> u64 {
    framed(5) + framed(1) + framed(4) + framed(name_len) + framed(4) + child + framed(1)
}

/// `md`: `path`'s own metadata (not its target's).
fn size_node(path: &Path, md: &fs::Metadata) -> Result<u64, NarError> {
    let ft = md.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(path).map_err(io_err(path))?;
        Ok(symlink_node(target.as_os_str().len()))
    } else if ft.is_file() {
        Ok(file_node(md.permissions().mode() & 0o100 != 0, md.len()))
    } else if ft.is_dir() {
        // Each entry's metadata relative to the open directory: no walk
        // of the whole path per file.
        let mut entries = Vec::new();
        for e in fs::read_dir(path).map_err(io_err(path))? {
            let e = e.map_err(io_err(path))?;
            let md = e.metadata().map_err(io_err(&e.path()))?;
            entries.push((e.file_name(), md));
        }
        entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let mut t = dir_node();
        for (name, md) in entries {
            t += dir_entry(name.len(), size_node(&path.join(&name), &md)?);
        }
        Ok(t)
    } else {
        Err(NarError::FileType {
            path: path.to_owned(),
        })
    }
}

/// The names in a directory, sorted bytewise as NAR requires.
pub fn sorted_entries(dir: &Path) -> Result<Vec<Vec<u8>>, NarError> {
    let mut names = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        names.push(e.file_name().as_bytes().to_vec());
    }
    names.sort();
    Ok(names)
}

/// A `Write` sink that hashes, counts and scans the NAR stream in one pass.
pub struct NarDigest {
    sha: Sha256,
    size: u64,
    pub scanner: Option<RefScanner>,
}

impl NarDigest {
    pub fn new(scanner: Option<RefScanner>) -> Self {
        NarDigest {
            sha: Sha256::new(),
            size: 0,
            scanner,
        }
    }
    /// (sha256 digest, narSize, scanner)
    pub fn finish(self) -> ([u8; 32], u64, Option<RefScanner>) {
        (self.sha.finalize().into(), self.size, self.scanner)
    }
}

impl Write for NarDigest {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.sha.update(b);
        self.size += b.len() as u64;
        if let Some(s) = &mut self.scanner {
            s.feed(b);
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `sha256:<nix base-32>`, the form Nix prints and `--load-db` accepts.
pub fn format_hash(digest: &[u8; 32]) -> String {
    format!("sha256:{}", crate::nixbase32::encode(digest))
}

#[cfg(test)]
mod tests;
