//! GPT facts the writer needs: where an image's own backup header is (it
//! is held back until the head is on the disk), and, on a larger disk, the
//! tables rewritten so the backup sits at the disk's end.

use formats::gpt::{Gpt, Header};

/// The image's sector size and its primary GPT header, if it has one.
fn header_of(head: &[u8]) -> Option<(u64, Header)> {
    [512u64, 4096].into_iter().find_map(|ss| {
        let h = head.get(ss as usize..2 * ss as usize)?;
        Header::parse(h, ss).ok().flatten().map(|h| (ss, h))
    })
}

/// (offset, length) of the image's backup GPT header: the one sector that
/// makes a backup table usable on its own, so it is written only after
/// the head.
pub(super) fn backup_header(head: &[u8], image_size: u64) -> Option<(u64, u64)> {
    let (ss, h) = header_of(head)?;
    let off = h.alternate_lba.checked_mul(ss)?;
    (off.checked_add(ss)? <= image_size).then_some((off, ss))
}

/// For a GPT image on a larger device: the rewritten primary table (bytes
/// from offset 0) and the backup table moved to the device's end.
pub(super) fn relocate_gpt(
    head: &[u8],
    image_size: u64,
    dev_size: u64,
    lbs: u64,
) -> Option<(Vec<u8>, u64, Vec<u8>)> {
    if dev_size <= image_size {
        return None;
    }
    let mut read = |o: u64, n: usize| -> std::io::Result<Vec<u8>> {
        o.checked_add(n as u64)
            .and_then(|end| head.get(o as usize..end as usize))
            .map(|s| s.to_vec())
            .ok_or_else(|| std::io::Error::other("outside the first MiB"))
    };
    let mut g = Gpt::parse(&mut read, lbs, image_size).ok()??;
    g.disk_sectors = dev_size / lbs;
    let (boff, backup) = g.backup();
    Some((g.primary(), boff, backup))
}
