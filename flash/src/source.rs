//! The image to write: raw, a fixed VHD (its raw part), or compressed
//! with zstd, xz, gzip or bzip2 (sniffed by content, not by name; several
//! streams or members, as pzstd, xz -T, pigz and pbzip2 write, are one
//! image), with its bmap (given, found beside it, or none), streamed
//! range by range.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use formats::bmap::{self, Bmap};

/// A compressor an image may come in; flash decompresses as it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    Zstd,
    Xz,
    Gzip,
    Bzip2,
}

impl Codec {
    /// The codec a file's first bytes announce, if any.
    pub fn of(head: &[u8]) -> Option<Codec> {
        use formats::sniff::Format;
        match formats::sniff::sniff(head)? {
            Format::Zstd => Some(Codec::Zstd),
            Format::Xz => Some(Codec::Xz),
            Format::Gzip => Some(Codec::Gzip),
            Format::Bzip2 => Some(Codec::Bzip2),
            _ => None,
        }
    }

    /// The decompressed bytes of all of `file`, every stream in turn.
    pub fn decoder(self, file: File) -> Result<Box<dyn Read + Send>> {
        let r = BufReader::with_capacity(1 << 20, file);
        Ok(match self {
            Codec::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(r)?),
            Codec::Xz => Box::new(liblzma::bufread::XzDecoder::new_multi_decoder(r)),
            Codec::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(r)),
            Codec::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(r)),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Codec::Zstd => "zstd",
            Codec::Xz => "xz",
            Codec::Gzip => "gzip",
            Codec::Bzip2 => "bzip2",
        }
    }
}

pub struct Source {
    pub path: PathBuf,
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

/// `disk.img.bmap` beside `disk.img`, or `nixos.img.bmap` beside
/// `nixos.img.zst` (or `.xz`, `.gz`, `.bz2`).
fn bmap_beside(image: &Path) -> Option<PathBuf> {
    let s = image.to_string_lossy();
    let mut c = vec![PathBuf::from(format!("{s}.bmap"))];
    for ext in [".zst", ".xz", ".gz", ".bz2"] {
        if let Some(base) = s.strip_suffix(ext) {
            c.push(PathBuf::from(format!("{base}.bmap")));
        }
    }
    c.into_iter().find(|p| p.is_file())
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

impl Source {
    pub fn open(path: &Path, choice: BmapChoice) -> Result<Source> {
        let mut f = File::open(path).with_context(|| path.display().to_string())?;
        let mut magic = [0u8; 512];
        let n = f
            .read(&mut magic)
            .with_context(|| path.display().to_string())?;
        let codec = Codec::of(&magic[..n]);
        let bmap_path = match choice {
            BmapChoice::Auto => bmap_beside(path),
            BmapChoice::File(p) => Some(p),
            BmapChoice::None => None,
        };
        let (bmap, bmap_sha256) = match bmap_path {
            Some(p) => {
                let text = std::fs::read_to_string(&p).with_context(|| p.display().to_string())?;
                let b = bmap::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                let sum = format!("{:x}", Sha256::digest(text.as_bytes()));
                (Some((p, b)), Some(sum))
            }
            None => (None, None),
        };
        let size = match codec {
            // Every frame's declared size (pzstd writes many, after a
            // skippable one), from the frame headers alone.
            Some(Codec::Zstd) => {
                let len = f.metadata()?.len();
                let declared = formats::zstd_frames::walk(&mut f, len)
                    .ok()
                    .and_then(|w| w.content_size);
                match declared {
                    Some(s) => s,
                    None => bmap_size_or_count(&bmap, path, Codec::Zstd)?,
                }
            }
            Some(c) => bmap_size_or_count(&bmap, path, c)?,
            None => raw_size(&f, path)?,
        };
        if let Some((p, b)) = &bmap {
            if b.image_size != size {
                return Err(crate::refusal::Unfit {
                    image: path.display().to_string(),
                    detail: format!(
                        "it is {size} bytes, but its bmap {} describes a {}-byte image",
                        p.display(),
                        b.image_size
                    ),
                }
                .into());
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
            path: path.to_owned(),
            codec,
            size,
            bmap,
            bmap_sha256,
            spans,
            first: Vec::new(),
        };
        src.first = src.head(FIRST)?;
        Ok(src)
    }

    /// The first MiB of the (decompressed) image, or all of a shorter one:
    /// its partition table, read once at open.
    pub fn first_mib(&self) -> &[u8] {
        &self.first
    }

    /// Whether the file is compressed (read in order, decompressed).
    pub fn compressed(&self) -> bool {
        self.codec.is_some()
    }

    /// The file's bytes, decompressed if it is compressed.
    fn bytes(&self) -> Result<Box<dyn Read + Send>> {
        let f = File::open(&self.path).with_context(|| self.path.display().to_string())?;
        match self.codec {
            Some(c) => c.decoder(f),
            None => Ok(Box::new(f)),
        }
    }

    /// The first `n` bytes of the (decompressed) image, or fewer if shorter.
    pub fn head(&self, n: usize) -> Result<Vec<u8>> {
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
    pub fn reader(&self, check: bool) -> Result<Reader<'_>> {
        let file = File::open(&self.path).with_context(|| self.path.display().to_string())?;
        let dec = match self.codec {
            Some(c) => Some(c.decoder(file.try_clone()?)?),
            None => None,
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
        })
    }

    /// A reader of a raw source's bytes at any offset, for pieces that
    /// [`Reader::next_piece`] left unread.
    pub fn piece_reader(&self) -> Result<PieceReader> {
        let file = File::open(&self.path).with_context(|| self.path.display().to_string())?;
        Ok(PieceReader {
            file,
            path: self.path.clone(),
        })
    }

    /// The checker of range `i` (as numbered in [`Piece::range`]).
    pub fn range_check(&self, i: usize) -> RangeCheck {
        let (off, len, want) = self.spans[i].clone();
        RangeCheck {
            path: self.path.clone(),
            bmap: self
                .bmap
                .as_ref()
                .map(|(p, _)| p.clone())
                .unwrap_or_default(),
            off,
            len,
            sum: RangeSum::for_sum(want.as_ref()),
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
        let f = File::open(&self.path).with_context(|| self.path.display().to_string())?;
        if let Some(c) = self.codec {
            let mut d = c.decoder(f).with_context(what)?;
            std::io::copy(&mut d.by_ref().take(off), &mut std::io::sink()).with_context(what)?;
            d.read_exact(&mut out).with_context(what)?;
        } else {
            f.read_exact_at(&mut out, off).with_context(what)?;
        }
        Ok(out)
    }
}

/// A bmap range checksum: SHA-256 (bmap 2.x) or SHA-1 (bmap 1.x).
enum RangeSum {
    Sha256(Sha256),
    Sha1(sha1::Sha1),
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
        }
    }
    fn hex(self) -> String {
        match self {
            RangeSum::Sha256(h) => format!("{:x}", h.finalize()),
            RangeSum::Sha1(h) => format!("{:x}", h.finalize()),
        }
    }
}

/// Checks one range's bytes, fed in order, against its bmap checksum.
pub struct RangeCheck {
    path: PathBuf,
    bmap: PathBuf,
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
                    "{}: bytes {}..{} do not match the checksum in {} (the image changed or corrupted since the bmap was made, or the bmap is of another build or image)",
                    self.path.display(),
                    self.off,
                    self.off + self.len,
                    self.bmap.display()
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
    file: File,
    dec: Option<Box<dyn Read + Send>>,
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
                return Ok(None);
            };
            if self.done == 0 {
                if self.check {
                    self.sum = Some(self.src.range_check(self.i));
                }
                if let Some(d) = self.dec.as_mut() {
                    // Skip the gap by decompressing into nothing.
                    std::io::copy(&mut d.by_ref().take(off - self.pos), &mut std::io::sink())
                        .with_context(|| format!("{path}: decompressing before byte {off}"))?;
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
                        .with_context(|| format!("{path}: decompressing at byte {at}"))?;
                    true
                }
                None if fill => {
                    self.file
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
}
