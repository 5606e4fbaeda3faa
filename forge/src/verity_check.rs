//! `forge inspect --verify`: an image's dm-verity root checked whole, as
//! the kernel would check it block by block: the hash tree made again
//! from the root partition must be the hash partition's, its root hash the
//! one the partition GUIDs name, and a root-verity-sig partition, when
//! there is one, must sign that root hash.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use formats::verity;

use crate::inspect::{read_at, Report};
use crate::layout::{Part, Role};

/// What was verified.
#[derive(Serialize)]
pub struct Verified {
    pub root_hash: String,
    pub data_blocks: u64,
    /// The signer of the root hash (the certificate the signature carries;
    /// whether it is trusted is the kernel's keyring's call).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signed_by: Option<String>,
}

fn role(r: &Report, role: Role) -> Option<&Part> {
    r.disk.partitions.iter().find(|p| p.role == Some(role))
}

/// Check the image `r` describes (read again from `path`).
pub fn check(path: &Path, r: &Report) -> Result<Verified> {
    let what = || path.display().to_string();
    let (Some(root), Some(hash)) = (role(r, Role::Root), role(r, Role::RootVerity)) else {
        bail!(
            "{}: no dm-verity root to verify (built without --verity)",
            what()
        );
    };
    let (mut f, _) = crate::unpack::open(path).with_context(what)?;
    let head = read_at(&mut f, hash.offset, 2 * verity::BLOCK).with_context(what)?;
    let Some(found) = verity::read(&head) else {
        bail!(
            "{}: the partition at offset {} is not a dm-verity hash device",
            what(),
            hash.offset
        );
    };
    // Its numbers are the image's: check them before hashing by them.
    if found.data_blocks > root.size / verity::BLOCK as u64 {
        bail!(
            "{}: the hash device at offset {} covers {} blocks of 4096 bytes, more than the root partition's {} bytes hold",
            what(),
            hash.offset,
            found.data_blocks,
            root.size
        );
    }
    let size = found.data_blocks * verity::BLOCK as u64;
    let mut h = verity::Hasher::new(found.params);
    f.seek(SeekFrom::Start(root.offset)).with_context(what)?;
    std::io::copy(&mut (&mut f).take(size), &mut h).with_context(what)?;
    let tree = h.finish(size).with_context(what)?;
    let stored = read_at(&mut f, hash.offset, tree.bytes.len()).with_context(what)?;
    if tree.bytes != stored {
        bail!(
            "{}: {}",
            what(),
            mismatch(&tree, &stored, root.offset, hash.offset)
        );
    }
    let hex = tree.root_hex();
    let halves = [&hex[..32], &hex[32..]];
    // A GPT's partition GUIDs name the root hash (an MBR has none).
    for (p, half) in [root, hash].into_iter().zip(halves) {
        if r.disk.table == "gpt" && p.guid.replace('-', "") != half {
            bail!(
                "{}: partition {} has GUID {}, not the root hash's half {half}",
                what(),
                p.number,
                p.guid
            );
        }
    }
    let signed_by = match role(r, Role::RootVeritySig) {
        Some(p) if p.type_name != "linux-reserved" => {
            Some(signer(&mut f, p, &hex).with_context(what)?)
        }
        _ => None,
    };
    Ok(Verified {
        root_hash: hex,
        data_blocks: found.data_blocks,
        signed_by,
    })
}

/// Where the hash tree made again differs from the stored one: the first
/// data block of the root whose digest (level 0, stored last) differs,
/// else the first byte of the tree that does.
fn mismatch(tree: &verity::Tree, stored: &[u8], root_off: u64, hash_off: u64) -> String {
    let level0 = tree.data_blocks.div_ceil((verity::BLOCK / 32) as u64) as usize * verity::BLOCK;
    let start = tree.bytes.len() - level0;
    let differs = |from: usize| {
        tree.bytes[from..]
            .iter()
            .zip(&stored[from..])
            .position(|(a, b)| a != b)
    };
    if let Some(at) = differs(start) {
        let block = at as u64 / 32;
        let byte = root_off + block * verity::BLOCK as u64;
        return format!("root data block {block} (image byte {byte}) does not match its hash: the root changed after it was hashed");
    }
    let at = differs(0).unwrap_or(0);
    format!(
        "the hash partition differs from the tree of the root at image byte {}",
        hash_off + at as u64
    )
}

/// The root-verity-sig partition's signer, once its JSON names this root
/// hash and its signature verifies with the certificate it carries.
fn signer(f: &mut File, p: &Part, root_hex: &str) -> Result<String> {
    use base64::Engine;
    let bytes = read_at(f, p.offset, p.size.min(1 << 20) as usize)?;
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let json: serde_json::Value = serde_json::from_slice(&bytes[..end]).with_context(|| {
        format!(
            "the root-verity-sig partition at offset {} is not JSON",
            p.offset
        )
    })?;
    if json["rootHash"] != root_hex {
        bail!(
            "the root-verity-sig partition signs root hash {}, not {root_hex}",
            json["rootHash"]
        );
    }
    let der = base64::engine::general_purpose::STANDARD
        .decode(json["signature"].as_str().unwrap_or_default())
        .context("the root-verity-sig partition's signature is not base64")?;
    match formats::sign::pkcs7::read_detached(&der, root_hex.as_bytes()) {
        Some((who, true)) => Ok(who),
        Some((who, false)) => bail!("the root hash's signature (by {who}) does not verify"),
        None => bail!("the root-verity-sig partition's signature is not a PKCS#7 signature"),
    }
}
