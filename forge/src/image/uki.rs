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
/// toplevel has one, else a NixOS one naming the generation; in an A/B
/// image with its image version, by which systemd-boot orders the entries.
fn os_release(store: &Store, spec: &BootSpec, version: Option<&str>) -> String {
    let own = store.physical(&format!("{}/etc/os-release", spec.toplevel));
    let text = std::fs::read_to_string(own).unwrap_or_else(|_| {
        format!(
            "NAME=NixOS\nID=nixos\nPRETTY_NAME=\"NixOS {}\"\nVERSION_ID=\"{}\"\n",
            spec.label, spec.label
        )
    });
    let Some(v) = version else { return text };
    let mut lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("IMAGE_ID=") && !l.starts_with("IMAGE_VERSION="))
        .collect();
    let image = format!("IMAGE_ID=nixos\nIMAGE_VERSION={v}");
    lines.push(&image);
    lines.join("\n") + "\n"
}

/// The kernel's release (`uname -r`), as ukify scrapes it: from an x86
/// bzImage's setup header (its version string's offset at 0x20E), else
/// after "Linux version " in the image; None when neither says.
pub fn uname(kernel: &[u8]) -> Option<String> {
    let word = |at: usize| {
        let rest = kernel.get(at..)?;
        let end = rest.iter().position(|&b| b == 0 || b == b' ')?;
        let w = std::str::from_utf8(&rest[..end]).ok()?;
        (!w.is_empty()).then(|| w.to_string())
    };
    if kernel.get(0x202..0x206) == Some(b"HdrS".as_slice()) {
        let off = u16::from_le_bytes([*kernel.get(0x20E)?, *kernel.get(0x20F)?]) as usize;
        return word(off + 0x200);
    }
    let key = b"Linux version ";
    let at = kernel.windows(key.len()).position(|w| w == key)?;
    word(at + key.len())
}

/// The EFI stub, read once for every entry.
struct Stub<'a> {
    path: &'a Path,
    bytes: Vec<u8>,
}

/// One UKI: the stub and the entry's sections, in ukify's (254) order:
/// `.osrel`, `.cmdline`, `.dtb` (the bootspec's devicetree, which the
/// stub installs for the kernel), `.uname`, `.initrd`, and `.linux` last.
fn uki(
    stub: &Stub,
    store: &Store,
    spec: &BootSpec,
    extra: &[String],
    version: Option<&str>,
) -> Result<Vec<u8>> {
    let read = |logical: &str| {
        std::fs::read(store.physical(logical)).with_context(|| format!("--uki: reading {logical}"))
    };
    let osrel = os_release(store, spec, version);
    let cmdline = command_line(spec, extra);
    let linux = read(&spec.kernel)?;
    let initrd = spec.initrd.as_deref().map(read).transpose()?;
    let dtb = spec.devicetree.as_deref().map(read).transpose()?;
    let uname = uname(&linux);
    let mut sections: Vec<(&str, &[u8])> = vec![
        (".osrel", osrel.as_bytes()),
        (".cmdline", cmdline.as_bytes()),
    ];
    if let Some(d) = &dtb {
        sections.push((".dtb", d));
    }
    if let Some(u) = &uname {
        sections.push((".uname", u.as_bytes()));
    }
    if let Some(i) = &initrd {
        sections.push((".initrd", i));
    }
    sections.push((".linux", &linux));
    formats::pe::add_sections(&stub.bytes, &sections)
        .with_context(|| format!("--uki: the EFI stub {}", stub.path.display()))
}

/// Every entry's UKI by its file name in `EFI/Linux/`: generation 1 and
/// each specialisation; in an A/B image (`version`), the system's one,
/// named for its slot with its boot tries (an update replaces one file).
pub fn ukis(
    stub: &Path,
    store: &Store,
    closure: &Closure,
    extra: &[String],
    version: Option<&str>,
) -> Result<Vec<(String, Vec<u8>)>> {
    let what = || format!("--uki: the EFI stub {}", stub.display());
    let bytes = std::fs::read(stub).with_context(what)?;
    // A signed stub's signature would not cover the sections added to it.
    let bytes = formats::sign::authenticode::unsigned(&bytes).with_context(what)?;
    let stub = Stub { path: stub, bytes };
    let boot = &closure.bootspec;
    if let Some(v) = version {
        let name = super::slots::UKI.name(v, Some(super::slots::TRIES));
        return Ok(vec![(name, uki(&stub, store, &boot.spec, extra, version)?)]);
    }
    let mut out = vec![(
        "nixos-generation-1.efi".to_string(),
        uki(&stub, store, &boot.spec, extra, None)?,
    )];
    for (name, b) in &boot.specialisations {
        let file = format!("nixos-generation-1-specialisation-{name}.efi");
        out.push((file, uki(&stub, store, &b.spec, extra, None)?));
    }
    Ok(out)
}
