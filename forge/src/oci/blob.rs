//! Blobs: a layer is its tree as tar, hashed (the diff id), compressed
//! and hashed again (the digest), in one streaming pass into
//! `blobs/sha256/<digest>`; and the layer cache, which keeps compressed
//! layers under a key naming their paths' contents and the compressor.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use formats::tar::TarWriter;
use formats::tree::Tree;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// gzip at a level (no name, no time, OS byte "unknown").
    Gzip(u32),
    /// zstd at a level, one frame with a checksum.
    Zstd(i32),
}

impl Compression {
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::Gzip(_) => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd(_) => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
    fn key(self) -> String {
        match self {
            Compression::Gzip(l) => format!("gzip-{l}"),
            Compression::Zstd(l) => format!("zstd-{l}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    pub digest: [u8; 32],
    pub size: u64,
    /// The uncompressed tar's SHA-256 (layers only; else the digest).
    pub diff_id: [u8; 32],
}

pub fn hex(d: &[u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let v: Option<Vec<u8>> = (0..32)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect();
    v?.try_into().ok()
}

/// A writer that hashes and counts what passes through.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    n: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let k = self.inner.write(b)?;
        self.hash.update(&b[..k]);
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn hashing<W>(inner: W) -> Hashing<W> {
    Hashing {
        inner,
        hash: Sha256::new(),
        n: 0,
    }
}

/// Where blobs go: `DIR/blobs/sha256/`.
pub struct Blobs {
    pub dir: PathBuf,
}

impl Blobs {
    pub fn new(root: &Path) -> Result<Blobs> {
        let dir = root.join("blobs/sha256");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Blobs { dir })
    }

    pub fn path(&self, digest: &[u8; 32]) -> PathBuf {
        self.dir.join(hex(digest))
    }

    /// A layer from its tree; `tmp` names the file while it is written.
    pub fn layer(&self, tree: &Tree, mtime: u64, c: Compression, tmp: &str) -> Result<Blob> {
        let tmp = self.dir.join(format!(".{tmp}.tmp"));
        let f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let out = hashing(BufWriter::with_capacity(1 << 20, f));
        let (out, diff) = match c {
            Compression::Gzip(level) => {
                let gz = flate2::GzBuilder::new()
                    .operating_system(255)
                    .write(out, flate2::Compression::new(level));
                let mut tar = TarWriter::new(hashing(gz), mtime);
                tar.tree(tree)?;
                let h = tar.finish()?;
                let diff: [u8; 32] = h.hash.finalize().into();
                (h.inner.finish()?, diff)
            }
            Compression::Zstd(level) => {
                let mut z = zstd::stream::write::Encoder::new(out, level)?;
                z.include_checksum(true)?;
                let mut tar = TarWriter::new(hashing(z), mtime);
                tar.tree(tree)?;
                let h = tar.finish()?;
                let diff: [u8; 32] = h.hash.finalize().into();
                (h.inner.finish()?, diff)
            }
        };
        let digest: [u8; 32] = out.hash.finalize().into();
        let size = out.n;
        let f = out
            .inner
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()?;
        let to = self.path(&digest);
        std::fs::rename(&tmp, &to).with_context(|| format!("naming {}", to.display()))?;
        Ok(Blob {
            digest,
            size,
            diff_id: diff,
        })
    }

    /// A JSON document (config, manifest) as a blob.
    pub fn bytes(&self, b: &[u8]) -> Result<Blob> {
        let digest: [u8; 32] = Sha256::digest(b).into();
        let to = self.path(&digest);
        std::fs::write(&to, b).with_context(|| format!("writing {}", to.display()))?;
        Ok(Blob {
            digest,
            size: b.len() as u64,
            diff_id: digest,
        })
    }
}

/// Compressed layers kept between runs: `DIR/layers/<key>` holds
/// "digest diff_id size", `DIR/blobs/sha256/<digest>` the blob.
pub struct Cache {
    root: PathBuf,
    blobs: Blobs,
}

impl Cache {
    pub fn open(root: &Path) -> Result<Cache> {
        std::fs::create_dir_all(root.join("layers")).with_context(|| {
            format!(
                "layer cache {} (pass --no-cache, or --cache DIR elsewhere)",
                root.display()
            )
        })?;
        Ok(Cache {
            root: root.to_owned(),
            blobs: Blobs::new(root)?,
        })
    }

    /// The key of a layer: what forge writes into it (each path and its
    /// NAR hash, in order), the tar's time and the compressor.
    pub fn key(paths: &[(&str, &[u8; 32])], mtime: u64, c: Compression) -> String {
        let mut h = Sha256::new();
        h.update(format!("nixforge oci layer v1\0{}\0{mtime}\0", c.key()));
        for (p, nar) in paths {
            h.update(p.as_bytes());
            h.update([0]);
            h.update(nar);
        }
        hex(&h.finalize().into())
    }

    /// A cached layer put into `into` (hard link, or copy across
    /// filesystems); None when absent or damaged (its size is checked).
    pub fn get(&self, key: &str, into: &Blobs) -> Option<Blob> {
        let text = std::fs::read_to_string(self.root.join("layers").join(key)).ok()?;
        let mut f = text.split_whitespace();
        let digest = unhex(f.next()?)?;
        let diff_id = unhex(f.next()?)?;
        let size: u64 = f.next()?.parse().ok()?;
        let from = self.blobs.path(&digest);
        if std::fs::metadata(&from).ok()?.len() != size {
            return None;
        }
        let to = into.path(&digest);
        if std::fs::hard_link(&from, &to).is_err() {
            let _ = std::fs::remove_file(&to);
            std::fs::copy(&from, &to).ok()?;
        }
        Some(Blob {
            digest,
            size,
            diff_id,
        })
    }

    /// Keep a layer written into `from` (best effort: a cache that cannot
    /// be written costs time, not correctness).
    pub fn put(&self, key: &str, blob: &Blob, from: &Blobs) {
        let src = from.path(&blob.digest);
        let dst = self.blobs.path(&blob.digest);
        if !dst.exists()
            && std::fs::hard_link(&src, &dst).is_err()
            && std::fs::copy(&src, &dst).is_err()
        {
            return;
        }
        let entry = self.root.join("layers").join(key);
        let tmp = self
            .root
            .join("layers")
            .join(format!(".{key}.{}", std::process::id()));
        let text = format!(
            "{} {} {}\n",
            hex(&blob.digest),
            hex(&blob.diff_id),
            blob.size
        );
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, &entry);
        }
    }
}
