//! Unified Kernel Images (`--uki`): per boot entry, systemd's EFI stub with
//! the entry's os-release, command line, kernel and initrd as sections
//! (`formats::pe`), for `EFI/Linux/`, where systemd-boot lists them itself
//! (Boot Loader Specification type 2 entries).

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

use super::trees::command_line;
use crate::closure::{BootSpec, Closure, Store};

/// The stub: `--uki-stub`, else the one beside the system's systemd-boot.
pub fn stub_path(given: Option<&Path>, systemd_boot: &Path) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let name = systemd_boot
        .file_name()
        .map(|n| n.to_string_lossy().replace("systemd-boot", "linux") + ".stub")
        .unwrap_or_default();
    let p = systemd_boot.with_file_name(&name);
    if !p.is_file() {
        anyhow::bail!(
            "--uki: no EFI stub beside the system's systemd-boot ({}); give one with --uki-stub",
            p.display()
        );
    }
    Ok(p)
}

/// What a UKI says of itself (`.osrel`): the system's os-release if its
/// toplevel has one, else a NixOS one naming the generation.
fn os_release(store: &Store, spec: &BootSpec) -> String {
    let own = store.physical(&format!("{}/etc/os-release", spec.toplevel));
    std::fs::read_to_string(own).unwrap_or_else(|_| {
        format!(
            "NAME=NixOS\nID=nixos\nPRETTY_NAME=\"NixOS {}\"\nVERSION_ID=\"{}\"\n",
            spec.label, spec.label
        )
    })
}

/// The EFI stub, read once for every entry.
struct Stub<'a> {
    path: &'a Path,
    bytes: Vec<u8>,
}

/// One UKI: the stub and the entry's sections, in ukify's order.
fn uki(stub: &Stub, store: &Store, spec: &BootSpec, extra: &[String]) -> Result<Vec<u8>> {
    let read = |logical: &str| {
        std::fs::read(store.physical(logical)).with_context(|| format!("--uki: reading {logical}"))
    };
    let osrel = os_release(store, spec);
    let cmdline = command_line(spec, extra);
    let linux = read(&spec.kernel)?;
    let initrd = spec.initrd.as_deref().map(read).transpose()?;
    let mut sections: Vec<(&str, &[u8])> = vec![
        (".osrel", osrel.as_bytes()),
        (".cmdline", cmdline.as_bytes()),
        (".linux", &linux),
    ];
    if let Some(i) = &initrd {
        sections.push((".initrd", i));
    }
    formats::pe::add_sections(&stub.bytes, &sections)
        .with_context(|| format!("--uki: the EFI stub {}", stub.path.display()))
}

/// Every entry's UKI by its file name in `EFI/Linux/`: generation 1 and
/// each specialisation.
pub fn ukis(
    stub: &Path,
    store: &Store,
    closure: &Closure,
    extra: &[String],
) -> Result<Vec<(String, Vec<u8>)>> {
    let what = || format!("--uki: the EFI stub {}", stub.display());
    let bytes = std::fs::read(stub).with_context(what)?;
    // A signed stub's signature would not cover the sections added to it.
    let bytes = formats::sign::authenticode::unsigned(&bytes).with_context(what)?;
    let stub = Stub { path: stub, bytes };
    let boot = &closure.bootspec;
    let mut out = vec![(
        "nixos-generation-1.efi".to_string(),
        uki(&stub, store, &boot.spec, extra)?,
    )];
    for (name, b) in &boot.specialisations {
        let file = format!("nixos-generation-1-specialisation-{name}.efi");
        out.push((file, uki(&stub, store, &b.spec, extra)?));
    }
    Ok(out)
}
