//! `forge lxc`: a system as an LXC image in the split format Incus, LXD
//! and `lxc-create -t local` import: `rootfs.tar.xz`, the root filesystem
//! forge's disk images hold (the closure, its registration and Nix
//! database, the profile links, the mount points) with `/sbin/init`
//! pointing at the system's init, as nixpkgs' LXC tarball has it; and
//! `metadata.tar.xz` holding `metadata.yaml` (architecture, creation date,
//! the system's description). The rootfs tarball alone is a Proxmox
//! container template.
//!
//! Both tarballs are deterministic (formats::tar; entries dated
//! SOURCE_DATE_EPOCH) and xz-compressed in 8 MiB blocks on every core,
//! which gives the same bytes for any thread count. They are written
//! unnamed and committed together under the directory's lock.

use anyhow::{Context, Result};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use formats::tar::TarWriter;
use formats::tree::{Node, Tree, ROOT};

use crate::closure::{self, Store};
use crate::output::AtomicOutput;
use crate::Progress;

pub const ROOTFS: &str = "rootfs.tar.xz";
pub const METADATA: &str = "metadata.tar.xz";
/// xz's block size: the unit compressed on one core.
const XZ_BLOCK: u64 = 8 << 20;

pub struct Options {
    pub system: PathBuf,
    pub store_root: PathBuf,
    pub closure_info: Option<PathBuf>,
    pub verify_nar: bool,
    /// The directory the two tarballs go into.
    pub dir: PathBuf,
    pub epoch: u32,
    /// xz preset, 0-9.
    pub xz_level: u32,
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub rootfs: PathBuf,
    pub metadata: PathBuf,
    pub architecture: String,
    pub release: String,
    pub toplevel: String,
}

/// LXC's name for a Nix system's architecture (`x86_64-linux` → `x86_64`).
pub fn architecture(system: &str) -> &str {
    system.split('-').next().unwrap_or(system)
}

/// metadata.yaml: what `lxc image import` and Incus read. Values are
/// quoted (JSON strings are YAML strings).
pub fn metadata_yaml(arch: &str, epoch: u32, release: &str, label: &str) -> String {
    let q = |s: &str| serde_json::to_string(s).expect("a string serialises");
    format!(
        "architecture: {}\ncreation_date: {epoch}\nproperties:\n  description: {}\n  os: {}\n  release: {}\n  architecture: {}\ntemplates: {{}}\n",
        q(arch),
        q(&format!("{label} {arch}")),
        q("nixos"),
        q(release),
        q(arch),
    )
}

pub fn build(o: &Options, progress: &dyn Progress) -> Result<Report> {
    let rootfs_path = o.dir.join(ROOTFS);
    let metadata_path = o.dir.join(METADATA);
    crate::output::check_dir(&rootfs_path)?;
    let opts = closure::Options {
        root: o.store_root.clone(),
        closure_info: o.closure_info.clone(),
        verify_nar: o.verify_nar,
        // root_tree checks them as it reads each path.
        sizes_later: true,
    };
    let c = closure::read_reported(&o.system, &opts, progress)?;
    let store = Store::new(&o.store_root);
    let mut root = crate::image::trees::root_tree(&store, &c, o.epoch)?;
    let sbin = root.mkdir_p(b"/sbin", 0o755)?;
    root.insert(
        sbin,
        b"init",
        Node::symlink(&format!("{}/init", c.toplevel)),
    )?;
    let spec = &c.bootspec.spec;
    let arch = architecture(&spec.system).to_string();
    let release = c
        .nixos_version(&store)
        .unwrap_or_else(|| spec.label.clone());
    let mut meta = Tree::new(0o755);
    let yaml = metadata_yaml(&arch, o.epoch, &release, &spec.label);
    meta.insert(ROOT, b"metadata.yaml", Node::bytes(yaml, 0o644))?;

    let lock = crate::output::lock_for_run(&o.dir, || {
        progress.stage(&format!("waiting for another run in {}", o.dir.display()))
    })?;
    let rootfs = tarball(&rootfs_path, &root, o)?;
    progress.stage(&format!("wrote {}", rootfs_path.display()));
    let metadata = tarball(&metadata_path, &meta, o)?;
    crate::output::commit_all(vec![rootfs, metadata], &lock)?;
    progress.stage(&format!(
        "done: {ROOTFS} and {METADATA} in {}",
        o.dir.display()
    ));
    Ok(Report {
        rootfs: rootfs_path,
        metadata: metadata_path,
        architecture: arch,
        release,
        toplevel: c.toplevel.clone(),
    })
}

/// `tree` as an xz-compressed tar at `path` (unnamed until committed).
fn tarball(path: &Path, tree: &Tree, o: &Options) -> Result<AtomicOutput> {
    let what = || format!("writing {}", path.display());
    let mut out = AtomicOutput::create(path)?;
    let stream = liblzma::stream::MtStreamBuilder::new()
        .preset(o.xz_level)
        .block_size(XZ_BLOCK)
        .threads(rayon::current_num_threads().max(1) as u32)
        .check(liblzma::stream::Check::Crc64)
        .encoder()
        .with_context(what)?;
    let file = BufWriter::with_capacity(1 << 20, out.file().try_clone().with_context(what)?);
    let xz = liblzma::write::XzEncoder::new_stream(file, stream);
    let mut tar = TarWriter::new(xz, u64::from(o.epoch));
    tar.tree(tree).with_context(what)?;
    let mut file = tar
        .finish()
        .with_context(what)?
        .finish()
        .with_context(what)?;
    file.flush().with_context(what)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_names_the_architecture_and_date_and_quotes_what_it_is_given() {
        assert_eq!(architecture("aarch64-linux"), "aarch64");
        let y = metadata_yaml("x86_64", 1700000000, "24.05.1\"x", "24.05");
        assert!(y.starts_with("architecture: \"x86_64\"\ncreation_date: 1700000000\n"));
        assert!(y.contains("  release: \"24.05.1\\\"x\"\n"), "{y}");
    }
}
