//! The write path on an in-memory disk: no root, no loop devices. Every
//! write and read must be aligned as O_DIRECT needs (the disk refuses and
//! records any that is not), the bytes written must be the image's, a GPT
//! moves to the disk's end, and each injected fault leaves the head wiped.

use super::*;
use crate::memdisk::{Fault, MemDisk};
use crate::source::BmapChoice;
use formats::gpt::{self, Gpt};
use std::path::{Path, PathBuf};

/// A GPT of `ss`-byte sectors for a disk of `size` bytes with one
/// partition, `name`, from 1 MiB to 8 MiB.
pub(crate) fn gpt_with_one(ss: u64, size: u64, name: &str) -> Gpt {
    Gpt {
        sector: ss,
        disk_sectors: size / ss,
        disk_guid: [7; 16],
        partitions: vec![gpt::Partition {
            type_guid: formats::seed::parse_uuid(gpt::types::VAR).unwrap(),
            guid: [9; 16],
            first_lba: (1 << 20) / ss,
            last_lba: (8 << 20) / ss - 1,
            attributes: 0,
            name: name.into(),
        }],
    }
}

/// A GPT image with `ss`-byte sectors: the table, a partition filled with
/// a byte pattern from 1 MiB on, whose last range ends mid-sector (the
/// size is not a multiple of 4 KiB for 512-byte sectors), and the backup
/// table. With `bmap`, a .bmap beside it maps only the written ranges.
pub(crate) fn image(dir: &Path, ss: u64, bmap: bool) -> (PathBuf, Vec<u8>, Vec<(u64, u64)>) {
    let size = (9 << 20) + 3 * ss;
    let g = gpt_with_one(ss, size, "data");
    let mut img = vec![0u8; size as usize];
    let primary = g.primary();
    img[..primary.len()].copy_from_slice(&primary);
    let data = (1u64 << 20)..(5 << 20) + 777;
    for i in data.clone() {
        img[i as usize] = (i * 31 % 251) as u8 + 1;
    }
    let (boff, backup) = g.backup();
    img[boff as usize..boff as usize + backup.len()].copy_from_slice(&backup);
    let path = dir.join("x.img");
    std::fs::write(&path, &img).unwrap();
    let mapped = vec![
        (0, primary.len() as u64),
        (data.start, data.end - data.start),
        (boff, backup.len() as u64),
    ];
    if bmap {
        let f = std::fs::File::open(&path).unwrap();
        let text = formats::bmap::create(&f, size, &mapped).unwrap();
        std::fs::write(dir.join("x.img.bmap"), text).unwrap();
    }
    (path, img, mapped)
}

fn flash_to(path: &Path, disk: MemDisk, bmap: bool) -> (Result<Outcome>, MemDisk) {
    let choice = if bmap {
        BmapChoice::Auto
    } else {
        BmapChoice::None
    };
    let src = Source::open(path, choice).unwrap();
    let disk = std::sync::Arc::new(disk);
    let dev: Box<dyn BlockDevice> = Box::new(Shared(disk.clone()));
    let r = flash(&src, vec![dev], &Options::verifying(true), &crate::Silent)
        .pop()
        .unwrap();
    let disk = std::sync::Arc::try_unwrap(disk)
        .ok()
        .expect("the writers are done");
    (r, disk)
}

/// The disk behind an Arc, so the test can look at it afterwards.
struct Shared(std::sync::Arc<MemDisk>);

impl BlockDevice for Shared {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn sector_size(&self) -> u64 {
        self.0.sector_size()
    }
    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<usize> {
        self.0.write_at(buf, off)
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        self.0.read_at(buf, off)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.0.sync()
    }
    fn drop_cache(&self) -> std::io::Result<()> {
        self.0.drop_cache()
    }
}

/// Bytes of the image in the 4 KiB blocks a bmap maps for `mapped`.
fn bmap_bytes(mapped: &[(u64, u64)], size: u64) -> u64 {
    formats::bmap::blocks(mapped)
        .iter()
        .map(|&(first, last)| ((last + 1) * 4096).min(size) - first * 4096)
        .sum()
}

#[test]
fn writes_are_aligned_and_exact_at_512_and_4096_byte_sectors_and_the_gpt_moves() {
    for ss in [512u64, 4096] {
        for bmap in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (path, img, mapped) = image(dir.path(), ss, bmap);
            let dev_size = 16 << 20;
            let (r, disk) = flash_to(&path, MemDisk::new(dev_size, ss, 0xAA), bmap);
            let o = r.unwrap_or_else(|e| panic!("{ss} {bmap}: {e:#}"));
            assert!(disk.refused().is_empty(), "{ss}: {:?}", disk.refused());
            let got = disk.bytes();
            // The backup GPT now sits at the disk's end and parses there.
            let mut read = |off: u64, n: usize| -> std::io::Result<Vec<u8>> {
                Ok(got[off as usize..off as usize + n].to_vec())
            };
            let g = Gpt::parse(&mut read, ss, dev_size).unwrap().expect("a GPT");
            assert_eq!(g.disk_sectors, dev_size / ss);
            assert!(o.gpt_moved);
            let (boff, backup) = g.backup();
            assert!(got[boff as usize..] == backup[..]);
            // Every mapped byte of the image is on the disk, past the
            // table (rewritten for the larger disk).
            let head = g.primary().len();
            for &(off, len) in &mapped[1..2] {
                let (a, b) = (off as usize, (off + len) as usize);
                assert!(got[a..b] == img[a..b], "{ss} {bmap}: bytes {a}..{b}");
            }
            // Without a bmap every byte is written; with one, only the
            // mapped blocks (the old 0xAA elsewhere stays).
            if bmap {
                assert_eq!(
                    got[head + 4096],
                    0,
                    "an unmapped block of the head is zeroed with the old table"
                );
                let untouched = (6u64 << 20) as usize;
                assert_eq!(got[untouched], 0xAA, "an unmapped block was written");
            } else {
                assert!(got[head..img.len()] == img[head..]);
            }
            // Verified: exactly what was written plus the moved backup.
            let written = if bmap {
                bmap_bytes(&mapped, img.len() as u64)
            } else {
                img.len() as u64
            };
            assert_eq!(o.written, written, "{ss} {bmap}");
            assert_eq!(o.verified, written + backup.len() as u64, "{ss} {bmap}");
            // (The order of the writes is judged by
            // power_cut_after_any_write_leaves_no_table_or_the_whole_image.)
        }
    }
}

/// Flash the `ss`-sector test image (no bmap) onto a 16 MiB disk that
/// injects `fault`: the result, the disk, and the image's bytes.
fn flash_faulty(ss: u64, fault: Fault) -> (Result<Outcome>, MemDisk, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let (path, img, _) = image(dir.path(), ss, false);
    let disk = MemDisk::new(16 << 20, ss, 0xAA).with_fault(fault);
    let (r, disk) = flash_to(&path, disk, false);
    (r, disk, img)
}

fn assert_head_wiped(disk: &MemDisk) {
    assert!(
        disk.bytes()[..HEAD as usize].iter().all(|&b| b == 0),
        "the first MiB is wiped"
    );
}

#[test]
fn an_io_error_names_the_device_and_offset_and_wipes_the_head() {
    let (r, disk, _) = flash_faulty(512, Fault::EioAt(3 << 20));
    let e = format!("{:#}", r.unwrap_err());
    // The failing write is the one of the chunk holding that byte; the
    // first chunk's write starts past the first MiB (written last).
    assert!(
        e.contains("writing memdisk512 at byte 1048576: Input"),
        "{e}"
    );
    assert!(e.contains("Input/output error"), "{e}");
    assert!(e.contains("partition tables wiped"), "{e}");
    assert_head_wiped(&disk);
}

#[test]
fn a_short_write_then_nothing_is_an_error_at_the_exact_byte() {
    let byte = (2 << 20) + 5 * 4096 + 100;
    let (r, disk, _) = flash_faulty(
        4096,
        Fault::ShortAt {
            byte,
            then_nothing: true,
        },
    );
    let e = format!("{:#}", r.unwrap_err());
    let at = (2 << 20) + 5 * 4096;
    assert!(e.contains(&format!("at byte {at}: short write")), "{e}");
    assert!(disk.refused().is_empty());
    // The wipe itself took nothing either (the disk is gone): the old
    // head stays, which the loop-device tests cover; here the error is
    // what matters.
}

#[test]
fn a_short_write_the_device_completes_verifies() {
    let byte = (3 << 20) + 1000;
    let (r, disk, img) = flash_faulty(
        512,
        Fault::ShortAt {
            byte,
            then_nothing: false,
        },
    );
    r.unwrap();
    assert!(disk.bytes()[1 << 20..6 << 20] == img[1 << 20..6 << 20]);
}

#[test]
fn a_byte_flipped_between_write_and_verify_is_located_exactly() {
    let byte = (4 << 20) + 12345;
    let (r, disk, img) = flash_faulty(512, Fault::FlipAt(byte));
    let m = r
        .unwrap_err()
        .downcast::<Mismatch>()
        .expect("a verify mismatch");
    assert_eq!(m.offset, byte);
    assert_eq!(m.want, format!("{:#04x}", img[byte as usize]));
    assert_eq!(m.got, format!("{:#04x}", !img[byte as usize]));
    assert_head_wiped(&disk);
}

#[test]
fn a_range_that_fails_its_checksum_reaches_the_disk_not_even_in_part() {
    let t = tempfile::tempdir().unwrap();
    let (path, img, _) = image(t.path(), 512, true);
    // The data range (1 MiB to past 5 MiB) streams as two chunks; change
    // a byte of the second after the bmap was made.
    let at = (5 << 20) + 100;
    let mut changed = img.clone();
    changed[at] = !changed[at];
    std::fs::write(&path, &changed).unwrap();
    let disk = MemDisk::new(img.len() as u64, 512, 0xEE);
    let (r, disk) = flash_to(&path, disk, true);
    let e = format!("{:#}", r.unwrap_err());
    assert!(
        e.contains("bytes 1048576..") && e.contains("do not match"),
        "{e}"
    );
    let got = disk.bytes();
    assert!(
        got[1 << 20..(5 << 20) + 777].iter().all(|&b| b == 0xEE),
        "no byte of the range was written, not even its first chunk"
    );
    assert_head_wiped(&disk);
}
/// Where a tool would find a partition table on `disk`: an MBR with a
/// partition, a primary GPT header, or a backup GPT header at the end.
fn tables(disk: &[u8], lbs: u64) -> Vec<&'static str> {
    let mut found = Vec::new();
    if disk[510..512] == [0x55, 0xAA] && (0..4).any(|i| disk[446 + 16 * i + 4] != 0) {
        found.push("MBR");
    }
    let header = |at: usize| gpt::Header::parse(&disk[at..at + lbs as usize], lbs);
    if matches!(header(lbs as usize), Ok(Some(_))) {
        found.push("primary GPT");
    }
    if matches!(header(disk.len() - lbs as usize), Ok(Some(_))) {
        found.push("backup GPT");
    }
    found
}

/// Disk A: a GPT over the whole disk, its partition full of 0x5A.
fn disk_a(size: u64, lbs: u64) -> MemDisk {
    let g = Gpt {
        sector: lbs,
        disk_sectors: size / lbs,
        disk_guid: [0xA; 16],
        partitions: vec![gpt::Partition {
            type_guid: formats::seed::parse_uuid(gpt::types::ESP).unwrap(),
            guid: [0xB; 16],
            first_lba: (1 << 20) / lbs,
            last_lba: g_last(size, lbs),
            attributes: 0,
            name: "a".into(),
        }],
    };
    let disk = MemDisk::new(size, lbs, 0x5A).recording();
    let mut bounce = Aligned::new(HEAD as usize);
    let p = g.primary();
    let (boff, b) = g.backup();
    for (off, bytes) in [(0, p), (boff, b)] {
        bounce.slice(bytes.len()).copy_from_slice(&bytes);
        disk.write_at(bounce.get(bytes.len()), off).unwrap();
    }
    disk
}

fn g_last(size: u64, lbs: u64) -> u64 {
    (size - (1 << 20)) / lbs - 1
}

#[test]
fn power_cut_after_any_write_leaves_no_table_or_the_whole_image() {
    // B smaller than the disk (its GPT moves) and B exactly the disk's size.
    for ss in [512u64, 4096] {
        for exact in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (path, img, mapped) = image(dir.path(), ss, true);
            let size = if exact { img.len() as u64 } else { 16 << 20 };
            let a = disk_a(size, ss);
            let mut replay = a.bytes();
            assert_eq!(tables(&replay, ss), ["MBR", "primary GPT", "backup GPT"]);
            let before = a.writes().len();
            let (r, disk) = flash_to(&path, a, true);
            r.unwrap();
            let writes = disk.writes();
            assert!(writes.len() > before + 3);
            // After each write of the flash (a power cut right after it,
            // everything before it on the medium): either no tool finds a
            // table, or every body byte of B is already there.
            let body = &mapped[1];
            let (b0, b1) = (body.0 as usize, (body.0 + body.1) as usize);
            // The first write takes A's backup header: A is still whole
            // (its table and partition unchanged); the second its head.
            let a_part = 1usize << 20..(g_last(size, ss) as usize + 1) * ss as usize;
            let a_bytes = replay[a_part.clone()].to_vec();
            let mut complete_at = None;
            for (i, (off, bytes)) in writes[before..].iter().enumerate() {
                replay[*off as usize..*off as usize + bytes.len()].copy_from_slice(bytes);
                let t = tables(&replay, ss);
                if i == 0 {
                    assert_eq!(
                        *off + bytes.len() as u64,
                        size,
                        "first: the old backup header"
                    );
                    assert_eq!(t, ["MBR", "primary GPT"]);
                    assert!(replay[a_part.clone()] == a_bytes[..], "A is whole");
                    continue;
                }
                if !t.is_empty() {
                    assert!(
                        replay[b0..b1] == img[b0..b1],
                        "{ss} exact={exact}: after write {i} (at byte {off}) {t:?} is found but B's body is not all there"
                    );
                    complete_at.get_or_insert(i);
                } else {
                    assert!(
                        complete_at.is_none(),
                        "{ss} exact={exact}: the table vanished again at write {i}"
                    );
                }
            }
            assert!(complete_at.is_some(), "the finished disk has B's table");
            assert_eq!(tables(&replay, ss), ["MBR", "primary GPT", "backup GPT"]);
            assert!(replay == disk.bytes());
        }
    }
}

#[test]
fn a_device_gets_its_own_state_filesystem_grown_to_its_end_and_the_table_to_match() {
    use crate::personal::{self, Request};
    for ss in [512u64, 4096] {
        let dir = tempfile::tempdir().unwrap();
        let (path, _img, _) = image(dir.path(), ss, true);
        let size = std::fs::metadata(&path).unwrap().len();
        // The image's partition as its layout manifest's state partition.
        let manifest = serde_json::json!({
            "version": 1, "table": "gpt", "sector_size": ss, "size": size,
            "disk_id": "07070707-0707-0707-0707-070707070707",
            "partitions": [{
                "number": 1, "role": "state", "offset": 1 << 20, "size": 7 << 20,
                "type_id": gpt::types::VAR, "type_name": "var", "name": "state",
                "guid": "01010101-0101-0101-0101-010101010101",
                "read_only": false, "bootable": false,
                "filesystem": {"kind": "ext4", "label": "state",
                               "uuid": "0a0b0c0d-0e0f-4011-8213-141516171819"}
            }],
            "identity": {"partition": 1, "path": "identity"}
        });
        std::fs::write(dir.path().join("x.img.layout.json"), manifest.to_string()).unwrap();
        let id = dir.path().join("id");
        std::fs::create_dir(&id).unwrap();
        std::fs::write(id.join("hostname"), "mem\n").unwrap();
        let src = Source::open(&path, BmapChoice::Auto).unwrap();
        let m = personal::manifest(&src).unwrap();
        let dev_size = 16 << 20;
        let req = Request {
            identity: Some(id),
            fill: true,
            epoch: 1,
            generate_machine_id: true,
            ..Request::default()
        };
        let p = personal::plan(&m, src.first_mib(), dev_size, ss, &req).unwrap();
        assert_eq!(
            p.state_size,
            (14 << 20),
            "{ss}: to the last whole MiB before the backup GPT"
        );
        let disk = std::sync::Arc::new(MemDisk::new(dev_size, ss, 0xAA));
        let dev: Box<dyn BlockDevice> = Box::new(Shared(disk.clone()));
        let r = flash_personal(
            &src,
            vec![(dev, Some(p))],
            &Options::verifying(true),
            &crate::Silent,
        )
        .pop()
        .unwrap();
        let o = r.unwrap_or_else(|e| panic!("{ss}: {e:#}"));
        assert!(o.verified > 0);
        assert!(disk.refused().is_empty(), "{ss}: {:?}", disk.refused());
        let got = disk.bytes();
        let mut read = |off: u64, n: usize| -> std::io::Result<Vec<u8>> {
            Ok(got[off as usize..off as usize + n].to_vec())
        };
        let g = Gpt::parse(&mut read, ss, dev_size).unwrap().unwrap();
        assert_eq!(g.partitions[0].last_lba, (15 << 20) / ss - 1, "{ss}");
        assert_eq!(g.disk_sectors, dev_size / ss);
        // The backup header at the disk's end.
        let last = &got[(dev_size - ss) as usize..];
        assert_eq!(&last[..8], b"EFI PART", "{ss}");
        // An ext4 of the new size where the image's partition was.
        let sb = &got[(1 << 20) + 1024..(1 << 20) + 2048];
        assert_eq!(&sb[56..58], &[0x53, 0xEF], "{ss}: ext4 magic");
        let blocks = u32::from_le_bytes(sb[4..8].try_into().unwrap());
        assert_eq!(u64::from(blocks) * 4096, 14 << 20, "{ss}");
        assert_eq!(&sb[120..125], b"state");
    }
}
