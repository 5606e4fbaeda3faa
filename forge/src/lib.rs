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
    fn bytes(&self, _what: &str) -> Option<std::sync::Arc<dyn Bytes>> {
        None
    }
}

/// The bytes of one long step (see [`Progress::bytes`]), counted from
/// the threads doing it.
pub trait Bytes: Send + Sync {
    /// How many bytes the step will write.
    fn total(&self, n: u64);
    fn add(&self, n: u64);
    /// The step is done.
    fn done(&self);
}
