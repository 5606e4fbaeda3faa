//! `forge erofs`: the EROFS writer on its own, for direct use and tests.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;

use formats::erofs;
use formats::tree::{Owner, Tree, ROOT};

use forge::container;

#[derive(clap::Args)]
pub struct ErofsArgs {
    /// Directory whose contents become the filesystem's root.
    src: PathBuf,
    /// Output image file.
    #[arg(short, long)]
    output: PathBuf,
    /// Volume name (at most 16 bytes).
    #[arg(long, default_value = "")]
    label: String,
    /// Filesystem UUID (default: derived from --seed).
    #[arg(long)]
    uuid: Option<String>,
    /// Force every entry's owner, e.g. 0:0 as a Nix store wants.
    #[arg(long, value_name = "UID:GID")]
    owner: Option<String>,
    /// Seed for the UUID.
    #[arg(long, default_value = "nixforge")]
    seed: String,
}

pub fn run(a: ErofsArgs) -> Result<()> {
    let owner = Owner {
        force: a
            .owner
            .as_deref()
            .map(super::ext4::parse_owner)
            .transpose()?,
    };
    let mut opts = erofs::Options::from_seed(&a.seed, &a.label, super::epoch()?.into());
    if let Some(u) = &a.uuid {
        opts.uuid =
            formats::seed::parse_uuid(u).with_context(|| format!("--uuid {u}: not a UUID"))?;
    }
    let md = std::fs::metadata(&a.src).with_context(|| format!("{}", a.src.display()))?;
    if !md.is_dir() {
        bail!("{}: not a directory", a.src.display());
    }
    let mut tree = Tree::new(0o755);
    tree.add_host_contents(ROOT, &a.src, owner)?;
    let plan = erofs::plan(&tree, &opts)?;
    let what = || format!("writing {}", a.output.display());
    container::write_file(&a.output, plan.size_bytes(), plan.mapped(), |w| {
        plan.write(w, 0).with_context(what).map(drop)
    })?;
    eprintln!(
        "{}: {} bytes, {} inodes, uncompressed",
        a.output.display(),
        plan.size_bytes(),
        plan.inodes_used()
    );
    Ok(())
}
