//! Any container, its bytes counted for a progress bar as they leave:
//! the total from the map given at `begin`, each chunk as it is handed
//! on.

use std::io;
use std::sync::Arc;

use crate::assemble::{Chunk, Container};
use crate::Meter;

pub struct Metered {
    inner: Box<dyn Container>,
    bytes: Arc<dyn Meter>,
}

/// `inner`, counted by `progress` as `what` when it watches.
pub fn metered(
    inner: Box<dyn Container>,
    progress: &dyn crate::Progress,
    what: &str,
) -> Box<dyn Container> {
    match progress.bytes(what) {
        Some(bytes) => Box::new(Metered { inner, bytes }),
        None => inner,
    }
}

impl Container for Metered {
    fn ordered(&self) -> bool {
        self.inner.ordered()
    }
    fn begin(&mut self, size: u64, map: &[(u64, u64)]) -> io::Result<()> {
        self.bytes.total(map.iter().map(|r| r.1).sum());
        self.inner.begin(size, map)
    }
    fn chunk(&mut self, chunk: &Chunk, n: usize) -> io::Result<()> {
        self.inner.chunk(chunk, n)?;
        self.bytes.add(n as u64);
        Ok(())
    }
    fn finish(&mut self) -> io::Result<()> {
        self.inner.finish()?;
        self.bytes.done();
        Ok(())
    }
}
