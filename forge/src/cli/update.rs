//! `forge update`: arguments for a version's update artefacts.

use anyhow::Result;

use super::image::ImageArgs;
use forge::update;

#[derive(clap::Args)]
#[command(mut_arg("output", |a| a.value_name("DIR").help(
    "The artefacts' directory (made when its parent exists): the root partition's \
     image (nixos_VERSION….root.raw; .raw.xz with --compress) and, with --verity, its \
     hash and signature partitions' images, the boot entry (a UKI, or a type 1 entry \
     with its kernel and initrd), SHA256SUMS of every version in it, and sysupdate.d/ \
     with --source"
)))]
pub struct UpdateArgs {
    /// Where the artefacts come from: an http(s) URL or a directory; with
    /// it, `OUTPUT/sysupdate.d/*.conf`, the transfer definitions that
    /// fetch and install them (as the NixOS module generates).
    #[arg(long, value_name = "URL|DIR")]
    source: Option<String>,
    /// The partition artefacts as xz streams (`.raw.xz`, --xz-level); the
    /// definitions match those names and sysupdate decompresses them as it
    /// installs (zst is refused: systemd-import reads zstd only from
    /// systemd 258 on).
    #[arg(long, value_parser = clap::builder::TypedValueParser::map(
        clap::builder::PossibleValuesParser::new(update::Compress::NAMES),
        |s: String| update::Compress::from_name(&s).expect("one of Compress::NAMES"),
    ))]
    compress: Option<update::Compress>,
    /// forge image's options: those that shape the root filesystem and the
    /// boot entry (--root-fs, --verity, --uki and --uki-stub, the keys,
    /// --seed, --version) must be the image's; -o is the artefacts'
    /// directory.
    #[command(flatten)]
    image: ImageArgs,
}

pub fn run(a: UpdateArgs) -> Result<()> {
    if let Some(flag) = a.image.container_only() {
        anyhow::bail!(
            "{flag}: forge update writes partition images, not a disk container \
             (--compress xz compresses them)"
        );
    }
    let json = a.image.json();
    let mut image = a.image.options()?;
    image.slots = 2;
    let dir = image.output.clone();
    let made = forge::output::make_parents(&dir.join(update::SUMS))?;
    let o = update::Options {
        image,
        dir,
        source: a.source.as_deref().map(update::Source::parse),
        compress: a.compress,
    };
    let report = update::build(&o, &super::Stages::new())?;
    made.keep();
    if json {
        crate::out!("{}", serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
