//! Signed images: with trusted keys, an image is written only when
//! `IMAGE.sig` is a trusted key's signature of the layout manifest beside
//! it, and that manifest vouches for everything flash will write. The
//! chain, all checked before any device is opened: the signature covers
//! the manifest's exact bytes; the manifest names the image's size, first
//! MiB (its partition table) and toplevel, the SHA-256 of its bmap, and
//! the bmap's ranges again, each at most 64 MiB, with a BLAKE3 each
//! (manifests made before these had only the bmap's SHA-256 of each
//! range, which is then what is checked). While writing, each range is
//! held until its bytes match its signed hash and only then handed to the
//! devices (`write`), so a range that changed under flash never reaches a
//! device; the read-back compares the device with those checked bytes.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

use crate::source::Source;
use crate::write::MAX_HELD;
use formats::manifest::Disk;
use formats::sign::image_sig::{self, Anchor};

/// Where trusted keys are looked for when no `--trust` is given.
pub const DEFAULT_DIR: &str = "/etc/nixforge/trusted-keys.d";

/// The keys a run trusts, and whether an image without a signature is
/// written anyway.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    pub anchors: Vec<Anchor>,
    pub allow_unsigned: bool,
}

impl Trust {
    /// The keys in `files` and in `dir` (the default directory when it
    /// exists, if none is given), each file one key.
    pub fn load(files: &[PathBuf], dir: Option<&Path>, allow_unsigned: bool) -> Result<Trust> {
        let mut anchors = Vec::new();
        for f in files {
            anchors.push(image_sig::load_anchor(f).context("--trust")?);
        }
        let default = Path::new(DEFAULT_DIR);
        let dir = dir.or((files.is_empty() && default.is_dir()).then_some(default));
        if let Some(d) = dir {
            let found = image_sig::anchors_in(d).context("trusted keys")?;
            if found.is_empty() && files.is_empty() {
                bail!("{}: no trusted keys in it", d.display());
            }
            anchors.extend(found);
        }
        Ok(Trust {
            anchors,
            allow_unsigned,
        })
    }

    /// Whether signatures are checked at all (some key is trusted).
    pub fn wanted(&self) -> bool {
        !self.anchors.is_empty()
    }
}

/// Who signed an image, for the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Signed {
    /// The key name the signature gives.
    pub key: String,
    /// The trusted key file that verified it.
    pub anchor: PathBuf,
    pub signature: PathBuf,
    /// The system the image holds, and its version, as its manifest
    /// names them.
    pub toplevel: Option<String>,
    pub version: Option<String>,
}

/// The signature beside `src` checked with `trust`'s keys, and everything
/// the signed manifest vouches for that can be checked without reading
/// the image (its size, first MiB, bmap). `None`: no key is trusted, or
/// the image is unsigned and `--allow-unsigned` was given. A signature
/// that is there but bad is refused even then.
pub fn check(src: &mut Source, trust: &Trust) -> Result<Option<Signed>> {
    if !trust.wanted() {
        return Ok(None);
    }
    let image = src.path.display();
    let Some(((sig, text), mpath)) = sidecars(src)? else {
        if trust.allow_unsigned {
            return Ok(None);
        }
        bail!(
            "{image}: not signed (no {} beside it), and keys are trusted: refusing it (--allow-unsigned writes unsigned images)",
            image_sig::path_for(&src.path).display()
        );
    };
    let text = String::from_utf8(text).with_context(|| format!("{}: not UTF-8", sig.display()))?;
    let (mpath, bytes) = mpath.with_context(|| format!("the manifest {} signs", sig.display()))?;
    let anchor = image_sig::verify(&sig, &text, &mpath, &bytes, &trust.anchors)?;
    let disk: Disk = serde_json::from_slice(&bytes)
        .with_context(|| format!("{}: not a layout manifest", mpath.display()))?;
    vouched(src, &disk, &mpath)?;
    Ok(Some(Signed {
        key: image_sig::signer(&text).unwrap_or_default(),
        anchor: anchor.file.clone(),
        signature: sig,
        toplevel: disk.toplevel,
        version: disk.system_version,
    }))
}

/// A file beside the image: where it was found, its bytes.
type Sidecar = (PathBuf, Vec<u8>);

/// `IMAGE.sig` and `IMAGE.layout.json` (where found, and their bytes);
/// for `nixos.img.zst` (or `.xz`) without them, `nixos.img.sig` and
/// `nixos.img.layout.json` (an image signed raw, then compressed for
/// download: the manifest describes the raw bytes, which the stream
/// holds), as the bmap is found. None: no signature.
fn sidecars(src: &Source) -> Result<Option<(Sidecar, Result<Sidecar>)>> {
    let o = &src.origin;
    for strip in ["", ".zst", ".xz"] {
        if let Some(sig) = o.beside(strip, image_sig::SUFFIX)? {
            let name = src.path.to_string_lossy();
            let base = name.strip_suffix(strip).unwrap_or(&name);
            let m = o
                .beside(strip, ".layout.json")?
                .with_context(|| format!("{base}.layout.json: not found"));
            return Ok(Some((sig, m)));
        }
    }
    Ok(None)
}

/// What the signed manifest says of the image holds before a byte is
/// read past its first MiB: its size and table, and the bmap it names,
/// whose every range can be checked before it is written.
fn vouched(src: &mut Source, disk: &Disk, mpath: &Path) -> Result<()> {
    let image = src.path.display();
    if let Err(what) = disk.matches(src.size, src.first_mib()) {
        bail!(
            "{image} is not the image its signed manifest {} describes ({what}): truncated, changed or swapped",
            mpath.display()
        );
    }
    let Some(want) = &disk.bmap_sha256 else {
        bail!(
            "{}: the signed manifest names no bmap, so it vouches for no byte past the first MiB",
            mpath.display()
        );
    };
    let (Some((bpath, bmap)), Some(got)) = (&src.bmap, &src.bmap_sha256) else {
        bail!("{image}: signed images are written by their bmap (the one the manifest names), not with --no-bmap or without one");
    };
    if got != want {
        bail!(
            "{} is not the bmap the signed manifest {} names (its SHA-256 differs)",
            bpath.display(),
            mpath.display()
        );
    }
    let spans = bmap.byte_ranges();
    for ((off, len), r) in spans.iter().zip(&bmap.ranges) {
        if r.2.as_ref().is_none_or(|s| s.len() != 64) || *len > MAX_HELD {
            bail!(
                "{}: bytes {off}..{} have no SHA-256 of at most {MAX_HELD} bytes, so they cannot be checked before they are written",
                bpath.display(),
                off + len
            );
        }
    }
    let Some(ranges) = &disk.ranges else {
        return Ok(()); // the bmap's SHA-256 of each range is checked
    };
    if let Some(r) = ranges.iter().find(|r| r.blake3.len() != 64) {
        bail!(
            "{}: the range at byte {} has no BLAKE3 (64 hex digits)",
            mpath.display(),
            r.offset
        );
    }
    let listed: Vec<(u64, u64)> = ranges.iter().map(|r| (r.offset, r.length)).collect();
    if listed != spans {
        bail!(
            "{}: the signed manifest's ranges are not its bmap's ({} listed, {} in {})",
            mpath.display(),
            listed.len(),
            spans.len(),
            bpath.display()
        );
    }
    src.check_by(mpath, ranges.iter().map(|r| r.blake3.clone()).collect())
}
