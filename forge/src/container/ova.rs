//! OVA: a tar holding the OVF descriptor (`formats::ovf`) first, then the
//! streamOptimized VMDK (`vmdk.rs`), written in one pass. The descriptor
//! states the VMDK's length, known only at the end, so its entry has a
//! fixed room (`OVF_ROOM`, the text padded with spaces, which XML allows
//! after the root element); the VMDK streams into the file after it, and
//! the two headers and the descriptor are written last.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use super::vmdk::Vmdk;
use super::{Chunk, Container, Settings};
use formats::tar;

/// The descriptor's room in the archive.
const OVF_ROOM: u64 = 8192;
const BLOCK: u64 = tar::BLOCK as u64;
/// Where the VMDK's bytes start.
const VMDK_AT: u64 = BLOCK + OVF_ROOM + BLOCK;

pub(super) struct Ova {
    file: File,
    vmdk: Vmdk,
    /// `NAME` of `NAME.ova`: the machine's and the members' names.
    name: String,
    mtime: u64,
    size: u64,
}

impl Ova {
    pub(super) fn open(file: &File, s: &Settings) -> io::Result<Ova> {
        let name = s
            .file_name
            .strip_suffix(".ova")
            .unwrap_or(&s.file_name)
            .to_string();
        // Its members' names (NAME-disk1.vmdk) fit a tar header's 100 bytes.
        if name.len() > 90 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("OVA: the name {name:?} is longer than 90 bytes"),
            ));
        }
        let mut f = file.try_clone()?;
        f.seek(SeekFrom::Start(VMDK_AT))?;
        Ok(Ova {
            vmdk: Vmdk::open(&f, format!("{name}-disk1.vmdk"), s.uuid)?,
            file: f,
            name,
            mtime: u64::from(s.unix_time),
            size: 0,
        })
    }
}

impl Container for Ova {
    fn ordered(&self) -> bool {
        true
    }

    fn begin(&mut self, size: u64, map: &[(u64, u64)]) -> io::Result<()> {
        self.size = size;
        self.vmdk.begin(size, map)
    }

    fn chunk(&mut self, c: &Chunk, n: usize) -> io::Result<()> {
        self.vmdk.chunk(c, n)
    }

    fn finish(&mut self) -> io::Result<()> {
        self.vmdk.finish()?;
        let (len, populated) = self.vmdk.written();
        let disk_file = format!("{}-disk1.vmdk", self.name);
        let mut ovf = formats::ovf::descriptor(&formats::ovf::Machine {
            name: &self.name,
            disk_file: &disk_file,
            file_size: len,
            capacity: self.size,
            populated,
        })
        .into_bytes();
        if ovf.len() as u64 > OVF_ROOM - 1 {
            return Err(io::Error::other(format!(
                "OVA: the descriptor for {:?} is longer than its room",
                self.name
            )));
        }
        ovf.resize(OVF_ROOM as usize - 1, b' ');
        ovf.push(b'\n');
        let end = VMDK_AT + len;
        let mut tail = tar::padding(len).to_vec();
        tail.extend_from_slice(&tar::END);
        self.file.write_all_at(&tail, end)?;
        let ovf_name = format!("{}.ovf", self.name);
        self.file
            .write_all_at(&tar::file_header(&ovf_name, OVF_ROOM, self.mtime), 0)?;
        self.file.write_all_at(&ovf, BLOCK)?;
        let header = tar::file_header(&disk_file, len, self.mtime);
        self.file.write_all_at(&header, BLOCK + OVF_ROOM)
    }
}
