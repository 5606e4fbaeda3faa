//! `forge sign`: the arguments, and the report.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct SignArgs {
    /// An image forge made: raw raw-efi built with --uki and/or --verity
    /// for the PE and root-hash signatures; any, with its layout manifest,
    /// for --key.
    image: PathBuf,
    /// The signed image (may be IMAGE itself: it is replaced whole, at the
    /// end); not with --key alone, which leaves the image as it is.
    #[arg(short, long, value_name = "SIGNED")]
    output: Option<PathBuf>,
    /// Sign the layout manifest with this Nix Ed25519 secret key (NAME:BASE64,
    /// as nix-store --generate-binary-cache-key writes it): IMAGE.sig, which
    /// flash --trust checks.
    #[arg(long, value_name = "KEYFILE")]
    key: Option<PathBuf>,
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
        key: a.key,
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
    if let Some((sig, key)) = &r.manifest_signature {
        crate::out!("signed the layout manifest with {key}: {}", sig.display())?;
    }
    crate::out!("wrote {}", r.image.display())?;
    Ok(())
}
