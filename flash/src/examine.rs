//! Everything about the source that can be checked before a byte is
//! written: it is a disk image (a partition table, not some other format),
//! whole (a .zst's frames end where the file does; the image reaches as
//! far as its own table says), and its sidecars are its own (every range
//! of the bmap matches its checksum; the layout manifest names the same
//! size, disk id and first MiB). A refusal here leaves every device
//! untouched.

use std::fs::File;

pub use crate::refusal::Unfit;
use crate::source::{Codec, Source};
use formats::zstd_frames;

/// What the checks learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Examined {
    /// The sector size the image's table is for (None: `--raw`, no table).
    pub sector: Option<u32>,
}

/// Formats that are not raw disk images flash writes, seen in the
/// (decompressed) image's first bytes.
fn foreign(b: &[u8]) -> Option<String> {
    use formats::sniff::Format;
    let f = formats::sniff::sniff(b)?;
    Some(match f {
        Format::Zstd => "zstd-compressed inside its compression: compressed twice, not a disk image".into(),
        Format::Qcow2 | Format::DynamicVhd | Format::Vhdx | Format::Vmdk => {
            format!("{}: convert it first (qemu-img convert -O raw)", f.name())
        }
        Format::Ova => "an OVA appliance (for VMware, VirtualBox): import it, or flash the raw image (.img) of the same system".into(),
        Format::Tar => "a tar archive (an OCI image or other tarball), not a disk image".into(),
        Format::Gzip | Format::Xz | Format::Bzip2 => format!(
            "{} inside its compression: compressed twice, not a disk image",
            f.name()
        ),
    })
}

/// Run every check; `raw` allows a source without a partition table
/// (and of any format), written byte for byte on purpose. A `signed`
/// source (see [`crate::trust`]) is not read through here: each of its
/// ranges is checked against its signed hash before it is written.
pub fn examine(src: &Source, raw: bool, signed: bool) -> Result<Examined, Unfit> {
    let unfit = |detail: String| Unfit {
        image: src.path.display().to_string(),
        detail,
    };
    let head = src.first_mib();
    if let (Some(Codec::Zstd), Some(path)) = (src.codec, src.origin.file()) {
        let mut f = File::open(path).map_err(|e| unfit(e.to_string()))?;
        let len = f.metadata().map_err(|e| unfit(e.to_string()))?.len();
        let frames = zstd_frames::walk(&mut f, len).map_err(|e| unfit(e.to_string()))?;
        if let Some(n) = frames.content_size.filter(|&n| n != src.size) {
            return Err(unfit(format!(
                "its zstd frames hold {n} bytes, but its bmap says the image is {}",
                src.size
            )));
        }
    }
    if !raw {
        if let Some(what) = foreign(head) {
            return Err(unfit(what));
        }
    }
    let found =
        formats::table::probe(head).map_err(|e| unfit(format!("its partition table: {e}")))?;
    let Some(found) = found else {
        if raw {
            return Ok(Examined { sector: None });
        }
        return Err(unfit(
            "no partition table: not a disk image (pass --raw to write its bytes anyway)".into(),
        ));
    };
    let ss = found.sector_size();
    if !src.size.is_multiple_of(512) {
        return Err(unfit(format!(
            "{} bytes is not a whole number of 512-byte sectors",
            src.size
        )));
    }
    if found.reach > src.size {
        return Err(unfit(format!(
            "{} bytes, but its partition table reaches byte {} ({}): truncated, or not the whole image",
            src.size, found.reach, found.what
        )));
    }
    if !signed {
        ranges_match(src).map_err(unfit)?;
    }
    manifest_matches(src, head).map_err(unfit)?;
    Ok(Examined { sector: Some(ss) })
}

/// Every range the bmap maps is checked against its checksum before
/// anything is written, so a bmap (and layout manifest) left beside a
/// rebuilt image is refused here, with every device untouched, however
/// little of the image changed and wherever (a firmware file past the
/// first MiB). Raw sources are checked range by range on every core; a
/// compressed one is decompressed once, in order. A stream (a URL,
/// stdin) is read once: its ranges are checked as it is written, those
/// of at most 64 MiB (forge's) before any of their bytes go to a device,
/// longer ones (bmaptool's) as they go, a mismatch failing the write with
/// its tables wiped (see [`crate::write`]).
fn ranges_match(src: &Source) -> Result<(), String> {
    if src.bmap.is_none() || src.is_stream() {
        return Ok(());
    }
    let text = |e: anyhow::Error| format!("{e:#}");
    if src.sequential() {
        let mut r = src.reader(true).map_err(text)?;
        let mut buf = vec![0u8; 4 << 20];
        while r.next_into(&mut buf).map_err(text)?.is_some() {}
        return Ok(());
    }
    use rayon::prelude::*;
    let reader = src.piece_reader().map_err(text)?;
    src.ranges()
        .par_iter()
        .enumerate()
        .filter(|(_, (_, _, want))| want.is_some())
        .try_for_each(|(i, &(off, len, _))| {
            let mut check = src.range_check(i);
            let mut buf = vec![0u8; len.min(4 << 20) as usize];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                reader.read(&mut buf[..n], off + done).map_err(text)?;
                check.update(&buf[..n]);
                done += n as u64;
            }
            check.finish().map_err(text)
        })
}

/// The manifest beside the image, if any, is its own (size, disk id,
/// first MiB); one that is there but cannot be read is refused, never
/// skipped.
fn manifest_matches(src: &Source, head: &[u8]) -> Result<(), String> {
    let Some(m) = src.manifest().map_err(|e| e.to_string())? else {
        return Ok(());
    };
    m.matches(src.size, head).map_err(|what| {
        format!(
            "{} describes another image ({what}); remove it or rebuild the image",
            formats::manifest::path_for(&src.path).display()
        )
    })
}
