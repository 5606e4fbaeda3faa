//! A libvirt domain for one VM: UEFI (OVMF), virtio disks (the boot
//! overlay with its backing chain, /var, the read-only identity disk), a
//! serial console, memory, vCPUs and an optional network. The same
//! [`Domain`] value is what the tests hand to QEMU, so the XML describes
//! what was booted.

use std::fmt::Write;
use std::path::PathBuf;

#[derive(Clone, Debug)]
pub struct Disk {
    pub file: PathBuf,
    /// `qcow2` or `raw`.
    pub format: &'static str,
    /// The backing file (and its format), for an overlay.
    pub backing: Option<(PathBuf, &'static str)>,
    pub read_only: bool,
    /// `vda`, `vdb`, …
    pub target: String,
}

#[derive(Clone, Debug)]
pub struct Domain {
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub disks: Vec<Disk>,
    /// A libvirt network name (e.g. `default`).
    pub network: Option<String>,
    /// Explicit firmware paths; else libvirt picks OVMF (`firmware='efi'`).
    pub loader: Option<PathBuf>,
    pub nvram: Option<PathBuf>,
    pub secure_boot: bool,
}

/// XML text: `&`, `<`, `>`, `'` and `"` escaped.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

fn p(path: &std::path::Path) -> String {
    esc(&path.to_string_lossy())
}

impl Domain {
    pub fn xml(&self) -> String {
        let mut x = String::new();
        let w = &mut x;
        let _ = writeln!(w, "<domain type='kvm'>");
        let _ = writeln!(w, "  <name>{}</name>", esc(&self.name));
        let _ = writeln!(w, "  <memory unit='MiB'>{}</memory>", self.memory_mib);
        let _ = writeln!(w, "  <vcpu>{}</vcpu>", self.vcpus);
        let _ = writeln!(w, "  <os firmware='efi'>");
        let _ = writeln!(w, "    <type arch='x86_64' machine='q35'>hvm</type>");
        let _ = writeln!(w, "    <firmware>");
        let sb = if self.secure_boot { "yes" } else { "no" };
        let _ = writeln!(w, "      <feature enabled='{sb}' name='secure-boot'/>");
        let _ = writeln!(w, "      <feature enabled='{sb}' name='enrolled-keys'/>");
        let _ = writeln!(w, "    </firmware>");
        if let Some(l) = &self.loader {
            let _ = writeln!(
                w,
                "    <loader readonly='yes' type='pflash'>{}</loader>",
                p(l)
            );
        }
        if let Some(n) = &self.nvram {
            let _ = writeln!(w, "    <nvram>{}</nvram>", p(n));
        }
        let _ = writeln!(w, "    <boot dev='hd'/>");
        let _ = writeln!(w, "  </os>");
        let _ = writeln!(w, "  <features><acpi/></features>");
        let _ = writeln!(w, "  <devices>");
        for d in &self.disks {
            let _ = writeln!(w, "    <disk type='file' device='disk'>");
            let _ = writeln!(w, "      <driver name='qemu' type='{}'/>", d.format);
            let _ = writeln!(w, "      <source file='{}'/>", p(&d.file));
            if let Some((b, f)) = &d.backing {
                let _ = writeln!(w, "      <backingStore type='file'>");
                let _ = writeln!(w, "        <format type='{f}'/>");
                let _ = writeln!(w, "        <source file='{}'/>", p(b));
                let _ = writeln!(w, "        <backingStore/>");
                let _ = writeln!(w, "      </backingStore>");
            }
            let _ = writeln!(w, "      <target dev='{}' bus='virtio'/>", esc(&d.target));
            if d.read_only {
                let _ = writeln!(w, "      <readonly/>");
            }
            let _ = writeln!(w, "    </disk>");
        }
        if let Some(n) = &self.network {
            let _ = writeln!(w, "    <interface type='network'>");
            let _ = writeln!(w, "      <source network='{}'/>", esc(n));
            let _ = writeln!(w, "      <model type='virtio'/>");
            let _ = writeln!(w, "    </interface>");
        }
        let _ = writeln!(w, "    <serial type='pty'><target port='0'/></serial>");
        let _ = writeln!(
            w,
            "    <console type='pty'><target type='serial' port='0'/></console>"
        );
        let _ = writeln!(w, "  </devices>");
        let _ = writeln!(w, "</domain>");
        x
    }
}
