use super::*;
use crate::tree::{Node, Tree};
use std::io::Cursor;

fn build(tree: &Tree) -> Vec<u8> {
    let p = plan(tree, &Options::from_seed("seed", "nixos", 1)).unwrap();
    let mut c = Cursor::new(Vec::new());
    let w = p.write(&mut c, 0).unwrap();
    assert_eq!(w.size, c.get_ref().len() as u64, "every byte up to the end");
    c.into_inner()
}

fn sample() -> Tree {
    let mut t = Tree::new(0o755);
    let d = t.mkdir_p(b"/nix/store/abc-hello/bin", 0o555).unwrap();
    t.insert(d, b"hello", Node::bytes(vec![7u8; 10_000], 0o555))
        .unwrap();
    t.insert(d, b"-dash", Node::bytes(b"x".to_vec(), 0o444))
        .unwrap();
    let etc = t.mkdir_p(b"/etc", 0o755).unwrap();
    t.insert(etc, b"l", Node::symlink("/nix/store")).unwrap();
    t
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

#[test]
fn same_tree_same_bytes_and_the_superblock_says_what_was_planned() {
    let (a, b) = (build(&sample()), build(&sample()));
    assert_eq!(a, b);
    assert_eq!(u32_at(&a, 1024), MAGIC);
    assert_eq!(a[1024 + 12], 12, "4 KiB blocks");
    assert_eq!(u32_at(&a, 1024 + 36) as usize * 4096, a.len(), "blocks");
    assert_eq!(&a[1024 + 64..1024 + 69], b"nixos");
    // 8 inodes: / nix store abc-hello bin hello -dash etc l = 9.
    assert_eq!(u32_at(&a, 1024 + 16), 9);
}

#[test]
fn a_directory_is_sorted_by_bytes_with_dot_entries_among_the_names() {
    let mut t = sample();
    let bin = t.mkdir_p(b"/nix/store/abc-hello/bin", 0o555).unwrap();
    let blocks = dir_blocks(&t, bin, ROOT);
    let names: Vec<&[u8]> = blocks[0].iter().map(|e| e.0).collect();
    assert_eq!(names, [&b"-dash"[..], b".", b"..", b"hello"]);
}

#[test]
fn a_big_directory_spans_blocks_each_holding_whole_entries() {
    let mut t = Tree::new(0o755);
    for i in 0..1000 {
        t.insert(
            ROOT,
            format!("entry-{i:05}").as_bytes(),
            Node::bytes(vec![], 0o644),
        )
        .unwrap();
    }
    let blocks = dir_blocks(&t, ROOT, ROOT);
    assert!(blocks.len() > 2);
    for b in &blocks {
        assert!(block_len(b) <= BS);
    }
    let all: Vec<&[u8]> = blocks.iter().flatten().map(|e| e.0).collect();
    assert!(all.windows(2).all(|w| w[0] < w[1]), "sorted across blocks");
    let p = plan(&t, &Options::from_seed("s", "", 1)).unwrap();
    let root = &p.inodes[0];
    assert_eq!(root.size, p.dirs[&ROOT].len() as u64);
}

#[test]
fn tails_go_inline_when_they_fit_and_names_over_255_bytes_are_refused() {
    let t = sample();
    let p = plan(&t, &Options::from_seed("s", "", 1)).unwrap();
    let hello = p.inodes.iter().find(|i| i.size == 10_000).unwrap();
    assert_eq!(
        (hello.layout, hello.blocks, hello.inline),
        (FLAT_INLINE, 2, 10_000 - 8192)
    );
    assert_eq!(
        hello.pos / BS,
        (hello.pos + 32 + hello.inline - 1) / BS,
        "one block"
    );
    let mut t = Tree::new(0o755);
    t.insert(ROOT, &[b'n'; 256], Node::bytes(vec![], 0o644))
        .unwrap_err();
    let t = sample();
    let e = plan(&t, &Options::from_seed("s", "a label over 16 b", 1));
    assert!(matches!(e, Err(ErofsError::Label(_))));
}

/// An inode and tail that do not fit at the end of a block leave it for
/// later, smaller ones (the smallest end that holds each): here four
/// files and the root fit in the superblock's block and two more, where
/// filling in order took four.
/// No two inodes overlap, none with a tail crosses a block, and the
/// image writes in order with every inode where it was placed.
#[test]
fn small_inodes_fill_the_ends_earlier_inodes_left() {
    let mut t = Tree::new(0o755);
    for (name, tail) in [(b"a", 3000), (b"b", 3000), (b"c", 800), (b"d", 800)] {
        let n = Node::bytes(vec![name[0]; 8192 + tail], 0o644);
        t.insert(ROOT, name, n).unwrap();
    }
    let p = plan(&t, &Options::from_seed("s", "", 1)).unwrap();
    assert_eq!(
        p.meta_end.div_ceil(BS) - META_BLKADDR,
        3,
        "three metadata blocks"
    );
    let mut spans: Vec<(u64, u64)> = p
        .inodes
        .iter()
        .map(|i| (i.pos, i.pos + i.isize() + i.inline))
        .collect();
    for &(s, e) in &spans {
        assert_eq!(s / BS, (e - 1) / BS, "within one block");
    }
    spans.sort();
    assert!(
        spans.windows(2).all(|w| w[0].1 <= w[1].0),
        "no overlap: {spans:?}"
    );
    let c = p
        .inodes
        .iter()
        .filter(|i| i.inline == 800)
        .map(|i| i.pos / BS)
        .min()
        .unwrap();
    assert_eq!(c, META_BLKADDR, "a small tail in the first block's end");
    let img = build(&t);
    assert_eq!(img.len() as u64, p.size_bytes());
}
