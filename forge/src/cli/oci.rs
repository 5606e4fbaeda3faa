//! `forge oci`: arguments, an optional config file, the default cache.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

use forge::oci::{self, blob::Compression, custom, spec};

#[derive(clap::Args)]
#[command(after_help = "Examples:
  forge oci ./result -o app.tar --entrypoint /nix/store/…-app/bin/app --port 8080/tcp
  skopeo copy docker-archive:app.tar docker://registry.example/app:1
  forge oci ./result -o app-oci --max-layers 60 --compression zstd
  skopeo copy oci:app-oci:latest docker://registry.example/app:1

Exit status: 0 done, 1 failed (one line on stderr says why), 2 bad arguments")]
pub struct OciArgs {
    /// Any store path, or a link to one (e.g. ./result); its closure goes
    /// into the image.
    path: PathBuf,
    /// A directory (OCI image layout: oci-layout, index.json, blobs/), or
    /// NAME.tar: that layout plus docker's manifest.json in one archive
    /// (skopeo's docker-archive:, podman load). An earlier OCI layout at
    /// the same name is replaced whole.
    #[arg(short, long)]
    output: PathBuf,
    #[command(flatten)]
    src: super::ClosureSource,
    /// At most this many layers, the customisation layer included
    /// (overlayfs fails past about 125 lower layers).
    /// [default: 100]
    #[arg(long, value_name = "N")]
    max_layers: Option<usize>,
    /// gzip (level 6) or zstd (level 3), optionally with a level: gzip:9,
    /// zstd:19. [default: gzip]
    #[arg(long, value_name = "gzip|zstd[:LEVEL]")]
    compression: Option<String>,
    /// The program the container runs and its first arguments: one word
    /// per --entrypoint (repeat it), or a JSON list: '["/bin/app","-v"]'.
    #[arg(long, value_name = "WORD|JSON", allow_hyphen_values = true)]
    entrypoint: Vec<String>,
    /// Arguments to the entrypoint (or the command, without one): one word
    /// per --cmd, or a JSON list.
    #[arg(long, value_name = "WORD|JSON", allow_hyphen_values = true)]
    cmd: Vec<String>,
    /// An environment variable, KEY=VALUE; repeatable. Without PATH=, PATH
    /// is the path's bin (and sw/bin) directories, /bin and /usr/bin.
    #[arg(long, value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// The user the container runs as (the config's User): a name or UID[:GID].
    #[arg(long)]
    user: Option<String>,
    /// The working directory.
    #[arg(long)]
    workdir: Option<String>,
    /// An exposed port, PORT[/tcp|udp|sctp]; repeatable.
    #[arg(long, value_name = "PORT[/PROTO]")]
    port: Vec<String>,
    /// A label, KEY=VALUE; repeatable.
    #[arg(long, value_name = "KEY=VALUE")]
    label: Vec<String>,
    /// A user in /etc/passwd besides root and nobody, NAME:UID[:GID]
    /// (with a group and a home directory); repeatable.
    #[arg(long, value_name = "NAME:UID[:GID]")]
    add_user: Vec<String>,
    /// The image's tag: a layout's reference name in index.json, and in an
    /// archive NAME:TAG. [default: latest]
    #[arg(long)]
    tag: Option<String>,
    /// The repository name of an archive (index.json's reference name and
    /// RepoTags: NAME:TAG), e.g. registry.example/team/app (default: the
    /// path's name).
    #[arg(long)]
    name: Option<String>,
    /// When the path has no bootspec: its Nix system or OCI architecture
    /// (x86_64-linux, arm64, …; default: this machine's).
    #[arg(long)]
    arch: Option<String>,
    /// The same settings in a TOML or JSON file (entrypoint, cmd, env,
    /// user, workdir, ports, labels, add-users, tag, name, arch,
    /// max-layers, compression); options given here win.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The layer cache (default: ~/.cache/nixforge/oci; none inside a Nix
    /// build): a rebuild compresses only the layers whose paths changed.
    #[arg(long, value_name = "DIR", conflicts_with = "no_cache")]
    cache: Option<PathBuf>,
    /// Use no layer cache.
    #[arg(long)]
    no_cache: bool,
    /// Print the report as JSON (digests, layers and their paths).
    #[arg(long)]
    json: bool,
}

/// The config file's settings (kebab-case keys, as the options).
#[derive(Default, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Vec<String>,
    user: Option<String>,
    workdir: Option<String>,
    #[serde(default)]
    ports: Vec<String>,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    add_users: Vec<String>,
    tag: Option<String>,
    name: Option<String>,
    arch: Option<String>,
    max_layers: Option<usize>,
    compression: Option<String>,
}

fn read_config(p: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(p).with_context(|| format!("--config {}", p.display()))?;
    let is_json = p.extension().is_some_and(|e| e == "json");
    if is_json {
        serde_json::from_str(&text).with_context(|| format!("--config {}", p.display()))
    } else {
        toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "--config {}: {}",
                p.display(),
                e.message().replace('\n', " ")
            )
        })
    }
}

fn compression(s: &str) -> Result<Compression> {
    let (name, level) = s.split_once(':').map_or((s, None), |(n, l)| (n, Some(l)));
    let level = |max: i64, default: i64| -> Result<i64> {
        match level {
            None => Ok(default),
            Some(l) => l
                .parse::<i64>()
                .ok()
                .filter(|&n| (1..=max).contains(&n))
                .with_context(|| format!("--compression {s:?}: the level is 1-{max}")),
        }
    };
    match name {
        "gzip" => Ok(Compression::Gzip(level(9, 6)? as u32)),
        "zstd" => Ok(Compression::Zstd(level(22, 3)? as i32)),
        _ => bail!("--compression {s:?}: unknown; gzip or zstd (optionally :LEVEL)"),
    }
}

/// Repeated words, or one JSON list; None when not given.
fn words(what: &str, v: Vec<String>) -> Result<Option<Vec<String>>> {
    match v.as_slice() {
        [] => Ok(None),
        [one] if one.trim_start().starts_with('[') => serde_json::from_str(one)
            .map(Some)
            .with_context(|| format!("{what} {one}: not a JSON list of strings")),
        _ => Ok(Some(v)),
    }
}

fn key_value(what: &str, s: &str) -> Result<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.into(), v.into())),
        _ => bail!("{what} {s:?}: expected KEY=VALUE"),
    }
}

/// ~/.cache/nixforge/oci, or none inside a Nix build or without a home.
fn default_cache() -> Option<PathBuf> {
    if std::env::var_os("NIX_BUILD_TOP").is_some() {
        return None;
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("nixforge/oci"))
}

pub fn run(a: OciArgs) -> Result<()> {
    let f = a
        .config
        .as_deref()
        .map(read_config)
        .transpose()?
        .unwrap_or_default();
    let mut run = spec::RunConfig {
        entrypoint: words("--entrypoint", a.entrypoint)?.or(f.entrypoint),
        cmd: words("--cmd", a.cmd)?.or(f.cmd),
        env: f.env,
        user: a.user.or(f.user),
        workdir: a.workdir.or(f.workdir),
        ports: f.ports,
        labels: f.labels,
    };
    for e in &a.env {
        let (k, _) = key_value("--env", e)?;
        run.env.retain(|x| x.split('=').next() != Some(&k));
        run.env.push(e.clone());
    }
    run.ports.extend(a.port);
    run.ports = run
        .ports
        .iter()
        .map(|p| spec::port(p).map_err(anyhow::Error::msg))
        .collect::<Result<_>>()?;
    run.ports.sort();
    run.ports.dedup();
    for l in &a.label {
        let (k, v) = key_value("--label", l)?;
        run.labels.insert(k, v);
    }
    let users = f
        .add_users
        .iter()
        .chain(&a.add_user)
        .map(|u| custom::parse_user(u))
        .collect::<Result<Vec<_>>>()?;
    let opts = oci::Options {
        path: a.path,
        store_root: a.src.root,
        closure_info: a.src.closure_info,
        verify_nar: a.src.verify_nar,
        output: a.output,
        max_layers: a.max_layers.or(f.max_layers).unwrap_or(100),
        compression: compression(a.compression.or(f.compression).as_deref().unwrap_or("gzip"))?,
        epoch: super::epoch()?,
        run,
        tag: a.tag.or(f.tag).unwrap_or_else(|| "latest".into()),
        name: a.name.or(f.name),
        arch: a.arch.or(f.arch),
        users,
        cache: match (a.no_cache, a.cache) {
            (true, _) => None,
            (false, Some(d)) => Some(d),
            (false, None) => default_cache(),
        },
    };
    oci::check_output(&opts.output)?;
    let made = forge::output::make_parents(&opts.output)?;
    let report = oci::build(&opts, &super::Stages::new())?;
    made.keep();
    if a.json {
        crate::out!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        crate::out!("{} {}", report.manifest, report.output.display())?;
    }
    Ok(())
}
