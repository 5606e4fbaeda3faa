//! `forge erofs`: the EROFS writer on its own, for direct use and tests.

use anyhow::{Context, Result};
use std::path::PathBuf;

use formats::erofs;

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
    /// none, lz4, or lz4hc[,LEVEL] (1-12, default 9): files over 4 KiB in
    /// LZ4 blocks where that saves space (Linux 5.3 and later read them).
    #[arg(long, default_value = "lz4hc", value_name = "ALGO")]
    compression: erofs::Compression,
}

pub fn run(a: ErofsArgs) -> Result<()> {
    let mut opts = erofs::Options::from_seed(&a.seed, &a.label, super::epoch()?.into());
    opts.compression = a.compression;
    if let Some(u) = &a.uuid {
        opts.uuid = super::ext4::uuid_arg(u)?;
    }
    let tree = super::ext4::source_tree(&a.src, a.owner.as_deref())?;
    let plan = erofs::plan(&tree, &opts)?;
    let what = || format!("writing {}", a.output.display());
    container::write_file(&a.output, plan.size_bytes(), plan.mapped(), |w| {
        plan.write(w, 0).with_context(what).map(drop)
    })?;
    eprintln!(
        "{}: {} bytes, {} inodes, {} of them compressed ({:?})",
        a.output.display(),
        plan.size_bytes(),
        plan.inodes_used(),
        plan.compressed_files(),
        a.compression
    );
    Ok(())
}
