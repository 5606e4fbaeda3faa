//! A GPT image on a larger disk: the backup table moves to the disk's end.

use formats::gpt::Gpt;

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
        head.get(o as usize..o as usize + n)
            .map(|s| s.to_vec())
            .ok_or_else(|| std::io::Error::other("outside the first MiB"))
    };
    let mut g = Gpt::parse(&mut read, lbs, image_size).ok()??;
    g.disk_sectors = dev_size / lbs;
    let (boff, backup) = g.backup();
    Some((g.primary(), boff, backup))
}
