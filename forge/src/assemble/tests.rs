//! The image output against a read-back reference.
use super::*;
use crate::container::Kind;
use formats::bmap;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;

fn raw_container(f: &File, path: &Path) -> Box<dyn Container> {
    Kind::Raw.open(f, path, &Default::default()).unwrap()
}

/// Writes that exercise every edge: partial blocks, two writes in one
/// block, a write across chunks, gaps inside a chunk and between
/// chunks, a run longer than a bmap piece, an image size that is not
/// a multiple of the block.
/// A host file of `HOST` random bytes, for put_host.
const HOST: u64 = 9 * CHUNK as u64 + 1000;

fn random(seed: u64, n: usize) -> Vec<u8> {
    let mut rng = seed | 1;
    (0..n)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng as u8
        })
        .collect()
}

/// Writes that exercise every edge: partial blocks, two writes in one
/// block, a write across chunks, gaps inside a chunk and between
/// chunks, host bytes by reference across chunks and a window edge
/// (with a zero tail, and from a file offset), an image size that is
/// not a multiple of the block. Returns the mapped byte ranges.
fn lay(w: &mut ImageOut, len: u64, host: &Path) -> Vec<(u64, u64)> {
    let mut seed = 7;
    let mut bytes = |n: usize| {
        seed += 1;
        random(seed, n)
    };
    let mut writes: Vec<(u64, usize)> = vec![
        (0, 512),
        (1024, 100),
        (3 * 4096 + 7, 20_000),
        (CHUNK as u64 - 4096, 3 * 4096),
        (3 * CHUNK as u64, 5 * CHUNK),
    ];
    let host_at = 8 * CHUNK as u64;
    let span = HOST.next_multiple_of(BLOCK);
    let part_at = host_at + span;
    // Bytes 4096..4096+5000 of the host file, in 3 blocks.
    let rest_at = part_at + 3 * BLOCK;
    writes.push((rest_at, (20 * CHUNK as u64 - rest_at) as usize));
    writes.push((21 * CHUNK as u64 + 8192, 10));
    // Small writes into chunks reused after the long run (stale bytes
    // around them must read as zeros).
    for k in 22..30u64 {
        writes.push((k * CHUNK as u64 + k * 4096 + 5, 10));
    }
    writes.push((len - 300, 300));
    let mut mapped: Vec<(u64, u64)> = writes.iter().map(|&(o, n)| (o, n as u64)).collect();
    mapped.push((host_at, span + 3 * BLOCK));
    w.begin(len, formats::ranges::merge(mapped.clone()))
        .unwrap();
    w.watch(0, 2 * CHUNK as u64).unwrap();
    w.watch(3 * CHUNK as u64, len - 3 * CHUNK as u64).unwrap();
    let mut hosted = false;
    for &(off, n) in &writes {
        if off > host_at && !hosted {
            w.seek(SeekFrom::Start(host_at)).unwrap();
            w.put_host(host, 0, HOST, span, HOST).unwrap();
            w.put_host(host, 4096, 5000, 3 * BLOCK, HOST).unwrap();
            hosted = true;
        }
        w.seek(SeekFrom::Start(off)).unwrap();
        w.write_all(&bytes(n)).unwrap();
    }
    mapped
}

fn host_file(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("host");
    std::fs::write(&p, random(99, HOST as usize)).unwrap();
    p
}

const ALL: Hashes = Hashes {
    bmap: true,
    partitions: true,
    image: true,
};

fn sha(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

#[test]
fn pieces_and_hashes_match_a_read_back_and_zstd_matches_raw() {
    let len = 30 * CHUNK as u64 + 1234;
    let dir = tempfile::tempdir().unwrap();
    let raw_path = dir.path().join("x.img");
    let raw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&raw_path)
        .unwrap();
    let mut w = ImageOut::new(raw_container(&raw, &raw_path), ALL).unwrap();
    let host = host_file(dir.path());
    let mapped = lay(&mut w, len, &host);
    let got = w.finish().unwrap();

    // The reference: bmap::create reads the finished file back.
    assert_eq!(raw.metadata().unwrap().len(), len);
    let want = bmap::hash(&raw, len, &mapped).unwrap();
    assert_eq!(got.pieces, want, "both hashes of every piece");
    assert_eq!(
        bmap::render(len, &got.pieces),
        bmap::create(&raw, len, &mapped).unwrap()
    );
    assert!(got.pieces.len() > 3, "{:?}", got.pieces);
    let image = std::fs::read(&raw_path).unwrap();
    // The host bytes landed where they were put, zeros after them.
    let h = std::fs::read(&host).unwrap();
    let at = 8 * CHUNK;
    assert!(image[at..at + h.len()] == h[..]);
    let span = (HOST as usize).next_multiple_of(4096);
    assert!(image[at + h.len()..at + span].iter().all(|&b| b == 0));
    assert!(image[at + span..at + span + 5000] == h[4096..4096 + 5000]);
    assert!(image[at + span + 5000..at + span + 3 * 4096]
        .iter()
        .all(|&b| b == 0));
    let w0 = &got.watched;
    assert_eq!(got.image_sha256, Some(sha(&image)));
    assert_eq!(w0.len(), 2, "the partitions, not the image");
    assert_eq!(w0[0].2, sha(&image[..2 * CHUNK]));
    assert_eq!(w0[1].2, sha(&image[3 * CHUNK..]));
    // Unwritten blocks stay holes.
    use std::os::unix::fs::MetadataExt;
    assert!(raw.metadata().unwrap().blocks() * 512 < 20 * CHUNK as u64);

    let zst_path = dir.path().join("x.img.zst");
    let zst = File::create(&zst_path).unwrap();
    let mut w = ImageOut::new(
        Kind::Zstd
            .open(&zst, &zst_path, &Default::default())
            .unwrap(),
        ALL,
    )
    .unwrap();
    lay(&mut w, len, &host);
    let got_z = w.finish().unwrap();
    assert_eq!(got_z.pieces, got.pieces);
    assert_eq!(got_z.watched, got.watched);
    assert_eq!(got_z.image_sha256, got.image_sha256);
    let mut out = Vec::new();
    zstd::stream::read::Decoder::new(File::open(&zst_path).unwrap())
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    assert!(out == image, "the .zst decompresses to the raw image");
}

#[test]
fn a_host_file_that_changed_size_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let host = host_file(dir.path());
    let p = dir.path().join("x.img");
    let f = File::create(&p).unwrap();
    let mut w = ImageOut::new(raw_container(&f, &p), ALL).unwrap();
    w.begin(64 << 20, vec![(0, HOST + 1)]).unwrap();
    // Planned as one byte longer than it is.
    let span = (HOST + 1).next_multiple_of(BLOCK);
    // The worker's error comes back at the next call that reaches it:
    // a later chunk of this same put_host, or finish.
    let e = match w.put_host(&host, 0, HOST + 1, span, HOST + 1) {
        Err(e) => e,
        Ok(_) => w.finish().err().expect("the size changed"),
    };
    let want = format!(
        "{}: file changed size while it was read (expected {} bytes)",
        host.display(),
        HOST + 1
    );
    assert_eq!(e.to_string(), want);
}

#[test]
fn writes_must_ascend_and_stay_inside() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.img");
    let f = File::create(&p).unwrap();
    let mut w = ImageOut::new(raw_container(&f, &p), Hashes::default()).unwrap();
    w.begin(1 << 20, vec![(4096, 4096 + 9)]).unwrap();
    w.seek(SeekFrom::Start(8192)).unwrap();
    w.write_all(b"later").unwrap();
    w.seek(SeekFrom::Start(4096)).unwrap();
    let e = w.write_all(b"earlier").unwrap_err();
    assert!(
        e.to_string()
            .contains("a write at byte 4096 after byte 8197"),
        "{e}"
    );
    w.seek(SeekFrom::Start((1 << 20) - 2)).unwrap();
    let e = w.write_all(b"past").unwrap_err();
    assert!(e.to_string().contains("goes past the image's end"), "{e}");
}

/// Lay the test image into a container of `kind`; the file's bytes.
fn lay_into(kind: Kind, dir: &Path, name: &str, len: u64, host: &Path) -> Vec<u8> {
    let p = dir.join(name);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap();
    let s = crate::container::Settings {
        zstd_level: 3,
        xz_level: 6,
        unix_time: 1_700_000_000,
        uuid: [5; 16],
        deflate: false,
        file_name: name.into(),
    };
    let mut w = ImageOut::new(kind.open(&f, &p, &s).unwrap(), ALL).unwrap();
    lay(&mut w, len, host);
    w.finish().unwrap();
    std::fs::read(&p).unwrap()
}

#[test]
fn qcow2_and_vhds_hold_the_raw_image() {
    use formats::vhd::{self, Type};
    let len = 32 * CHUNK as u64; // whole MiB, as a VHD needs
    let dir = tempfile::tempdir().unwrap();
    let host = host_file(dir.path());
    let image = lay_into(Kind::Raw, dir.path(), "x.img", len, &host);

    // qcow2, read back by an independent reader (the qcow2-core crate).
    let q = lay_into(Kind::Qcow2, dir.path(), "x.qcow2", len, &host);
    let mut r = qcow2::Qcow2Reader::open(&dir.path().join("x.qcow2")).unwrap();
    assert_eq!(r.virtual_disk_size(), len);
    let mut back = vec![0u8; len as usize];
    r.read_exact(&mut back).unwrap();
    assert!(back == image, "qcow2-core reads back the raw image");
    // Unwritten clusters take no room.
    assert!((q.len() as u64) < len, "{} bytes", q.len());

    // Fixed VHD: the raw bytes and a footer.
    let f = lay_into(Kind::Vhd(Type::Fixed), dir.path(), "x.vhd", len, &host);
    assert!(f[..len as usize] == image[..]);
    let foot = vhd::parse_footer(&f[len as usize..]).unwrap();
    assert_eq!((foot.ty, foot.size), (Some(Type::Fixed), len));

    // Dynamic VHD: read through its block table.
    let d = lay_into(Kind::Vhd(Type::Dynamic), dir.path(), "d.vhd", len, &host);
    assert!(d[..512] == d[d.len() - 512..], "footer copy at the start");
    let be = |o: usize| u32::from_be_bytes(d[o..o + 4].try_into().unwrap());
    let mut back = vec![0u8; len as usize];
    for b in 0..vhd::table_entries(len) as usize {
        let s = be(vhd::TABLE_AT as usize + 4 * b);
        if s != u32::MAX {
            let at = s as usize * 512 + vhd::BITMAP as usize;
            let blk = vhd::BLOCK as usize;
            back[b * blk..(b + 1) * blk].copy_from_slice(&d[at..at + blk]);
        }
    }
    assert!(back == image, "the dynamic VHD's blocks hold the raw image");
    // Deterministic.
    assert!(lay_into(Kind::Qcow2, dir.path(), "y.qcow2", len, &host) == q);
    assert!(lay_into(Kind::Vhd(Type::Dynamic), dir.path(), "e.vhd", len, &host) == d);
}

#[test]
fn vhdx_vmdk_ova_and_gce_read_back_as_the_raw_image() {
    let len = 40 * CHUNK as u64; // past one VMDK grain table (32 MiB)
    let dir = tempfile::tempdir().unwrap();
    let host = host_file(dir.path());
    let image = lay_into(Kind::Raw, dir.path(), "x.img", len, &host);
    for (kind, name) in [
        (Kind::Vhdx, "x.vhdx"),
        (Kind::Vmdk, "x.vmdk"),
        (Kind::Ova, "x.ova"),
        (Kind::Gce, "x.tar.gz"),
    ] {
        let bytes = lay_into(kind, dir.path(), name, len, &host);
        let (f, size) = crate::unpack::open(&dir.path().join(name)).unwrap();
        assert_eq!(size, len, "{name}");
        let mut back = vec![0u8; len as usize];
        f.read_exact_at(&mut back, 0).unwrap();
        assert!(back == image, "{name} reads back as the raw image");
        assert!((bytes.len() as u64) < len, "{name}: {} bytes", bytes.len());
    }
}

#[test]
fn an_xz_stream_decompresses_to_the_raw_image() {
    let dir = tempfile::tempdir().unwrap();
    let len = 3 * CHUNK as u64 + 777; // two 8 MiB xz blocks, a ragged end
    let ranges = [
        (4096u64, 5000usize),
        (CHUNK as u64 + 3, 7 << 20),
        (len - 10, 10),
    ];
    let mut images = Vec::new();
    for (kind, name) in [(Kind::Raw, "x.img"), (Kind::Xz, "x.img.xz")] {
        let p = dir.path().join(name);
        let f = File::create(&p).unwrap();
        let s = crate::container::Settings {
            xz_level: 1,
            ..Default::default()
        };
        let mut w = ImageOut::new(kind.open(&f, &p, &s).unwrap(), Hashes::default()).unwrap();
        let map: Vec<(u64, u64)> = ranges.iter().map(|&(o, n)| (o, n as u64)).collect();
        w.begin(len, formats::ranges::merge(map)).unwrap();
        for &(off, n) in &ranges {
            w.seek(SeekFrom::Start(off)).unwrap();
            w.write_all(&random(off, n)).unwrap();
        }
        w.finish().unwrap();
        images.push(std::fs::read(&p).unwrap());
    }
    let mut out = Vec::new();
    liblzma::read::XzDecoder::new_multi_decoder(&images[1][..])
        .read_to_end(&mut out)
        .unwrap();
    assert_eq!(out.len() as u64, len);
    assert!(out == images[0], "the .xz decompresses to the raw image");
}
