//! A deterministic tar (POSIX pax) writer for a [`Tree`]: what a container
//! layer is.
//!
//! Entries come in tree order (each directory's children sorted by name,
//! bytewise), directories before their contents, names relative (`nix/`,
//! `nix/store/…`). Entries keep their nodes' uid and gid (a store's are
//! 0), with no user or group names, and all have one mtime. ustar headers carry what fits; a pax extended header
//! (`x`) carries a name or link target over 100 bytes or a size over
//! ustar's 8 GiB. A node reachable under several names is written in full
//! under each, never as a hard link: whether a store's files share inodes
//! depends on `nix-store --optimise`, which must not change a layer's bytes.
//! The archive ends with two zero blocks, nothing more.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;

use crate::tree::{Content, Kind, NodeId, Tree, ROOT};

pub const BLOCK: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: io::Error },
    #[error("{path}: was {expected} bytes when the layer was planned, now {found}")]
    Changed {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("writing the archive: {0}")]
    Out(#[source] io::Error),
    #[error("{path}: a device, fifo or socket cannot go into a layer")]
    Special { path: String },
}

/// Entry types as tar names them.
#[derive(Clone, Copy)]
enum Type {
    File = b'0' as isize,
    Symlink = b'2' as isize,
    Dir = b'5' as isize,
    Pax = b'x' as isize,
}

struct Header<'a> {
    name: &'a [u8],
    perm: u16,
    owner: (u32, u32),
    size: u64,
    typ: Type,
    link: &'a [u8],
}

/// Writes archives with every entry's mtime at `mtime`.
pub struct TarWriter<W: Write> {
    out: W,
    mtime: u64,
    written: u64,
}

impl<W: Write> TarWriter<W> {
    pub fn new(out: W, mtime: u64) -> Self {
        TarWriter {
            out,
            mtime,
            written: 0,
        }
    }

    /// Every node below the tree's root (the root itself is `.`, not an
    /// entry), in order.
    pub fn tree(&mut self, t: &Tree) -> Result<(), TarError> {
        let mut name = Vec::new();
        self.children(t, ROOT, &mut name)
    }

    fn children(&mut self, t: &Tree, dir: NodeId, prefix: &mut Vec<u8>) -> Result<(), TarError> {
        let Kind::Dir { children } = &t.node(dir).kind else {
            return Ok(());
        };
        for (cname, &id) in children {
            let len = prefix.len();
            prefix.extend_from_slice(cname);
            let node = t.node(id);
            match &node.kind {
                Kind::Dir { .. } => {
                    prefix.push(b'/');
                    self.entry(Header {
                        name: prefix,
                        perm: node.perm,
                        owner: (node.uid, node.gid),
                        size: 0,
                        typ: Type::Dir,
                        link: b"",
                    })?;
                    self.children(t, id, prefix)?;
                }
                Kind::File { size, content } => {
                    self.entry(Header {
                        name: prefix,
                        perm: node.perm,
                        owner: (node.uid, node.gid),
                        size: *size,
                        typ: Type::File,
                        link: b"",
                    })?;
                    self.content(content, *size)?;
                }
                Kind::Symlink { target } => self.entry(Header {
                    name: prefix,
                    perm: 0o777,
                    owner: (node.uid, node.gid),
                    size: 0,
                    typ: Type::Symlink,
                    link: target,
                })?,
                _ => {
                    return Err(TarError::Special {
                        path: String::from_utf8_lossy(prefix).into_owned(),
                    })
                }
            }
            prefix.truncate(len);
        }
        Ok(())
    }

    fn put(&mut self, b: &[u8]) -> Result<(), TarError> {
        self.out.write_all(b).map_err(TarError::Out)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<(), TarError> {
        let rem = (self.written % BLOCK as u64) as usize;
        if rem != 0 {
            self.put(&[0u8; BLOCK][..BLOCK - rem])?;
        }
        Ok(())
    }

    fn entry(&mut self, h: Header) -> Result<(), TarError> {
        let mut pax = Vec::new();
        if h.name.len() > 100 {
            record(&mut pax, "path", h.name);
        }
        if h.link.len() > 100 {
            record(&mut pax, "linkpath", h.link);
        }
        if h.size > MAX_OCTAL_11 {
            record(&mut pax, "size", h.size.to_string().as_bytes());
        }
        if h.owner.0 > MAX_ID {
            record(&mut pax, "uid", h.owner.0.to_string().as_bytes());
        }
        if h.owner.1 > MAX_ID {
            record(&mut pax, "gid", h.owner.1.to_string().as_bytes());
        }
        if !pax.is_empty() {
            // A name for the extended header that is itself deterministic.
            let mut xname = b"PaxHeaders/".to_vec();
            let base = h
                .name
                .strip_suffix(b"/")
                .unwrap_or(h.name)
                .rsplit(|&c| c == b'/')
                .next()
                .unwrap_or(b"");
            xname.extend_from_slice(&base[..base.len().min(100 - xname.len())]);
            let block = self.header(&xname, 0o644, (0, 0), pax.len() as u64, Type::Pax, b"");
            self.put(&block)?;
            self.put(&pax)?;
            self.pad()?;
        }
        let name = &h.name[..h.name.len().min(100)];
        let link = &h.link[..h.link.len().min(100)];
        let size = if h.size > MAX_OCTAL_11 { 0 } else { h.size };
        let block = self.header(name, h.perm, h.owner, size, h.typ, link);
        self.put(&block)
    }

    fn header(
        &self,
        name: &[u8],
        perm: u16,
        owner: (u32, u32),
        size: u64,
        typ: Type,
        link: &[u8],
    ) -> [u8; BLOCK] {
        block(name, perm, owner, (size, self.mtime), typ, link)
    }

    fn content(&mut self, content: &Content, size: u64) -> Result<(), TarError> {
        match content {
            Content::Bytes(b) => self.put(b)?,
            Content::Host { path, .. } => {
                let err = |err| TarError::Io {
                    path: path.clone(),
                    err,
                };
                let f = File::open(path).map_err(err)?;
                let mut r = f.take(size);
                let mut buf = vec![0u8; 1 << 16];
                let mut n = 0u64;
                loop {
                    let k = r.read(&mut buf).map_err(err)?;
                    if k == 0 {
                        break;
                    }
                    self.put(&buf[..k])?;
                    n += k as u64;
                }
                // One byte more than planned is a file that grew.
                let grew = r.into_inner().read(&mut [0u8; 1]).map_err(err)? > 0;
                if n != size || grew {
                    return Err(TarError::Changed {
                        path: path.clone(),
                        expected: size,
                        found: std::fs::metadata(path).map_or(n, |m| m.len()),
                    });
                }
            }
        }
        self.pad()
    }

    /// The two zero blocks that end an archive; the writer back.
    pub fn finish(mut self) -> Result<W, TarError> {
        self.put(&[0u8; 2 * BLOCK])?;
        self.out.flush().map_err(TarError::Out)?;
        Ok(self.out)
    }
}

/// A ustar header block (`size` and `mtime` fit 11 octal digits).
fn block(
    name: &[u8],
    perm: u16,
    (uid, gid): (u32, u32),
    (size, mtime): (u64, u64),
    typ: Type,
    link: &[u8],
) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    b[..name.len()].copy_from_slice(name);
    octal(&mut b[100..108], u64::from(perm & 0o7777));
    // An id past ustar's 7 octal digits is in the pax header.
    octal(
        &mut b[108..116],
        u64::from(if uid > MAX_ID { 0 } else { uid }),
    );
    octal(
        &mut b[116..124],
        u64::from(if gid > MAX_ID { 0 } else { gid }),
    );
    octal(&mut b[124..136], size);
    octal(&mut b[136..148], mtime.min(MAX_OCTAL_11));
    b[156] = typ as u8;
    b[157..157 + link.len()].copy_from_slice(link);
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    octal(&mut b[329..337], 0);
    octal(&mut b[337..345], 0);
    checksum(&mut b);
    b
}

/// The checksum, over the header with its own field as spaces.
pub fn checksum(b: &mut [u8; BLOCK]) {
    b[148..156].fill(b' ');
    let sum: u32 = b.iter().map(|&c| u32::from(c)).sum();
    let s = format!("{sum:06o}\0 ");
    b[148..156].copy_from_slice(s.as_bytes());
}

/// A regular file's header (mode 0644, owner 0, `name` up to 100 bytes),
/// for archives of a few named files (an OVA). A size past ustar's 8 GiB
/// is in base-256, as GNU tar, libarchive and Python's tarfile read it.
pub fn file_header(name: &str, size: u64, mtime: u64) -> [u8; BLOCK] {
    let name = &name.as_bytes()[..name.len().min(100)];
    if size <= MAX_OCTAL_11 {
        return block(name, 0o644, (0, 0), (size, mtime), Type::File, b"");
    }
    let mut b = block(name, 0o644, (0, 0), (0, mtime), Type::File, b"");
    b[124] = 0x80;
    b[128..136].copy_from_slice(&size.to_be_bytes());
    checksum(&mut b);
    b
}

/// Zeros after `len` bytes of content, to the next whole block.
pub fn padding(len: u64) -> &'static [u8] {
    &[0u8; BLOCK][..(len.next_multiple_of(BLOCK as u64) - len) as usize]
}

/// What ends an archive: two zero blocks.
pub const END: [u8; 2 * BLOCK] = [0; 2 * BLOCK];

const MAX_OCTAL_11: u64 = 0o77777777777;
const MAX_ID: u32 = 0o7777777;

/// A NUL-terminated, zero-padded octal field.
fn octal(field: &mut [u8], v: u64) {
    let s = format!("{v:0w$o}", w = field.len() - 1);
    field[..s.len()].copy_from_slice(s.as_bytes());
    field[s.len()] = 0;
}

/// A pax record: "LEN key=value\n", LEN counting itself.
fn record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::{Node, Owner};
    use std::sync::Arc;

    fn file(b: &[u8], perm: u16) -> Node {
        Node {
            kind: Kind::File {
                size: b.len() as u64,
                content: Content::Bytes(Arc::from(b.to_vec())),
            },
            perm,
            uid: 0,
            gid: 0,
        }
    }

    fn archive(t: &Tree) -> Vec<u8> {
        let mut w = TarWriter::new(Vec::new(), 1);
        w.tree(t).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn pax_record_lengths_count_themselves() {
        for n in [1, 80, 90, 95, 96, 97, 98, 99, 100, 1000] {
            let mut out = Vec::new();
            record(&mut out, "path", &vec![b'a'; n]);
            let text = String::from_utf8(out.clone()).unwrap();
            let len: usize = text.split(' ').next().unwrap().parse().unwrap();
            assert_eq!(len, out.len(), "{n}");
        }
    }

    #[test]
    fn gnu_tar_reads_names_links_modes_and_contents_back() {
        let d = tempfile::tempdir().unwrap();
        let host = d.path().join("host");
        std::fs::write(&host, b"from the host\n").unwrap();
        let mut t = Tree::new(0o755);
        let deep = format!("nix/store/{}", "d".repeat(120));
        let dir = t.mkdir_p(deep.as_bytes(), 0o555).unwrap();
        t.insert(dir, b"x", file(b"hello\n", 0o444)).unwrap();
        let long_target = "/".to_string() + &"t".repeat(150);
        t.insert(
            dir,
            b"link",
            Node {
                kind: Kind::Symlink {
                    target: long_target.clone().into_bytes(),
                },
                perm: 0o777,
                uid: 0,
                gid: 0,
            },
        )
        .unwrap();
        t.add_host(
            ROOT,
            b"h",
            &host,
            Owner {
                force: Some((0, 0)),
            },
        )
        .unwrap();
        let tmp = t.mkdir_p(b"tmp", 0o1777).unwrap();
        let _ = tmp;
        let a = archive(&t);
        assert_eq!(a.len() % BLOCK, 0);
        assert_eq!(a, archive(&t), "deterministic");
        let tarfile = d.path().join("a.tar");
        std::fs::write(&tarfile, &a).unwrap();
        let out = d.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let st = std::process::Command::new("tar")
            .arg("-xpf")
            .arg(&tarfile)
            .arg("-C")
            .arg(&out)
            .status()
            .unwrap();
        assert!(st.success());
        use std::os::unix::fs::PermissionsExt;
        let md = |p: &str| std::fs::symlink_metadata(out.join(p)).unwrap();
        assert_eq!(
            std::fs::read(out.join(&deep).join("x")).unwrap(),
            b"hello\n"
        );
        assert_eq!(md(&deep).permissions().mode() & 0o7777, 0o555);
        assert_eq!(md("tmp").permissions().mode() & 0o7777, 0o1777);
        assert_eq!(
            std::fs::read_link(out.join(&deep).join("link")).unwrap(),
            PathBuf::from(long_target)
        );
        assert_eq!(std::fs::read(out.join("h")).unwrap(), b"from the host\n");
        // Listing order: parents first, children sorted.
        let list = std::process::Command::new("tar")
            .arg("-tf")
            .arg(&tarfile)
            .output()
            .unwrap();
        let names: Vec<String> = String::from_utf8(list.stdout)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        assert_eq!(names[0], "h");
        assert_eq!(names[1], "nix/");
        assert_eq!(names[2], "nix/store/");
        assert_eq!(names.last().unwrap(), "tmp/");
    }

    #[test]
    fn a_host_file_that_changed_size_is_named() {
        let d = tempfile::tempdir().unwrap();
        let host = d.path().join("f");
        std::fs::write(&host, b"four").unwrap();
        let mut t = Tree::new(0o755);
        t.add_host(ROOT, b"f", &host, Owner::default()).unwrap();
        std::fs::write(&host, b"four and more").unwrap();
        let mut w = TarWriter::new(Vec::new(), 1);
        let e = w.tree(&t).unwrap_err().to_string();
        assert!(
            e.contains(&host.display().to_string()) && e.contains("4 bytes"),
            "{e}"
        );
    }
}
