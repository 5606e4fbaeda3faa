//! The image to write: raw, a fixed VHD (its raw part), or compressed
//! with zstd, xz, gzip or bzip2 (sniffed by content, not by name; several
//! streams or members, as pzstd, xz -T, pigz and pbzip2 write, are one
//! image), with its bmap (given, found beside it, or none), streamed
//! range by range. It is a file, or a stream (a URL, stdin: see
//! [`crate::origin`]) read once, in order, its first MiB kept from the
//! start.

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Cursor, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub use crate::codec::Codec;
use crate::origin::{InOrder, Joined, Origin, Plain};

use formats::bmap::{self, Bmap};
use formats::manifest::{Disk, ManifestError};

pub struct Source {
    /// How messages name the image (a file's path, a URL, `stdin`).
    pub path: PathBuf,
    pub origin: Origin,
    /// How the file is compressed (None: the raw image).
    pub codec: Option<Codec>,
    /// Size of the (decompressed) image.
    pub size: u64,
    pub bmap: Option<(PathBuf, Bmap)>,
    /// The SHA-256 of the bmap's bytes as read (what a signed manifest
    /// names).
    pub bmap_sha256: Option<String>,
    /// (offset, length, expected checksum) of every range to write.
    spans: Vec<(u64, u64, Option<String>)>,
    /// The first MiB of the (decompressed) image, or all of a shorter one.
    first: Vec<u8>,
    /// A stream's (decompressed) bytes past `first`, for its one reader.
    rest: Mutex<Option<Box<dyn InOrder>>>,
    /// Set when a stream's reader is taken: bytes may reach a device.
    committed: Option<Arc<AtomicBool>>,
    /// A stream's expected SHA-256 (hex), checked as it is read.
    whole_sha256: Option<String>,
    /// Where the ranges' checksums come from: the bmap's (SHA-256 or
    /// SHA-1), or a signed manifest's BLAKE3 ([`Source::check_by`]).
    sums: Sums,
}

/// The ranges' checksums: the bmap's, or BLAKE3 from the named file.
#[derive(Clone, Debug, Default)]
enum Sums {
    #[default]
    Bmap,
    Blake3(PathBuf),
}

/// How much of the image's start [`Source::first_mib`] keeps.
pub const FIRST: usize = 1 << 20;

#[derive(Debug, Clone, Default)]
pub enum BmapChoice {
    #[default]
    Auto,
    File(PathBuf),
    None,
}

/// A bmap and where it was found.
type BmapAt = (PathBuf, Bmap);

/// The bmap as chosen: given, or `disk.img.bmap` beside `disk.img`, or
/// `nixos.img.bmap` beside `nixos.img.zst` (or `.xz`, `.gz`, `.bz2`);
/// with the SHA-256 of its bytes.
fn load_bmap(origin: &Origin, choice: BmapChoice) -> Result<(Option<BmapAt>, Option<String>)> {
    let found = match choice {
        BmapChoice::None => None,
        BmapChoice::File(p) => {
            let b = std::fs::read(&p).with_context(|| p.display().to_string())?;
            Some((p, b))
        }
        BmapChoice::Auto => {
            let mut found = None;
            for strip in ["", ".zst", ".xz", ".gz", ".bz2"] {
                found = origin.beside(strip, ".bmap")?;
                if found.is_some() {
                    break;
                }
            }
            found
        }
    };
    let Some((p, bytes)) = found else {
        return Ok((None, None));
    };
    let text = String::from_utf8(bytes).map_err(|_| anyhow!("{}: not UTF-8", p.display()))?;
    let b = bmap::parse(&text).map_err(|e| anyhow!("{}: {e}", p.display()))?;
    let sum = format!("{:x}", Sha256::digest(text.as_bytes()));
    Ok((Some((p, b)), Some(sum)))
}

/// A raw file's image size: a fixed VHD is its raw part, without the
/// footer (written to no device).
fn raw_size(f: &File, path: &Path) -> Result<u64> {
    let len = f
        .metadata()
        .with_context(|| path.display().to_string())?
        .len();
    if len >= formats::vhd::FOOTER {
        let mut tail = [0u8; 512];
        f.read_exact_at(&mut tail, len - formats::vhd::FOOTER)
            .with_context(|| path.display().to_string())?;
        if let Some(foot) = formats::vhd::parse_footer(&tail) {
            if foot.ty == Some(formats::vhd::Type::Fixed) && foot.size == len - formats::vhd::FOOTER
            {
                return Ok(foot.size);
            }
        }
    }
    Ok(len)
}

/// A compressed image's size: its bmap's, or counted by decompressing it
/// all (which also finds a truncated file before anything is written).
fn bmap_size_or_count(bmap: &Option<(PathBuf, Bmap)>, path: &Path, c: Codec) -> Result<u64> {
    if let Some((_, b)) = bmap {
        return Ok(b.image_size);
    }
    let mut d = c.decoder(File::open(path).with_context(|| path.display().to_string())?)?;
    std::io::copy(&mut d, &mut std::io::sink())
        .with_context(|| format!("{}: decompressing ({})", path.display(), c.name()))
}

/// A file's image size: a compressed one's from its zstd frames, its
/// bmap, or counted; a raw one's from its length.
fn file_size(path: &Path, codec: Option<Codec>, bmap: &Option<(PathBuf, Bmap)>) -> Result<u64> {
    let mut f = File::open(path).with_context(|| path.display().to_string())?;
    Ok(match codec {
        // Every frame's declared size (pzstd writes many, after a
        // skippable one), from the frame headers alone.
        Some(Codec::Zstd) => {
            let len = f.metadata()?.len();
            let declared = formats::zstd_frames::walk(&mut f, len)
                .ok()
                .and_then(|w| w.content_size);
            match declared {
                Some(s) => s,
                None => bmap_size_or_count(bmap, path, Codec::Zstd)?,
            }
        }
        Some(c) => bmap_size_or_count(bmap, path, c)?,
        None => raw_size(&f, path)?,
    })
}

/// A stream's image size, known before it is read: its bmap's, the one
/// given (`--size`), a raw download's length; a compressed download is
/// counted by reading it once before the write (stdin cannot be).
fn stream_size(
    origin: &Origin,
    codec: Option<Codec>,
    bmap: &Option<(PathBuf, Bmap)>,
    given: Option<u64>,
    len: Option<u64>,
) -> Result<u64> {
    if let Some((_, b)) = bmap {
        return Ok(b.image_size);
    }
    if let Some(g) = given {
        return Ok(g);
    }
    let name = origin.name();
    match (codec, len, origin) {
        (None, Some(l), _) => Ok(l),
        (Some(c), _, Origin::Url(_)) => {
            let mut d = c.decoder(origin.open()?.body)?;
            std::io::copy(&mut d, &mut std::io::sink())
                .with_context(|| format!("{}: decompressing ({})", name.display(), c.name()))
        }
        _ => bail!(
            "{}: its size cannot be known before it is read: give --size BYTES or its --bmap",
            name.display()
        ),
    }
}

impl Source {
    pub fn open(path: &Path, choice: BmapChoice) -> Result<Source> {
        Source::open_sized(path, choice, None)
    }

    /// As [`Source::open`], with the (decompressed) image's size given
    /// (`--size`): what a stream without a bmap needs, checked against
    /// what the source says where it says it.
    pub fn open_sized(path: &Path, choice: BmapChoice, given: Option<u64>) -> Result<Source> {
        let origin = Origin::of(path);
        let name = origin.name();
        let opened = origin.open()?;
        let mut body = opened.body;
        let mut magic = Vec::with_capacity(512);
        body.by_ref()
            .take(512)
            .read_to_end(&mut magic)
            .with_context(|| name.display().to_string())?;
        let codec = Codec::of(&magic);
        let (bmap, bmap_sha256) = load_bmap(&origin, choice)?;
        let size = match origin.file() {
            Some(file) => file_size(file, codec, &bmap)?,
            None => stream_size(&origin, codec, &bmap, given, opened.len)?,
        };
        let differs = |detail: String| -> anyhow::Error {
            crate::refusal::Unfit {
                image: name.display().to_string(),
                detail,
            }
            .into()
        };
        if let Some(g) = given.filter(|&g| g != size) {
            return Err(differs(format!(
                "it is {size} bytes, not the {g} --size gives"
            )));
        }
        if let Some((p, b)) = &bmap {
            if b.image_size != size {
                return Err(differs(format!(
                    "it is {size} bytes, but its bmap {} describes a {}-byte image",
                    p.display(),
                    b.image_size
                )));
            }
        }
        let spans = match &bmap {
            Some((_, b)) => b
                .byte_ranges()
                .into_iter()
                .zip(&b.ranges)
                .map(|((o, l), r)| (o, l, r.2.clone()))
                .collect(),
            None => vec![(0, size, None)],
        };
        let mut src = Source {
            path: name,
            origin,
            codec,
            size,
            bmap,
            bmap_sha256,
            spans,
            first: Vec::new(),
            rest: Mutex::new(None),
            committed: opened.committed,
            whole_sha256: None,
            sums: Sums::Bmap,
        };
        if src.origin.file().is_some() {
            src.first = src.head(FIRST)?;
        } else {
            // A stream: its first MiB now, the rest kept for the reader.
            let joined = Joined {
                head: Cursor::new(magic),
                rest: body,
            };
            let mut bytes: Box<dyn InOrder> = match codec {
                Some(c) => Box::new(Plain(c.decoder(joined)?)),
                None => Box::new(joined),
            };
            bytes
                .by_ref()
                .take(FIRST as u64)
                .read_to_end(&mut src.first)
                .with_context(|| format!("{}: reading its first MiB", src.path.display()))?;
            src.rest = Mutex::new(Some(bytes));
        }
        Ok(src)
    }

    /// Whether the image is read once, in order (a URL, stdin), not a
    /// file read at any offset.
    pub fn is_stream(&self) -> bool {
        self.origin.file().is_none()
    }

    /// A stream's whole-image SHA-256 is checked as it is read (its
    /// reader fails at the end if it differs); a file's is checked before
    /// with [`Source::sha256`].
    pub fn expect_sha256(&mut self, want: &str) {
        self.whole_sha256 = Some(want.to_ascii_lowercase());
    }

    /// The first MiB of the (decompressed) image, or all of a shorter one:
    /// its partition table, read once at open.
    pub fn first_mib(&self) -> &[u8] {
        &self.first
    }

    /// The layout manifest beside the image (`NAME.layout.json`), if
    /// any; one that is there but cannot be read or is not a manifest is
    /// an error, never skipped.
    pub fn manifest(&self) -> Result<Option<Disk>, ManifestError> {
        match &self.origin {
            Origin::File(p) => formats::manifest::read_beside(p),
            origin => {
                let path = formats::manifest::path_for(&self.path);
                match origin.beside("", ".layout.json") {
                    Ok(None) => Ok(None),
                    Ok(Some((p, bytes))) => formats::manifest::parse(p, &bytes).map(Some),
                    Err(e) => Err(ManifestError::Unreadable {
                        path,
                        err: std::io::Error::other(format!("{e:#}")),
                    }),
                }
            }
        }
    }

    /// Whether the image is read in order only (compressed, or a
    /// stream), not at any offset.
    pub fn sequential(&self) -> bool {
        self.codec.is_some() || self.is_stream()
    }

    /// The (decompressed) image from its start, read again: a file's, a
    /// URL's downloaded again; stdin cannot be.
    fn bytes(&self) -> Result<Box<dyn Read + Send>> {
        if self.origin == Origin::Stdin {
            bail!("stdin is read once: its bytes cannot be read again");
        }
        let body = self.origin.open()?.body;
        match self.codec {
            Some(c) => c.decoder(body),
            None => Ok(Box::new(body)),
        }
    }

    /// The first `n` bytes of the (decompressed) image, or fewer if shorter.
    fn head(&self, n: usize) -> Result<Vec<u8>> {
        let mut r = self.bytes()?;
        let mut head = Vec::with_capacity(n);
        r.by_ref()
            .take(n as u64)
            .read_to_end(&mut head)
            .with_context(|| format!("{}: reading its first {n} bytes", self.path.display()))?;
        Ok(head)
    }

    /// (offset, length, expected checksum) of every range to write.
    pub fn ranges(&self) -> &[(u64, u64, Option<String>)] {
        &self.spans
    }

    /// A pull reader over every range, in order. With `check`, each range
    /// is checked against its bmap checksum as its last byte is read;
    /// without, the caller checks with [`Source::range_check`] (e.g. on
    /// other cores, range by range).
    /// A stream has one reader (its bytes are not read twice).
    pub fn reader(&self, check: bool) -> Result<Reader<'_>> {
        let (file, dec) = match self.origin.file() {
            Some(p) => {
                let file = File::open(p).with_context(|| p.display().to_string())?;
                let dec = match self.codec {
                    Some(c) => {
                        Some(Box::new(Plain(c.decoder(file.try_clone()?)?)) as Box<dyn InOrder>)
                    }
                    None => None,
                };
                (Some(file), dec)
            }
            None => {
                let rest = self.rest.lock().expect("not poisoned").take();
                let Some(rest) = rest else {
                    bail!("{}: a stream is read once", self.path.display());
                };
                if let Some(c) = &self.committed {
                    c.store(true, Ordering::SeqCst);
                }
                let all: Box<dyn InOrder> = Box::new(Joined {
                    head: Cursor::new(self.first.clone()),
                    rest,
                });
                (None, Some(all))
            }
        };
        Ok(Reader {
            src: self,
            check,
            i: 0,
            done: 0,
            sum: None,
            file,
            dec,
            pos: 0,
            cuts: Vec::new(),
            whole: self.whole_sha256.as_ref().map(|_| Sha256::new()),
        })
    }

    /// A reader of a raw source's bytes at any offset, for pieces that
    /// [`Reader::next_piece`] left unread.
    pub fn piece_reader(&self) -> Result<PieceReader> {
        let Some(path) = self.origin.file() else {
            bail!("{}: a stream is read in order", self.path.display());
        };
        let file = File::open(path).with_context(|| path.display().to_string())?;
        Ok(PieceReader {
            file,
            path: self.path.clone(),
        })
    }

    /// Check every range against the BLAKE3 (hex) `sums` gives it, in
    /// range order, instead of its bmap checksum: what a signed manifest
    /// (`from`) lists for the same ranges.
    pub fn check_by(&mut self, from: &Path, sums: Vec<String>) -> Result<()> {
        if sums.len() != self.spans.len() {
            bail!(
                "{}: {} range hashes for {} ranges",
                from.display(),
                sums.len(),
                self.spans.len()
            );
        }
        for (span, sum) in self.spans.iter_mut().zip(sums) {
            span.2 = Some(sum);
        }
        self.sums = Sums::Blake3(from.to_path_buf());
        Ok(())
    }

    /// The checker of range `i` (as numbered in [`Piece::range`]).
    pub fn range_check(&self, i: usize) -> RangeCheck {
        let (off, len, want) = self.spans[i].clone();
        let (sum, from, of) = match &self.sums {
            Sums::Blake3(from) => (RangeSum::Blake3(Box::default()), from.clone(), "manifest"),
            Sums::Bmap => (
                RangeSum::for_sum(want.as_ref()),
                self.bmap
                    .as_ref()
                    .map(|(p, _)| p.clone())
                    .unwrap_or_default(),
                "bmap",
            ),
        };
        RangeCheck {
            path: self.path.clone(),
            from,
            of,
            off,
            len,
            sum,
            want,
        }
    }

    /// Stream every range through `f(offset, bytes)` in chunks of at most
    /// `chunk` bytes, checking each range against its bmap checksum.
    pub fn stream(&self, chunk: usize, f: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
        let mut r = self.reader(true)?;
        let mut buf = vec![0u8; chunk];
        while let Some(p) = r.next_into(&mut buf)? {
            f(p.off, &buf[..p.len])?;
        }
        Ok(())
    }

    /// Bytes `off..off+len` of the (decompressed) image; for locating a
    /// mismatch, so a compressed source is simply decompressed up to there.
    pub fn read_range(&self, off: u64, len: usize) -> Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        let what = || format!("{}: reading {len} bytes at byte {off}", self.path.display());
        match (&self.origin, self.codec) {
            (Origin::File(p), None) => {
                let f = File::open(p).with_context(|| p.display().to_string())?;
                f.read_exact_at(&mut out, off).with_context(what)?;
            }
            (Origin::Url(u), None) => return crate::http::read_range(u, off, len),
            _ => {
                let mut d = self.bytes().with_context(what)?;
                std::io::copy(&mut d.by_ref().take(off), &mut std::io::sink())
                    .with_context(what)?;
                d.read_exact(&mut out).with_context(what)?;
            }
        }
        Ok(out)
    }
}

/// A bmap range checksum: SHA-256 (bmap 2.x) or SHA-1 (bmap 1.x).
enum RangeSum {
    Sha256(Sha256),
    Sha1(sha1::Sha1),
    Blake3(Box<blake3::Hasher>),
}

impl RangeSum {
    fn for_sum(want: Option<&String>) -> RangeSum {
        match want {
            Some(w) if w.len() == 40 => RangeSum::Sha1(sha1::Sha1::new()),
            _ => RangeSum::Sha256(Sha256::new()),
        }
    }
    fn update(&mut self, d: &[u8]) {
        match self {
            RangeSum::Sha256(h) => h.update(d),
            RangeSum::Sha1(h) => h.update(d),
            RangeSum::Blake3(h) => {
                h.update(d);
            }
        }
    }
    fn hex(self) -> String {
        match self {
            RangeSum::Sha256(h) => format!("{:x}", h.finalize()),
            RangeSum::Sha1(h) => format!("{:x}", h.finalize()),
            RangeSum::Blake3(h) => h.finalize().to_hex().to_string(),
        }
    }
}

/// Checks one range's bytes, fed in order, against its checksum (the
/// bmap's, or a signed manifest's).
pub struct RangeCheck {
    path: PathBuf,
    /// Where the checksum comes from, and what that file is.
    from: PathBuf,
    of: &'static str,
    off: u64,
    len: u64,
    sum: RangeSum,
    want: Option<String>,
}

impl RangeCheck {
    pub fn update(&mut self, d: &[u8]) {
        if self.want.is_some() {
            self.sum.update(d);
        }
    }
    pub fn finish(self) -> Result<()> {
        if let Some(want) = &self.want {
            if !self.sum.hex().eq_ignore_ascii_case(want) {
                bail!(
                    "{}: bytes {}..{} do not match the checksum in {} (the image changed or corrupted since it was made, or the {} is of another build or image)",
                    self.path.display(),
                    self.off,
                    self.off + self.len,
                    self.from.display(),
                    self.of
                );
            }
        }
        Ok(())
    }
}

/// What [`Reader::next_into`] read: `len` bytes at `off`, part of range
/// number `range`, its last piece when `last`.
#[derive(Clone, Copy, Debug)]
pub struct Piece {
    pub off: u64,
    pub len: usize,
    pub range: usize,
    pub last: bool,
    /// Whether the bytes were read into the buffer (see
    /// [`Reader::next_piece`]).
    pub filled: bool,
}

/// See [`Source::piece_reader`].
pub struct PieceReader {
    file: File,
    path: PathBuf,
}

impl PieceReader {
    /// Bytes `at..at + buf.len()` of the raw source.
    pub fn read(&self, buf: &mut [u8], at: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, at)
            .with_context(|| format!("{}: reading at byte {at}", self.path.display()))
    }
}

/// See [`Source::reader`].
pub struct Reader<'a> {
    src: &'a Source,
    check: bool,
    /// The current range, how much of it has been read, its checker.
    i: usize,
    done: u64,
    sum: Option<RangeCheck>,
    /// A file read at any offset (raw), or the bytes in order.
    file: Option<File>,
    dec: Option<Box<dyn InOrder>>,
    /// A stream's whole-image SHA-256 so far, when one is expected.
    whole: Option<Sha256>,
    /// Decompressed position, for a compressed source.
    pos: u64,
    /// Offsets no piece crosses (ascending).
    cuts: Vec<u64>,
}

impl Reader<'_> {
    /// No piece will cross any of these offsets: a piece is either wholly
    /// before or wholly after each.
    pub fn cut_at(&mut self, mut cuts: Vec<u64>) {
        cuts.sort_unstable();
        cuts.dedup();
        self.cuts = cuts;
    }

    /// Read the next at most `buf.len()` bytes of the current range into
    /// `buf`, or `None` after the last range. When checking, a range whose
    /// checksum fails is an error before its last bytes are returned.
    pub fn next_into(&mut self, buf: &mut [u8]) -> Result<Option<Piece>> {
        self.next(buf, true)
    }

    /// Like [`Reader::next_into`], but a raw (uncompressed) source is not
    /// read: the piece says where its bytes are and `filled` is false, so
    /// another thread can read them with [`Source::read_piece`]. A
    /// compressed source can only be read in order, here.
    pub fn next_piece(&mut self, buf: &mut [u8]) -> Result<Option<Piece>> {
        assert!(!self.check, "a checking reader reads every byte itself");
        self.next(buf, false)
    }

    fn next(&mut self, buf: &mut [u8], fill: bool) -> Result<Option<Piece>> {
        let path = self.src.path.display();
        loop {
            let Some(&(off, len, _)) = self.src.spans.get(self.i) else {
                self.check_whole()?;
                return Ok(None);
            };
            if self.done == 0 {
                if self.check {
                    self.sum = Some(self.src.range_check(self.i));
                }
                if self.dec.is_some() {
                    // Skip the gap by reading it into nothing.
                    self.skip(off - self.pos)
                        .with_context(|| format!("{path}: reading before byte {off}"))?;
                    self.pos = off;
                }
            }
            if self.done == len {
                self.i += 1;
                self.done = 0;
                continue;
            }
            let at = off + self.done;
            let cut = self
                .cuts
                .iter()
                .find(|&&c| c > at)
                .map_or(u64::MAX, |c| c - at);
            let n = (buf.len() as u64).min(len - self.done).min(cut) as usize;
            let filled = match self.dec.as_mut() {
                Some(d) => {
                    d.read_exact(&mut buf[..n])
                        .with_context(|| format!("{path}: reading at byte {at}"))?;
                    if let Some(h) = self.whole.as_mut() {
                        h.update(&buf[..n]);
                    }
                    true
                }
                None if fill => {
                    self.file
                        .as_ref()
                        .expect("a file when not in order")
                        .read_exact_at(&mut buf[..n], at)
                        .with_context(|| format!("{path}: reading at byte {at}"))?;
                    true
                }
                None => false,
            };
            if let Some(c) = self.sum.as_mut() {
                c.update(&buf[..n]);
            }
            self.done += n as u64;
            self.pos = at + n as u64;
            let piece = Piece {
                off: at,
                len: n,
                range: self.i,
                last: self.done == len,
                filled,
            };
            if piece.last {
                if let Some(c) = self.sum.take() {
                    c.finish()?;
                }
                self.i += 1;
                self.done = 0;
            }
            return Ok(Some(piece));
        }
    }

    /// Read `n` in-order bytes into nothing (a gap), hashed when the
    /// whole image's SHA-256 is expected.
    fn skip(&mut self, n: u64) -> std::io::Result<()> {
        let d = self.dec.as_mut().expect("bytes in order");
        let Some(h) = self.whole.as_mut() else {
            return d.skip(n);
        };
        let mut buf = vec![0u8; (n as usize).min(1 << 20)];
        let mut left = n;
        while left > 0 {
            let k = (left as usize).min(buf.len());
            d.read_exact(&mut buf[..k])?;
            h.update(&buf[..k]);
            left -= k as u64;
        }
        Ok(())
    }

    /// After the last range: a stream's bytes to its end hashed and
    /// compared with the SHA-256 it must have.
    fn check_whole(&mut self) -> Result<()> {
        if self.whole.is_none() {
            return Ok(());
        }
        let path = self.src.path.display();
        self.skip(self.src.size - self.pos)
            .with_context(|| format!("{path}: reading to its end"))?;
        self.pos = self.src.size;
        let got = format!("{:x}", self.whole.take().expect("checked").finalize());
        let want = self.src.whole_sha256.as_deref().unwrap_or_default();
        if got != want {
            bail!("{path}: SHA-256 is {got}, not the expected {want}");
        }
        Ok(())
    }
}
