//! `forge sign`: the arguments, and the report.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

use forge::image::KeyFiles;

#[derive(Args)]
pub struct SignArgs {
    /// A raw raw-efi image built with --uki and/or --verity, unsigned.
    image: PathBuf,
    /// The signed image (may be IMAGE itself: it is replaced whole, at the end).
    #[arg(short, long, value_name = "SIGNED")]
    output: PathBuf,
    /// Sign systemd-boot and every UKI on the ESP (Authenticode) with this
    /// RSA private key (PEM, unencrypted).
    #[arg(long, value_name = "KEY", requires = "secure_boot_cert")]
    secure_boot_key: Option<PathBuf>,
    /// The X.509 certificate (PEM or DER) of --secure-boot-key.
    #[arg(long, value_name = "CERT", requires = "secure_boot_key")]
    secure_boot_cert: Option<PathBuf>,
    /// Sign the root hash into the image's root-verity-sig partition.
    #[arg(long, value_name = "KEY", requires = "verity_cert")]
    verity_key: Option<PathBuf>,
    /// The X.509 certificate (PEM or DER) of --verity-key.
    #[arg(long, value_name = "CERT", requires = "verity_key")]
    verity_cert: Option<PathBuf>,
    /// Print what was signed as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: SignArgs) -> Result<()> {
    let r = forge::sign::sign(&forge::sign::Options {
        image: a.image,
        output: a.output,
        secure_boot: KeyFiles::pair(a.secure_boot_key, a.secure_boot_cert),
        verity_sig: KeyFiles::pair(a.verity_key, a.verity_cert),
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
