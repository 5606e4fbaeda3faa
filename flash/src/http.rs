//! Images and their sidecars over HTTP(S): one GET streamed as it is
//! read (no temporary file), a dropped connection resumed with a `Range`
//! request where the server takes them. A server that does not may be
//! read again from the start only while nothing has been written (see
//! [`Body::commit`]); after that a dropped connection ends the stream
//! with an error, which the write turns into wiped tables.

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ureq::Agent;

/// How often one stream is resumed before it is given up.
const RESUMES: u32 = 8;

/// Whether `s` names an image on a web server.
pub fn is_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

/// One agent for the process: TLS verified against the system's CA
/// store, statuses handled here, no transparent decompression (flash
/// sniffs the bytes as they are).
fn agent() -> &'static Agent {
    static AGENT: OnceLock<Agent> = OnceLock::new();
    AGENT.get_or_init(|| {
        use ureq::tls::{RootCerts, TlsConfig};
        let tls = TlsConfig::builder()
            .root_certs(RootCerts::PlatformVerifier)
            .build();
        Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_recv_body(None)
            .build()
            .into()
    })
}

type Response = ureq::http::Response<ureq::Body>;

fn get(url: &str, from: u64) -> Result<Response> {
    let mut req = agent().get(url);
    if from > 0 {
        req = req.header("Range", format!("bytes={from}-"));
    }
    req.call().with_context(|| url.to_string())
}

/// A small file beside the image (bmap, manifest, signature): its bytes,
/// or None when the server has none (404, 410).
pub fn fetch_small(url: &str) -> Result<Option<Vec<u8>>> {
    let mut resp = get(url, 0)?;
    match resp.status().as_u16() {
        200 => {}
        404 | 410 => return Ok(None),
        s => bail!("{url}: the server answered {s}"),
    }
    let bytes = resp
        .body_mut()
        .with_config()
        .limit(256 << 20)
        .read_to_vec()
        .with_context(|| url.to_string())?;
    Ok(Some(bytes))
}

/// An image's bytes from a server, from the start, resumed where they
/// stopped when the connection drops.
pub struct Body {
    url: String,
    inner: Box<dyn Read + Send>,
    pos: u64,
    len: Option<u64>,
    ranges: bool,
    resumed: u32,
    /// Set once bytes may have reached a device: from then on a server
    /// without ranges cannot be read again from the start.
    committed: Arc<AtomicBool>,
}

impl Body {
    /// GET `url`; its length when the server says it.
    pub fn open(url: &str) -> Result<Body> {
        let resp = get(url, 0)?;
        let status = resp.status().as_u16();
        if status != 200 {
            bail!("{url}: the server answered {status}");
        }
        let ranges = resp
            .headers()
            .get("accept-ranges")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("bytes"));
        let len = resp.body().content_length();
        Ok(Body {
            url: url.to_string(),
            inner: Box::new(resp.into_body().into_reader()),
            pos: 0,
            len,
            ranges,
            resumed: 0,
            committed: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The length the server gave (Content-Length), if it did.
    pub fn content_length(&self) -> Option<u64> {
        self.len
    }

    /// The flag that says bytes may have been written (see the module).
    pub fn commit(&self) -> Arc<AtomicBool> {
        self.committed.clone()
    }

    /// Continue at `self.pos` after `why` stopped the stream.
    fn resume(&mut self, why: &str) -> io::Result<()> {
        let fail = |m: String| io::Error::other(m);
        let at = self.pos;
        if self.resumed >= RESUMES {
            return Err(fail(format!(
                "{}: {why} at byte {at}, {RESUMES} times resumed: giving up",
                self.url
            )));
        }
        self.resumed += 1;
        if self.ranges {
            return self.reopen().map_err(|answer| {
                fail(format!(
                    "{}: {why} at byte {at}, and the server did not resume there ({answer})",
                    self.url
                ))
            });
        }
        if self.committed.load(Ordering::SeqCst) {
            return Err(fail(format!(
                "{}: {why} at byte {at}, and the server does not take Range requests, so it cannot be resumed once writing began",
                self.url
            )));
        }
        // Nothing written yet: read it again from the start, up to here.
        let resp = get(&self.url, 0).map_err(|e| fail(format!("{e:#}")))?;
        if resp.status().as_u16() != 200 {
            return Err(fail(format!(
                "{}: the server answered {}",
                self.url,
                resp.status().as_u16()
            )));
        }
        let mut inner: Box<dyn Read + Send> = Box::new(resp.into_body().into_reader());
        io::copy(&mut inner.by_ref().take(at), &mut io::sink())?;
        self.inner = inner;
        Ok(())
    }
}

impl Body {
    /// A new GET from `self.pos` (a Range request); what the server
    /// said when it did not answer with those bytes.
    fn reopen(&mut self) -> Result<(), String> {
        let at = self.pos;
        let resp = get(&self.url, at).map_err(|e| format!("{e:#}"))?;
        let start = resp
            .headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("bytes "))
            .and_then(|v| v.split('-').next())
            .and_then(|v| v.parse::<u64>().ok());
        if resp.status().as_u16() != 206 || start != Some(at) {
            return Err(format!("answered {}", resp.status().as_u16()));
        }
        self.inner = Box::new(resp.into_body().into_reader());
        Ok(())
    }
}

/// Gaps at least this long are skipped with a Range request rather than
/// downloaded.
const SKIP_BY_RANGE: u64 = 8 << 20;

impl crate::origin::InOrder for Body {
    /// A long gap (a bmap's unmapped range) is not downloaded where the
    /// server takes ranges: the next GET starts after it.
    fn skip(&mut self, n: u64) -> io::Result<()> {
        if !self.ranges || n < SKIP_BY_RANGE {
            io::copy(&mut self.by_ref().take(n), &mut io::sink())?;
            return Ok(());
        }
        self.pos += n;
        self.reopen().map_err(|answer| {
            io::Error::other(format!(
                "{}: skipping to byte {}: {answer}",
                self.url, self.pos
            ))
        })
    }
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.inner.read(buf) {
                Ok(0) if !buf.is_empty() && self.len.is_some_and(|l| self.pos < l) => {
                    self.resume("the connection closed")?
                }
                Ok(n) => {
                    self.pos += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.resume(&e.to_string())?,
            }
        }
    }
}

/// `len` bytes at `off` of `url` (a Range request; for locating a
/// difference after a verify).
pub fn read_range(url: &str, off: u64, len: usize) -> Result<Vec<u8>> {
    let what = || format!("{url}: reading {len} bytes at byte {off}");
    let resp = get(url, off)?;
    let skip = match resp.status().as_u16() {
        206 => 0,
        200 => off, // the server sent it all: skip to there
        s => bail!("{}: the server answered {s}", what()),
    };
    let mut r = resp.into_body().into_reader();
    io::copy(&mut r.by_ref().take(skip), &mut io::sink()).with_context(what)?;
    let mut out = vec![0u8; len];
    r.read_exact(&mut out).with_context(what)?;
    Ok(out)
}
