//! On-disk formats shared by `forge` (which writes images) and `flash`
//! (which writes images to devices).
//!
//! Every writer here is a *layout compiler*: it plans the whole structure
//! first (pure, testable), then streams it into a `Write + Seek` target in
//! one mostly-sequential pass. Nothing here knows about the command line.

pub mod bmap;
pub mod erofs;
pub mod ext4;
pub mod fat;
#[cfg(any(test, feature = "fuzz"))]
pub mod fuzz;
pub mod glob;
pub mod gnu_sparse;
pub mod gpt;
pub mod identity;
pub mod iso9660;
pub mod manifest;
pub mod mbr;
pub mod nar;
pub mod nixbase32;
pub mod ovf;
pub mod pe;
pub mod qcow2;
pub mod ranges;
pub mod seed;
pub mod sign;
pub mod sink;
pub mod size;
pub mod sniff;
pub mod sys;
pub mod table;
pub mod tar;
pub mod time;
pub mod tree;
pub mod verity;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;
pub mod zstd_frames;
