//! A machine's identity: a directory of files that ends up visible at
//! `/var/identity` on the running system (on a disk image: the state
//! filesystem's `identity/`, as the layout manifest says). This module
//! turns a source directory plus generated items into the tree written
//! there:
//!
//! - regular files and directories only; a symlink is taken only when it
//!   leads to a regular file inside the source directory (copied as a
//!   file); one leading outside, device nodes, fifos and sockets are
//!   refused, naming the path;
//! - every owner is root; modes are kept, except private keys (`*_key`,
//!   `*.key`), which are forced to 0600 (a git checkout gives 0644);
//! - generated on request, unless the source has its own: `hostname`,
//!   `machine-id`, and an ed25519 SSH host key pair
//!   (`ssh_host_ed25519_key`, `.pub`) made from the OS's randomness,
//!   never from a public seed;
//! - a `hostname` or `machine-id` the source brings is checked as a
//!   generated one would be (one valid host name; 32 lowercase hex).

use base64::Engine;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::tree::{Content, Kind, Node, NodeId, Owner, Tree, TreeError, ROOT};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: a symlink leading outside the identity directory ({target})")]
    Escapes { path: PathBuf, target: PathBuf },
    #[error("{path}: not a regular file or directory ({what}); an identity holds files only")]
    NotAFile { path: PathBuf, what: &'static str },
    #[error("{path}: {why}")]
    BadFile { path: PathBuf, why: String },
    #[error("hostname {0:?}: not a valid host name (letters, digits, '-', '.'; at most 253)")]
    Hostname(String),
    #[error("the OS's randomness: {0}")]
    Random(String),
    #[error(transparent)]
    Tree(#[from] TreeError),
}

/// Where the machine-id comes from when the source has none.
#[derive(Clone, Debug)]
pub enum MachineId {
    /// Derived from a seed and a purpose (stable per machine name).
    Seeded { seed: String, purpose: String },
    /// From the OS's randomness.
    Random,
}

/// What to generate besides the source directory's files.
#[derive(Clone, Debug, Default)]
pub struct Generate {
    pub hostname: Option<String>,
    pub machine_id: Option<MachineId>,
    pub host_key: bool,
    /// With `host_key`: a pair generated before (private file, `.pub`
    /// line), kept instead of making a new one (a VM's upgrade).
    pub keep_host_key: Option<(Vec<u8>, String)>,
}

/// A generated host key's public half, for the operator to pin.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HostKey {
    /// The `.pub` line.
    pub public: String,
    /// As `ssh-keygen -l` prints it: `SHA256:…`.
    pub fingerprint: String,
}

pub struct Identity {
    pub tree: Tree,
    pub host_key: Option<HostKey>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |err| IdentityError::Io {
        path: path.to_owned(),
        err,
    }
}

fn file(bytes: Vec<u8>, perm: u16) -> Node {
    Node {
        kind: Kind::File {
            size: bytes.len() as u64,
            content: Content::Bytes(bytes.into()),
        },
        perm,
        uid: 0,
        gid: 0,
    }
}

/// Whether an identity tree holds a private key anywhere (its disk or
/// file must then be readable by its owner alone).
pub fn holds_private_key(tree: &Tree) -> bool {
    tree.nodes.iter().any(|n| match &n.kind {
        Kind::Dir { children } => children.keys().any(|k| is_private_key(k)),
        _ => false,
    })
}

/// Whether a file name is a private key's.
pub fn is_private_key(name: &[u8]) -> bool {
    name.ends_with(b"_key") || name.ends_with(b".key")
}

/// The identity tree of `src` (if any) plus what `gen` asks for.
pub fn build(src: Option<&Path>, gen: &Generate) -> Result<Identity, IdentityError> {
    let mut tree = Tree::new(0o755);
    if let Some(src) = src {
        let top = fs::canonicalize(src).map_err(io(src))?;
        if !fs::metadata(&top).map_err(io(src))?.is_dir() {
            return Err(IdentityError::NotAFile {
                path: src.to_owned(),
                what: "not a directory",
            });
        }
        add_dir(&mut tree, ROOT, src, &top)?;
    }
    complete(tree, src.unwrap_or(Path::new("identity")), gen)
}

/// An identity tree (from a directory, or an earlier identity disk named
/// `origin`) checked and completed: what it has is kept, what `gen` asks
/// for and it lacks is generated. Its `hostname` and `machine-id` are
/// checked as a generated one would be.
pub fn complete(mut tree: Tree, origin: &Path, gen: &Generate) -> Result<Identity, IdentityError> {
    check_files(&tree, origin)?;
    if let Some(h) = &gen.hostname {
        if !valid_hostname(h) {
            return Err(IdentityError::Hostname(h.clone()));
        }
        if !has(&tree, b"hostname") {
            tree.insert(
                ROOT,
                b"hostname",
                file(format!("{h}\n").into_bytes(), 0o644),
            )?;
        }
    }
    if let (Some(m), false) = (&gen.machine_id, has(&tree, b"machine-id")) {
        let id: [u8; 16] = match m {
            MachineId::Seeded { seed, purpose } => {
                let d = crate::seed::derive(seed, &format!("machine-id:{purpose}"));
                d[..16].try_into().expect("16 bytes")
            }
            MachineId::Random => random()?,
        };
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        tree.insert(
            ROOT,
            b"machine-id",
            file(format!("{hex}\n").into_bytes(), 0o444),
        )?;
    }
    let host_key = if !gen.host_key {
        None
    } else if has(&tree, b"ssh_host_ed25519_key") {
        // The identity's own key stays; its fingerprint is still reported.
        text_of(&tree, b"ssh_host_ed25519_key.pub").and_then(|public| {
            let fingerprint = fingerprint_of(&public)?;
            Some(HostKey {
                public,
                fingerprint,
            })
        })
    } else {
        let comment = format!(
            "root@{}",
            text_of(&tree, b"hostname").as_deref().unwrap_or("nixforge")
        );
        Some(add_host_key(&mut tree, gen, &comment)?)
    };
    Ok(Identity { tree, host_key })
}

fn has(t: &Tree, name: &[u8]) -> bool {
    matches!(&t.nodes[ROOT].kind, Kind::Dir { children } if children.contains_key(name))
}

/// The text of a top-level file of an identity tree, trimmed.
pub fn text_of(tree: &Tree, name: &[u8]) -> Option<String> {
    let Kind::Dir { children } = &tree.nodes[ROOT].kind else {
        return None;
    };
    match &tree.nodes[*children.get(name)?].kind {
        Kind::File {
            content: Content::Bytes(b),
            ..
        } => Some(String::from_utf8_lossy(b).trim().to_string()),
        Kind::File {
            content: Content::Host { path, .. },
            ..
        } => fs::read_to_string(path).ok().map(|s| s.trim().to_string()),
        _ => None,
    }
}

/// A `hostname` and a `machine-id` the identity brings must be what the
/// system takes: one valid host name; 32 lowercase hex digits.
fn check_files(tree: &Tree, origin: &Path) -> Result<(), IdentityError> {
    let bad = |name: &str, why: String| IdentityError::BadFile {
        path: origin.join(name),
        why,
    };
    if has(tree, b"hostname") {
        let h = text_of(tree, b"hostname").unwrap_or_default();
        if !valid_hostname(&h) || h.contains('\n') {
            return Err(bad(
                "hostname",
                format!("{h:?} is not a valid host name (letters, digits, '-', '.'; at most 253)"),
            ));
        }
    }
    if has(tree, b"machine-id") {
        let m = text_of(tree, b"machine-id").unwrap_or_default();
        let hex = m.len() == 32
            && m.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex || m.bytes().all(|b| b == b'0') {
            return Err(bad(
                "machine-id",
                format!("{m:?} is not a machine ID (32 lowercase hex digits, not all zero)"),
            ));
        }
    }
    Ok(())
}

/// A new (or kept, `gen.keep_host_key`) ed25519 host key pair into `tree`.
fn add_host_key(tree: &mut Tree, gen: &Generate, comment: &str) -> Result<HostKey, IdentityError> {
    let (private, public, fingerprint) = match &gen.keep_host_key {
        Some((private, public)) => (
            private.clone(),
            public.trim_end().to_string(),
            fingerprint_of(public).ok_or_else(|| {
                IdentityError::Random("the kept host key's public line is not ssh-ed25519".into())
            })?,
        ),
        None => {
            let (private, public, fingerprint) = ed25519_pair(random()?, comment)?;
            (private.into_bytes(), public, fingerprint)
        }
    };
    tree.insert(ROOT, b"ssh_host_ed25519_key", file(private, 0o600))?;
    tree.insert(
        ROOT,
        b"ssh_host_ed25519_key.pub",
        file(format!("{public}\n").into_bytes(), 0o644),
    )?;
    Ok(HostKey {
        public,
        fingerprint,
    })
}

/// Letters, digits, `-` and `.`, at most 253.
fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn random<const N: usize>() -> Result<[u8; N], IdentityError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| IdentityError::Random(e.to_string()))?;
    Ok(b)
}

/// The entries of `dir` (a path under the canonical `top`) into `node`.
fn add_dir(tree: &mut Tree, node: NodeId, dir: &Path, top: &Path) -> Result<(), IdentityError> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(io(dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io(dir))?;
    entries.sort();
    for path in entries {
        let name = path
            .file_name()
            .expect("a directory entry has a name")
            .as_encoded_bytes()
            .to_vec();
        let md = fs::symlink_metadata(&path).map_err(io(&path))?;
        let ft = md.file_type();
        let (real, md) = if ft.is_symlink() {
            let target = fs::canonicalize(&path).map_err(io(&path))?;
            if !target.starts_with(top) {
                return Err(IdentityError::Escapes { path, target });
            }
            let md = fs::metadata(&target).map_err(io(&target))?;
            if !md.is_file() {
                return Err(IdentityError::NotAFile {
                    path,
                    what: "a symlink to a non-file",
                });
            }
            (target, md)
        } else {
            (path.clone(), md)
        };
        let ft = md.file_type();
        if ft.is_dir() {
            let perm = (md.permissions().mode() & 0o7777) as u16;
            let id = tree.insert(
                node,
                &name,
                Node {
                    kind: Kind::Dir {
                        children: Default::default(),
                    },
                    perm,
                    uid: 0,
                    gid: 0,
                },
            )?;
            add_dir(tree, id, &path, top)?;
        } else if ft.is_file() {
            let id = tree.add_host(
                node,
                &name,
                &real,
                Owner {
                    force: Some((0, 0)),
                },
            )?;
            if is_private_key(&name) {
                tree.nodes[id].perm = 0o600;
            }
        } else {
            use std::os::unix::fs::FileTypeExt;
            let what = if ft.is_block_device() || ft.is_char_device() {
                "a device node"
            } else if ft.is_fifo() {
                "a fifo"
            } else {
                "a socket"
            };
            return Err(IdentityError::NotAFile { path, what });
        }
    }
    Ok(())
}

/// An ed25519 key pair from a 32-byte secret: the OpenSSH private key
/// file (openssh-key-v1, unencrypted), the public line and its SHA-256
/// fingerprint.
fn ed25519_pair(
    secret: [u8; 32],
    comment: &str,
) -> Result<(String, String, String), IdentityError> {
    let key = ed25519_dalek::SigningKey::from_bytes(&secret);
    let pk = key.verifying_key().to_bytes();
    let put = |v: &mut Vec<u8>, b: &[u8]| {
        v.extend_from_slice(&(b.len() as u32).to_be_bytes());
        v.extend_from_slice(b);
    };
    let mut blob = Vec::new();
    put(&mut blob, b"ssh-ed25519");
    put(&mut blob, &pk);
    let check: [u8; 4] = random()?;
    let mut private = Vec::new();
    private.extend_from_slice(&check);
    private.extend_from_slice(&check);
    put(&mut private, b"ssh-ed25519");
    put(&mut private, &pk);
    let mut sk = secret.to_vec();
    sk.extend_from_slice(&pk);
    put(&mut private, &sk);
    put(&mut private, comment.as_bytes());
    let mut pad = 1u8;
    while private.len() % 8 != 0 {
        private.push(pad);
        pad += 1;
    }
    let mut file = b"openssh-key-v1\0".to_vec();
    put(&mut file, b"none");
    put(&mut file, b"none");
    put(&mut file, b"");
    file.extend_from_slice(&1u32.to_be_bytes());
    put(&mut file, &blob);
    put(&mut file, &private);
    let b64 = base64::engine::general_purpose::STANDARD;
    let body = b64.encode(&file);
    let mut pem = String::from("-----BEGIN OPENSSH PRIVATE KEY-----\n");
    for line in body.as_bytes().chunks(70) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END OPENSSH PRIVATE KEY-----\n");
    let public = format!("ssh-ed25519 {} {comment}", b64.encode(&blob));
    let digest = <sha2::Sha256 as sha2::Digest>::digest(&blob);
    let fingerprint = format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    );
    Ok((pem, public, fingerprint))
}

/// `SHA256:…` of an OpenSSH public key line, as `ssh-keygen -l` shows it.
pub fn fingerprint_of(public: &str) -> Option<String> {
    use base64::Engine;
    let mut f = public.split_whitespace();
    if f.next()? != "ssh-ed25519" {
        return None;
    }
    let blob = base64::engine::general_purpose::STANDARD
        .decode(f.next()?)
        .ok()?;
    let digest = <sha2::Sha256 as sha2::Digest>::digest(&blob);
    Some(format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    ))
}

#[cfg(test)]
mod tests;
