//! The frame structure of a zstd file (RFC 8878, section 3.1), walked
//! without decompressing: each frame's header and block headers are read
//! and the block bodies skipped, so a truncated or corrupted file is found
//! in milliseconds, before anything is done with its content.

use std::io::{self, Read, Seek, SeekFrom};

const MAGIC: u32 = 0xFD2F_B528;
/// Skippable frames: 0x184D2A50..=0x184D2A5F.
const SKIPPABLE: std::ops::RangeInclusive<u32> = 0x184D_2A50..=0x184D_2A5F;

/// What the walk found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frames {
    /// Data frames (skippable ones are not counted).
    pub frames: usize,
    /// The sum of the frames' declared content sizes, if every data frame
    /// declares one.
    pub content_size: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("reading: {0}")]
    Io(#[from] io::Error),
    #[error("byte {0}: not a zstd frame (magic number missing)")]
    NotZstd(u64),
    #[error("byte {at}: {problem}")]
    Bad { at: u64, problem: &'static str },
    #[error("ends inside a zstd frame: byte {end} is where the file stops, but the frame at byte {frame} needs {needs} bytes (truncated?)")]
    Truncated { frame: u64, end: u64, needs: u64 },
    #[error("no zstd frame at all")]
    Empty,
}

/// Read exactly `buf.len()` bytes at the current position, or say how far
/// the file goes.
fn fill(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Walk every frame of `r` (of `len` bytes) from its start to its end.
pub fn walk<R: Read + Seek>(r: &mut R, len: u64) -> Result<Frames, FrameError> {
    let mut pos = 0u64;
    let mut out = Frames {
        frames: 0,
        content_size: Some(0),
    };
    let truncated = |frame: u64, needs: u64| FrameError::Truncated {
        frame,
        end: len,
        needs,
    };
    r.seek(SeekFrom::Start(0))?;
    while pos < len {
        let frame = pos;
        let mut m = [0u8; 4];
        if fill(r, &mut m)? < 4 {
            return Err(truncated(frame, 4));
        }
        let magic = u32::from_le_bytes(m);
        pos += 4;
        if SKIPPABLE.contains(&magic) {
            let mut s = [0u8; 4];
            if fill(r, &mut s)? < 4 {
                return Err(truncated(frame, 8));
            }
            let size = u32::from_le_bytes(s) as u64;
            pos += 4 + size;
            if pos > len {
                return Err(truncated(frame, pos - frame));
            }
            r.seek(SeekFrom::Start(pos))?;
            continue;
        }
        if magic != MAGIC {
            return Err(FrameError::NotZstd(frame));
        }
        let h = header(r, frame, pos, len)?;
        out.content_size = match (out.content_size, h.size) {
            (Some(a), Some(b)) => a.checked_add(b),
            _ => None,
        };
        pos = blocks(r, frame, pos + h.len, len)?;
        if h.checksum {
            pos += 4;
            if pos > len {
                return Err(truncated(frame, pos - frame));
            }
            r.seek(SeekFrom::Start(pos))?;
        }
        out.frames += 1;
    }
    if out.frames == 0 {
        return Err(FrameError::Empty);
    }
    Ok(out)
}

/// What a frame's header says.
struct Header {
    /// Its length in bytes.
    len: u64,
    /// The content size, when it is given.
    size: Option<u64>,
    /// A checksum follows the last block.
    checksum: bool,
}

/// The header of the frame at `frame` (of a file of `len` bytes), read
/// from `pos`, just past its magic number: descriptor, window,
/// dictionary id, content size.
fn header(r: &mut impl Read, frame: u64, pos: u64, len: u64) -> Result<Header, FrameError> {
    let truncated = |needs: u64| FrameError::Truncated {
        frame,
        end: len,
        needs,
    };
    let mut d = [0u8; 1];
    if fill(r, &mut d)? < 1 {
        return Err(truncated(5));
    }
    let fhd = d[0];
    if fhd & 0x08 != 0 {
        return Err(FrameError::Bad {
            at: pos,
            problem: "reserved bit set in the frame header",
        });
    }
    let single = fhd & 0x20 != 0;
    let dict = [0u64, 1, 2, 4][(fhd & 3) as usize];
    let fcs = match fhd >> 6 {
        0 if single => 1,
        0 => 0,
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let rest = u64::from(!single) + dict + fcs;
    let mut h = [0u8; 13];
    let want = rest as usize;
    if fill(r, &mut h[..want])? < want {
        return Err(truncated(5 + rest));
    }
    let f = &h[(rest - fcs) as usize..want];
    let size = match fcs {
        0 => None,
        1 => Some(f[0] as u64),
        2 => Some(u16::from_le_bytes([f[0], f[1]]) as u64 + 256),
        4 => Some(u32::from_le_bytes(f.try_into().expect("4 bytes")) as u64),
        _ => Some(u64::from_le_bytes(f.try_into().expect("8 bytes"))),
    };
    Ok(Header {
        len: 1 + rest,
        size,
        checksum: fhd & 0x04 != 0,
    })
}

/// The frame's blocks from `pos` until the last; where they end.
fn blocks<R: Read + Seek>(
    r: &mut R,
    frame: u64,
    mut pos: u64,
    len: u64,
) -> Result<u64, FrameError> {
    loop {
        let mut b = [0u8; 3];
        if fill(r, &mut b)? < 3 {
            return Err(FrameError::Truncated {
                frame,
                end: len,
                needs: pos + 3 - frame,
            });
        }
        let bh = u32::from_le_bytes([b[0], b[1], b[2], 0]);
        let last = bh & 1 != 0;
        let body = match (bh >> 1) & 3 {
            0 | 2 => (bh >> 3) as u64,
            1 => 1,
            _ => {
                return Err(FrameError::Bad {
                    at: pos,
                    problem: "reserved block type",
                })
            }
        };
        pos += 3 + body;
        if pos > len {
            return Err(FrameError::Truncated {
                frame,
                end: len,
                needs: pos - frame,
            });
        }
        r.seek(SeekFrom::Start(pos))?;
        if last {
            return Ok(pos);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn walk_bytes(b: &[u8]) -> Result<Frames, FrameError> {
        walk(&mut Cursor::new(b), b.len() as u64)
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| (i * 7 % 253) as u8 ^ (i >> 11) as u8)
            .collect()
    }

    #[test]
    fn whole_files_walk_and_every_truncation_is_found() {
        let plain = data(3 << 20);
        for level in [1, 3, 19] {
            // Streamed: no content size in the header; in one go: one.
            let s = zstd::encode_all(&plain[..], level).unwrap();
            assert_eq!(walk_bytes(&s).unwrap().content_size, None);
            let z = zstd::bulk::compress(&plain, level).unwrap();
            let f = walk_bytes(&z).unwrap();
            assert_eq!(f.frames, 1);
            assert_eq!(f.content_size, Some(plain.len() as u64));
            // Every cut short of the end is truncation, named as such.
            for cut in (0..z.len()).step_by(z.len() / 97 + 1).chain([z.len() - 1]) {
                match walk_bytes(&z[..cut]) {
                    Err(FrameError::Truncated { end, .. }) => assert_eq!(end, cut as u64),
                    Err(FrameError::Empty) if cut == 0 => {}
                    other => panic!("cut at {cut} of {}: {other:?}", z.len()),
                }
            }
        }
    }

    #[test]
    fn two_frames_a_skippable_one_and_garbage_after() {
        let a = zstd::bulk::compress(&data(1000), 3).unwrap();
        let b = zstd::bulk::compress(&data(70_000), 3).unwrap();
        let mut z = a.clone();
        z.extend([0x50, 0x2A, 0x4D, 0x18, 3, 0, 0, 0, 9, 9, 9]);
        z.extend(&b);
        let f = walk_bytes(&z).unwrap();
        assert_eq!(f.frames, 2);
        assert_eq!(f.content_size, Some(71_000));
        z.extend(b"trailing text");
        assert!(
            matches!(walk_bytes(&z), Err(FrameError::NotZstd(at)) if at == (a.len() + 11 + b.len()) as u64)
        );
    }

    #[test]
    fn arbitrary_and_mutated_bytes_never_panic() {
        let base = zstd::bulk::compress(&data(50_000), 3).unwrap();
        crate::fuzz::run("zstd_frames::walk", 3000, |r| {
            let mut b = base.clone();
            r.mutate(&mut b, 8);
            let _ = walk_bytes(&b);
            let n = r.below(64);
            let _ = walk_bytes(&r.bytes(n));
        });
    }
}
