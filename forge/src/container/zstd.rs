//! A zstd stream of the raw image (`stream.rs`). Multithreaded mode (the
//! output does not depend on the worker count: checked with the zstd CLI
//! at -T1, -T2 and -T4), with a checksum and the content size in the
//! frame header; levels up to 19 use windows of at most 2^23, so readers
//! need no --long.

use std::fs::File;
use std::io::{self, BufWriter, Write};

use super::stream::{Compressor, Stream};

type Encoder = zstd::stream::write::Encoder<'static, BufWriter<File>>;

impl Compressor for Encoder {
    fn done(self: Box<Self>) -> io::Result<()> {
        self.finish()?.flush()
    }
}

pub(super) fn open(out: File, level: i32) -> Stream {
    Stream::new(
        "zstd",
        Box::new(move |size| {
            let mut enc = Encoder::new(BufWriter::with_capacity(4 << 20, out), level)?;
            let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
            enc.multithread(workers as u32)?;
            enc.include_checksum(true)?;
            enc.set_pledged_src_size(Some(size))?;
            Ok(Box::new(enc) as Box<dyn Compressor>)
        }),
    )
}
