//! The compressors an image may come in, recognized by content:
//! zstd, xz, gzip, bzip2, each decoded across all of its streams or
//! members (as pzstd, `xz -T`, pigz and pbzip2 write them).

use anyhow::Result;
use std::io::{BufReader, Read};

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

    /// The decompressed bytes of all of `input`, every stream in turn.
    pub fn decoder(self, input: impl Read + Send + 'static) -> Result<Box<dyn Read + Send>> {
        let r = BufReader::with_capacity(1 << 20, input);
        Ok(match self {
            Codec::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(r)?),
            Codec::Xz => Box::new(XzStreams::new(r)?),
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

/// Every .xz stream of an input in turn, each decoded on every core
/// where it has several blocks (as `xz -T` writes them; a single-block
/// stream decodes on one). liblzma's threaded decoder stops at the end
/// of a stream, so the next one (after its padding) gets a new decoder.
struct XzStreams<R: std::io::BufRead> {
    dec: Option<liblzma::bufread::XzDecoder<R>>,
}

impl<R: std::io::BufRead> XzStreams<R> {
    fn new(r: R) -> Result<Self> {
        Ok(XzStreams {
            dec: Some(Self::decoder(r)?),
        })
    }

    fn decoder(r: R) -> Result<liblzma::bufread::XzDecoder<R>> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        let stream = liblzma::stream::MtStreamBuilder::new()
            .threads(threads)
            .memlimit_threading(1 << 30)
            .memlimit_stop(u64::MAX)
            .decoder()?;
        Ok(liblzma::bufread::XzDecoder::new_stream(r, stream))
    }
}

impl<R: std::io::BufRead> Read for XzStreams<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let Some(d) = self.dec.as_mut() else {
                return Ok(0);
            };
            let n = d.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            // The stream ended: skip its padding (zero bytes), then the
            // next stream, if any.
            let mut r = self.dec.take().expect("a decoder").into_inner();
            loop {
                let b = r.fill_buf()?;
                let zeros = b.iter().take_while(|&&x| x == 0).count();
                let (empty, all) = (b.is_empty(), zeros == b.len());
                r.consume(zeros);
                if empty {
                    return Ok(0);
                }
                if !all {
                    break;
                }
            }
            self.dec = Some(Self::decoder(r).map_err(std::io::Error::other)?);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use liblzma::stream::{Action, MtStreamBuilder, Status, Stream};

    fn xz(data: &[u8], mt: bool) -> Vec<u8> {
        let mut s = if mt {
            MtStreamBuilder::new()
                .threads(2)
                .block_size(64 << 10)
                .preset(0)
                .encoder()
                .unwrap()
        } else {
            Stream::new_easy_encoder(0, liblzma::stream::Check::Crc64).unwrap()
        };
        let mut out = Vec::with_capacity(data.len() + 4096);
        let mut input = data;
        loop {
            let before = s.total_in();
            let st = s.process_vec(input, &mut out, Action::Finish).unwrap();
            input = &input[(s.total_in() - before) as usize..];
            if st == Status::StreamEnd {
                return out;
            }
            out.reserve(1 << 20);
        }
    }

    #[test]
    fn xz_streams_of_many_blocks_and_concatenated_with_padding_decode_whole() {
        let data: Vec<u8> = (0..(1u32 << 20))
            .map(|i| ((i % 251) ^ (i >> 9)) as u8)
            .collect();
        let mut file = xz(&data, true);
        file.extend([0u8; 8]); // stream padding
        file.extend(xz(&data[..1000], false));
        let mut out = Vec::new();
        Codec::Xz
            .decoder(std::io::Cursor::new(file.clone()))
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out.len(), data.len() + 1000);
        assert!(out[..data.len()] == data[..] && out[data.len()..] == data[..1000]);
        // Cut short: an error, not a shorter image.
        file.truncate(file.len() / 2);
        let mut d = Codec::Xz.decoder(std::io::Cursor::new(file)).unwrap();
        assert!(d.read_to_end(&mut Vec::new()).is_err());
    }
}
