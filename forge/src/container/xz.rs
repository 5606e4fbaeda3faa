//! An xz stream of the raw image (`stream.rs`), compressed in 8 MiB
//! blocks on every core (liblzma's multithreaded encoder: the blocks, and
//! so the bytes, do not depend on the thread count), a CRC64 per block:
//! what Raspberry Pi OS's and Etcher's users download, and what
//! systemd-sysupdate's import decompresses.

use std::fs::File;
use std::io::{self, BufWriter, Write};

use liblzma::stream::{Check, MtStreamBuilder};
use liblzma::write::XzEncoder;

use super::stream::{Compressor, Stream};

/// The unit compressed on one core.
const BLOCK: u64 = 8 << 20;

impl Compressor for XzEncoder<BufWriter<File>> {
    fn done(self: Box<Self>) -> io::Result<()> {
        self.finish()?.flush()
    }
}

pub(super) fn open(out: File, level: u32) -> Stream {
    Stream::new(
        "xz",
        Box::new(move |_size| {
            let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(16));
            let stream = MtStreamBuilder::new()
                .preset(level)
                .block_size(BLOCK)
                .threads(threads as u32)
                .check(Check::Crc64)
                .encoder()
                .map_err(io::Error::other)?;
            let file = BufWriter::with_capacity(1 << 20, out);
            Ok(Box::new(XzEncoder::new_stream(file, stream)) as Box<dyn Compressor>)
        }),
    )
}
