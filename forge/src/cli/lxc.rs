//! `forge lxc`: arguments for a system's LXC image (`forge::lxc`).

use anyhow::Result;
use std::path::PathBuf;

use forge::lxc;

#[derive(clap::Args)]
pub struct LxcArgs {
    /// Toplevel store path of the system, or a link to one (e.g. ./result).
    system: PathBuf,
    /// The directory rootfs.tar.xz and metadata.tar.xz go into (made if
    /// missing).
    #[arg(short, long, value_name = "DIR")]
    output: PathBuf,
    #[command(flatten)]
    src: super::ClosureSource,
    /// xz preset, 0 (fastest) to 9 (smallest); 6 is xz's own default.
    #[arg(long, default_value_t = 6, value_name = "N",
          value_parser = clap::value_parser!(u32).range(0..=9))]
    xz_level: u32,
    /// Print what was written as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: LxcArgs) -> Result<()> {
    let made = forge::output::make_parents(&a.output.join(lxc::ROOTFS))?;
    let o = lxc::Options {
        system: a.system,
        store_root: a.src.root,
        closure_info: a.src.closure_info,
        verify_nar: a.src.verify_nar,
        dir: a.output,
        epoch: super::epoch()?,
        xz_level: a.xz_level,
    };
    let report = lxc::build(&o, &super::Stages::new())?;
    made.keep();
    if a.json {
        crate::out!("{}", serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
