//! Where an image's bytes come from: a file (read at any offset, as
//! often as needed), or a stream: a URL (read once in order, resumed
//! where the server allows) or stdin (`-`, read once). A stream's
//! sidecars (bmap, manifest, signature) come from beside it on the same
//! server; stdin has none but a `--bmap` file.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::http;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File(PathBuf),
    Url(String),
    Stdin,
}

/// Bytes read in order, which may move ahead more cheaply than by
/// reading (a download skips a gap with a Range request).
pub trait InOrder: Read + Send {
    /// Move `n` bytes ahead; the bytes are not wanted.
    fn skip(&mut self, n: u64) -> std::io::Result<()> {
        std::io::copy(&mut self.take(n), &mut std::io::sink())?;
        Ok(())
    }
}

/// Any reader, skipping by reading.
pub struct Plain(pub Box<dyn Read + Send>);

impl Read for Plain {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl InOrder for Plain {}

/// Bytes already read (a stream's head), then the rest of the stream.
pub struct Joined {
    pub head: std::io::Cursor<Vec<u8>>,
    pub rest: Box<dyn InOrder>,
}

impl Read for Joined {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.head.read(buf)? {
            0 => self.rest.read(buf),
            n => Ok(n),
        }
    }
}

impl InOrder for Joined {
    fn skip(&mut self, n: u64) -> std::io::Result<()> {
        let left = self.head.get_ref().len() as u64 - self.head.position();
        let from_head = n.min(left);
        self.head.set_position(self.head.position() + from_head);
        self.rest.skip(n - from_head)
    }
}

/// An origin's bytes from the start.
pub struct Opened {
    pub body: Box<dyn InOrder>,
    /// Its length, when known before reading it (a file's, a server's
    /// Content-Length).
    pub len: Option<u64>,
    /// Set once the stream's bytes may have reached a device (see
    /// [`http::Body::commit`]).
    pub committed: Option<Arc<AtomicBool>>,
}

impl Origin {
    /// `-` is stdin, `http://` and `https://` are URLs, anything else a
    /// file.
    pub fn of(arg: &Path) -> Origin {
        match arg.to_str() {
            Some("-") => Origin::Stdin,
            Some(s) if http::is_url(s) => Origin::Url(s.to_string()),
            _ => Origin::File(arg.to_owned()),
        }
    }

    /// How messages name it.
    pub fn name(&self) -> PathBuf {
        match self {
            Origin::File(p) => p.clone(),
            Origin::Url(u) => PathBuf::from(u),
            Origin::Stdin => PathBuf::from("stdin"),
        }
    }

    /// The file, when it is one (read at any offset).
    pub fn file(&self) -> Option<&Path> {
        match self {
            Origin::File(p) => Some(p),
            _ => None,
        }
    }

    /// Its bytes from the start.
    pub fn open(&self) -> Result<Opened> {
        Ok(match self {
            Origin::File(p) => {
                let f = File::open(p).with_context(|| p.display().to_string())?;
                let len = f.metadata().with_context(|| p.display().to_string())?.len();
                Opened {
                    body: Box::new(Plain(Box::new(f))),
                    len: Some(len),
                    committed: None,
                }
            }
            Origin::Url(u) => {
                let b = http::Body::open(u)?;
                Opened {
                    len: b.content_length(),
                    committed: Some(b.commit()),
                    body: Box::new(b),
                }
            }
            Origin::Stdin => Opened {
                body: Box::new(Plain(Box::new(std::io::stdin()))),
                len: None,
                committed: None,
            },
        })
    }

    /// The file named `suffix` appended to its own name with `strip`
    /// removed first (`.bmap` beside `nixos.img` or, stripping `.zst`,
    /// beside `nixos.img.zst`): where it was found and its bytes, or
    /// None when there is none (stdin has none).
    pub fn beside(&self, strip: &str, suffix: &str) -> Result<Option<(PathBuf, Vec<u8>)>> {
        let named = |s: &str| -> Option<String> {
            s.strip_suffix(strip).map(|base| format!("{base}{suffix}"))
        };
        match self {
            Origin::File(p) => {
                let Some(q) = p.to_str().and_then(named) else {
                    return Ok(None);
                };
                match std::fs::read(&q) {
                    Ok(b) => Ok(Some((q.into(), b))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(e).context(q),
                }
            }
            Origin::Url(u) => {
                // The name is the path's: a query (`?token=…`) or
                // fragment stays as it is, after it.
                let cut = u.find(['?', '#']).unwrap_or(u.len());
                let Some(q) = named(&u[..cut]).map(|p| format!("{p}{}", &u[cut..])) else {
                    return Ok(None);
                };
                Ok(http::fetch_small(&q)?.map(|b| (q.into(), b)))
            }
            Origin::Stdin => Ok(None),
        }
    }
}
