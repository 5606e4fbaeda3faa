//! The customisation layer, written by forge itself: users and groups,
//! `/tmp`, `/root`, `/bin/sh`, `/usr/bin/env` and the CA bundle as links
//! into the closure when it has them, and the closure's Nix database with
//! a `nix.conf` that needs no build users, so `nix` and `nix-daemon` work
//! inside the container.

use anyhow::{bail, Result};

use crate::closure::{Paths, Store};
use formats::tree::{dir_node, Node, Tree, ROOT};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

const NOBODY: u32 = 65534;

/// `NAME:UID[:GID]` (the GID defaults to the UID).
pub fn parse_user(s: &str) -> Result<User> {
    let bad = || anyhow::anyhow!("--add-user {s:?}: expected NAME:UID[:GID]");
    let mut f = s.split(':');
    let name = f.next().filter(|n| !n.is_empty()).ok_or_else(bad)?;
    let valid = name.bytes().enumerate().all(|(i, c)| {
        c.is_ascii_lowercase() || c == b'_' || (i > 0 && (c.is_ascii_digit() || c == b'-'))
    });
    if !valid || name.len() > 32 {
        bail!("--add-user {s:?}: {name:?} is not a user name (a-z, 0-9, _ and -, not first)");
    }
    let uid: u32 = f.next().and_then(|u| u.parse().ok()).ok_or_else(bad)?;
    let gid: u32 = match f.next() {
        Some(g) => g.parse().map_err(|_| bad())?,
        None => uid,
    };
    if f.next().is_some() {
        return Err(bad());
    }
    // (uid_t)-1 means "no change" to chown and setuid: never an id.
    if uid == u32::MAX || gid == u32::MAX {
        bail!("--add-user {s:?}: 4294967295 is not a valid user or group id");
    }
    Ok(User {
        name: name.into(),
        uid,
        gid,
    })
}

/// The users, root and nobody first; a clash with them or between the
/// added ones is an error naming both.
pub fn users(added: &[User]) -> Result<Vec<User>> {
    let mut all = vec![
        User {
            name: "root".into(),
            uid: 0,
            gid: 0,
        },
        User {
            name: "nobody".into(),
            uid: NOBODY,
            gid: NOBODY,
        },
    ];
    for u in added {
        if let Some(o) = all.iter().find(|o| o.name == u.name || o.uid == u.uid) {
            bail!(
                "--add-user {}:{}: clashes with user {} (uid {})",
                u.name,
                u.uid,
                o.name,
                o.uid
            );
        }
        all.push(u.clone());
    }
    Ok(all)
}

/// The first path of the closure (the top first, then in order) holding
/// `sub`, as a logical path.
fn provided(store: &Store, c: &Paths, sub: &str) -> Option<String> {
    let top = std::iter::once(c.top.as_str());
    let rest = c
        .paths
        .iter()
        .map(|p| p.path.as_str())
        .filter(|p| *p != c.top);
    top.chain(rest)
        .map(|p| format!("{p}/{sub}"))
        .find(|l| std::fs::symlink_metadata(store.physical(l)).is_ok())
}

/// What the layer holds besides its tree: the links it made, for the report.
pub struct Made {
    pub tree: Tree,
    pub links: Vec<(String, String)>,
}

/// `/etc/passwd` and `/etc/group` of `users`. A gid names one group: the
/// first user with it (root, nobody, then the added ones in order) names
/// it, and later ones join it.
fn accounts(users: &[User], shell: &str) -> (String, String) {
    let mut passwd = String::new();
    let mut group = String::new();
    for (i, u) in users.iter().enumerate() {
        let home = match u.uid {
            0 => "/root".to_string(),
            NOBODY => "/var/empty".to_string(),
            _ => format!("/home/{}", u.name),
        };
        let sh = if u.uid == NOBODY {
            "/sbin/nologin"
        } else {
            shell
        };
        passwd.push_str(&format!(
            "{}:x:{}:{}:{}:{home}:{sh}\n",
            u.name, u.uid, u.gid, u.name
        ));
        if !users[..i].iter().any(|o| o.gid == u.gid) {
            group.push_str(&format!("{}:x:{}:\n", u.name, u.gid));
        }
    }
    (passwd, group)
}

pub fn layer(store: &Store, c: &Paths, users: &[User], epoch: u32) -> Result<Made> {
    let mut t = Tree::new(0o755);
    let mut links = Vec::new();
    let sh = provided(store, c, "bin/sh");
    for (at, sub) in [
        ("/bin/sh", "bin/sh"),
        ("/usr/bin/env", "bin/env"),
        (
            "/etc/ssl/certs/ca-certificates.crt",
            "etc/ssl/certs/ca-bundle.crt",
        ),
    ] {
        if let Some(target) = provided(store, c, sub) {
            let (dir, name) = at.rsplit_once('/').expect("absolute");
            let d = t.mkdir_p(dir.as_bytes(), 0o755)?;
            t.insert(d, name.as_bytes(), Node::symlink(&target))?;
            links.push((at.to_string(), target));
        }
    }
    let shell = if sh.is_some() {
        "/bin/sh"
    } else {
        "/sbin/nologin"
    };
    let (passwd, group) = accounts(users, shell);
    for u in users {
        if u.uid != 0 && u.uid != NOBODY {
            let h = t.mkdir_p(b"/home", 0o755)?;
            t.insert(h, u.name.as_bytes(), dir_node(0o700, u.uid, u.gid))?;
        }
    }
    let etc = t.mkdir_p(b"/etc", 0o755)?;
    t.insert(etc, b"passwd", Node::bytes(passwd, 0o644))?;
    t.insert(etc, b"group", Node::bytes(group, 0o644))?;
    let nix = t.mkdir_p(b"/etc/nix", 0o755)?;
    // Single-user Nix as root: no nixbld group, no sandbox (a container
    // rarely may make namespaces).
    t.insert(
        nix,
        b"nix.conf",
        Node::bytes("build-users-group =\nsandbox = false\n", 0o644),
    )?;
    t.insert(ROOT, b"root", dir_node(0o700, 0, 0))?;
    t.insert(ROOT, b"tmp", dir_node(0o1777, 0, 0))?;
    let var = t.mkdir_p(b"/var", 0o755)?;
    t.insert(var, b"empty", dir_node(0o555, 0, 0))?;
    t.mkdir_p(b"/nix/store", 0o755)?;
    crate::nixdb::add_to(&mut t, &c.paths, epoch)?;
    Ok(Made { tree: t, links })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_added_user_joins_an_existing_group_of_its_gid() {
        let all = users(&[
            parse_user("app:1000:65534").unwrap(),
            parse_user("ops:1001:0").unwrap(),
            parse_user("web:1002").unwrap(),
        ])
        .unwrap();
        let (passwd, group) = accounts(&all, "/bin/sh");
        assert_eq!(group, "root:x:0:\nnobody:x:65534:\nweb:x:1002:\n");
        assert!(
            passwd.contains("app:x:1000:65534:app:/home/app:/bin/sh\n"),
            "{passwd}"
        );
    }

    #[test]
    fn users_parse_and_clashes_are_named() {
        assert_eq!(
            parse_user("app:1000").unwrap(),
            User {
                name: "app".into(),
                uid: 1000,
                gid: 1000
            }
        );
        assert_eq!(parse_user("app:1000:100").unwrap().gid, 100);
        for bad in [
            "",
            "app",
            "app:x",
            "App:1",
            "1a:1",
            "a:1:2:3",
            "a:-1",
            "a:4294967295",
            "a:1:4294967295",
        ] {
            assert!(parse_user(bad).is_err(), "{bad}");
        }
        let e = users(&[parse_user("toor:0").unwrap()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("clashes with user root"), "{e}");
        let e = users(&[parse_user("root:1000").unwrap()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("clashes with user root"), "{e}");
        let two = [parse_user("a:1000").unwrap(), parse_user("b:1000").unwrap()];
        assert!(users(&two).unwrap_err().to_string().contains("user a"));
    }
}
