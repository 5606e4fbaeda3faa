//! nixforge's image compiler: closure → filesystem trees → layout →
//! container. The command line lives in the `forge` binary (`main.rs`,
//! `cli/`); nothing here parses arguments or prints.

pub mod assemble;
pub mod closure;
pub mod container;
pub mod image;
pub mod inspect;
pub mod layout;
pub mod lxc;
pub mod nixdb;
pub mod oci;
pub mod output;
pub mod sign;
pub mod unpack;
pub mod update;
pub mod verity_check;
pub mod vm;

/// Where a library reports progress; the binaries decide how to show it.
pub trait Progress {
    /// A stage of the work is done.
    fn stage(&self, what: &str);
    /// Something the user should know that does not stop the work.
    fn warn(&self, _what: &str) {}
    /// A scratch directory the work is filling, to remove if the process
    /// is interrupted (None: no longer any).
    fn scratch(&self, _dir: Option<&std::path::Path>) {}
    /// A count of the bytes a long step (`what`) writes, for a bar; None
    /// when nobody watches.
    fn bytes(&self, _what: &str) -> Option<std::sync::Arc<dyn Meter>> {
        None
    }
    /// A count of the things (`unit`: "VMs") a long step makes, for a
    /// bar; None when nobody watches.
    fn items(&self, _what: &str, _unit: &str) -> Option<std::sync::Arc<dyn Meter>> {
        None
    }
}

/// How far one long step is (see [`Progress::bytes`], [`Progress::items`]),
/// counted from the threads doing it.
pub trait Meter: Send + Sync {
    /// How many bytes (or items) the step will make.
    fn total(&self, n: u64);
    fn add(&self, n: u64);
    /// The step is done.
    fn done(&self);
}
