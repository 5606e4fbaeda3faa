//! In-memory tests of the planner and writer; the real judges (e2fsck,
//! the kernel) run in the workspace's tests/ext4.rs.

use super::*;
use std::io::Cursor;
use std::sync::Arc;

fn file(bytes: &[u8]) -> Node {
    Node {
        kind: Kind::File {
            size: bytes.len() as u64,
            content: Content::Bytes(Arc::from(bytes)),
        },
        perm: 0o644,
        uid: 0,
        gid: 0,
    }
}

fn opts(size: Size) -> Options {
    Options::from_seed("test", "t", size, false, 1)
}

/// Written, after checking the plan knew beforehand what it would write.
fn build(tree: &Tree, o: &Options) -> Vec<u8> {
    let p = plan(tree, o).unwrap();
    let mut c = Cursor::new(vec![0u8; p.size_bytes() as usize]);
    let w = p.write(&mut c, 0).unwrap();
    assert_eq!(crate::ranges::merge(w.mapped), p.mapped());
    c.into_inner()
}

#[test]
fn same_input_same_bytes() {
    let mut t = Tree::new(0o755);
    for i in 0..50 {
        t.insert(
            ROOT,
            format!("f{i}").as_bytes(),
            file(&vec![i as u8; i * 100]),
        )
        .unwrap();
    }
    let o = opts(Size::Auto {
        slack: Slack::default(),
    });
    assert_eq!(build(&t, &o), build(&t, &o));
    let mut other = o.clone();
    other.uuid[0] ^= 1;
    assert_ne!(build(&t, &o), build(&t, &other), "the UUID must matter");
}

#[test]
fn superblock_fields() {
    let t = Tree::new(0o755);
    let img = build(
        &t,
        &opts(Size::Auto {
            slack: Slack::default(),
        }),
    );
    let sb = &img[1024..2048];
    assert_eq!(&sb[0x38..0x3A], &[0x53, 0xEF]);
    assert_eq!(&sb[0x78..0x79], b"t");
    // Checksum over the first 1020 bytes.
    let c = csum::crc(!0, &sb[..0x3FC]);
    assert_eq!(&sb[0x3FC..], &c.to_le_bytes());
}

#[test]
fn names_over_255_bytes_are_refused() {
    let mut t = Tree::new(0o755);
    let e = t.insert(ROOT, &[b'x'; 256], file(b"")).unwrap_err();
    assert!(
        e.to_string().contains("256 bytes; ext4 allows at most 255"),
        "{e}"
    );
    t.insert(ROOT, &[b'x'; 255], file(b"")).unwrap();
    for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
        assert!(t.insert(ROOT, bad, file(b"")).is_err(), "{bad:?}");
    }
}

#[test]
fn fixed_size_too_small_says_what_is_needed() {
    let mut t = Tree::new(0o755);
    t.insert(ROOT, b"big", file(&vec![1u8; 3 << 20])).unwrap();
    let e = plan(&t, &opts(Size::Fixed(1 << 20))).err().unwrap();
    match e {
        Ext4Error::TooSmall { size, needed } => {
            assert_eq!(size, 1 << 20);
            assert!(needed > 3 << 20 && needed < 4 << 20, "{needed}");
        }
        e => panic!("{e}"),
    }
}

#[test]
fn too_many_inodes_for_a_fixed_size() {
    let mut t = Tree::new(0o755);
    for i in 0..5000 {
        t.insert(ROOT, format!("{i}").as_bytes(), file(b""))
            .unwrap();
    }
    match plan(&t, &opts(Size::Fixed(1 << 20))).err().unwrap() {
        Ext4Error::TooManyInodes { needed, max, .. } => {
            assert_eq!(needed, 5011);
            assert!(max < needed);
        }
        e => panic!("{e}"),
    }
}

#[test]
fn auto_size_grows_with_content_and_slack() {
    let mut t = Tree::new(0o755);
    t.insert(ROOT, b"f", file(&vec![7u8; 10 << 20])).unwrap();
    let a = plan(
        &t,
        &opts(Size::Auto {
            slack: Slack::default(),
        }),
    )
    .unwrap();
    let b = plan(
        &t,
        &opts(Size::Auto {
            slack: Slack::bytes(8 << 20),
        }),
    )
    .unwrap();
    assert!(
        a.size_bytes() >= 10 << 20 && a.size_bytes() < 11 << 20,
        "{}",
        a.size_bytes()
    );
    assert!(b.size_bytes() >= a.size_bytes() + (8 << 20));
}

/// A `Write + Seek` that refuses to go back: what a streaming consumer
/// (the compressing image writer) needs from every filesystem writer.
struct Ascending {
    pos: u64,
    cursor: u64,
}

impl std::io::Write for Ascending {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.cursor < self.pos {
            return Err(std::io::Error::other(format!(
                "write at {} after {}",
                self.cursor, self.pos
            )));
        }
        self.cursor += b.len() as u64;
        self.pos = self.cursor;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl crate::sink::Sink for Ascending {}

impl std::io::Seek for Ascending {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        match to {
            std::io::SeekFrom::Start(n) => self.cursor = n,
            _ => return Err(std::io::Error::other("only absolute seeks")),
        }
        Ok(self.cursor)
    }
}

#[test]
fn writes_ascend_even_when_a_file_jumps_over_a_backup_superblock() {
    // 160 MiB of data: its extents start in group 0 and continue past the
    // backup superblock at the start of group 1 (block 32768).
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big");
    let size = 160u64 << 20;
    {
        let mut f = std::fs::File::create(&big).unwrap();
        let chunk = vec![0xA5u8; 1 << 20];
        for _ in 0..size >> 20 {
            std::io::Write::write_all(&mut f, &chunk).unwrap();
        }
    }
    let mut t = Tree::new(0o755);
    for i in 0..20 {
        t.insert(ROOT, format!("small{i}").as_bytes(), file(&[i as u8; 5000]))
            .unwrap();
    }
    let node = Node {
        kind: Kind::File {
            size,
            content: Content::Host {
                path: big.clone(),
                segments: vec![(0, size)],
            },
        },
        perm: 0o644,
        uid: 0,
        gid: 0,
    };
    t.insert(ROOT, b"big", node).unwrap();
    let p = plan(
        &t,
        &opts(Size::Auto {
            slack: Slack::default(),
        }),
    )
    .unwrap();
    let big_ino = p
        .inodes
        .iter()
        .find(|ip| ip.extents.iter().map(|e| e.len as u64).sum::<u64>() * BS64 >= size)
        .expect("the big file's inode");
    assert!(
        big_ino.extents.len() > 1,
        "the file must be split for this test to mean anything"
    );
    let w = p.write(&mut Ascending { pos: 0, cursor: 0 }, 0).unwrap();
    assert_eq!(crate::ranges::merge(w.mapped), p.mapped());
}

#[test]
fn a_journaled_filesystem_maps_what_its_plan_says() {
    let mut t = Tree::new(0o755);
    t.insert(ROOT, b"f", file(&[7u8; 10_000])).unwrap();
    // build() compares the plan's map with what was written.
    let img = build(
        &t,
        &Options::from_seed("test", "state", Size::Fixed(64 << 20), true, 1),
    );
    assert_eq!(img.len(), 64 << 20);
}

#[test]
fn a_lazy_journal_writes_only_its_superblock_and_starts_at_its_sequence() {
    let mut t = Tree::new(0o755);
    t.insert(ROOT, b"f", file(&[7u8; 10_000])).unwrap();
    let mut o = Options::from_seed("test", "state", Size::Fixed(64 << 20), true, 1);
    let zeroed = plan(&t, &o).unwrap();
    o.journal = Journal::Lazy {
        sequence: 0x1234_5678,
    };
    let lazy = plan(&t, &o).unwrap();
    let journal = lazy.inodes[JOURNAL_INO as usize - 1].extents.clone();
    assert_eq!(
        journal.len(),
        1,
        "one extent for a 64 MiB filesystem's journal"
    );
    let (start, len) = (journal[0].physical * BS64, journal[0].len as u64 * BS64);
    // The lazy map is the zeroed one less the journal after its superblock.
    let less = |m: Vec<(u64, u64)>| -> u64 { m.iter().map(|r| r.1).sum() };
    assert_eq!(less(zeroed.mapped()) - less(lazy.mapped()), len - BS64);
    assert!(lazy
        .mapped()
        .iter()
        .any(|&(o, n)| o <= start && start + BS64 <= o + n));
    // Written over old bytes: the journal's body keeps them.
    let mut c = Cursor::new(vec![0xA5u8; lazy.size_bytes() as usize]);
    let w = lazy.write(&mut c, 0).unwrap();
    assert_eq!(crate::ranges::merge(w.mapped), lazy.mapped());
    let img = c.into_inner();
    let jsb = &img[start as usize..][..BS];
    assert_eq!(&jsb[..4], &0xC03B_3998u32.to_be_bytes());
    assert_eq!(
        &jsb[0x18..0x1C],
        &0x1234_5678u32.to_be_bytes(),
        "s_sequence"
    );
    assert_eq!(&jsb[0x1C..0x20], &[0; 4], "s_start: clean");
    let body = &img[(start + BS64) as usize..(start + len) as usize];
    assert!(body.iter().all(|&b| b == 0xA5), "the body is not written");
    // The zeroed journal, over the same old bytes, starts at 1 with zeros.
    let mut c = Cursor::new(vec![0xA5u8; zeroed.size_bytes() as usize]);
    zeroed.write(&mut c, 0).unwrap();
    let img = c.into_inner();
    assert_eq!(&img[start as usize + 0x18..][..4], &1u32.to_be_bytes());
    let body = &img[(start + BS64) as usize..(start + len) as usize];
    assert!(body.iter().all(|&b| b == 0));
}
