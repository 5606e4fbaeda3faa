use super::*;
use std::os::unix::fs::symlink;
use std::process::Command;

fn node<'t>(t: &'t Tree, name: &[u8]) -> &'t Node {
    let Kind::Dir { children } = &t.nodes[ROOT].kind else {
        panic!("root is a directory");
    };
    &t.nodes[children[name]]
}

#[test]
fn a_checkouts_files_keep_their_modes_but_private_keys_become_0600_owned_by_root() {
    let d = tempfile::tempdir().unwrap();
    for (name, mode) in [
        ("resolv.conf", 0o644),
        ("admin_authorized_keys", 0o640),
        ("wifi.key", 0o644),
        ("tls_key", 0o664),
    ] {
        let p = d.path().join(name);
        fs::write(&p, name).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }
    fs::create_dir(d.path().join("sub")).unwrap();
    fs::write(d.path().join("sub/hosts"), "127.0.0.1 x\n").unwrap();
    symlink("sub/hosts", d.path().join("hosts")).unwrap();
    let id = build(Some(d.path()), &Generate::default()).unwrap();
    let t = &id.tree;
    assert_eq!(node(t, b"resolv.conf").perm, 0o644);
    assert_eq!(node(t, b"admin_authorized_keys").perm, 0o640);
    assert_eq!(node(t, b"wifi.key").perm, 0o600);
    assert_eq!(node(t, b"tls_key").perm, 0o600);
    let hosts = node(t, b"hosts");
    assert!(
        matches!(hosts.kind, Kind::File { size: 12, .. }),
        "a symlink inside is copied as a file"
    );
    for n in [b"resolv.conf".as_slice(), b"hosts", b"sub"] {
        assert_eq!((node(t, n).uid, node(t, n).gid), (0, 0));
    }
}

#[test]
fn a_symlink_leading_outside_is_refused_naming_it() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("id");
    fs::create_dir(&src).unwrap();
    fs::write(d.path().join("secret"), "x").unwrap();
    symlink("../secret", src.join("leak")).unwrap();
    let e = build(Some(&src), &Generate::default()).err().unwrap();
    assert!(matches!(e, IdentityError::Escapes { .. }), "{e}");
    assert!(
        e.to_string().starts_with(&format!(
            "{}: a symlink leading outside",
            src.join("leak").display()
        )),
        "{e}"
    );
}

#[test]
fn a_fifo_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("pipe");
    assert!(Command::new("mkfifo").arg(&p).status().unwrap().success());
    let e = build(Some(d.path()), &Generate::default()).err().unwrap();
    assert!(
        matches!(e, IdentityError::NotAFile { what: "a fifo", .. }),
        "{e}"
    );
}

#[test]
fn generated_items_fill_gaps_and_a_seeded_machine_id_is_stable() {
    let g = Generate {
        hostname: Some("pi-07".into()),
        machine_id: Some(MachineId::Seeded {
            seed: "s".into(),
            purpose: "vm1".into(),
        }),
        host_key: false,
        keep_host_key: None,
    };
    let a = build(None, &g).unwrap();
    let b = build(None, &g).unwrap();
    let text = |t: &Tree, n: &[u8]| match &node(t, n).kind {
        Kind::File {
            content: Content::Bytes(b),
            ..
        } => String::from_utf8(b.to_vec()).unwrap(),
        _ => panic!("a generated file"),
    };
    assert_eq!(text(&a.tree, b"hostname"), "pi-07\n");
    let id = text(&a.tree, b"machine-id");
    assert_eq!(id.len(), 33);
    assert_eq!(id, text(&b.tree, b"machine-id"));
    // A machine-id in the directory wins over a generated one.
    let d = tempfile::tempdir().unwrap();
    fs::write(
        d.path().join("machine-id"),
        "0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
    let c = build(Some(d.path()), &g).unwrap();
    assert!(matches!(
        node(&c.tree, b"machine-id").kind,
        Kind::File {
            content: Content::Host { .. },
            ..
        }
    ));
    assert!(build(
        None,
        &Generate {
            hostname: Some("bad/name".into()),
            ..g
        }
    )
    .is_err());
}

#[test]
fn a_generated_host_key_is_one_ssh_keygen_reads_and_each_is_new() {
    let g = Generate {
        host_key: true,
        ..Generate::default()
    };
    let a = build(None, &g).unwrap();
    let b = build(None, &g).unwrap();
    let ka = a.host_key.clone().unwrap();
    assert_ne!(
        ka.public,
        b.host_key.unwrap().public,
        "keys come from the OS's randomness"
    );
    // A kept pair comes back unchanged, with the same fingerprint.
    let private = match &node(&a.tree, b"ssh_host_ed25519_key").kind {
        Kind::File {
            content: Content::Bytes(b),
            ..
        } => b.to_vec(),
        _ => panic!("a generated file"),
    };
    let kept = build(
        None,
        &Generate {
            host_key: true,
            keep_host_key: Some((private.clone(), format!("{}\n", ka.public))),
            ..Generate::default()
        },
    )
    .unwrap();
    assert_eq!(kept.host_key.as_ref().unwrap().fingerprint, ka.fingerprint);
    assert!(matches!(&node(&kept.tree, b"ssh_host_ed25519_key").kind,
        Kind::File { content: Content::Bytes(b), .. } if b[..] == private[..]));
    let Kind::File {
        content: Content::Bytes(private),
        ..
    } = &node(&a.tree, b"ssh_host_ed25519_key").kind
    else {
        panic!("the private key");
    };
    assert_eq!(node(&a.tree, b"ssh_host_ed25519_key").perm, 0o600);
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("k");
    fs::write(&p, private).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    // The judge: OpenSSH's own reader (openssh-client, from scripts/deps.sh).
    let out = Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(&p)
        .output()
        .expect("ssh-keygen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let derived = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        derived.split_whitespace().take(2).collect::<Vec<_>>(),
        ka.public.split_whitespace().take(2).collect::<Vec<_>>()
    );
    let fp = Command::new("ssh-keygen")
        .arg("-l")
        .arg("-f")
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&fp.stdout).contains(&ka.fingerprint),
        "{}",
        String::from_utf8_lossy(&fp.stdout)
    );
}
