//! `forge update`: a system version's update artefacts for machines laid
//! out by `forge image --slots 2`: the root filesystem (and its hash tree
//! and signature with `--verity`) as raw partition images (xz streams of
//! them with `--compress xz`), the UKI (or the type 1 entry, kernel and
//! initrd), and
//! `SHA256SUMS` (with `--sign`, `SHA256SUMS.sig` and the OpenPGP
//! `SHA256SUMS.gpg` sysupdate checks, and the key's `import-pubring.gpg`),
//! named as systemd-sysupdate
//! matches them (`transfers`). The image is planned exactly as `forge image`
//! plans it, and only those partitions are written, so a slot's bytes in an
//! image of the same version are the artefact's.

pub mod transfers;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::container;
use crate::image::slots::{self, BootFile};
use crate::image::{self, trees, DiskFormat};
use crate::layout::{Layout, Partition, Role};
use crate::output::AtomicOutput;
use crate::Progress;
use formats::sign::nixkey::SecretKey;
use formats::sign::openpgp;
use formats::tree::{Content, Kind};
pub use transfers::{Compress, Source};

pub struct Options {
    /// The image the artefacts are for (`--slots 2`, its `--version`).
    pub image: image::Options,
    /// Where the artefacts go (beside earlier versions').
    pub dir: PathBuf,
    /// `--source`: write `sysupdate.d/` transfer definitions fetching
    /// from there.
    pub source: Option<Source>,
    /// `--compress`: the partition artefacts as xz streams (zstd is
    /// refused: see [`build`]).
    pub compress: Option<Compress>,
}

/// One file written, as `SHA256SUMS` lists it (its size and SHA-256 are
/// the file's, compressed or not).
#[derive(Serialize, Clone, Debug)]
pub struct Artefact {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// What `forge update --json` prints.
#[derive(Serialize)]
pub struct Report {
    pub version: String,
    pub toplevel: String,
    pub artefacts: Vec<Artefact>,
    /// With `--verity`: the root hash and its parameters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verity: Option<formats::manifest::Verity>,
    pub sums: PathBuf,
    /// With `--sign`: `SHA256SUMS.sig`, `SHA256SUMS.gpg` and
    /// `import-pubring.gpg`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub openpgp_signature: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keyring: Option<PathBuf>,
    pub transfers: Vec<PathBuf>,
}

/// The checksum list's name, as systemd-sysupdate fetches it.
pub const SUMS: &str = "SHA256SUMS";
/// What a signed run writes beside it: the Nix key's signature, the
/// OpenPGP one systemd-pull checks, and the OpenPGP public key a machine
/// keeps as /etc/systemd/import-pubring.gpg.
const SIGNED: [&str; 3] = ["SHA256SUMS.sig", "SHA256SUMS.gpg", "import-pubring.gpg"];

pub fn build(o: &Options, progress: &dyn Progress) -> Result<Report> {
    if o.image.slots != 2 {
        bail!("forge update makes the artefacts of --slots 2 images");
    }
    image::check_options(&o.image)?;
    if o.compress == Some(Compress::Zst) {
        // Seen here: sysupdate 254 with Debian 12's systemd-import 252
        // filled the slot with the .zst's bytes, with no error.
        bail!("--compress zst: systemd-sysupdate installs through systemd-import, which decompresses zstd only from systemd 258 on (older ones write the compressed bytes into the slot as they are); use --compress xz");
    }
    crate::output::check_dir(&o.dir.join(SUMS))?;
    image::plan(&o.image, progress, |i, format, layout| {
        let version = i.version.clone().expect("--slots 2 has a version");
        let lock = crate::output::lock_for_run(&o.dir, || {
            progress.stage(&format!("waiting for another run in {}", o.dir.display()))
        })?;
        let mut outs = Vec::new();
        let mut made = Vec::new();
        let slot = slot_partitions(&layout, &version);
        let verity = slot.iter().find_map(|p| p.fs.verity());
        for p in slot {
            let (out, a) = write_partition(o, &version, p)?;
            progress.stage(&format!("wrote {} ({} bytes)", a.name, a.size));
            outs.push(out);
            made.push(a);
        }
        let boot = boot_files(i);
        for f in &boot {
            let (out, a) = write_boot_file(&o.dir, &version, f, format)?;
            outs.push(out);
            made.push(a);
        }
        let (sums, mut stale) = sums_text(&o.dir, &version, &made)?;
        let sums_path = o.dir.join(SUMS);
        outs.push(text_file(&sums_path, &sums)?);
        let [signature, openpgp_signature, keyring] = match &i.signers.manifest {
            Some(key) => sign_sums(o, key, &sums, &mut outs)?.map(Some),
            None => {
                // An earlier run's signatures are of another SHA256SUMS.
                stale.extend(SIGNED.iter().map(|f| o.dir.join(f)).filter(|p| p.exists()));
                [None, None, None]
            }
        };
        let verify = signature.is_some();
        let transfers = match &o.source {
            Some(s) => transfer_files(o, s, &layout, verify, &boot, &mut outs)?,
            None => Vec::new(),
        };
        crate::output::commit_all(outs, &lock)?;
        for p in &stale {
            std::fs::remove_file(p)
                .with_context(|| format!("removing {}, replaced by this run", p.display()))?;
        }
        progress.stage(&format!("done: version {version} in {}", o.dir.display()));
        Ok(Report {
            version,
            toplevel: i.c.toplevel.clone(),
            artefacts: made,
            verity,
            sums: sums_path,
            signature,
            openpgp_signature,
            keyring,
            transfers,
        })
    })
}

/// The installed slot's partitions: root, and with verity its hash and
/// signature (named for the version, unlike the empty slot's).
fn slot_partitions<'a, 't>(layout: &'a Layout<'t>, version: &str) -> Vec<&'a Partition<'t>> {
    let name = slots::slot_name(version);
    layout
        .partitions
        .iter()
        .filter(|p| p.name == name)
        .collect()
}

/// A partition's filesystem alone, as a raw file (or an xz stream of one)
/// named for sysupdate.
fn write_partition(o: &Options, version: &str, p: &Partition) -> Result<(AtomicOutput, Artefact)> {
    let kind = match p.role {
        Role::Root => &transfers::ROOT,
        Role::RootVerity => &transfers::VERITY,
        Role::RootVeritySig => &transfers::VERITY_SIG,
        r => bail!("internal: a {r:?} partition in an A/B slot"),
    };
    // The root hash decides the root's and hash partition's GUIDs.
    let uuid = match (p.role, p.guid) {
        (Role::Root | Role::RootVerity, Some(g)) => Some(formats::seed::format_uuid(&g)),
        _ => None,
    };
    let name = transfers::artefact(version, kind, uuid.as_deref(), o.compress);
    let path = o.dir.join(&name);
    let what = || format!("writing {}", path.display());
    let mut out = AtomicOutput::create(&path)?;
    let (size, map) = (p.fs.size(), p.fs.mapped());
    let write = |w: &mut dyn formats::sink::Sink| p.fs.write_to(w, 0);
    let Some(c) = o.compress else {
        let sha256 = container::write_hashed(&mut out, size, map, write).with_context(what)?;
        return Ok((out, Artefact { name, size, sha256 }));
    };
    let kind = match c {
        Compress::Zst => container::Kind::Zstd,
        Compress::Xz => container::Kind::Xz,
    };
    let settings = container::Settings {
        zstd_level: o.image.zstd_level,
        xz_level: o.image.xz_level,
        ..container::Settings::default()
    };
    container::write_image(&mut out, kind, &settings, size, map, write).with_context(what)?;
    // The file's own hash, as sysupdate checks a download: read back.
    let size = out.file().metadata().with_context(what)?.len();
    let sha256 = crate::sign::sha256_at(out.file(), 0, size).with_context(what)?;
    Ok((out, Artefact { name, size, sha256 }))
}

/// The files that boot a version of this image (its UKI, or type 1
/// entry, kernel, initrd and devicetree).
fn boot_files(i: &image::Input) -> Vec<&'static BootFile> {
    let spec = &i.c.bootspec.spec;
    slots::boot_files(i.o.uki, spec.initrd.is_some(), spec.devicetree.is_some())
}

/// One of them, as the ESP of its image holds it (a UKI signed with
/// `--secure-boot-key`), under the name sysupdate installs it by.
fn write_boot_file(
    dir: &Path,
    version: &str,
    f: &BootFile,
    format: &dyn DiskFormat,
) -> Result<(AtomicOutput, Artefact)> {
    let on_esp = f.on_esp(version);
    let (planned, bytes) = format
        .esp()
        .and_then(|t| Some((t, trees::lookup(t, on_esp.as_bytes())?)))
        .and_then(|(t, id)| match &t.node(id).kind {
            Kind::File { size, content } => Some((*size, content.clone())),
            _ => None,
        })
        .with_context(|| format!("internal: no {on_esp} on the planned ESP"))?;
    let name = f.name(version, None);
    let path = dir.join(&name);
    let mut out = AtomicOutput::create(&path)?;
    let writing = || format!("writing {}", path.display());
    let sha256 = match bytes {
        Content::Bytes(b) => {
            out.file().write_all(&b).with_context(writing)?;
            formats::manifest::sha256_hex(&b)
        }
        // Streamed, hashed on the way (a kernel or initrd can be large),
        // and held to the size the image's ESP was planned with.
        Content::Host { path: from, .. } => {
            let reading = || format!("reading {}", from.display());
            let mut src = std::fs::File::open(&from).with_context(reading)?;
            let (mut sha, mut n, mut buf) = (Sha256::new(), 0u64, vec![0; 1 << 20]);
            loop {
                let got = match src.read(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    r => r.with_context(reading)?,
                };
                if got == 0 {
                    break;
                }
                out.file().write_all(&buf[..got]).with_context(writing)?;
                sha.update(&buf[..got]);
                n += got as u64;
            }
            if n != planned {
                bail!("{}: {n} bytes, but {planned} when the image was planned (changed while forge ran?)", from.display());
            }
            format!("{:x}", sha.finalize())
        }
    };
    let size = planned;
    let a = Artefact { name, size, sha256 };
    Ok((out, a))
}

/// `SHA256SUMS`: the lines of an earlier one in `dir` for files still
/// there that this run does not replace (the other versions published
/// there), and this run's files; sorted by name. Also this version's
/// earlier artefacts this run does not make again (another root hash's
/// names), which must go: two root images of one version are ambiguous.
fn sums_text(dir: &Path, version: &str, made: &[Artefact]) -> Result<(String, Vec<PathBuf>)> {
    let path = dir.join(SUMS);
    let old = match std::fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut lines = std::collections::BTreeMap::new();
    for (n, line) in old.lines().enumerate() {
        let Some((hash, name)) = line.split_once(' ') else {
            bail!("{}:{}: not a `SHA256  NAME` line", path.display(), n + 1);
        };
        let name = name.trim_start_matches([' ', '*']);
        let ok = hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit());
        if !ok || name.is_empty() || name.contains('/') {
            bail!("{}:{}: not a `SHA256  NAME` line", path.display(), n + 1);
        }
        if dir.join(name).is_file() {
            lines.insert(name.to_string(), hash.to_string());
        }
    }
    let stale: Vec<PathBuf> = lines
        .keys()
        .filter(|n| transfers::version_of(n) == Some(version))
        .filter(|n| !made.iter().any(|a| &a.name == *n))
        .map(|n| dir.join(n))
        .collect();
    lines.retain(|n, _| transfers::version_of(n) != Some(version));
    for a in made {
        lines.insert(a.name.clone(), a.sha256.clone());
    }
    let text = lines.iter().map(|(n, h)| format!("{h}  {n}\n")).collect();
    Ok((text, stale))
}

fn text_file(path: &Path, text: &str) -> Result<AtomicOutput> {
    bytes_file(path, text.as_bytes())
}

fn bytes_file(path: &Path, bytes: &[u8]) -> Result<AtomicOutput> {
    let mut out = AtomicOutput::create(path)?;
    out.file()
        .write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(out)
}

/// `SHA256SUMS` signed with `key`: `SHA256SUMS.sig` (Nix's format),
/// `SHA256SUMS.gpg` (OpenPGP, made at SOURCE_DATE_EPOCH) and the key's
/// OpenPGP public half; their paths.
fn sign_sums(
    o: &Options,
    key: &SecretKey,
    sums: &str,
    outs: &mut Vec<AtomicOutput>,
) -> Result<[PathBuf; 3]> {
    let [sig, gpg, ring] = SIGNED.map(|f| o.dir.join(f));
    outs.push(text_file(
        &sig,
        &format!("{}\n", key.sign(sums.as_bytes())),
    )?);
    let detached = openpgp::detached_signature(key, sums.as_bytes(), o.image.epoch);
    outs.push(bytes_file(&gpg, &detached)?);
    outs.push(bytes_file(&ring, &openpgp::public_keyring(key))?);
    Ok([sig, gpg, ring])
}

/// `DIR/sysupdate.d/*.conf` for the partitions this layout has.
fn transfer_files(
    o: &Options,
    source: &Source,
    layout: &Layout,
    verify: bool,
    boot: &[&BootFile],
    outs: &mut Vec<AtomicOutput>,
) -> Result<Vec<PathBuf>> {
    let has = |r: Role| layout.partitions.iter().any(|p| p.role == r);
    let d = o.dir.join("sysupdate.d");
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    let mut paths = Vec::new();
    let (verity, sig) = (has(Role::RootVerity), has(Role::RootVeritySig));
    for (name, text) in transfers::all(source, verity, sig, o.compress, verify, boot) {
        let path = d.join(name);
        outs.push(text_file(&path, &text)?);
        paths.push(path);
    }
    Ok(paths)
}
