//! `forge ext4`: the ext4 writer on its own, for direct use and tests.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

use formats::ext4::{self, Owner, Size, Slack, Tree};

use forge::container;

#[derive(clap::Args)]
pub struct Ext4Args {
    /// Directory whose contents become the filesystem's root.
    src: PathBuf,
    /// Output image file.
    #[arg(short, long)]
    output: PathBuf,
    /// Filesystem size: `auto`, or bytes with an optional K/M/G/T suffix.
    #[arg(long, default_value = "auto", value_parser = |s: &str| super::word_or_size(s, "auto"))]
    size: super::WordOrSize,
    /// With --size auto: extra space, in bytes (K/M/G suffixes) or percent (`10%`).
    #[arg(long, default_value = "0", value_parser = |s: &str| parse_slack(s).map_err(|e| format!("{e:#}")))]
    slack: Slack,
    /// Filesystem label (at most 16 bytes).
    #[arg(long, default_value = "")]
    label: String,
    /// Filesystem UUID (default: derived from --seed).
    #[arg(long)]
    uuid: Option<String>,
    /// Add a jbd2 journal (the read-write "state" profile).
    #[arg(long)]
    journal: bool,
    /// Force every entry's owner, e.g. 0:0 as a Nix store wants.
    #[arg(long, value_name = "UID:GID")]
    owner: Option<String>,
    /// Seed for UUID and hash seed.
    #[arg(long, default_value = "nixforge")]
    seed: String,
    /// Print the plan and write nothing.
    #[arg(long)]
    dry_run: bool,
}

pub fn run(a: Ext4Args) -> Result<()> {
    let size = match a.size {
        super::WordOrSize::Word => Size::Auto { slack: a.slack },
        super::WordOrSize::Bytes(n) => Size::Fixed(n),
    };
    let mut opts = ext4::Options::from_seed(&a.seed, &a.label, size, a.journal, super::epoch()?);
    if let Some(u) = &a.uuid {
        opts.uuid = uuid_arg(u)?;
    }
    let tree = source_tree(&a.src, a.owner.as_deref())?;
    let plan = ext4::plan(&tree, &opts)?;
    let g = &plan.geometry;
    let summary = format!(
        "{}: {} bytes, {} blocks in {} groups, {} inodes ({} used), {} blocks used{}",
        a.output.display(),
        plan.size_bytes(),
        g.blocks,
        g.groups,
        g.inodes(),
        plan.inodes_used(),
        plan.blocks_used(),
        if g.journal_blocks > 0 {
            format!(", journal {} blocks", g.journal_blocks)
        } else {
            String::new()
        }
    );
    if a.dry_run {
        crate::out!("{summary}")?;
        return Ok(());
    }
    let what = || format!("writing {}", a.output.display());
    container::write_file(&a.output, plan.size_bytes(), plan.mapped(), |w| {
        plan.write(w, 0).with_context(what).map(drop)
    })?;
    eprintln!("{summary}");
    Ok(())
}

/// `--uuid`: a UUID in its usual text form.
pub fn uuid_arg(u: &str) -> Result<[u8; 16]> {
    formats::seed::parse_uuid(u).with_context(|| format!("--uuid {u}: not a UUID"))
}

/// The tree of directory `src`'s contents (the filesystem's root), every
/// owner forced to `--owner UID:GID` when given.
pub fn source_tree(src: &Path, owner: Option<&str>) -> Result<Tree> {
    let owner = Owner {
        force: owner.map(parse_owner).transpose()?,
    };
    let md = std::fs::metadata(src).with_context(|| format!("{}", src.display()))?;
    if !md.is_dir() {
        bail!("{}: not a directory", src.display());
    }
    let mut tree = Tree::new(0o755);
    tree.add_host_contents(ext4::ROOT, src, owner)?;
    Ok(tree)
}

/// `64M`, `10%`, or both as `10%,64M` (the larger applies).
pub fn parse_slack(s: &str) -> Result<Slack> {
    let mut slack = Slack::default();
    for part in s.split(',') {
        if let Some(p) = part.strip_suffix('%') {
            slack.percent = p
                .parse()
                .with_context(|| format!("slack {s}: bad percent"))?;
        } else {
            slack.bytes = super::parse_bytes(part).with_context(|| format!("slack {s}"))?;
        }
    }
    Ok(slack)
}

fn parse_owner(s: &str) -> Result<(u32, u32)> {
    let (u, g) = s
        .split_once(':')
        .with_context(|| format!("--owner {s}: expected UID:GID"))?;
    Ok((
        u.parse().with_context(|| format!("--owner {s}: bad uid"))?,
        g.parse().with_context(|| format!("--owner {s}: bad gid"))?,
    ))
}
