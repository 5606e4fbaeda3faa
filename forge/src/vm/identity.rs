//! A VM's identity disk: what goes on it, made or upgraded.
//!
//! - A new VM: its identity directory (if any) plus what was asked for.
//! - An upgrade with a new `--identity`: that directory; a host key
//!   generated before stays unless the directory brings its own.
//! - An upgrade without one: the previous disk's files, all of them
//!   (nothing a machine was given is dropped on the way to a new base).

use anyhow::{Context, Result};
use std::path::Path;

use formats::identity::{self, Generate, Identity, MachineId};
use formats::tree::{Content, Kind, Node, NodeId, Tree, ROOT};

use super::{Machine, Options};

/// The identity of machine `m`, whose current identity disk (if any) is
/// `disk`.
pub fn of(o: &Options, m: &Machine, disk: &Path) -> Result<Identity> {
    let what = || format!("the identity of VM {}", m.name);
    let mut gen = Generate {
        hostname: o.hostname.then(|| m.name.clone()),
        machine_id: Some(MachineId::Seeded {
            seed: o.seed.clone(),
            purpose: format!("vm:{}", m.name),
        }),
        host_key: o.host_keys,
        keep_host_key: None,
    };
    match &m.identity {
        None if o.upgrade => {
            let old = previous(disk)
                .with_context(|| format!("{}: reading the VM's identity", disk.display()))?;
            // A key it holds is reported again.
            gen.host_key |= identity::text_of(&old, b"ssh_host_ed25519_key.pub").is_some();
            identity::complete(old, disk, &gen).with_context(what)
        }
        dir => {
            let own_key = dir
                .as_ref()
                .is_some_and(|d| d.join("ssh_host_ed25519_key").exists());
            if !own_key {
                gen.keep_host_key = old_host_key(disk);
                gen.host_key |= gen.keep_host_key.is_some();
            }
            identity::build(dir.as_deref(), &gen).with_context(what)
        }
    }
}

fn open(disk: &Path) -> Result<ext4_view::Ext4> {
    let (f, _) = crate::unpack::open(disk)?;
    Ok(ext4_view::Ext4::load(Box::new(crate::inspect::Region {
        f,
        off: 0,
    }))?)
}

/// The host key pair on an existing identity disk, if any.
fn old_host_key(disk: &Path) -> Option<(Vec<u8>, String)> {
    let fs = open(disk).ok()?;
    let private = fs.read("/ssh_host_ed25519_key").ok()?;
    let public = String::from_utf8(fs.read("/ssh_host_ed25519_key.pub").ok()?).ok()?;
    Some((private, public))
}

/// Every file and directory of an identity disk (but `lost+found`), with
/// its mode, owned by root as the identity writer makes them.
fn previous(disk: &Path) -> Result<Tree> {
    let fs = open(disk)?;
    let mut tree = Tree::new(0o755);
    copy_dir(&fs, "/", &mut tree, ROOT)?;
    Ok(tree)
}

fn copy_dir(fs: &ext4_view::Ext4, dir: &str, tree: &mut Tree, at: NodeId) -> Result<()> {
    let mut entries = Vec::new();
    for e in fs.read_dir(dir)? {
        let e = e?;
        let name = e.file_name().as_ref().to_vec();
        if name == b"." || name == b".." || (dir == "/" && name == b"lost+found") {
            continue;
        }
        entries.push((name, e.path(), e.metadata()?));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, path, md) in entries {
        let perm = md.mode() & 0o7777;
        let p = path
            .to_str()
            .context("a non-UTF-8 path on an identity disk")?;
        let kind = if md.is_dir() {
            Kind::Dir {
                children: Default::default(),
            }
        } else {
            let bytes = fs.read(p)?;
            Kind::File {
                size: bytes.len() as u64,
                content: Content::Bytes(bytes.into()),
            }
        };
        let is_dir = md.is_dir();
        let id = tree.insert(
            at,
            &name,
            Node {
                kind,
                perm,
                uid: 0,
                gid: 0,
            },
        )?;
        if is_dir {
            copy_dir(fs, p, tree, id)?;
        }
    }
    Ok(())
}
