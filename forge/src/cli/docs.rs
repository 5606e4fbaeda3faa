//! Shell completions and man pages from a binary's clap definition, for
//! `forge` and `flash` alike (flash includes this file: both binaries'
//! command lines are documented the same way, from one place).

use std::io::Write;
use std::path::{Path, PathBuf};

/// The completion script for `shell` on stdout.
pub fn completions(mut cmd: clap::Command, shell: clap_complete::Shell) -> std::io::Result<()> {
    let name = cmd.get_name().to_string();
    let mut out = std::io::stdout().lock();
    clap_complete::generate(shell, &mut cmd, name, &mut out);
    out.flush()
}

/// One man page per command and subcommand (`forge.1`, `forge-image.1`, …)
/// into `dir`; the files written.
pub fn man_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    page(cmd.clone(), cmd.get_name(), dir, &mut written)?;
    Ok(written)
}

fn page(
    cmd: clap::Command,
    name: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let cmd = cmd.name(name.to_string());
    let file = dir.join(format!("{name}.1"));
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut buf)?;
    std::fs::write(&file, buf)?;
    written.push(file);
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        page(
            sub.clone(),
            &format!("{name}-{}", sub.get_name()),
            dir,
            written,
        )?;
    }
    Ok(())
}
