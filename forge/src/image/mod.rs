//! `forge image`: closure → filesystem trees → plans → partition table →
//! one pass into a sparse temporary file → bmap → rename into place.

pub mod trees;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Instant;

use formats::{bmap, ext4, fat, gpt, seed};

use crate::closure::{self, Closure, Store};

pub const ALIGN: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// GPT + FAT32 ESP with systemd-boot + ext4 root + ext4 state (UEFI).
    RawEfi,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RootMode {
    /// Read-only root without a journal (GPT read-only attribute set).
    Ro,
    /// Journaled, writable root, for systems that rebuild in place.
    Rw,
}

pub struct Options {
    pub system: PathBuf,
    pub store_root: PathBuf,
    pub format: Format,
    pub output: PathBuf,
    pub seed: Option<String>,
    pub esp_size: u64,
    pub root_size: ext4::Size,
    pub root_mode: RootMode,
    pub state_size: u64,
    pub sector_size: u32,
    pub loader_timeout: u32,
    pub epoch: u32,
    pub hash_partitions: bool,
}

#[derive(Serialize)]
pub struct PartitionReport {
    pub number: u32,
    pub name: String,
    pub type_guid: String,
    pub guid: String,
    pub offset: u64,
    pub size: u64,
    pub filesystem: &'static str,
    pub label: String,
    pub fs_uuid: String,
    pub fs_size: u64,
    pub read_only: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

#[derive(Serialize)]
pub struct Report {
    pub image: PathBuf,
    pub bmap: PathBuf,
    pub format: &'static str,
    pub size: u64,
    pub sector_size: u32,
    pub disk_guid: String,
    pub mapped_bytes: u64,
    pub toplevel: String,
    pub closure_paths: usize,
    pub partitions: Vec<PartitionReport>,
}

/// Stage lines on stderr: one per stage, with elapsed time.
struct Progress(Instant);
impl Progress {
    fn stage(&self, what: &str) {
        eprintln!("forge: [{:6.2}s] {what}", self.0.elapsed().as_secs_f64());
    }
}

fn align(n: u64) -> u64 {
    n.next_multiple_of(ALIGN)
}

pub fn build(o: &Options) -> Result<Report> {
    let p = Progress(Instant::now());
    let store = Store::new(&o.store_root);
    let c: Closure = closure::read(
        &o.system,
        &closure::Options {
            root: o.store_root.clone(),
            closure_info: None,
        },
    )
    .with_context(|| format!("reading the closure of {}", o.system.display()))?;
    p.stage(&format!(
        "closure: {} paths, {} bytes",
        c.paths.len(),
        c.total_nar_size()
    ));
    let system = c.bootspec.spec.system.as_str();
    let Some(arch) = trees::efi_arch(system) else {
        bail!("{}: system {system:?} cannot boot from a raw-efi image (x86_64-linux and aarch64-linux can; sd-aarch64 is for Raspberry Pis)", c.toplevel);
    };
    let root_type = if system == "x86_64-linux" {
        gpt::types::ROOT_X86_64
    } else {
        gpt::types::ROOT_AARCH64
    };
    let sd_boot = trees::find_systemd_boot(&store, &c, &arch)?;
    let mut specs = vec![&c.bootspec.spec];
    specs.extend(c.bootspec.specialisations.values().map(|b| &b.spec));
    for s in &specs {
        trees::check_efi_stub(&store.physical(&s.kernel), &s.kernel)?;
    }
    let seed = o.seed.clone().unwrap_or_else(|| c.toplevel.clone());
    let ss = o.sector_size as u64;

    // Plans: everything is decided before a byte is written.
    let esp_tree = trees::esp_tree(&store, &c, &sd_boot, &arch, o.epoch, o.loader_timeout)?;
    let esp_off = ALIGN;
    let esp_opts = fat::Options {
        size: o.esp_size,
        sector_size: o.sector_size,
        label: "ESP".into(),
        volume_id: crate::cli::fat::volume_id(&seed, "ESP"),
        epoch: o.epoch,
        hidden_sectors: (esp_off / ss) as u32,
    };
    let esp = fat::plan(&esp_tree, &esp_opts).context("planning the ESP (--esp-size)")?;
    let root_tree = trees::root_tree(&store, &c)?;
    let rw = o.root_mode == RootMode::Rw;
    let root_opts = ext4::Options::from_seed(&seed, "nixos", o.root_size, rw, o.epoch);
    let root =
        ext4::plan(&root_tree, &root_opts).context("planning the root filesystem (--root-size)")?;
    let state_tree = ext4::Tree::new(0o755);
    let state_opts = ext4::Options::from_seed(
        &seed,
        "state",
        ext4::Size::Fixed(o.state_size),
        true,
        o.epoch,
    );
    let state = ext4::plan(&state_tree, &state_opts)
        .context("planning the state filesystem (--state-size)")?;
    p.stage(&format!(
        "planned: ESP {} bytes, root {} bytes ({} inodes), state {} bytes",
        esp.size_bytes(),
        root.size_bytes(),
        root.inodes_used(),
        state.size_bytes()
    ));

    let root_off = align(esp_off + o.esp_size);
    let state_off = align(root_off + root.size_bytes());
    let end = align(state_off + o.state_size) + ALIGN;
    let guid = |what: &str| seed::uuid(&seed, &format!("gpt:{what}"));
    let part = |ty: &str, name: &str, off: u64, size: u64, attrs: u64| gpt::Partition {
        type_guid: seed::parse_uuid(ty).expect("constant GUIDs parse"),
        guid: guid(name),
        first_lba: off / ss,
        last_lba: (off + size) / ss - 1,
        attributes: attrs,
        name: name.to_string(),
    };
    let table = gpt::Gpt {
        sector: ss,
        disk_sectors: end / ss,
        disk_guid: guid("disk"),
        partitions: vec![
            part(gpt::types::ESP, "ESP", esp_off, o.esp_size, 0),
            part(
                root_type,
                "nixos",
                root_off,
                align(root.size_bytes()),
                if rw { 0 } else { gpt::ATTR_READ_ONLY },
            ),
            part(gpt::types::VAR, "state", state_off, align(o.state_size), 0),
        ],
    };

    let mut out = crate::cli::output::AtomicOutput::create(&o.output)?;
    let tmp = out.temp_path().to_owned();
    out.file()
        .set_len(end)
        .with_context(|| format!("sizing {}", tmp.display()))?;
    let mut mapped: Vec<(u64, u64)> = Vec::new();
    let primary = table.primary();
    write_at(out.file(), 0, &primary)
        .with_context(|| format!("writing the GPT to {}", tmp.display()))?;
    mapped.push((0, primary.len() as u64));
    let (boff, backup) = table.backup();
    write_at(out.file(), boff, &backup)
        .with_context(|| format!("writing the backup GPT to {}", tmp.display()))?;
    mapped.push((boff, backup.len() as u64));
    let w = esp
        .write(out.file(), esp_off)
        .with_context(|| format!("writing the ESP into {}", tmp.display()))?;
    mapped.extend(w.mapped.iter().map(|&(s, l)| (s + esp_off, l)));
    p.stage("wrote the ESP");
    let w = root
        .write(out.file(), root_off)
        .with_context(|| format!("writing the root filesystem into {}", tmp.display()))?;
    mapped.extend(w.mapped.iter().map(|&(s, l)| (s + root_off, l)));
    p.stage("wrote the root filesystem");
    let w = state
        .write(out.file(), state_off)
        .with_context(|| format!("writing the state filesystem into {}", tmp.display()))?;
    mapped.extend(w.mapped.iter().map(|&(s, l)| (s + state_off, l)));
    p.stage("wrote the state filesystem");

    let bmap_path = bmap_path_for(&o.output);
    let bmap_text = bmap::create(out.file(), end, &mapped)
        .with_context(|| format!("reading back {}", tmp.display()))?;
    let mapped_bytes: u64 = bmap::blocks(&mapped)
        .iter()
        .map(|r| (r.1 - r.0 + 1) * bmap::BLOCK)
        .sum();
    let mut reports = Vec::new();
    let fs = [
        (
            "vfat",
            "ESP".to_string(),
            format!("{:08X}", esp_opts.volume_id),
            esp.size_bytes(),
        ),
        (
            "ext4",
            "nixos".to_string(),
            seed::format_uuid(&root_opts.uuid),
            root.size_bytes(),
        ),
        (
            "ext4",
            "state".to_string(),
            seed::format_uuid(&state_opts.uuid),
            state.size_bytes(),
        ),
    ];
    for (i, (pt, (fstype, label, fsuuid, fssize))) in table.partitions.iter().zip(fs).enumerate() {
        let (off, size) = (pt.first_lba * ss, (pt.last_lba + 1 - pt.first_lba) * ss);
        let sha256 = if o.hash_partitions {
            Some(hash_range(out.file(), off, size)?)
        } else {
            None
        };
        reports.push(PartitionReport {
            number: i as u32 + 1,
            name: pt.name.clone(),
            type_guid: seed::format_uuid(&pt.type_guid),
            guid: seed::format_uuid(&pt.guid),
            offset: off,
            size,
            filesystem: fstype,
            label,
            fs_uuid: fsuuid,
            fs_size: fssize,
            read_only: pt.attributes & gpt::ATTR_READ_ONLY != 0,
            sha256,
        });
    }
    let mut bout = crate::cli::output::AtomicOutput::create(&bmap_path)?;
    std::io::Write::write_all(bout.file(), bmap_text.as_bytes())
        .with_context(|| format!("writing {}", bmap_path.display()))?;
    out.commit()?;
    bout.commit()?;
    p.stage(&format!(
        "done: {} ({end} bytes, {mapped_bytes} mapped) and {}",
        o.output.display(),
        bmap_path.display()
    ));
    Ok(Report {
        image: o.output.clone(),
        bmap: bmap_path,
        format: "raw-efi",
        size: end,
        sector_size: o.sector_size,
        disk_guid: seed::format_uuid(&table.disk_guid),
        mapped_bytes,
        toplevel: c.toplevel.clone(),
        closure_paths: c.paths.len(),
        partitions: reports,
    })
}

/// `disk.img` → `disk.img.bmap`; `nixos.img.zst` → `nixos.img.bmap`.
pub fn bmap_path_for(out: &std::path::Path) -> PathBuf {
    let s = out.to_string_lossy();
    let base = s.strip_suffix(".zst").unwrap_or(&s);
    PathBuf::from(format!("{base}.bmap"))
}

fn write_at(f: &mut File, off: u64, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    f.write_all_at(data, off)
}

fn hash_range(f: &mut File, off: u64, size: u64) -> Result<String> {
    let mut h = Sha256::new();
    f.seek(SeekFrom::Start(off))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = (buf.len() as u64).min(left) as usize;
        f.read_exact(&mut buf[..n])?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(format!("{:x}", h.finalize()))
}
