//! The closure reader: from a toplevel store path to every store path the
//! system needs, each with the NAR hash, size and references Nix itself
//! would record.
//!
//! Where the references come from, in order of preference:
//! 1. `--closure-info PATH`: nixpkgs' `closureInfo` directory
//!    (`store-paths` and `registration`), or JSON path records (a Nix
//!    builder's `.attrs.json` from `exportReferencesGraph`), cut to what
//!    the top path reaches;
//! 2. the store's own Nix database (`ROOT/nix/var/nix/db/db.sqlite`);
//! 3. scanning every path's NAR stream for the hash parts of the paths
//!    present in the store, exactly as Nix finds references after a build.
//!
//! In modes 1 and 2 the NAR hashes Nix recorded are taken, and each path's
//! NAR size is computed from metadata and held to the recorded one (no
//! file is read; `verify_nar` hashes them all again and holds each to its
//! record). In mode 3 the hashes are computed here, in one streaming pass
//! per path that also scans, in parallel across paths.

pub mod bootspec;
mod db;
pub mod registration;
pub mod store;

use rayon::prelude::*;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use formats::nar::{self, NarDigest, NarError, RefScanner, HASH_LEN};

pub use bootspec::{Boot, BootSpec};
pub use store::{Store, StoreError, STORE_DIR};

#[derive(Debug, thiserror::Error)]
pub enum ClosureError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    BootSpec(#[from] bootspec::BootSpecError),
    #[error(transparent)]
    Nar(#[from] NarError),
    #[error("{referrer} refers to {missing}, which is not in the store at {store}")]
    MissingReference {
        referrer: String,
        missing: String,
        store: PathBuf,
    },
    #[error("{file}: {problem}")]
    ClosureInfo { file: PathBuf, problem: String },
    #[error("{db}: {problem}")]
    Db { db: PathBuf, problem: String },
    #[error(
        "{path}: its NAR is {computed} bytes, but {db} records {recorded} (corrupted store path?)"
    )]
    SizeMismatch {
        path: String,
        computed: u64,
        recorded: u64,
        db: PathBuf,
    },
    #[error(
        "{path}: contents hash to {computed}, but {db} records {recorded} (corrupted store path?)"
    )]
    HashMismatch {
        path: String,
        computed: String,
        recorded: String,
        db: PathBuf,
    },
}

/// How the references were found.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    ClosureInfo,
    NixDb,
    Scan,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PathInfo {
    pub path: String,
    #[serde(serialize_with = "ser_hash")]
    pub nar_hash: [u8; 32],
    pub nar_size: u64,
    pub references: BTreeSet<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deriver: Option<String>,
}

fn ser_hash<S: serde::Serializer>(h: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&nar::format_hash(h))
}

#[derive(Clone, Debug, Serialize)]
pub struct Closure {
    pub toplevel: String,
    pub bootspec: Boot,
    pub source: Source,
    /// Things worth saying that are not errors (printed on stderr).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Sorted by path.
    pub paths: Vec<PathInfo>,
    /// Where the sizes were recorded, when they were taken without being
    /// checked ([`Options::sizes_later`]): whoever reads the paths' trees
    /// must hold each NAR size to its path's.
    #[serde(skip)]
    pub sizes_unchecked: Option<PathBuf>,
}

pub struct Options {
    pub root: PathBuf,
    pub closure_info: Option<PathBuf>,
    /// Hash every NAR even where Nix recorded the hash (a Nix database or
    /// closure-info): else the recorded hash is taken and only the NAR's
    /// size is checked, from the tree's metadata, without reading a file.
    pub verify_nar: bool,
    /// The caller reads every path's tree (`image::trees::root_tree`) and
    /// checks the NAR sizes there ([`Closure::sizes_unchecked`]): the
    /// recorded sizes are taken here, which spares a second walk that
    /// stats every file of the closure.
    pub sizes_later: bool,
}

/// An edge list: path → (references, deriver, hash recorded by Nix).
struct Graph {
    nodes: BTreeMap<String, Node>,
}

impl Graph {
    /// The part of the graph `root` reaches (closure info may list more
    /// roots than the system; they must not reach the image).
    fn closure_of(mut self, root: &str, file: &Path) -> Result<Graph, ClosureError> {
        if !self.nodes.contains_key(root) {
            return Err(ClosureError::ClosureInfo {
                file: file.to_owned(),
                problem: format!("does not list {root} (the closure of another system?)"),
            });
        }
        let mut keep = BTreeMap::new();
        let mut todo = vec![(String::new(), root.to_string())];
        while let Some((referrer, p)) = todo.pop() {
            if keep.contains_key(&p) {
                continue;
            }
            let Some(node) = self.nodes.remove(&p) else {
                return Err(ClosureError::ClosureInfo {
                    file: file.to_owned(),
                    problem: format!("{referrer} refers to {p}, which has no record"),
                });
            };
            todo.extend(node.references.iter().map(|r| (p.clone(), r.clone())));
            keep.insert(p, node);
        }
        Ok(Graph { nodes: keep })
    }
}

#[derive(Default)]
struct Node {
    references: BTreeSet<String>,
    deriver: Option<String>,
    recorded_hash: Option<String>,
    recorded_size: Option<u64>,
}

/// The closure of any store path (a system or not): see [`read`].
#[derive(Clone, Debug)]
pub struct Paths {
    pub top: String,
    pub source: Source,
    pub warnings: Vec<String>,
    /// Sorted by path.
    pub paths: Vec<PathInfo>,
    /// As [`Closure::sizes_unchecked`].
    pub sizes_unchecked: Option<PathBuf>,
}

/// [`read`], the error naming the system, the closure's size reported
/// as a stage.
pub fn read_reported(
    system: &Path,
    opts: &Options,
    progress: &dyn crate::Progress,
) -> anyhow::Result<Closure> {
    use anyhow::Context;
    let c = read(system, opts)
        .with_context(|| format!("reading the closure of {}", system.display()))?;
    progress.stage(&format!(
        "closure: {} paths, {} bytes",
        c.paths.len(),
        c.total_nar_size()
    ));
    Ok(c)
}

/// The closure of a system: its bootspec, and every path with Nix's hash,
/// size and references.
pub fn read(system: &Path, opts: &Options) -> Result<Closure, ClosureError> {
    let store = Store::new(&opts.root);
    let toplevel = store.resolve_toplevel(system)?;
    let phys = store.physical(&toplevel);
    if let Err(err) = std::fs::symlink_metadata(&phys) {
        return Err(StoreError::Io { path: phys, err }.into());
    }
    let boot = bootspec::read(&store, &toplevel)?;
    let p = read_closure(&store, toplevel, opts)?;
    Ok(Closure {
        toplevel: p.top,
        bootspec: boot,
        source: p.source,
        warnings: p.warnings,
        paths: p.paths,
        sizes_unchecked: p.sizes_unchecked,
    })
}

/// The closure of any store path, or a link to one.
pub fn read_paths(path: &Path, opts: &Options) -> Result<Paths, ClosureError> {
    let store = Store::new(&opts.root);
    let top = store.resolve_toplevel(path)?;
    let phys = store.physical(&top);
    if let Err(err) = std::fs::symlink_metadata(&phys) {
        return Err(StoreError::Io { path: phys, err }.into());
    }
    read_closure(&store, top, opts)
}

fn read_closure(store: &Store, toplevel: String, opts: &Options) -> Result<Paths, ClosureError> {
    let db_file = store.physical("/nix/var/nix/db/db.sqlite");

    let mut warnings = Vec::new();
    let later = opts.sizes_later && !opts.verify_nar;
    let (source, paths, unchecked) = if let Some(ci) = &opts.closure_info {
        let g = registration::read_closure_info(ci)?.closure_of(&toplevel, ci)?;
        let from = info_dir(opts);
        let paths = hash_graph(store, g, &from, opts.verify_nar, later)?;
        (Source::ClosureInfo, paths, later.then_some(from))
    } else if db_file.exists() {
        let g = db::closure(&db_file, &toplevel)?;
        let paths = hash_graph(store, g, &db_file, opts.verify_nar, later)?;
        (Source::NixDb, paths, later.then_some(db_file))
    } else {
        let paths = scan_closure(store, &toplevel, &mut warnings)?;
        (Source::Scan, paths, None)
    };
    Ok(Paths {
        top: toplevel,
        source,
        warnings,
        paths,
        sizes_unchecked: unchecked,
    })
}

/// Every path of the graph must be in the store; a missing one is named
/// with a path that refers to it.
fn missing_check(store: &Store, g: &Graph) -> Result<(), ClosureError> {
    let present = |p: &str| std::fs::symlink_metadata(store.physical(p)).is_ok();
    for (path, node) in &g.nodes {
        if let Some(r) = node.references.iter().find(|r| !present(r)) {
            return Err(ClosureError::MissingReference {
                referrer: path.clone(),
                missing: r.clone(),
                store: store.store_dir_physical(),
            });
        }
    }
    if let Some(p) = g.nodes.keys().find(|p| !present(p)) {
        return Err(ClosureError::MissingReference {
            referrer: "the closure".into(),
            missing: p.clone(),
            store: store.store_dir_physical(),
        });
    }
    Ok(())
}

/// The registration file of `--closure-info`, for messages.
fn info_dir(opts: &Options) -> PathBuf {
    opts.closure_info
        .as_ref()
        .map(|d| d.join("registration"))
        .unwrap_or_default()
}

/// Every node of a graph Nix recorded, in parallel: with `verify`, each
/// NAR hashed and held to the recorded hash; else the recorded hash
/// taken and the NAR's size, from metadata alone, held to the recorded
/// size (so the files are read once, by whoever writes them), or with
/// `sizes_later` the recorded size taken as it is, for the caller to
/// check.
fn hash_graph(
    store: &Store,
    g: Graph,
    from: &Path,
    verify: bool,
    sizes_later: bool,
) -> Result<Vec<PathInfo>, ClosureError> {
    missing_check(store, &g)?;
    let nodes: Vec<(String, Node)> = g.nodes.into_iter().collect();
    nodes
        .into_par_iter()
        .map_init(Vec::new, |buf, (path, node)| {
            let recorded = match node.recorded_hash.as_deref() {
                None => None,
                Some(r) => Some(parse_hash(r).ok_or_else(|| ClosureError::ClosureInfo {
                    file: from.to_owned(),
                    problem: format!("{path}: narHash {r:?} is not a SHA-256 hash"),
                })?),
            };
            let (hash, size) = match recorded {
                Some(h) if !verify => match node.recorded_size {
                    Some(size) if sizes_later => (h, size),
                    _ => (h, nar::size(&store.physical(&path))?),
                },
                _ => {
                    let (hash, size, _) = nar_digest(store, &path, None, buf)?;
                    if let Some(digest) = recorded.filter(|d| *d != hash) {
                        // Both in Nix's own form, whatever form was recorded.
                        return Err(ClosureError::HashMismatch {
                            path,
                            computed: nar::format_hash(&hash),
                            recorded: nar::format_hash(&digest),
                            db: from.to_owned(),
                        });
                    }
                    (hash, size)
                }
            };
            if let Some(rec) = node.recorded_size.filter(|&r| r != size) {
                return Err(ClosureError::SizeMismatch {
                    path,
                    computed: size,
                    recorded: rec,
                    db: from.to_owned(),
                });
            }
            Ok(PathInfo {
                path,
                nar_hash: hash,
                nar_size: size,
                references: node.references,
                deriver: node.deriver,
            })
        })
        .collect()
}

/// The digest of a recorded NAR hash: base16 or Nix's base32, with
/// `sha256:` (the Nix database, closureInfo, exportReferencesGraph) or
/// without (`nix-store --dump-db`), or SRI `sha256-<base64>` (`nix
/// path-info --json` since Nix 2.19).
fn parse_hash(recorded: &str) -> Option<[u8; 32]> {
    use base64::Engine;
    let bytes = if let Some(b64) = recorded.strip_prefix("sha256-") {
        base64::engine::general_purpose::STANDARD.decode(b64).ok()?
    } else {
        let body = recorded.strip_prefix("sha256:").unwrap_or(recorded);
        if body.len() == 64 {
            (0..32)
                .map(|i| u8::from_str_radix(body.get(2 * i..2 * i + 2)?, 16).ok())
                .collect::<Option<Vec<u8>>>()?
        } else {
            formats::nixbase32::decode(body, 32)?
        }
    };
    bytes.try_into().ok()
}

fn nar_digest(
    store: &Store,
    path: &str,
    scanner: Option<RefScanner>,
    buf: &mut Vec<u8>,
) -> Result<([u8; 32], u64, Option<RefScanner>), NarError> {
    let mut d = NarDigest::new(scanner);
    nar::dump(&store.physical(path), &mut d, buf)?;
    Ok(d.finish())
}

/// Breadth-first closure by scanning, one parallel NAR pass per level.
///
/// As in Nix, only hashes of paths present in the store are references. A
/// `/nix/store/<hash>-<name>` string whose path is absent is reported as a
/// warning: it may be a deleted dependency, or just text (Debian's nix-bin
/// carries such strings).
fn scan_closure(
    store: &Store,
    toplevel: &str,
    warnings: &mut Vec<String>,
) -> Result<Vec<PathInfo>, ClosureError> {
    let dir = store.store_dir_physical();
    let mut by_hash: HashMap<[u8; HASH_LEN], String> = HashMap::new();
    let rd = std::fs::read_dir(&dir).map_err(|err| StoreError::Io {
        path: dir.clone(),
        err,
    })?;
    for e in rd {
        let e = e.map_err(|err| StoreError::Io {
            path: dir.clone(),
            err,
        })?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some((h, _)) = store::parse_base_name(name) {
            by_hash.insert(h, format!("{STORE_DIR}/{name}"));
        }
    }
    let candidates: Arc<HashSet<[u8; HASH_LEN]>> = Arc::new(by_hash.keys().copied().collect());

    let mut done: BTreeMap<String, PathInfo> = BTreeMap::new();
    let mut frontier = vec![toplevel.to_string()];
    while !frontier.is_empty() {
        let results: Vec<Result<(Vec<String>, PathInfo), ClosureError>> = frontier
            .par_iter()
            .map_init(Vec::new, |buf, path| {
                let sc = RefScanner::new(candidates.clone());
                let (hash, size, sc) = nar_digest(store, path, Some(sc), buf)?;
                let sc = sc.expect("scanner was given");
                let missing = sc
                    .missing
                    .iter()
                    .map(|m| format!("{STORE_DIR}/{}", String::from_utf8_lossy(m)))
                    .collect::<Vec<_>>();
                Ok((
                    missing,
                    PathInfo {
                        path: path.clone(),
                        nar_hash: hash,
                        nar_size: size,
                        references: sc.found.iter().map(|h| by_hash[h].clone()).collect(),
                        deriver: None,
                    },
                ))
            })
            .collect();
        let mut next = BTreeSet::new();
        for r in results {
            let (missing, info) = r?;
            for m in missing {
                warnings.push(format!(
                    "{} mentions {m}, which is not in the store at {} (not counted as a reference)",
                    info.path,
                    store.store_dir_physical().display()
                ));
            }
            for reference in &info.references {
                if !done.contains_key(reference) && !frontier.contains(reference) {
                    next.insert(reference.clone());
                }
            }
            done.insert(info.path.clone(), info);
        }
        frontier = next.into_iter().filter(|p| !done.contains_key(p)).collect();
    }
    Ok(done.into_values().collect())
}

impl Closure {
    /// Text that `nix-store --load-db` accepts (and that forged images
    /// carry as `/nix-path-registration`).
    /// The registration without derivers, as images carry it.
    pub fn registration_for_image(&self) -> String {
        registration::render(&self.paths, false)
    }

    pub fn registration(&self) -> String {
        registration::render(&self.paths, true)
    }

    pub fn total_nar_size(&self) -> u64 {
        self.paths.iter().map(|p| p.nar_size).sum()
    }

    /// The system's `nixos-version` file, trimmed (None: it has none).
    pub fn nixos_version(&self, store: &store::Store) -> Option<String> {
        let file = store.physical(&format!("{}/nixos-version", self.toplevel));
        std::fs::read_to_string(file)
            .ok()
            .map(|s| s.trim().to_string())
    }
}
