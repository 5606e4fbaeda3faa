//! Any image as its raw bytes, for reading it back: a raw image or block
//! device as it is, a fixed VHD without its footer, and a zstd-, xz-,
//! gzip- or bzip2-compressed image, a qcow2, dynamic VHD, VHDX, VMDK,
//! OVA or GCE image unpacked into an unnamed sparse temporary file
//! (`vm_disks.rs` for the last four).
//! Other containers and compressors (`formats::sniff`) are named, never
//! read as a raw image.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use formats::{qcow2, vhd};

mod vm_disks;

/// The raw image behind `path`, and its size.
pub fn open(path: &Path) -> io::Result<(File, u64)> {
    let mut f = File::open(path)?;
    let len = f.seek(SeekFrom::End(0))?; // block devices have no length
    let mut head = [0u8; 512];
    let n = f.read_at(&mut head, 0)?;
    let head = &head[..n];
    use formats::sniff::Format;
    match formats::sniff::sniff(head) {
        Some(Format::Zstd) => return decompressed(zstd::stream::read::Decoder::new(from_start(f)?)?),
        Some(Format::Xz) => {
            let r = io::BufReader::new(from_start(f)?);
            return decompressed(liblzma::bufread::XzDecoder::new_multi_decoder(r));
        }
        Some(Format::Bzip2) => {
            let r = io::BufReader::new(from_start(f)?);
            return decompressed(bzip2::bufread::MultiBzDecoder::new(r));
        }
        Some(Format::Qcow2) => return qcow(&f),
        Some(Format::Vhdx) => return vm_disks::vhdx(&f),
        Some(Format::Vmdk) => return vm_disks::vmdk(&f, 0, len),
        Some(Format::Ova) => return vm_disks::ova(&f, len),
        // A GCE image is a tar in gzip; anything else gzipped, an image.
        Some(Format::Gzip) if vm_disks::is_tar_gz(&f)? => return vm_disks::gce(&f),
        Some(Format::Gzip) => {
            let r = io::BufReader::new(from_start(f)?);
            return decompressed(flate2::bufread::MultiGzDecoder::new(r));
        }
        Some(Format::DynamicVhd) | None => {}
        Some(other) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}, not a disk image forge reads (raw, .zst, .xz, .gz, .bz2, .qcow2, .vhd, .vhdx, .vmdk, .ova, GCE .tar.gz): decompress or convert it first", other.name()),
            ))
        }
    }
    if let Some(foot) = vhd::parse_footer(head) {
        return dynamic_vhd(&f, foot);
    }
    if len >= vhd::FOOTER {
        let mut tail = [0u8; 512];
        f.read_exact_at(&mut tail, len - vhd::FOOTER)?;
        if let Some(foot) = vhd::parse_footer(&tail) {
            if foot.ty == Some(vhd::Type::Fixed) && foot.size == len - vhd::FOOTER {
                return Ok((f, foot.size));
            }
        }
    }
    Ok((f, len))
}

/// A sparse temporary file of `size` bytes filled by `fill(write_at)`.
fn sparse(size: u64, fill: impl FnOnce(&File) -> io::Result<()>) -> io::Result<(File, u64)> {
    let out = tempfile::tempfile()?;
    out.set_len(size)?;
    fill(&out)?;
    Ok((out, size))
}

/// The raw image's first `n` bytes (fewer if it is shorter) and its size,
/// reading no more than that where it can: a `.zst` whose frames declare
/// their sizes is decompressed only as far as `n`.
pub fn head(path: &Path, n: usize) -> io::Result<(Vec<u8>, u64)> {
    let mut f = File::open(path)?;
    let mut magic = [0u8; 512];
    let got = f.read_at(&mut magic, 0)?;
    if formats::sniff::sniff(&magic[..got]) == Some(formats::sniff::Format::Zstd) {
        let len = f.seek(SeekFrom::End(0))?;
        f.seek(SeekFrom::Start(0))?;
        let declared = formats::zstd_frames::walk(&mut f, len)
            .ok()
            .and_then(|w| w.content_size);
        if let Some(size) = declared {
            f.seek(SeekFrom::Start(0))?;
            let mut out = Vec::with_capacity(n.min(size as usize));
            zstd::stream::read::Decoder::new(f)?
                .take(n as u64)
                .read_to_end(&mut out)?;
            return Ok((out, size));
        }
    }
    let (f, size) = open(path)?;
    let mut out = vec![0u8; n.min(size as usize)];
    f.read_exact_at(&mut out, 0)?;
    Ok((out, size))
}

/// `f` read from its start again (`open` measured its length at the end).
fn from_start(mut f: File) -> io::Result<File> {
    f.seek(SeekFrom::Start(0))?;
    Ok(f)
}

/// A decompressed image into a sparse temporary file (zero MiBs skipped).
fn decompressed(mut d: impl Read) -> io::Result<(File, u64)> {
    let mut out = tempfile::tempfile()?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            match d.read(&mut buf[n..])? {
                0 => break,
                k => n += k,
            }
        }
        if n == 0 {
            break;
        }
        if formats::sys::is_zero(&buf[..n]) {
            out.seek(SeekFrom::Current(n as i64))?;
        } else {
            out.write_all(&buf[..n])?;
        }
        total += n as u64;
    }
    out.set_len(total)?;
    Ok((out, total))
}

fn read_at(f: &File) -> impl FnMut(u64, usize) -> io::Result<Vec<u8>> + '_ {
    move |o, n| {
        let mut b = vec![0u8; n];
        f.read_exact_at(&mut b, o)?;
        Ok(b)
    }
}

fn qcow(f: &File) -> io::Result<(File, u64)> {
    let mut r = read_at(f);
    let q = qcow2::Reader::open(&mut r)?;
    sparse(q.size, |out| {
        let mut buf = vec![0u8; qcow2::CLUSTER as usize];
        for i in 0..q.size.div_ceil(qcow2::CLUSTER) {
            if let Some(n) = qcow_cluster(f, &q, i, &mut buf)? {
                out.write_all_at(&buf[..n], i * qcow2::CLUSTER)?;
            }
        }
        Ok(())
    })
}

/// Guest cluster `i` of a flat qcow2 image into `buf`: how many of its
/// bytes are in the image, or None when it holds only zeros.
fn qcow_cluster(f: &File, q: &qcow2::Reader, i: u64, buf: &mut [u8]) -> io::Result<Option<usize>> {
    let at = i * qcow2::CLUSTER;
    let n = (q.size - at).min(qcow2::CLUSTER) as usize;
    match q.entry(i, &mut read_at(f))? {
        qcow2::Entry::Data(h) => f.read_exact_at(&mut buf[..n], h * qcow2::CLUSTER)?,
        qcow2::Entry::Compressed { offset, len } => {
            let mut z = vec![0u8; len as usize];
            let got = f.read_at(&mut z, offset)?;
            inflate(&z[..got], buf)?;
        }
        _ => return Ok(None),
    }
    Ok(Some(n))
}

/// The first `len` guest bytes of a flat qcow2 image (fewer when the
/// image is smaller), and its virtual size; nothing else is read.
pub fn qcow_head(f: &File, len: u64) -> io::Result<(Vec<u8>, u64)> {
    let q = qcow2::Reader::open(&mut read_at(f))?;
    let len = len.min(q.size);
    let mut head = vec![0u8; len as usize];
    let mut buf = vec![0u8; qcow2::CLUSTER as usize];
    for i in 0..len.div_ceil(qcow2::CLUSTER) {
        if let Some(n) = qcow_cluster(f, &q, i, &mut buf)? {
            let at = (i * qcow2::CLUSTER) as usize;
            let n = n.min(head.len() - at);
            head[at..at + n].copy_from_slice(&buf[..n]);
        }
    }
    Ok((head, q.size))
}

/// A compressed cluster (raw deflate, QEMU's 4 KiB window) into `out`.
fn inflate(z: &[u8], out: &mut [u8]) -> io::Result<()> {
    let mut d = flate2::Decompress::new_with_window_bits(false, qcow2::DEFLATE_WINDOW_BITS);
    d.decompress(z, out, flate2::FlushDecompress::Finish)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("qcow2: {e}")))?;
    if d.total_out() != out.len() as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "qcow2: a compressed cluster is short",
        ));
    }
    Ok(())
}

fn dynamic_vhd(f: &File, foot: vhd::Footer) -> io::Result<(File, u64)> {
    let bad = |w: &str| io::Error::new(io::ErrorKind::InvalidData, format!("VHD: {w}"));
    if foot.ty != Some(vhd::Type::Dynamic) {
        return Err(bad("a footer copy at the start, but not a dynamic disk"));
    }
    let mut h = [0u8; 1024];
    f.read_exact_at(&mut h, foot.data_offset)?;
    if &h[..8] != b"cxsparse" {
        return Err(bad("no dynamic disk header"));
    }
    let be64 = |o: usize| u64::from_be_bytes(h[o..o + 8].try_into().expect("8 bytes"));
    let be32 = |o: usize| u32::from_be_bytes(h[o..o + 4].try_into().expect("4 bytes"));
    let (table_at, entries, block) = (be64(16), be32(28) as u64, be32(32) as u64);
    if !block.is_power_of_two() || !(512..=256 << 20).contains(&block) {
        return Err(bad("block size"));
    }
    if foot.size > vhd::MAX_SIZE {
        return Err(bad("a size larger than a VHD can describe"));
    }
    if entries.checked_mul(block).is_none_or(|n| n < foot.size) || entries > foot.size / block + 1 {
        return Err(bad("the block table does not match the disk's size"));
    }
    let len = f.metadata()?.len();
    if table_at.saturating_add(entries * 4) > len {
        return Err(bad(&format!(
            "its block table (byte {table_at}, {} bytes) lies past its end",
            entries * 4
        )));
    }
    let mut table = vec![0u8; (entries * 4) as usize];
    f.read_exact_at(&mut table, table_at)?;
    // One bit per sector, in whole sectors.
    let bitmap = (block / 512).div_ceil(8).next_multiple_of(512);
    sparse(foot.size, |out| {
        let mut buf = vec![0u8; block as usize];
        for (b, e) in table.chunks(4).enumerate() {
            let s = u32::from_be_bytes(e.try_into().expect("4 bytes"));
            let at = b as u64 * block;
            if s == u32::MAX || at >= foot.size {
                continue;
            }
            let n = (foot.size - at).min(block) as usize;
            f.read_exact_at(&mut buf[..n], s as u64 * 512 + bitmap)?;
            out.write_all_at(&buf[..n], at)?;
        }
        Ok(())
    })
}
