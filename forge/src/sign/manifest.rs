//! `forge sign --key`: the layout manifest signed with a Nix Ed25519 key
//! (`IMAGE.sig`, one line `NAME:BASE64` over the manifest's exact bytes).
//! The manifest names the image (size, first MiB, toplevel, root hash) and
//! its bmap (SHA-256), and the bmap every mapped range's SHA-256: so one
//! signature vouches for every byte flash writes.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

use formats::manifest::{self, Disk};
use formats::sign::image_sig::{self, Anchor};
use formats::sign::nixkey::SecretKey;

use crate::output::AtomicOutput;

/// `IMAGE.sig`.
pub fn sig_path_for(image: &Path) -> PathBuf {
    image_sig::path_for(image)
}

/// A Nix secret key file (`nix-store --generate-binary-cache-key`).
pub fn load_key(path: &Path) -> Result<SecretKey> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("--key {}", path.display()))?;
    SecretKey::parse(&text).map_err(|e| anyhow::anyhow!("--key {}: {e}", path.display()))
}

/// The signature of `manifest` (its exact bytes), made into `IMAGE.sig`
/// beside `image` (unnamed until committed).
pub fn signature(image: &Path, manifest: &[u8], key: &SecretKey) -> Result<AtomicOutput> {
    let path = sig_path_for(image);
    let mut out = AtomicOutput::create(&path)?;
    writeln!(out.file(), "{}", key.sign(manifest))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(out)
}

/// The manifest beside `image`, checked to describe it (a raw image's size
/// and first MiB; the bmap beside it, when the manifest names one), as
/// bytes to sign.
pub fn checked(image: &Path) -> Result<Vec<u8>> {
    let path = manifest::path_for(image);
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "{}: no layout manifest beside it ({}): --key signs the manifest forge image writes",
            image.display(),
            path.display()
        )
    })?;
    let disk: Disk = serde_json::from_slice(&bytes)
        .with_context(|| format!("{}: not a layout manifest", path.display()))?;
    let (first, size) =
        crate::unpack::head(image, 1 << 20).with_context(|| image.display().to_string())?;
    if let Err(what) = disk.matches(size, &first) {
        bail!(
            "{} describes another image ({what}): refusing to sign it",
            path.display()
        );
    }
    if let Some(want) = &disk.bmap_sha256 {
        let bmap = crate::image::bmap_path_for(image);
        let text = std::fs::read(&bmap)
            .with_context(|| format!("{} (the manifest names a bmap)", bmap.display()))?;
        if &manifest::sha256_hex(&text) != want {
            bail!(
                "{} is not the bmap the manifest names (its SHA-256 differs): refusing to sign",
                bmap.display()
            );
        }
    }
    Ok(bytes)
}

/// What `forge inspect` says of `IMAGE.sig`.
#[derive(serde::Serialize)]
pub struct Signature {
    pub file: PathBuf,
    /// The key name it gives.
    pub key: String,
    /// With trusted keys given: it verifies over the manifest beside.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
}

/// A trusted key file (Nix `NAME:BASE64`, or OpenSSH `ssh-ed25519`).
pub fn load_public(path: &Path) -> Result<Anchor> {
    image_sig::load_anchor(path).context("--trust")
}

/// `IMAGE.sig` beside `image`, if there is one, checked against the
/// manifest beside it with `trusted` keys (when any are given; a signature
/// none of them verifies is an error naming the files).
pub fn describe(image: &Path, trusted: &[Anchor]) -> Result<Option<Signature>> {
    let file = sig_path_for(image);
    let Ok(text) = std::fs::read_to_string(&file) else {
        if !trusted.is_empty() {
            bail!(
                "{}: no signature beside it ({})",
                image.display(),
                file.display()
            );
        }
        return Ok(None);
    };
    let key = image_sig::signer(&text).unwrap_or_default();
    let verified = if trusted.is_empty() {
        None
    } else {
        let m = manifest::path_for(image);
        let bytes = std::fs::read(&m).with_context(|| m.display().to_string())?;
        image_sig::verify(&file, &text, &m, &bytes, trusted)?;
        Some(true)
    };
    Ok(Some(Signature {
        file,
        key,
        verified,
    }))
}
