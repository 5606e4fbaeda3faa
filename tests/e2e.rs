//! The end-to-end tests, one module per file, in one test binary: run
//! one file's with `cargo test --test e2e FILE::` (e.g. `flash::`), any
//! test by a part of its name.

#[path = "ab_boots.rs"]
mod ab_boots;
#[path = "ab_updates.rs"]
mod ab_updates;
#[path = "closure.rs"]
mod closure;
#[path = "defects_flash.rs"]
mod defects_flash;
#[path = "defects_forge.rs"]
mod defects_forge;
#[path = "demo.rs"]
mod demo;
#[path = "erofs.rs"]
mod erofs;
#[path = "ext4.rs"]
mod ext4;
#[path = "flash.rs"]
mod flash;
#[path = "flash_http.rs"]
mod flash_http;
#[path = "flash_safety.rs"]
mod flash_safety;
#[path = "flash_sources.rs"]
mod flash_sources;
#[path = "fleet.rs"]
mod fleet;
#[path = "image.rs"]
mod image;
#[path = "image_safety.rs"]
mod image_safety;
#[path = "iso.rs"]
mod iso;
#[path = "live_iso.rs"]
mod live_iso;
#[path = "lxc.rs"]
mod lxc;
#[path = "nix.rs"]
mod nix;
#[path = "oci.rs"]
mod oci;
#[path = "progress.rs"]
mod progress;
#[path = "provision.rs"]
mod provision;
#[path = "release.rs"]
mod release;
#[path = "sd.rs"]
mod sd;
#[path = "signing.rs"]
mod signing;
#[path = "station.rs"]
mod station;
#[path = "trust.rs"]
mod trust;
#[path = "uki.rs"]
mod uki;
#[path = "verity.rs"]
mod verity;
#[path = "vm.rs"]
mod vm;
#[path = "vm_formats.rs"]
mod vm_formats;
