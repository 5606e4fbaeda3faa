//! `forge sign`: sign an image after its build, where the keys are (they
//! must not enter the Nix store). `--key` signs the layout manifest
//! (`manifest.rs`, `IMAGE.sig`), alone (the image unchanged) or after the
//! rest. The ESP is planned again from its own
//! files with every PE file under `EFI/` signed (Authenticode), same
//! label, volume ID, size and time stamps; the root hash (read from the
//! hash partition, checked against the partition GUIDs it names) is signed
//! into the slot an unsigned `--verity` image keeps, which is retyped
//! root-verity-sig. Every other byte is the input's: the result is the
//! image `forge image` makes with the same keys.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use formats::fat::read::Volume;
use formats::gpt::{types, Gpt};
use formats::sign::{authenticode, Signer};
use formats::tree::{Node, Tree};
use formats::{seed, verity};

use crate::image::{KeyFiles, VERITY_SIG_NAME};
use crate::inspect::read_at;
use crate::output::AtomicOutput;

pub mod manifest;

pub struct Options {
    pub image: PathBuf,
    /// The signed image; None with `--key` alone (the image unchanged).
    pub output: Option<PathBuf>,
    pub secure_boot: Option<KeyFiles>,
    pub verity_sig: Option<KeyFiles>,
    /// `--key`: a Nix Ed25519 secret key that signs the layout manifest.
    pub key: Option<PathBuf>,
}

/// What was signed.
#[derive(Serialize)]
pub struct Report {
    pub image: PathBuf,
    /// The ESP's PE files signed for Secure Boot.
    pub signed: Vec<String>,
    /// The root hash signed into the root-verity-sig partition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root_hash: Option<String>,
    /// `IMAGE.sig` (`--key`) and the key's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest_signature: Option<(PathBuf, String)>,
}

pub fn sign(o: &Options) -> Result<Report> {
    let key = o.key.as_deref().map(manifest::load_key).transpose()?;
    let rewrites = o.secure_boot.is_some() || o.verity_sig.is_some();
    match (rewrites, &o.output, &key) {
        (false, _, None) => bail!("nothing to sign with: give --secure-boot-key/--secure-boot-cert, --verity-key/--verity-cert, --key, or several"),
        (true, None, _) => bail!("give -o SIGNED: signing PE files or the root hash makes a new image"),
        (false, Some(_), Some(_)) => bail!("--key alone leaves the image as it is and puts IMAGE.sig beside it: drop -o"),
        (false, None, Some(k)) => sign_manifest_only(&o.image, k),
        (true, Some(out), _) => rewrite(o, out, key.as_ref()),
    }
}

/// `--key` alone: `IMAGE.sig` over the manifest beside the image.
fn sign_manifest_only(
    image: &std::path::Path,
    key: &formats::sign::nixkey::SecretKey,
) -> Result<Report> {
    let bytes = manifest::checked(image)?;
    let sig = manifest::signature(image, &bytes, key)?;
    sig.commit()?;
    Ok(Report {
        image: image.to_path_buf(),
        signed: Vec::new(),
        root_hash: None,
        manifest_signature: Some((manifest::sig_path_for(image), key.name.clone())),
    })
}

/// PE files and/or the root hash signed into a new image at `output`
/// (its sidecars made true of it; `IMAGE.sig` with `--key`).
fn rewrite(
    o: &Options,
    output: &std::path::Path,
    key: Option<&formats::sign::nixkey::SecretKey>,
) -> Result<Report> {
    let sb = o
        .secure_boot
        .as_ref()
        .map(|k| k.load("--secure-boot-key"))
        .transpose()?;
    let vs = o
        .verity_sig
        .as_ref()
        .map(|k| k.load("--verity-key"))
        .transpose()?;
    let name = o.image.display().to_string();
    let mut input = File::open(&o.image).with_context(|| name.clone())?;
    let (gpt, ss) = read_gpt(&mut input).with_context(|| name.clone())?;
    let mut out = AtomicOutput::create(output)?;
    copy_sparse(&mut input, out.file()).with_context(|| format!("copying {name}"))?;
    let mut report = Report {
        image: output.to_path_buf(),
        signed: Vec::new(),
        root_hash: None,
        manifest_signature: None,
    };
    let mut changes = Vec::new();
    if let Some(s) = &sb {
        let (signed, change) = sign_esp(out.file(), &gpt, ss, s).with_context(|| name.clone())?;
        report.signed = signed;
        changes.push(change);
    }
    if let Some(s) = &vs {
        let (hash, change) =
            sign_root_hash(out.file(), gpt, ss, s).with_context(|| name.clone())?;
        report.root_hash = Some(hash);
        changes.push(change);
    }
    let (mut sidecars, manifest_bytes) = sidecars(&o.image, output, out.file(), &changes)?;
    let sig_path = manifest::sig_path_for(output);
    match (key, manifest_bytes) {
        (Some(k), Some(bytes)) => {
            sidecars.push(manifest::signature(output, &bytes, k)?);
            report.manifest_signature = Some((sig_path, k.name.clone()));
        }
        (Some(_), None) => bail!(
            "{}: no layout manifest beside it for --key to sign",
            o.image.display()
        ),
        // An old signature is of another manifest.
        (None, _) => remove_if_there(&sig_path)?,
    }
    crate::output::commit_together(out, sidecars)?;
    Ok(report)
}

/// A partition `forge sign` rewrote: its range, and the byte ranges in it
/// that now hold data.
struct Change {
    region: (u64, u64),
    mapped: Vec<(u64, u64)>,
}

/// `ranges` with the parts inside `region` (offset, length) cut out.
fn outside(ranges: &[(u64, u64)], (start, len): (u64, u64)) -> Vec<(u64, u64)> {
    let end = start + len;
    let mut out = Vec::new();
    for &(s, l) in ranges {
        let e = s + l;
        if s < start {
            out.push((s, e.min(start) - s));
        }
        if e > end {
            let from = s.max(end);
            out.push((from, e - from));
        }
    }
    out
}

/// The input's bmap and layout manifest, made true of the signed image
/// (the rewritten partitions' mapped ranges, types and hashes, the first
/// MiB's hash): the ones `forge image` writes with the same keys. Without
/// them beside the input, none beside the output either (old ones go).
fn sidecars(
    input: &Path,
    output: &Path,
    f: &mut File,
    changes: &[Change],
) -> Result<(Vec<AtomicOutput>, Option<Vec<u8>>)> {
    let size = f.metadata()?.len();
    let mut out = Vec::new();
    let mut bmap_sha256 = None;
    let mut pieces = None;
    let mut manifest = None;
    let bmap_in = crate::image::bmap_path_for(input);
    if let Ok(text) = std::fs::read_to_string(&bmap_in) {
        let b = formats::bmap::parse(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", bmap_in.display()))?;
        let mut ranges = b.byte_ranges();
        for c in changes {
            ranges = outside(&ranges, c.region);
            ranges.extend(&c.mapped);
        }
        let hashed = formats::bmap::hash(f, size, &ranges)?;
        let text = formats::bmap::render(size, &hashed);
        bmap_sha256 = Some(formats::manifest::sha256_hex(text.as_bytes()));
        pieces = Some(hashed);
        out.push(sidecar(
            &crate::image::bmap_path_for(output),
            text.as_bytes(),
        )?);
    }
    if let Some(mut disk) = formats::manifest::read_beside(input)? {
        let g = read_gpt(f)?.0;
        for (p, e) in disk.partitions.iter_mut().zip(&g.partitions) {
            p.type_id = seed::format_uuid(&e.type_guid);
            p.type_name = formats::manifest::type_name(&p.type_id).into();
            if p.sha256.is_some() && changes.iter().any(|c| c.region.0 == p.offset) {
                p.sha256 = Some(sha256_at(f, p.offset, p.size)?);
            }
        }
        if disk.head_sha256.is_some() {
            let head = read_at(f, 0, size.min(1 << 20) as usize)?;
            disk.head_sha256 = Some(formats::manifest::head_sha256(&head));
        }
        if disk.bmap_sha256.is_some() {
            disk.bmap_sha256 = bmap_sha256;
        }
        if disk.ranges.is_some() {
            disk.ranges = pieces.map(|p| formats::manifest::ranges_of(size, &p));
        }
        if disk.image_sha256.is_some() {
            disk.image_sha256 = Some(sha256_at(f, 0, size)?);
        }
        let text = serde_json::to_vec_pretty(&disk)?;
        out.push(sidecar(&formats::manifest::path_for(output), &text)?);
        manifest = Some(text);
    }
    for stale in [
        crate::image::bmap_path_for(output),
        formats::manifest::path_for(output),
    ] {
        if !out.iter().any(|o| o.target() == stale) {
            remove_if_there(&stale)?;
        }
    }
    Ok((out, manifest))
}

/// A stale sidecar removed (it described other bytes).
fn remove_if_there(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing the stale {}", path.display()))
        }
        _ => Ok(()),
    }
}

fn sidecar(path: &Path, bytes: &[u8]) -> Result<AtomicOutput> {
    let mut o = AtomicOutput::create(path)?;
    o.file()
        .write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(o)
}

/// SHA-256 of `len` bytes of `f` at `off` (also `forge update`'s
/// compressed artefacts).
pub(crate) fn sha256_at(f: &mut File, off: u64, len: u64) -> std::io::Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    f.seek(SeekFrom::Start(off))?;
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        f.read_exact(&mut buf[..n])?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(format!("{:x}", h.finalize()))
}

/// The image's GPT and sector size (a raw image: `forge sign` does not
/// take a compressed or VM container).
fn read_gpt(f: &mut File) -> Result<(Gpt, u64)> {
    let size = f.metadata()?.len();
    for ss in [512u64, 4096] {
        let mut r = |o: u64, n: usize| read_at(f, o, n);
        if let Some(g) = Gpt::parse(&mut r, ss, size)? {
            return Ok((g, ss));
        }
    }
    bail!("no GPT: forge sign takes a raw raw-efi image (decompress a .zst, or sign before converting to qcow2 or VHD)")
}

/// `to` becomes a copy of `from`, holes kept as holes.
fn copy_sparse(from: &mut File, to: &mut File) -> std::io::Result<()> {
    let size = from.metadata()?.len();
    to.set_len(size)?;
    let mut pos = 0;
    let mut buf = vec![0u8; 1 << 20];
    while let Some(start) = formats::sys::seek_data(from, pos)? {
        let end = formats::sys::seek_hole(from, start)?.min(size);
        from.seek(SeekFrom::Start(start))?;
        to.seek(SeekFrom::Start(start))?;
        let mut left = end - start;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            from.read_exact(&mut buf[..n])?;
            to.write_all(&buf[..n])?;
            left -= n as u64;
        }
        pos = end;
    }
    Ok(())
}

/// The first partition of type `ty`: (offset, size, index).
fn find(g: &Gpt, ss: u64, ty: &str) -> Option<(u64, u64, usize)> {
    let ty = seed::parse_uuid(ty)?;
    g.partitions
        .iter()
        .enumerate()
        .find(|(_, p)| p.type_guid == ty)
        .map(|(i, p)| (p.first_lba * ss, (p.last_lba + 1 - p.first_lba) * ss, i))
}

/// Whether a file on the ESP is one Secure Boot firmware or systemd-boot
/// will load: an `.efi` file under `EFI/` that is a PE image.
fn is_efi(path: &str, bytes: &[u8]) -> bool {
    path.to_ascii_uppercase().starts_with("/EFI/")
        && path.to_ascii_lowercase().ends_with(".efi")
        && formats::pe::sections(bytes).is_ok()
}

/// The ESP planned again with its PE files signed, written over the old
/// one (zeroed first: nothing of the old layout stays). The signed files.
fn sign_esp(f: &mut File, g: &Gpt, ss: u64, signer: &Signer) -> Result<(Vec<String>, Change)> {
    let Some((off, size, _)) = find(g, ss, types::ESP) else {
        bail!("no EFI system partition to sign the boot files of");
    };
    let mut vol = Volume::open(&mut *f, off).context("the ESP")?;
    let mut tree = Tree::new(0o755);
    let mut signed = Vec::new();
    let mut stamp = None;
    copy_dir(&mut vol, "/", &mut tree, &mut |path, bytes, written| {
        stamp.get_or_insert(written);
        if !is_efi(path, &bytes) {
            return Ok(bytes);
        }
        signed.push(path.to_string());
        authenticode::sign(&bytes, signer).with_context(|| format!("signing {path} on the ESP"))
    })?;
    // As forge image: under Secure Boot a loose kernel would boot with an
    // initrd and command line nobody signed.
    if !signed
        .iter()
        .any(|p| p.to_ascii_uppercase().starts_with("/EFI/LINUX/"))
    {
        bail!("no Unified Kernel Images on the ESP (EFI/Linux/): build with --uki; forge signs UKIs, not loose kernels");
    }
    let (date, time) = stamp.unwrap_or_default();
    let opts = formats::fat::Options {
        size: vol.total_bytes.min(size),
        sector_size: vol.sector_size,
        label: vol.label.clone(),
        volume_id: vol.volume_id,
        epoch: formats::fat::unix_time(date, time),
        hidden_sectors: vol.hidden_sectors,
    };
    drop(vol);
    let plan = formats::fat::plan(&tree, &opts).context("planning the signed ESP (is it full?)")?;
    zero(f, off, size)?;
    let w = plan.write(f, off).context("writing the signed ESP")?;
    let mapped = formats::ranges::shift(&w.mapped, off).collect();
    Ok((
        signed,
        Change {
            region: (off, size),
            mapped,
        },
    ))
}

type FileFn<'a> = dyn FnMut(&str, Vec<u8>, (u16, u16)) -> Result<Vec<u8>> + 'a;

/// The FAT directory `path` copied into `tree` at the same path, each
/// file's bytes passed through `file`.
fn copy_dir<R: Read + Seek>(
    vol: &mut Volume<R>,
    path: &str,
    tree: &mut Tree,
    file: &mut FileFn,
) -> Result<()> {
    let at = tree.mkdir_p(path.as_bytes(), 0o755)?;
    let entries = vol.list(path)?.unwrap_or_default();
    for e in entries {
        let child = format!("{}/{}", path.trim_end_matches('/'), e.name);
        if e.is_dir {
            copy_dir(vol, &child, tree, file)?;
        } else {
            let bytes = vol.read(&child)?.unwrap_or_default();
            let bytes = file(&child, bytes, e.written)?;
            tree.insert(at, e.name.as_bytes(), Node::bytes(bytes, 0o644))?;
        }
    }
    Ok(())
}

/// `len` bytes at `off` made zeros: a hole where the filesystem can punch
/// one (as in the image `forge image` writes), else written zeros.
fn zero(f: &mut File, off: u64, len: u64) -> std::io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    if fallocate(&*f, punch, off as i64, len as i64).is_ok() {
        return Ok(());
    }
    f.seek(SeekFrom::Start(off))?;
    let mut left = len;
    while left > 0 {
        let n = left.min(formats::sys::ZEROS.len() as u64) as usize;
        f.write_all(&formats::sys::ZEROS[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// The root hash (from the hash partition's top level, which must match
/// the root and hash partitions' GUIDs) signed into the verity-sig slot,
/// the slot retyped, the GPT's two copies rewritten. The root hash.
fn sign_root_hash(f: &mut File, mut g: Gpt, ss: u64, signer: &Signer) -> Result<(String, Change)> {
    let (vtype, sig_type, root_type) = match find(&g, ss, types::ROOT_VERITY_X86_64) {
        Some(_) => (
            types::ROOT_VERITY_X86_64,
            types::ROOT_VERITY_SIG_X86_64,
            types::ROOT_X86_64,
        ),
        None => (
            types::ROOT_VERITY_AARCH64,
            types::ROOT_VERITY_SIG_AARCH64,
            types::ROOT_AARCH64,
        ),
    };
    let (Some((voff, _, vi)), Some((_, _, ri))) = (find(&g, ss, vtype), find(&g, ss, root_type))
    else {
        bail!("no root and root-verity partitions: build the image with --verity");
    };
    let found = verity::read(&read_at(f, voff, 8192)?).with_context(|| {
        format!("the hash partition at offset {voff} is not a dm-verity hash device")
    })?;
    let hash = found.root_hash;
    if g.partitions[ri].guid[..] != hash[..16] || g.partitions[vi].guid[..] != hash[16..] {
        bail!("the root hash of the hash partition at offset {voff} is not the one the partition GUIDs name");
    }
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    let Some(slot) = g.partitions.iter().position(|p| p.name == VERITY_SIG_NAME) else {
        bail!("no {VERITY_SIG_NAME} partition to hold the signature (built before forge kept one, or an A/B image: --slots 2 keeps one only when built with --verity-key)");
    };
    let p = &mut g.partitions[slot];
    let (off, len) = (p.first_lba * ss, (p.last_lba + 1 - p.first_lba) * ss);
    let bytes = formats::sign::verity_signature(signer, &hex).context("signing the root hash")?;
    if bytes.len() as u64 > len {
        bail!(
            "the signature ({} bytes) does not fit the {len}-byte {VERITY_SIG_NAME} partition",
            bytes.len()
        );
    }
    p.type_guid = seed::parse_uuid(sig_type).expect("a valid type GUID");
    zero(f, off, len)?;
    f.seek(SeekFrom::Start(off))?;
    f.write_all(&bytes)?;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&g.primary())?;
    let (at, backup) = g.backup();
    f.seek(SeekFrom::Start(at))?;
    f.write_all(&backup)?;
    let mapped = vec![(off, bytes.len() as u64)];
    Ok((
        hex,
        Change {
            region: (off, len),
            mapped,
        },
    ))
}
