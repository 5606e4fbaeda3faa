use super::*;
use std::io::Cursor;
use std::sync::Arc;

fn opts(size: u64) -> Options {
    Options {
        size,
        sector_size: 512,
        label: "ESP".into(),
        volume_id: 0x1234_5678,
        epoch: 1,
        hidden_sectors: 2048,
    }
}

#[test]
fn always_fat32_or_refused() {
    let t = Tree::new(0o755);
    let p = plan(&t, &opts(512 << 20)).unwrap();
    assert_eq!(p.cluster_bytes(), 4096);
    let p = plan(&t, &opts(64 << 20)).unwrap();
    assert!(p.g.clusters >= MIN_FAT32_CLUSTERS, "{}", p.g.clusters);
    match plan(&t, &opts(16 << 20)).err().unwrap() {
        FatError::TooSmallForFat32 { needed, .. } => assert!(needed > 16 << 20),
        e => panic!("{e}"),
    }
    // 4096-byte sectors need 4 KiB clusters: 256 MiB is too small.
    let mut o = opts(256 << 20);
    o.sector_size = 4096;
    assert!(plan(&t, &o).is_err());
}

#[test]
fn dos_dates() {
    // Clamped to 1980-01-01: year 0, month 1, day 1.
    assert_eq!(dos_time(0), ((1 << 5) | 1, 0));
    // 2023-11-14 22:13:20 UTC
    let (d, t) = dos_time(1_700_000_000);
    assert_eq!((d >> 9, (d >> 5) & 15, d & 31), (43, 11, 14));
    assert_eq!((t >> 11, (t >> 5) & 63, (t & 31) * 2), (22, 13, 20));
}

#[test]
fn deterministic_and_symlinks_refused() {
    let mut t = Tree::new(0o755);
    let d = t.mkdir_p(b"/EFI/BOOT", 0o755).unwrap();
    let f = crate::tree::Node {
        kind: Kind::File {
            size: 5,
            content: Content::Bytes(Arc::from(&b"hello"[..])),
        },
        perm: 0o644,
        uid: 0,
        gid: 0,
    };
    t.insert(d, b"BOOTX64.EFI", f).unwrap();
    let build = || {
        let p = plan(&t, &opts(64 << 20)).unwrap();
        let mut c = Cursor::new(Vec::new());
        p.write(&mut c, 0).unwrap();
        c.into_inner()
    };
    assert_eq!(build(), build());
    let link = crate::tree::Node {
        kind: Kind::Symlink {
            target: b"x".to_vec(),
        },
        perm: 0o777,
        uid: 0,
        gid: 0,
    };
    t.insert(ROOT, b"l", link).unwrap();
    assert!(matches!(
        plan(&t, &opts(64 << 20)),
        Err(FatError::Unsupported { .. })
    ));
}

#[test]
fn reader_reads_back_what_the_writer_wrote() {
    let mut t = Tree::new(0o755);
    let d = t.mkdir_p(b"/loader/entries", 0o755).unwrap();
    let text = b"title NixOS\n".repeat(1000);
    let f = crate::tree::Node {
        kind: Kind::File {
            size: text.len() as u64,
            content: Content::Bytes(Arc::from(&text[..])),
        },
        perm: 0o644,
        uid: 0,
        gid: 0,
    };
    t.insert(d, b"nixos-generation-1.conf", f).unwrap();
    let p = plan(&t, &opts(64 << 20)).unwrap();
    let mut c = Cursor::new(Vec::new());
    let w = p.write(&mut c, 0).unwrap();
    // The plan knew beforehand what it would write.
    assert_eq!(crate::ranges::merge(w.mapped), p.mapped());
    let mut v = read::Volume::open(c, 0).unwrap();
    assert_eq!(v.label, "ESP");
    let names: Vec<String> = v
        .list("/loader/entries")
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec!["nixos-generation-1.conf"]);
    assert_eq!(
        v.read("/loader/entries/nixos-generation-1.conf")
            .unwrap()
            .unwrap(),
        text
    );
    assert!(v.read("/nope").unwrap().is_none());
    assert!(
        v.list("/LOADER").unwrap().is_some(),
        "lookups ignore case as FAT does"
    );
}

#[test]
fn names_differing_only_in_case_are_refused() {
    let mut t = Tree::new(0o755);
    let d = t.mkdir_p(b"/EFI", 0o755).unwrap();
    let file = || crate::tree::Node {
        kind: Kind::File {
            size: 1,
            content: Content::Bytes(Arc::from(&b"x"[..])),
        },
        perm: 0o644,
        uid: 0,
        gid: 0,
    };
    t.insert(d, b"a.txt", file()).unwrap();
    t.insert(d, b"B.txt", file()).unwrap();
    assert!(plan(&t, &opts(64 << 20)).is_ok());
    t.insert(d, b"A.TXT", file()).unwrap();
    match plan(&t, &opts(64 << 20)) {
        Err(FatError::CaseClash {
            path,
            first,
            second,
        }) => {
            assert_eq!(path, std::path::PathBuf::from("/EFI"));
            assert_eq!((first.as_str(), second.as_str()), ("A.TXT", "a.txt"));
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a.txt and A.TXT were both planned"),
    }
}

#[test]
fn dos_times_read_back_as_the_unix_time_they_were_made_of() {
    // 1980 (the clamp), 2000-02-29 23:59:58, a leap day, 2107's last second.
    for t in [315_532_800u32, 951_868_798, 1_700_000_000, 4_294_967_294] {
        let (date, time) = dos_time(t);
        let back = unix_time(date, time);
        assert_eq!(dos_time(back), (date, time), "{t}");
        assert!(t - back < 2, "{t} -> {back}");
    }
    assert_eq!(unix_time(dos_time(1).0, dos_time(1).1), 315_532_800);
}

/// A volume's bytes with some changed or cut short, read without copying
/// the volume for each case.
struct Patched<'a> {
    base: &'a [u8],
    changed: std::collections::HashMap<u64, u8>,
    len: u64,
    pos: u64,
}

impl std::io::Read for Patched<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.len {
            return Ok(0);
        }
        let end = (self.pos + buf.len() as u64).min(self.len);
        let n = (end - self.pos) as usize;
        buf[..n].copy_from_slice(&self.base[self.pos as usize..end as usize]);
        for (i, b) in buf[..n].iter_mut().enumerate() {
            if let Some(&v) = self.changed.get(&(self.pos + i as u64)) {
                *b = v;
            }
        }
        self.pos = end;
        Ok(n)
    }
}

impl std::io::Seek for Patched<'_> {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        self.pos = crate::sink::seek_in(self.pos, to, "patched")?;
        Ok(self.pos)
    }
}

/// An ESP's boot sector fields, its first FAT entries (chains made to loop
/// or to point anywhere) and its directory entries set at random, or the
/// volume cut short: the reader answers each lookup, never panics, never
/// reads on forever.
#[test]
fn damaged_volumes_never_panic_or_hang_the_reader() {
    let mut t = Tree::new(0o755);
    let d = t.mkdir_p(b"/loader/entries", 0o755).unwrap();
    let text = b"title NixOS\n".repeat(600);
    let file = |b: &[u8]| crate::tree::Node::bytes(b, 0o644);
    t.insert(d, b"a.conf", file(&text)).unwrap();
    t.insert(d, b"b.conf", file(b"x")).unwrap();
    let p = plan(&t, &opts(40 << 20)).unwrap();
    let mut c = Cursor::new(Vec::new());
    p.write(&mut c, 0).unwrap();
    let base = c.into_inner();
    let (fat, data) = (p.g.reserved * p.g.sector, p.g.data_start());
    crate::fuzz::run("fat::read", 300, |r| {
        let mut changed = std::collections::HashMap::new();
        for _ in 0..1 + r.below(6) {
            let (at, v) = match r.below(4) {
                0 => (11 + r.below(37) as u64, r.word() as u8),
                // A FAT entry: another early cluster, itself, or one before.
                1 => {
                    let e = fat + 8 + r.below(16) as u64 * 4;
                    for (i, b) in (r.below(20) as u32).to_le_bytes().iter().enumerate() {
                        changed.insert(e + i as u64, *b);
                    }
                    continue;
                }
                2 => (data + r.below(4 * 4096) as u64, r.word() as u8),
                _ => (r.below(base.len()) as u64, r.word() as u8),
            };
            changed.insert(at, v);
        }
        let len = match r.below(4) {
            0 => r.below(base.len() + 1) as u64,
            _ => base.len() as u64,
        };
        let patched = Patched {
            base: &base,
            changed,
            len,
            pos: 0,
        };
        if let Ok(mut v) = read::Volume::open(patched, 0) {
            let _ = v.list("/");
            let _ = v.list("/loader/entries");
            let _ = v.read("/loader/entries/a.conf");
            let _ = v.read("/loader/entries/b.conf");
        }
    });
}
