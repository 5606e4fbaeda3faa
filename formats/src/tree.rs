//! The input of the filesystem writers (ext4, FAT): a tree *description*,
//! not a directory.
//!
//! Nodes come from host directories (read lazily at write time: only
//! metadata is gathered here) or are generated (bytes, directories,
//! symlinks). A node reachable under several names is a hard link. Store
//! paths are mapped into `/nix/store/…` without copying the closure first.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub type NodeId = usize;
pub const ROOT: NodeId = 0;

#[derive(Clone, Debug)]
pub enum Content {
    /// Read from a host file at write time. `segments` are the
    /// block-aligned (offset, length) ranges holding data; holes between
    /// them stay holes.
    Host {
        path: PathBuf,
        segments: Vec<(u64, u64)>,
    },
    Bytes(Arc<[u8]>),
}

#[derive(Clone, Debug)]
pub enum Kind {
    Dir { children: BTreeMap<Vec<u8>, NodeId> },
    File { size: u64, content: Content },
    Symlink { target: Vec<u8> },
    CharDev { major: u32, minor: u32 },
    BlockDev { major: u32, minor: u32 },
    Fifo,
    Socket,
}

#[derive(Clone, Debug)]
pub struct Node {
    pub kind: Kind,
    /// Permission bits including setuid/setgid/sticky (no type bits).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
}

impl Node {
    /// A root-owned file holding `b`.
    pub fn bytes(b: impl Into<Vec<u8>>, perm: u16) -> Node {
        let b: Vec<u8> = b.into();
        Node {
            kind: Kind::File {
                size: b.len() as u64,
                content: Content::Bytes(std::sync::Arc::from(b)),
            },
            perm,
            uid: 0,
            gid: 0,
        }
    }

    /// A root-owned symlink to `target`.
    pub fn symlink(target: &str) -> Node {
        Node {
            kind: Kind::Symlink {
                target: target.as_bytes().to_vec(),
            },
            perm: 0o777,
            uid: 0,
            gid: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: io::Error },
    #[error("{path}: name is {len} bytes; ext4 allows at most 255")]
    NameTooLong { path: PathBuf, len: usize },
    #[error("{path}: invalid name (empty, '.', '..', or contains '/' or NUL)")]
    BadName { path: PathBuf },
    #[error("{path}: already exists in the image tree")]
    Exists { path: PathBuf },
    #[error("{path}: not a directory in the image tree")]
    NotDir { path: PathBuf },
}

/// How to take ownership from host files.
#[derive(Clone, Copy, Debug, Default)]
pub struct Owner {
    /// Force every host entry to this uid:gid (a Nix store wants 0:0).
    pub force: Option<(u32, u32)>,
}

#[derive(Clone, Debug)]
pub struct Tree {
    pub nodes: Vec<Node>,
}

/// A host object read apart from any tree: see [`Tree::read_host`].
pub struct Fragment {
    tree: Tree,
    top: NodeId,
}

impl Fragment {
    /// Its tree, and the node that is the host object read.
    pub fn parts(&self) -> (&Tree, NodeId) {
        (&self.tree, self.top)
    }
}

/// Data segments of sparse files are aligned to this (the ext4 block).
pub const BLOCK: u64 = 4096;

impl Tree {
    pub fn new(root_perm: u16) -> Self {
        Tree {
            nodes: vec![Node {
                kind: Kind::Dir {
                    children: BTreeMap::new(),
                },
                perm: root_perm,
                uid: 0,
                gid: 0,
            }],
        }
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    pub fn push(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Link `child` as `name` in directory `dir`.
    pub fn link(&mut self, dir: NodeId, name: &[u8], child: NodeId) -> Result<(), TreeError> {
        check_name(name, || self.describe(dir, name))?;
        // The path for messages is computed only on error: it walks the tree.
        match &mut self.nodes[dir].kind {
            Kind::Dir { children } if !children.contains_key(name) => {
                children.insert(name.to_vec(), child);
                Ok(())
            }
            Kind::Dir { .. } => Err(TreeError::Exists {
                path: self.describe(dir, name),
            }),
            _ => Err(TreeError::NotDir {
                path: self.describe(dir, name),
            }),
        }
    }

    /// Insert a new node as `name` in `dir`.
    pub fn insert(&mut self, dir: NodeId, name: &[u8], node: Node) -> Result<NodeId, TreeError> {
        let id = self.push(node);
        self.link(dir, name, id)?;
        Ok(id)
    }

    /// The directory at `path` (absolute, `/`-separated), created with
    /// `perm` (owned by root) where missing.
    pub fn mkdir_p(&mut self, path: &[u8], perm: u16) -> Result<NodeId, TreeError> {
        let mut cur = ROOT;
        for comp in path.split(|&c| c == b'/').filter(|c| !c.is_empty()) {
            let existing = match &self.nodes[cur].kind {
                Kind::Dir { children } => children.get(comp).copied(),
                _ => {
                    return Err(TreeError::NotDir {
                        path: PathBuf::from(OsStr::from_bytes(path)),
                    })
                }
            };
            cur = match existing {
                Some(id) => id,
                None => self.insert(cur, comp, dir_node(perm, 0, 0))?,
            };
        }
        if !matches!(self.nodes[cur].kind, Kind::Dir { .. }) {
            return Err(TreeError::NotDir {
                path: PathBuf::from(OsStr::from_bytes(path)),
            });
        }
        Ok(cur)
    }

    /// Add the host object at `src` as `name` in `dir`, recursively.
    /// Hard links inside `src` stay hard links (one node).
    pub fn add_host(
        &mut self,
        dir: NodeId,
        name: &[u8],
        src: &Path,
        owner: Owner,
    ) -> Result<NodeId, TreeError> {
        let mut links = HashMap::new();
        let md = fs::symlink_metadata(src).map_err(io_err(src))?;
        self.add_host_inner(dir, name, src, md, owner, &mut links)
    }

    /// The host object at `src` read on its own, as [`Tree::add_host`]
    /// would read it, to be [`Tree::graft`]ed later: many can be read in
    /// parallel (reading is all system calls; grafting is cheap).
    pub fn read_host(src: &Path, owner: Owner) -> Result<Fragment, TreeError> {
        let mut tree = Tree::new(0o755);
        let name = src.file_name().map_or(&b"_"[..], |n| n.as_bytes());
        let top = tree.add_host(ROOT, name, src, owner)?;
        Ok(Fragment { tree, top })
    }

    /// Put a fragment into `dir` as `name`.
    pub fn graft(&mut self, dir: NodeId, name: &[u8], f: Fragment) -> Result<NodeId, TreeError> {
        // The fragment's nodes but its own root move up by `shift`.
        let shift = self.nodes.len() - 1;
        for mut node in f.tree.nodes.into_iter().skip(1) {
            if let Kind::Dir { children } = &mut node.kind {
                for id in children.values_mut() {
                    *id += shift;
                }
            }
            self.nodes.push(node);
        }
        let top = f.top + shift;
        self.link(dir, name, top)?;
        Ok(top)
    }

    /// Put all of `other` into `dir` as `name` (its root becomes that
    /// directory).
    pub fn nest(&mut self, dir: NodeId, name: &[u8], other: Tree) -> Result<NodeId, TreeError> {
        let shift = self.nodes.len();
        for mut node in other.nodes {
            if let Kind::Dir { children } = &mut node.kind {
                for id in children.values_mut() {
                    *id += shift;
                }
            }
            self.nodes.push(node);
        }
        self.link(dir, name, shift)?;
        Ok(shift)
    }

    /// Merge the *contents* of host directory `src` into `dir`.
    pub fn add_host_contents(
        &mut self,
        dir: NodeId,
        src: &Path,
        owner: Owner,
    ) -> Result<(), TreeError> {
        let mut links = HashMap::new();
        let md = fs::metadata(src).map_err(io_err(src))?;
        if let Kind::Dir { .. } = self.nodes[dir].kind {
            let n = &mut self.nodes[dir];
            n.perm = (md.mode() & 0o7777) as u16;
            (n.uid, n.gid) = owner.force.unwrap_or((md.uid(), md.gid()));
        }
        for (cname, cpath, cmd) in read_dir_sorted(src)? {
            self.add_host_inner(dir, &cname, &cpath, cmd, owner, &mut links)?;
        }
        Ok(())
    }

    /// `md`: `src`'s own metadata (not its target's).
    fn add_host_inner(
        &mut self,
        dir: NodeId,
        name: &[u8],
        src: &Path,
        md: fs::Metadata,
        owner: Owner,
        links: &mut HashMap<(u64, u64), NodeId>,
    ) -> Result<NodeId, TreeError> {
        check_name(name, || src.to_owned())?;
        let ft = md.file_type();
        if !ft.is_dir() && md.nlink() > 1 {
            if let Some(&id) = links.get(&(md.dev(), md.ino())) {
                self.link(dir, name, id)?;
                return Ok(id);
            }
        }
        let (uid, gid) = owner.force.unwrap_or((md.uid(), md.gid()));
        let perm = (md.mode() & 0o7777) as u16;
        let kind = if ft.is_dir() {
            Kind::Dir {
                children: BTreeMap::new(),
            }
        } else if ft.is_file() {
            Kind::File {
                size: md.len(),
                content: Content::Host {
                    path: src.to_owned(),
                    segments: data_segments(src, &md)?,
                },
            }
        } else if ft.is_symlink() {
            Kind::Symlink {
                target: fs::read_link(src)
                    .map_err(io_err(src))?
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
            }
        } else {
            let (major, minor) = (dev_major(md.rdev()), dev_minor(md.rdev()));
            if ft.is_char_device() {
                Kind::CharDev { major, minor }
            } else if ft.is_block_device() {
                Kind::BlockDev { major, minor }
            } else if ft.is_fifo() {
                Kind::Fifo
            } else {
                Kind::Socket
            }
        };
        let is_dir = ft.is_dir();
        let id = self.insert(
            dir,
            name,
            Node {
                kind,
                perm,
                uid,
                gid,
            },
        )?;
        if is_dir {
            for (cname, cpath, cmd) in read_dir_sorted(src)? {
                self.add_host_inner(id, &cname, &cpath, cmd, owner, links)?;
            }
        } else if md.nlink() > 1 {
            links.insert((md.dev(), md.ino()), id);
        }
        Ok(id)
    }

    /// A readable path for error messages.
    fn describe(&self, dir: NodeId, name: &[u8]) -> PathBuf {
        let mut p = self.path_of(dir);
        p.push(OsStr::from_bytes(name));
        p
    }

    /// The image path of a node (first found; for messages only).
    pub fn path_of(&self, target: NodeId) -> PathBuf {
        fn walk(t: &Tree, at: NodeId, target: NodeId, acc: &mut Vec<Vec<u8>>) -> bool {
            if at == target {
                return true;
            }
            if let Kind::Dir { children } = &t.nodes[at].kind {
                for (n, &c) in children {
                    acc.push(n.clone());
                    if walk(t, c, target, acc) {
                        return true;
                    }
                    acc.pop();
                }
            }
            false
        }
        let mut acc = Vec::new();
        walk(self, ROOT, target, &mut acc);
        let mut p = PathBuf::from("/");
        for c in acc {
            p.push(OsStr::from_bytes(&c));
        }
        p
    }
}

pub fn dir_node(perm: u16, uid: u32, gid: u32) -> Node {
    Node {
        kind: Kind::Dir {
            children: BTreeMap::new(),
        },
        perm,
        uid,
        gid,
    }
}

fn check_name(name: &[u8], path: impl Fn() -> PathBuf) -> Result<(), TreeError> {
    if name.len() > 255 {
        return Err(TreeError::NameTooLong {
            path: path(),
            len: name.len(),
        });
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(TreeError::BadName { path: path() });
    }
    Ok(())
}

fn io_err(p: &Path) -> impl FnOnce(io::Error) -> TreeError + '_ {
    move |err| TreeError::Io {
        path: p.to_owned(),
        err,
    }
}

/// A directory's entries sorted by name, each with its own metadata,
/// taken relative to the open directory (no walk of the whole path).
fn read_dir_sorted(dir: &Path) -> Result<Vec<(Vec<u8>, PathBuf, fs::Metadata)>, TreeError> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        let md = e.metadata().map_err(io_err(&e.path()))?;
        v.push((e.file_name().as_bytes().to_vec(), e.path(), md));
    }
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

/// Block-aligned data ranges of a host file. Only files with fewer
/// allocated blocks than their size can have holes, so only those are
/// probed with SEEK_DATA/SEEK_HOLE.
fn data_segments(path: &Path, md: &fs::Metadata) -> Result<Vec<(u64, u64)>, TreeError> {
    let size = md.len();
    if size == 0 {
        return Ok(Vec::new());
    }
    if md.blocks() * 512 >= size {
        return Ok(vec![(0, size)]);
    }
    let f = fs::File::open(path).map_err(io_err(path))?;
    let mut segs: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let Some(data) = crate::sys::seek_data(&f, pos).map_err(io_err(path))? else {
            break;
        };
        let hole = crate::sys::seek_hole(&f, data)
            .map_err(io_err(path))?
            .min(size);
        let start = data / BLOCK * BLOCK;
        let end = hole.div_ceil(BLOCK) * BLOCK;
        match segs.last_mut() {
            Some(last) if last.0 + last.1 >= start => last.1 = end.max(last.0 + last.1) - last.0,
            _ => segs.push((start, end - start)),
        }
        pos = hole.max(data + 1);
    }
    // The final segment may extend past EOF by rounding: clamp it.
    if let Some(last) = segs.last_mut() {
        last.1 = last.1.min(size - last.0);
    }
    Ok(segs)
}

fn dev_major(rdev: u64) -> u32 {
    (((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff)) as u32
}
fn dev_minor(rdev: u64) -> u32 {
    (((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff)) as u32
}
