//! An in-memory disk for tests of the write path without root or loop
//! devices: it refuses (EINVAL, and records) any access that O_DIRECT on
//! a real disk would refuse — offsets, lengths or buffers not aligned to
//! its logical sector — records every write and flush, and injects the
//! faults a real device here cannot produce on request.

use std::io;
use std::sync::Mutex;

use crate::device::BlockDevice;

/// A fault to inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// A write covering this byte fails with EIO.
    EioAt(u64),
    /// A write covering this byte stops at the sector before it (a short
    /// write); with `then_nothing`, every later write takes nothing.
    ShortAt { byte: u64, then_nothing: bool },
    /// Reads return this byte inverted (as if the medium changed it after
    /// the write).
    FlipAt(u64),
    /// A fake card: byte offsets past `real` land at `offset % real`.
    Aliases { real: u64 },
    /// A fake card: writes at or past this byte are dropped (reads there
    /// give what was there before).
    DropsFrom(u64),
}

/// What happened to the disk, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Write { off: u64, len: usize },
    Sync,
}

pub struct MemDisk {
    name: String,
    lbs: u64,
    data: Mutex<Vec<u8>>,
    fault: Option<Fault>,
    /// Keep every write's bytes (see [`MemDisk::writes`]).
    record: bool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    events: Vec<Event>,
    refused: Vec<String>,
    dead: bool,
    /// A short write happens once.
    shorted: bool,
    /// With `record`: (offset, bytes) of every write, in order.
    writes: Vec<(u64, Vec<u8>)>,
    /// Reads so far.
    reads: u64,
}

impl MemDisk {
    /// A disk of `size` bytes with `lbs`-byte sectors, every byte `fill`.
    pub fn new(size: u64, lbs: u64, fill: u8) -> MemDisk {
        MemDisk {
            name: format!("memdisk{lbs}"),
            lbs,
            data: Mutex::new(vec![fill; size as usize]),
            fault: None,
            record: false,
            state: Mutex::new(State::default()),
        }
    }

    /// A disk holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>, lbs: u64) -> MemDisk {
        let d = MemDisk::new(0, lbs, 0);
        *d.data.lock().unwrap_or_else(|e| e.into_inner()) = bytes;
        d
    }

    /// Reads so far.
    pub fn reads(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).reads
    }

    /// Where an access at `off` lands on a fake card.
    fn place(&self, off: u64) -> u64 {
        match self.fault {
            Some(Fault::Aliases { real }) => off % real,
            _ => off,
        }
    }

    pub fn with_fault(mut self, f: Fault) -> MemDisk {
        self.fault = Some(f);
        self
    }

    /// Keep the bytes of every write, to replay any prefix of them (a
    /// power cut after that write).
    pub fn recording(mut self) -> MemDisk {
        self.record = true;
        self
    }

    /// With [`MemDisk::recording`]: (offset, bytes) of every write, in order.
    pub fn writes(&self) -> Vec<(u64, Vec<u8>)> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .writes
            .clone()
    }

    /// The disk's bytes now.
    pub fn bytes(&self) -> Vec<u8> {
        self.data.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn events(&self) -> Vec<Event> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .events
            .clone()
    }

    /// Accesses refused for misalignment (empty when all were aligned).
    pub fn refused(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .refused
            .clone()
    }

    fn aligned(&self, what: &str, ptr: *const u8, len: usize, off: u64) -> io::Result<()> {
        let lbs = self.lbs as usize;
        if !(ptr as usize).is_multiple_of(lbs)
            || !len.is_multiple_of(lbs)
            || !off.is_multiple_of(self.lbs)
        {
            let why = format!(
                "{what} of {len} bytes at byte {off} (buffer at {:#x}) not aligned to {lbs}",
                ptr as usize
            );
            self.state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .refused
                .push(why);
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
    }
}

impl BlockDevice for MemDisk {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.data.lock().unwrap_or_else(|e| e.into_inner()).len() as u64
    }
    fn sector_size(&self) -> u64 {
        self.lbs
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<usize> {
        self.aligned("write", buf.as_ptr(), buf.len(), off)?;
        let end = off + buf.len() as u64;
        let mut n = buf.len();
        {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.dead {
                return Ok(0);
            }
            match self.fault {
                Some(Fault::EioAt(b)) if (off..end).contains(&b) => {
                    return Err(io::Error::from_raw_os_error(libc::EIO))
                }
                Some(Fault::ShortAt { byte, then_nothing })
                    if !st.shorted && (off..end).contains(&byte) =>
                {
                    n = ((byte - off) / self.lbs * self.lbs) as usize;
                    st.dead = then_nothing;
                    st.shorted = true;
                }
                _ => {}
            }
            st.events.push(Event::Write { off, len: n });
            if self.record {
                st.writes.push((off, buf[..n].to_vec()));
            }
        }
        let mut d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        if end > d.len() as u64 {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        if matches!(self.fault, Some(Fault::DropsFrom(b)) if end > b) {
            return Ok(n);
        }
        let at = self.place(off) as usize;
        d[at..at + n].copy_from_slice(&buf[..n]);
        Ok(n)
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.aligned("read", buf.as_ptr(), buf.len(), off)?;
        self.state.lock().unwrap_or_else(|e| e.into_inner()).reads += 1;
        let d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let n = buf.len().min(d.len().saturating_sub(off as usize));
        let at = self.place(off) as usize;
        buf[..n].copy_from_slice(&d[at..at + n]);
        if let Some(Fault::FlipAt(b)) = self.fault {
            if (off..off + n as u64).contains(&b) {
                buf[(b - off) as usize] ^= 0xFF;
            }
        }
        Ok(n)
    }

    fn sync(&self) -> io::Result<()> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .events
            .push(Event::Sync);
        Ok(())
    }

    fn drop_cache(&self) -> io::Result<()> {
        Ok(())
    }
}
