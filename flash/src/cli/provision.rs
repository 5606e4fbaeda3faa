//! The provisioning options of a write, for clap; the library's
//! [`flash::provision`] decides what they mean.

use std::path::PathBuf;

use flash::provision::Provisioning;

/// The provisioning options of a write.
#[derive(clap::Args, Default)]
pub struct ProvisionArgs {
    /// An identity directory (its files go to /var/identity on the state
    /// partition): DIR for the one device, or DEV=DIR per device (DEV a
    /// path such as /dev/disk/by-id/…, or a serial number; DEV=none for a
    /// device that gets none while others do); repeatable.
    #[arg(long, value_name = "[DEV=]DIR")]
    pub identity: Vec<String>,
    /// A directory holding one identity directory per device, assigned in
    /// name order to the devices in the order given (hidden entries such
    /// as .git are skipped, and said so).
    #[arg(long, value_name = "DIR")]
    pub identities: Option<PathBuf>,
    /// Give one --identity DIR to several devices on purpose.
    #[arg(long)]
    pub same_identity: bool,
    /// Write NAME as the identity's hostname (one device).
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
    /// Generate an ed25519 SSH host key per device (the OS's randomness);
    /// its public key and fingerprint are reported.
    #[arg(long)]
    pub generate_host_keys: bool,
    /// Grow the state partition to the end of each device: the partition
    /// table rewritten and the state filesystem compiled for its new size.
    #[arg(long)]
    pub fill: bool,
    /// Probe for fake capacity even on disks not marked removable (it is
    /// on by default for removable ones).
    #[arg(long, conflicts_with = "no_probe")]
    pub probe: bool,
    /// Do not probe for fake capacity.
    #[arg(long)]
    pub no_probe: bool,
}

impl From<&ProvisionArgs> for Provisioning {
    fn from(a: &ProvisionArgs) -> Self {
        Provisioning {
            identity: a.identity.clone(),
            identities: a.identities.clone(),
            same_identity: a.same_identity,
            hostname: a.hostname.clone(),
            generate_host_keys: a.generate_host_keys,
            fill: a.fill,
            probe: a.probe,
            no_probe: a.no_probe,
        }
    }
}
