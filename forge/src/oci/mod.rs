//! OCI container images straight from a closure: any store path and what
//! it needs, a layer per store path (grouped past `max_layers`, see
//! [`layers`]), a customisation layer forge writes itself ([`custom`]),
//! deterministic tar and compression ([`blob`]), the JSON documents
//! ([`spec`]). The output is an OCI image layout directory, or an archive
//! (`.tar`) holding that layout plus docker's `manifest.json`.
//!
//! Everything is written into a staging directory beside the output and
//! put in place at the end: a directory by one rename (exchanged with an
//! earlier OCI layout of the same name), an archive as an unnamed file
//! linked in when complete.

pub mod blob;
pub mod custom;
pub mod layers;
pub mod spec;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::closure::{self, store, PathInfo, Store};
use crate::output::AtomicOutput;
use crate::Progress;
use blob::{Blob, Blobs, Cache, Compression};
use formats::tree::{Owner, Tree, ROOT};
use layers::GroupKind;
use spec::{Platform, RunConfig};

pub struct Options {
    pub path: PathBuf,
    pub store_root: PathBuf,
    pub closure_info: Option<PathBuf>,
    pub verify_nar: bool,
    /// A directory (OCI image layout), or NAME.tar (an archive).
    pub output: PathBuf,
    /// Every layer counts, the customisation layer too.
    pub max_layers: usize,
    pub compression: Compression,
    pub epoch: u32,
    pub run: RunConfig,
    /// The tag: a layout's reference name in index.json; an archive's
    /// is NAME:TAG.
    pub tag: String,
    /// The repository name of an archive (index.json and RepoTags; default:
    /// the path's name).
    pub name: Option<String>,
    /// A Nix system (`aarch64-linux`) or an OCI architecture (`arm64`),
    /// used when the path has no bootspec saying its system.
    pub arch: Option<String>,
    pub users: Vec<custom::User>,
    pub cache: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct LayerReport {
    pub digest: String,
    pub size: u64,
    pub paths: Vec<String>,
    pub cached: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub output: PathBuf,
    pub manifest: String,
    pub config: String,
    pub architecture: String,
    pub layers: Vec<LayerReport>,
    /// Links the customisation layer made (`/bin/sh` → …).
    pub links: BTreeMap<String, String>,
}

/// Before any work: an archive's name must not be a directory; a
/// directory output may replace only an earlier OCI layout.
pub fn check_output(p: &Path) -> Result<()> {
    let Ok(md) = std::fs::symlink_metadata(p) else {
        return Ok(());
    };
    if is_archive(p) {
        if md.is_dir() {
            bail!("{}: is a directory", p.display());
        }
    } else if !(md.is_dir() && p.join("oci-layout").is_file()) {
        bail!(
            "{}: exists and is not an OCI image layout; not replacing it",
            p.display()
        );
    }
    Ok(())
}

fn is_archive(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "tar")
}

/// The architecture: the bootspec's system, else `--arch`, else the host's.
fn platform(store: &Store, top: &str, arch: Option<&str>) -> Result<Platform> {
    let boot_json = store.physical(&format!("{top}/boot.json"));
    if boot_json.exists() {
        let b = closure::bootspec::read(store, top)?;
        return spec::platform(&b.spec.system)
            .with_context(|| format!("{top}: no OCI architecture for system {}", b.spec.system));
    }
    let host = format!("{}-linux", std::env::consts::ARCH);
    let want = arch.unwrap_or(&host);
    if let Some(p) = spec::platform(want) {
        return Ok(p);
    }
    // An OCI name as it is (amd64, arm64, …).
    match [
        "amd64", "arm64", "386", "arm", "riscv64", "ppc64le", "s390x",
    ]
    .contains(&want)
    {
        true => Ok(Platform {
            architecture: want.into(),
            variant: (want == "arm64").then(|| "v8".into()),
        }),
        false => bail!("--arch {want:?}: not a Nix system or OCI architecture"),
    }
}

/// A repository name docker accepts ([`check_name`]), from a store
/// path's name: lower-cased, other characters and separator runs that
/// the grammar does not allow made one `-`.
fn repo_name(top: &str) -> String {
    let base = store::base_name(top);
    let name = base
        .split_once('-')
        .map_or(base, |(_, n)| n)
        .to_ascii_lowercase();
    let mut out = String::new();
    let mut sep = String::new();
    for c in name.chars() {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            if !out.is_empty() && !sep.is_empty() {
                let allowed =
                    [".", "_", "__"].contains(&sep.as_str()) || sep.chars().all(|c| c == '-');
                out.push_str(if allowed { &sep } else { "-" });
            }
            sep.clear();
            out.push(c);
        } else {
            sep.push(c);
        }
    }
    if out.is_empty() {
        "image".into()
    } else {
        out
    }
}

/// A repository name as docker's reference grammar has it: components of
/// lower-case letters and digits joined by `.`, `_`, `__` or dashes,
/// separated by `/`, the first optionally a registry host (`host[:port]`).
pub fn check_name(n: &str) -> Result<()> {
    let component = |c: &str| {
        let b = c.as_bytes();
        let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
        let (mut i, mut ok) = (0, !b.is_empty() && alnum(b[0]) && alnum(b[b.len() - 1]));
        while ok && i < b.len() {
            let run = b[i..].iter().take_while(|&&x| !alnum(x)).count();
            let sep = &c[i..i + run];
            ok = run == 0
                || sep == "."
                || sep == "_"
                || sep == "__"
                || sep.bytes().all(|x| x == b'-');
            i += run.max(1);
        }
        ok
    };
    let host = |h: &str| {
        let (name, port) = h.split_once(':').unwrap_or((h, "1"));
        !name.is_empty()
            && name.split('.').all(|l| {
                !l.is_empty()
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.bytes().all(|x| x.is_ascii_alphanumeric() || x == b'-')
            })
            && !port.is_empty()
            && port.bytes().all(|x| x.is_ascii_digit())
    };
    let parts: Vec<&str> = n.split('/').collect();
    let first_is_host = parts.len() > 1
        && (parts[0].contains(['.', ':']) || parts[0] == "localhost")
        && host(parts[0]);
    let rest = &parts[usize::from(first_is_host)..];
    if n.len() > 255 || !rest.iter().all(|c| component(c)) {
        bail!(
            "--name {n:?}: a repository name is lower-case letters and digits joined by . _ __ or -, \
             in /-separated parts, optionally after a registry host"
        );
    }
    Ok(())
}

pub fn check_tag(t: &str) -> Result<()> {
    let ok = !t.is_empty()
        && t.len() <= 128
        && t.bytes().enumerate().all(|(i, c)| {
            c.is_ascii_alphanumeric() || c == b'_' || (i > 0 && (c == b'.' || c == b'-'))
        });
    if !ok {
        bail!("--tag {t:?}: a tag is 1-128 of A-Z a-z 0-9 _ . - (not . or - first)");
    }
    Ok(())
}

/// What the container would fail on when it starts, warned rather than
/// refused (a volume may bring it): an absolute entrypoint (or command)
/// that is neither in the closure nor one of the customisation layer's
/// links, a `--user` name no account has.
fn run_warnings(
    store: &Store,
    links: &[(String, String)],
    users: &[custom::User],
    run: &spec::RunConfig,
) -> Vec<String> {
    let mut w = Vec::new();
    let first = run
        .entrypoint
        .as_ref()
        .or(run.cmd.as_ref())
        .and_then(|v| v.first());
    if let Some(p) = first.filter(|p| p.starts_with('/')) {
        let linked = links.iter().any(|(at, _)| at == p);
        let in_store = p.starts_with("/nix/store/") && store.follow(p).is_some();
        if !linked && !in_store {
            w.push(format!("the entrypoint {p} is not in the image"));
        }
    }
    if let Some(u) = &run.user {
        let name = u.split(':').next().unwrap_or_default();
        if name.parse::<u32>().is_err() && !users.iter().any(|x| x.name == name) {
            w.push(format!(
                "--user {u}: no account {name} in the image (root, nobody and --add-user's)"
            ));
        }
    }
    w
}

/// A staging directory beside the output, removed unless kept.
struct Staging(Option<PathBuf>);

impl Staging {
    fn new(output: &Path) -> Result<Staging> {
        let dir = match output.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let name = output
            .file_name()
            .with_context(|| format!("{}: not a file name", output.display()))?
            .to_string_lossy()
            .into_owned();
        crate::output::check_dir(output)?;
        // Left by a run that was killed: its process is gone.
        crate::output::remove_stale(output)?;
        let path = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Staging(Some(path)))
    }
    fn path(&self) -> &Path {
        self.0.as_deref().expect("staging directory")
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// One layer's tree: /nix, /nix/store and the paths.
fn store_layer(store: &Store, paths: &[&PathInfo]) -> Result<Tree> {
    let mut t = Tree::new(0o755);
    let sd = t.mkdir_p(b"/nix/store", 0o755)?;
    let owner = Owner {
        force: Some((0, 0)),
    };
    for p in paths {
        let f = Tree::read_host(&store.physical(&p.path), owner)
            .with_context(|| format!("reading {}", p.path))?;
        t.graft(sd, store::base_name(&p.path).as_bytes(), f)?;
    }
    Ok(t)
}

pub fn build(o: &Options, progress: &dyn Progress) -> Result<Report> {
    let users = checked_users(o)?;
    let store = Store::new(&o.store_root);
    let c = closure::read_paths(
        &o.path,
        &closure::Options {
            root: o.store_root.clone(),
            closure_info: o.closure_info.clone(),
            verify_nar: o.verify_nar,
            sizes_later: false,
        },
    )
    .with_context(|| format!("reading the closure of {}", o.path.display()))?;
    let platform = platform(&store, &c.top, o.arch.as_deref())?;
    progress.stage(&format!(
        "closure: {} paths, {} bytes",
        c.paths.len(),
        c.paths.iter().map(|p| p.nar_size).sum::<u64>()
    ));
    let groups = layers::group(&c.paths, &c.top, o.max_layers - 1);

    let staging = Staging::new(&o.output)?;
    progress.scratch(Some(staging.path()));
    let blobs = Blobs::new(staging.path())?;
    // The bar: the closure's bytes, a layer's at a time.
    let bar = progress.bytes(&format!("layers of {}", o.output.display()));
    if let Some(b) = &bar {
        b.total(c.paths.iter().map(|p| p.nar_size).sum());
    }
    let built = store_layers(o, &store, &c, &groups, &blobs, bar.as_deref())?;
    if let Some(b) = &bar {
        b.done();
    }
    let made = custom::layer(&store, &c, &users, o.epoch)?;
    let custom_blob = blobs.layer(&made.tree, u64::from(o.epoch), o.compression, "custom")?;
    progress.stage(&format!(
        "layers: {} ({} from the cache) and the customisation layer",
        built.len(),
        built.iter().filter(|b| b.1).count()
    ));
    let (hist, report_layers) = history(&c, &groups, &built, &custom_blob);
    let run = run_config(o, &store, &c.top);
    for w in run_warnings(&store, &made.links, &users, &run) {
        progress.warn(&w);
    }
    let created = spec::rfc3339(o.epoch);
    let config = blobs.bytes(&spec::config(&run, &platform, &created, &hist))?;
    let name = o.name.clone().unwrap_or_else(|| repo_name(&c.top));
    let annotations = BTreeMap::from([
        (
            "org.opencontainers.image.created".to_string(),
            created.clone(),
        ),
        ("org.opencontainers.image.title".to_string(), name.clone()),
    ]);
    let layer_refs: Vec<(&Blob, &str)> = built
        .iter()
        .map(|(b, _)| (b, o.compression.media_type()))
        .chain([(&custom_blob, o.compression.media_type())])
        .collect();
    let manifest = blobs.bytes(&spec::manifest(&config, &layer_refs, &annotations))?;
    let layer_blobs: Vec<&Blob> = layer_refs.iter().map(|(b, _)| *b).collect();
    let written = Written {
        config: &config,
        manifest: &manifest,
        layers: &layer_blobs,
        platform: &platform,
        reference: format!("{name}:{}", o.tag),
    };
    let done = written.commit(o, staging);
    progress.scratch(None);
    done?;
    progress.stage(&format!("done: {}", o.output.display()));
    Ok(Report {
        output: o.output.clone(),
        manifest: spec::digest(&manifest),
        config: spec::digest(&config),
        architecture: platform.architecture,
        layers: report_layers,
        links: made.links.into_iter().collect(),
    })
}

/// The options that can be refused before anything is read; the users
/// the image has.
fn checked_users(o: &Options) -> Result<Vec<custom::User>> {
    if o.max_layers < 2 {
        bail!(
            "--max-layers {}: at least 2 (a store layer and the customisation layer)",
            o.max_layers
        );
    }
    check_tag(&o.tag)?;
    if let Some(n) = &o.name {
        check_name(n)?;
    }
    custom::users(&o.users)
}

/// A layer per group of store paths, made on every core (or taken from
/// the cache: whether each was).
fn store_layers(
    o: &Options,
    store: &Store,
    c: &closure::Paths,
    groups: &[layers::Group],
    blobs: &Blobs,
    bar: Option<&dyn crate::Meter>,
) -> Result<Vec<(Blob, bool)>> {
    let cache = o.cache.as_deref().map(Cache::open).transpose()?;
    let mtime = u64::from(o.epoch);
    groups
        .par_iter()
        .enumerate()
        .map(|(i, g)| {
            let paths: Vec<&PathInfo> = g.paths.iter().map(|&k| &c.paths[k]).collect();
            let counted = || {
                if let Some(b) = bar {
                    b.add(paths.iter().map(|p| p.nar_size).sum());
                }
            };
            let key_of: Vec<(&str, &[u8; 32])> = paths
                .iter()
                .map(|p| (p.path.as_str(), &p.nar_hash))
                .collect();
            let key = Cache::key(&key_of, mtime, o.compression);
            if let Some(b) = cache.as_ref().and_then(|c| c.get(&key, blobs)) {
                counted();
                return Ok((b, true));
            }
            let tree = store_layer(store, &paths)?;
            let b = blobs.layer(&tree, mtime, o.compression, &format!("layer{i}"))?;
            if let Some(cache) = &cache {
                cache.put(&key, &b, blobs);
            }
            counted();
            Ok((b, false))
        })
        .collect()
}

/// The config's history (a line per layer) and the report's layers.
fn history<'b>(
    c: &closure::Paths,
    groups: &[layers::Group],
    built: &'b [(Blob, bool)],
    custom_blob: &'b Blob,
) -> (Vec<spec::Layer<'b>>, Vec<LayerReport>) {
    let mut report_layers = Vec::new();
    let mut hist = Vec::new();
    for (g, (b, cached)) in groups.iter().zip(built) {
        let names: Vec<String> = g.paths.iter().map(|&k| c.paths[k].path.clone()).collect();
        let what = match g.kind {
            GroupKind::Own => "store path",
            GroupKind::Merged => "store paths merged",
            GroupKind::Top => "the top path with what only it needs",
        };
        hist.push(spec::Layer {
            blob: b,
            comment: format!("{what}: {}", names.join(" ")),
        });
        report_layers.push(LayerReport {
            digest: spec::digest(b),
            size: b.size,
            paths: names,
            cached: *cached,
        });
    }
    hist.push(spec::Layer {
        blob: custom_blob,
        comment: "customisation: users, /tmp, links, the Nix database".into(),
    });
    report_layers.push(LayerReport {
        digest: spec::digest(custom_blob),
        size: custom_blob.size,
        paths: vec![],
        cached: false,
    });
    (hist, report_layers)
}

/// The run configuration, with a PATH of the top path's bin directories
/// unless one is given.
fn run_config(o: &Options, store: &Store, top: &str) -> RunConfig {
    let mut run = o.run.clone();
    if !run.env.iter().any(|e| e.starts_with("PATH=")) {
        let mut path: Vec<String> = ["bin", "sw/bin"]
            .iter()
            .map(|s| format!("{top}/{s}"))
            .filter(|l| store.follow(l).is_some_and(|p| p.is_dir()))
            .collect();
        path.extend(["/bin".into(), "/usr/bin".into()]);
        run.env.insert(0, format!("PATH={}", path.join(":")));
    }
    run
}

/// The image's documents, to be written beside its blobs.
struct Written<'a> {
    config: &'a Blob,
    manifest: &'a Blob,
    layers: &'a [&'a Blob],
    platform: &'a Platform,
    /// NAME:TAG.
    reference: String,
}

impl Written<'_> {
    /// `oci-layout` and `index.json` staged, then the layout put in
    /// place, or archived (with a `manifest.json`) into one tar.
    fn commit(&self, o: &Options, staging: Staging) -> Result<()> {
        let root = staging.path();
        let write = |n: &str, b: &[u8]| {
            std::fs::write(root.join(n), b).with_context(|| format!("writing {n}"))
        };
        write("oci-layout", spec::LAYOUT)?;
        // A layout names its image by the tag (`oci:DIR:TAG`, umoci); an
        // archive by NAME:TAG, as `podman save` does, which is the name
        // `podman load` gives it (a bare tag would load as localhost/TAG).
        let archived = is_archive(&o.output);
        let ref_name = if archived { &self.reference } else { &o.tag };
        write(
            "index.json",
            &spec::index(self.manifest, self.platform, ref_name),
        )?;
        if archived {
            let m = spec::docker_manifest(self.config, self.layers, &self.reference);
            write("manifest.json", &m)?;
            archive(root, &o.output, u64::from(o.epoch))
        } else {
            put_in_place(staging, &o.output)
        }
    }
}

/// The staged layout as one tar, committed whole.
fn archive(root: &Path, output: &Path, mtime: u64) -> Result<()> {
    let mut t = Tree::new(0o755);
    t.add_host_contents(
        ROOT,
        root,
        Owner {
            force: Some((0, 0)),
        },
    )?;
    let mut out = AtomicOutput::create(output)?;
    let mut w = formats::tar::TarWriter::new(std::io::BufWriter::new(out.file()), mtime);
    w.tree(&t)?;
    w.finish()?;
    out.commit()
}

/// The staged directory takes the output's name: by rename, or by
/// exchange with an earlier OCI layout there (then removed). Anything
/// else at that name is refused, untouched.
fn put_in_place(mut staging: Staging, output: &Path) -> Result<()> {
    let from = staging.0.take().expect("staging directory");
    let result = (|| {
        sync_tree(&from)?;
        match std::fs::symlink_metadata(output) {
            Err(_) => std::fs::rename(&from, output)
                .with_context(|| format!("naming {}", output.display())),
            Ok(md) if md.is_dir() && output.join("oci-layout").is_file() => {
                nix::fcntl::renameat2(
                    nix::fcntl::AT_FDCWD,
                    &from,
                    nix::fcntl::AT_FDCWD,
                    output,
                    nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                )
                .with_context(|| format!("replacing {}", output.display()))?;
                // `from` now names the earlier layout; the new one is in
                // place, so a failure to remove the old (hidden, named for
                // this process) is left to the next run's cleanup.
                let _ = std::fs::remove_dir_all(&from);
                Ok(())
            }
            Ok(_) => bail!(
                "{}: exists and is not an OCI image layout; not replacing it",
                output.display()
            ),
        }
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&from);
    }
    result
}

/// Every file and directory under `dir` on disk before it is named.
fn sync_tree(dir: &Path) -> Result<()> {
    let ctx = |p: &Path| format!("syncing {}", p.display());
    for e in std::fs::read_dir(dir).with_context(|| ctx(dir))? {
        let p = e.with_context(|| ctx(dir))?.path();
        if p.is_dir() {
            sync_tree(&p)?;
        } else {
            std::fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .with_context(|| ctx(&p))?;
        }
    }
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| ctx(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names_follow_dockers_grammar() {
        for ok in [
            "hello",
            "a/b",
            "a.b_c__d---e",
            "registry.example:5000/team/app",
            "localhost/app",
            "x0",
        ] {
            check_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "", "Hello", "a b", "-a", "a-", "a..b", "a._b", "a___b", "a//b", "/a", "a/", "host:x/a",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        // Defaults from store path names always pass.
        for (path, want) in [
            (
                "/nix/store/00000000000000000000000000000000-hello-2.12",
                "hello-2.12",
            ),
            (
                "/nix/store/00000000000000000000000000000000-Foo+Bar..x",
                "foo-bar-x",
            ),
            (
                "/nix/store/00000000000000000000000000000000-python3.11-a_b",
                "python3.11-a_b",
            ),
            ("/nix/store/00000000000000000000000000000000-+++", "image"),
        ] {
            assert_eq!(repo_name(path), want);
            check_name(&repo_name(path)).unwrap();
        }
    }
}
