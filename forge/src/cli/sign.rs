//! `forge sign`: the arguments, and the report.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct SignArgs {
    /// A raw raw-efi image built with --uki and/or --verity, unsigned.
    image: PathBuf,
    /// The signed image (may be IMAGE itself: it is replaced whole, at the end).
    #[arg(short, long, value_name = "SIGNED")]
    output: PathBuf,
    #[command(flatten)]
    keys: super::SigningKeys,
    /// Print what was signed as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: SignArgs) -> Result<()> {
    let r = forge::sign::sign(&forge::sign::Options {
        image: a.image,
        output: a.output,
        secure_boot: a.keys.secure_boot(),
        verity_sig: a.keys.verity(),
    })?;
    if a.json {
        crate::out!("{}", serde_json::to_string_pretty(&r)?)?;
        return Ok(());
    }
    for f in &r.signed {
        crate::out!("signed {f}")?;
    }
    if let Some(h) = &r.root_hash {
        crate::out!("signed root hash {h}")?;
    }
    crate::out!("wrote {}", r.image.display())?;
    Ok(())
}
