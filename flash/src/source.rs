//! The image to write: raw or zstd (sniffed by magic, not by name), with
//! its bmap (given, found beside it, or none), streamed range by range.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use formats::bmap::{self, Bmap};

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

pub struct Source {
    pub path: PathBuf,
    pub zstd: bool,
    /// Size of the (decompressed) image.
    pub size: u64,
    pub bmap: Option<(PathBuf, Bmap)>,
}

pub enum BmapChoice {
    Auto,
    File(PathBuf),
    None,
}

/// `disk.img.bmap` beside `disk.img`, or `nixos.img.bmap` beside `nixos.img.zst`.
fn bmap_beside(image: &Path) -> Option<PathBuf> {
    let s = image.to_string_lossy();
    let mut c = vec![PathBuf::from(format!("{s}.bmap"))];
    if let Some(base) = s.strip_suffix(".zst") {
        c.push(PathBuf::from(format!("{base}.bmap")));
    }
    c.into_iter().find(|p| p.is_file())
}

impl Source {
    pub fn open(path: &Path, choice: BmapChoice) -> Result<Source> {
        let mut f = File::open(path).with_context(|| path.display().to_string())?;
        let mut magic = [0u8; 4];
        let n = f
            .read(&mut magic)
            .with_context(|| path.display().to_string())?;
        let zstd = n == 4 && magic == ZSTD_MAGIC;
        let bmap_path = match choice {
            BmapChoice::Auto => bmap_beside(path),
            BmapChoice::File(p) => Some(p),
            BmapChoice::None => None,
        };
        let bmap = match bmap_path {
            Some(p) => {
                let text = std::fs::read_to_string(&p).with_context(|| p.display().to_string())?;
                let b = bmap::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                Some((p, b))
            }
            None => None,
        };
        let size = if zstd {
            let mut head = vec![0u8; 18];
            let n = f.read_at(&mut head, 0)?;
            match zstd::zstd_safe::get_frame_content_size(&head[..n]) {
                Ok(Some(s)) => s,
                _ => match &bmap {
                    Some((_, b)) => b.image_size,
                    None => {
                        // No size in the frame header: count by decompressing.
                        let mut d = zstd::stream::read::Decoder::new(File::open(path)?)?;
                        std::io::copy(&mut d, &mut std::io::sink())
                            .with_context(|| format!("{}: decompressing", path.display()))?
                    }
                },
            }
        } else {
            f.metadata()?.len()
        };
        if let Some((p, b)) = &bmap {
            if b.image_size != size {
                bail!(
                    "{}: describes a {}-byte image, but {} is {size} bytes",
                    p.display(),
                    b.image_size,
                    path.display()
                );
            }
        }
        Ok(Source {
            path: path.to_owned(),
            zstd,
            size,
            bmap,
        })
    }

    /// The first `n` bytes of the (decompressed) image, or fewer if shorter.
    pub fn head(&self, n: usize) -> Result<Vec<u8>> {
        let f = File::open(&self.path).with_context(|| self.path.display().to_string())?;
        let mut r: Box<dyn Read> = if self.zstd {
            Box::new(zstd::stream::read::Decoder::new(f)?)
        } else {
            Box::new(f)
        };
        let mut head = Vec::with_capacity(n);
        r.by_ref()
            .take(n as u64)
            .read_to_end(&mut head)
            .with_context(|| format!("{}: reading its first {n} bytes", self.path.display()))?;
        Ok(head)
    }

    /// (offset, length, expected sha256) of every range to write.
    pub fn ranges(&self) -> Vec<(u64, u64, Option<String>)> {
        match &self.bmap {
            Some((_, b)) => b
                .byte_ranges()
                .into_iter()
                .zip(&b.ranges)
                .map(|((o, l), r)| (o, l, r.2.clone()))
                .collect(),
            None => vec![(0, self.size, None)],
        }
    }

    /// Stream every range through `f(offset, bytes)` in chunks of at most
    /// `chunk` bytes, checking each range against its bmap checksum.
    pub fn stream(&self, chunk: usize, f: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
        let ranges = self.ranges();
        let file = File::open(&self.path).with_context(|| self.path.display().to_string())?;
        let mut dec: Option<Box<dyn Read>> = if self.zstd {
            Some(Box::new(zstd::stream::read::Decoder::with_buffer(
                BufReader::with_capacity(1 << 20, file.try_clone()?),
            )?))
        } else {
            None
        };
        let mut pos = 0u64; // decompressed position, for zstd
        let mut buf = vec![0u8; chunk];
        for (off, len, sum) in ranges {
            let mut h = Sha256::new();
            if let Some(d) = dec.as_mut() {
                // Skip the gap by decompressing into nothing.
                let gap = off - pos;
                std::io::copy(&mut d.by_ref().take(gap), &mut std::io::sink())?;
            }
            let mut done = 0u64;
            while done < len {
                let n = (chunk as u64).min(len - done) as usize;
                match dec.as_mut() {
                    Some(d) => d.read_exact(&mut buf[..n]).with_context(|| {
                        format!(
                            "{}: decompressing at byte {}",
                            self.path.display(),
                            off + done
                        )
                    })?,
                    None => file
                        .read_exact_at(&mut buf[..n], off + done)
                        .with_context(|| {
                            format!("{}: reading at byte {}", self.path.display(), off + done)
                        })?,
                }
                h.update(&buf[..n]);
                f(off + done, &buf[..n])?;
                done += n as u64;
            }
            pos = off + len;
            if let Some(want) = sum {
                let got = format!("{:x}", h.finalize());
                if got != want {
                    bail!(
                        "{}: bytes {off}..{} do not match the bmap's checksum (source corrupted, or the wrong bmap)",
                        self.path.display(),
                        off + len
                    );
                }
            }
        }
        Ok(())
    }
}
