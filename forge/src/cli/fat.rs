//! `forge fat`: the FAT32 writer on its own, for direct use and tests.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;

use formats::fat;
use formats::tree::{Owner, Tree, ROOT};

use forge::container;

#[derive(clap::Args)]
pub struct FatArgs {
    /// Directory whose contents become the volume's root.
    src: PathBuf,
    /// Output image file.
    #[arg(short, long)]
    output: PathBuf,
    /// Volume size, bytes with an optional K/M/G suffix.
    #[arg(long, default_value = "256M", value_parser = super::size_arg)]
    size: u64,
    /// Volume label (at most 11 ASCII characters).
    #[arg(long, default_value = "ESP")]
    label: String,
    /// Logical sector size of the disk it is meant for.
    #[arg(long, default_value_t = 512, value_parser = super::sector_size)]
    sector_size: u32,
    /// Seed for the volume ID.
    #[arg(long, default_value = "nixforge")]
    seed: String,
}

pub fn run(a: FatArgs) -> Result<()> {
    let md = std::fs::metadata(&a.src).with_context(|| a.src.display().to_string())?;
    if !md.is_dir() {
        bail!("{}: not a directory", a.src.display());
    }
    let mut tree = Tree::new(0o755);
    tree.add_host_contents(ROOT, &a.src, Owner::default())?;
    let opts = fat::Options {
        size: a.size,
        sector_size: a.sector_size,
        label: a.label.clone(),
        volume_id: fat::volume_id(&a.seed, &a.label),
        epoch: super::epoch()?,
        hidden_sectors: 0,
    };
    let plan = fat::plan(&tree, &opts)?;
    let what = || format!("writing {}", a.output.display());
    container::write_file(&a.output, plan.size_bytes(), plan.mapped(), |w| {
        plan.write(w, 0).with_context(what).map(drop)
    })
}
