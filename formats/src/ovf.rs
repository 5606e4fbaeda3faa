//! The OVF 1.0 descriptor of an OVA: one virtual machine with UEFI
//! firmware, 2 virtual CPUs, 2 GiB of memory, a SATA (AHCI) controller
//! holding one streamOptimized VMDK, and one NAT network adapter (E1000).
//! The CIM elements of each hardware item are in the schema's
//! (alphabetical) order; VMware reads the firmware from its `vmw:Config`.

/// What the descriptor says about the machine and its disk.
pub struct Machine<'a> {
    /// The machine's name (escaped here).
    pub name: &'a str,
    /// The VMDK's name in the archive.
    pub disk_file: &'a str,
    /// The VMDK's length in bytes.
    pub file_size: u64,
    /// The disk's virtual size in bytes.
    pub capacity: u64,
    /// Bytes of the disk the VMDK holds data for.
    pub populated: u64,
}

pub const CPUS: u32 = 2;
pub const MEMORY_MIB: u32 = 2048;

/// `s` with XML's special characters as entities.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c => o.push(c),
        }
    }
    o
}

fn item(fields: &[(&str, String)]) -> String {
    let mut s = String::from("      <Item>\n");
    for (k, v) in fields {
        s.push_str(&format!("        <rasd:{k}>{v}</rasd:{k}>\n"));
    }
    s.push_str("      </Item>\n");
    s
}

/// The virtual hardware: CPUs, memory, the SATA controller, the disk on
/// it, the network adapter.
fn hardware() -> String {
    let s = |v: &str| v.to_string();
    [
        item(&[
            ("AllocationUnits", s("hertz * 10^6")),
            ("Description", s("Number of Virtual CPUs")),
            ("ElementName", format!("{CPUS} virtual CPU(s)")),
            ("InstanceID", s("1")),
            ("ResourceType", s("3")),
            ("VirtualQuantity", CPUS.to_string()),
        ]),
        item(&[
            ("AllocationUnits", s("byte * 2^20")),
            ("Description", s("Memory Size")),
            ("ElementName", format!("{MEMORY_MIB}MB of memory")),
            ("InstanceID", s("2")),
            ("ResourceType", s("4")),
            ("VirtualQuantity", MEMORY_MIB.to_string()),
        ]),
        item(&[
            ("Address", s("0")),
            ("Description", s("SATA Controller")),
            ("ElementName", s("sataController0")),
            ("InstanceID", s("3")),
            ("ResourceSubType", s("vmware.sata.ahci")),
            ("ResourceType", s("20")),
        ]),
        item(&[
            ("AddressOnParent", s("0")),
            ("ElementName", s("disk0")),
            ("HostResource", s("ovf:/disk/vmdisk1")),
            ("InstanceID", s("4")),
            ("Parent", s("3")),
            ("ResourceType", s("17")),
        ]),
        item(&[
            ("AutomaticAllocation", s("true")),
            ("Connection", s("nat")),
            ("ElementName", s("ethernet0")),
            ("InstanceID", s("5")),
            ("ResourceSubType", s("E1000")),
            ("ResourceType", s("10")),
        ]),
    ]
    .concat()
}

/// The descriptor's text.
pub fn descriptor(m: &Machine) -> String {
    let name = escape(m.name);
    let file = escape(m.disk_file);
    let items = hardware();
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:href="{file}" ovf:id="file1" ovf:size="{size}"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="{capacity}" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" ovf:populatedSize="{populated}"/>
  </DiskSection>
  <NetworkSection>
    <Info>The list of logical networks</Info>
    <Network ovf:name="nat">
      <Description>The nat network</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="{name}">
    <Info>A virtual machine</Info>
    <Name>{name}</Name>
    <OperatingSystemSection ovf:id="101" vmw:osType="other5xLinux64Guest">
      <Info>The kind of installed guest operating system</Info>
      <Description>NixOS (64-bit)</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-14</vssd:VirtualSystemType>
      </System>
{items}      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#,
        size = m.file_size,
        capacity = m.capacity,
        populated = m.populated,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_escaped_and_sizes_stated() {
        let d = descriptor(&Machine {
            name: "a<b&c",
            disk_file: "x.vmdk",
            file_size: 123,
            capacity: 1 << 30,
            populated: 65536,
        });
        assert!(d.contains("<Name>a&lt;b&amp;c</Name>"));
        assert!(d.contains(r#"ovf:size="123""#) && d.contains(r#"ovf:capacity="1073741824""#));
        assert!(d.contains(r#"ovf:populatedSize="65536""#));
        assert_eq!(d.matches("<Item>").count(), 5);
    }
}
