use super::*;
use std::os::unix::fs::symlink;

fn nar_of(p: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    dump(p, &mut out, &mut Vec::new()).unwrap();
    out
}

fn s(b: &[u8]) -> Vec<u8> {
    let mut v = (b.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(b);
    v.resize(v.len() + (8 - b.len() % 8) % 8, 0);
    v
}

#[test]
fn regular_file_framing() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("f");
    std::fs::write(&f, b"hello").unwrap();
    let mut want = Vec::new();
    for part in [
        &b"nix-archive-1"[..],
        b"(",
        b"type",
        b"regular",
        b"contents",
    ] {
        want.extend(s(part));
    }
    want.extend(s(b"hello"));
    want.extend(s(b")"));
    assert_eq!(nar_of(&f), want);
}

#[test]
fn executable_bit_and_sorted_entries_and_dangling_symlink() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("r");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("b"), b"x").unwrap();
    std::fs::set_permissions(root.join("b"), std::fs::Permissions::from_mode(0o755)).unwrap();
    symlink("/does/not/exist", root.join("a")).unwrap();
    let nar = nar_of(&root);
    let a = nar.windows(1).position(|_| true).unwrap();
    let find = |needle: &[u8]| {
        nar.windows(needle.len())
            .position(|w| w == needle)
            .unwrap_or_else(|| panic!("{:?} not in NAR", String::from_utf8_lossy(needle)))
    };
    assert!(find(&s(b"/does/not/exist")) > a);
    assert!(find(&s(b"a")) < find(&s(b"b")), "entries sorted");
    assert!(find(&s(b"executable")) > find(&s(b"b")));
}

#[test]
fn scanner_finds_hash_split_across_chunks_and_missing_paths() {
    let known = *b"0123456789abcdfghijklmnpqrsvwxyz";
    let unknown = *b"zyxwvsrqpnmlkjihgfdcba9876543210";
    let mut set = std::collections::HashSet::new();
    set.insert(known);
    let mut sc = RefScanner::new(std::sync::Arc::new(set));
    let mut stream = vec![0u8; 1000];
    stream.extend_from_slice(b"/nix/store/");
    stream.extend_from_slice(&known);
    stream.extend_from_slice(b"-lib\0\x01");
    stream.extend_from_slice(b"/nix/store/");
    stream.extend_from_slice(&unknown);
    stream.extend_from_slice(b"-gone-1.0/bin\0");
    // Feed in awkward chunk sizes so matches straddle boundaries.
    for c in stream.chunks(7) {
        sc.feed(c);
    }
    assert!(sc.found.contains(&known));
    assert_eq!(sc.found.len(), 1);
    let missing: Vec<_> = sc
        .missing
        .iter()
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .collect();
    assert_eq!(
        missing,
        vec![format!("{}-gone-1.0", String::from_utf8_lossy(&unknown))]
    );
}

#[test]
fn size_from_metadata_equals_the_dumped_length() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("r");
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    std::fs::write(root.join("b"), b"x").unwrap();
    std::fs::set_permissions(root.join("b"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(root.join("sub/empty"), b"").unwrap();
    std::fs::write(root.join("sub/deeper/nine"), b"123456789").unwrap();
    std::fs::write(root.join("sub/eight"), b"12345678").unwrap();
    symlink("../b", root.join("sub/link-with-a-longer-name")).unwrap();
    std::fs::hard_link(root.join("sub/eight"), root.join("sub/eight-again")).unwrap();
    for p in [
        root.clone(),
        root.join("b"),
        root.join("sub/link-with-a-longer-name"),
        root.join("sub/empty"),
    ] {
        let dumped = nar_of(&p).len() as u64;
        assert_eq!(size(&p).unwrap(), dumped, "{}", p.display());
        // The same from the tree forge reads (owners forced, as the
        // root's are; a hard link twice, as NAR holds it).
        let owner = crate::tree::Owner {
            force: Some((0, 0)),
        };
        let f = Tree::read_host(&p, owner).unwrap();
        let (t, top) = f.parts();
        assert_eq!(tree_size(t, top, &p).unwrap(), dumped, "{}", p.display());
    }
}

#[test]
fn a_tree_with_what_nar_cannot_hold_is_refused_naming_it() {
    let mut t = Tree::new(0o755);
    let top = t.mkdir_p(b"/top", 0o755).unwrap();
    let d = t.mkdir_p(b"/top/dev", 0o755).unwrap();
    let fifo = crate::tree::Node {
        kind: Kind::Fifo,
        perm: 0o644,
        uid: 0,
        gid: 0,
    };
    t.insert(d, b"pipe", fifo).unwrap();
    let e = tree_size(&t, top, Path::new("/store/x-top")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "/store/x-top/dev/pipe: unsupported file type (NAR holds only files, directories and symlinks)"
    );
}
