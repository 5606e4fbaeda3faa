//! Command implementations: argument types and glue to the library.

pub mod docs;
pub mod erofs;
pub mod ext4;
pub mod fat;
pub mod image;
pub mod lxc;
pub mod oci;
pub mod sign;
pub mod stages;
pub mod update;
pub mod vm;

pub use stages::Stages;

use anyhow::Result;

/// Where a command takes the closure from (image, oci, closure).
#[derive(clap::Args)]
pub struct ClosureSource {
    /// Physical root of the store: logical /nix/store/… lives at DIR/nix/store/….
    #[arg(long, default_value = "/")]
    pub root: std::path::PathBuf,
    /// Where to take the closure, its NAR hashes and sizes from (else the
    /// Nix database under --root, or scanning): nixpkgs' closureInfo
    /// output (store-paths, registration), or a JSON file of path records,
    /// such as the .attrs.json of a builder whose derivation has
    /// __structuredAttrs and exportReferencesGraph.
    #[arg(long, value_name = "PATH")]
    pub closure_info: Option<std::path::PathBuf>,
    /// Hash every NAR even where Nix recorded the hash (a Nix database or
    /// closure-info); by default only the sizes are checked and each file
    /// is read once.
    #[arg(long)]
    pub verify_nar: bool,
}

/// The keys `forge image` and `forge sign` sign with (RSA, PEM,
/// unencrypted; certificates PEM or DER). Keep them out of the Nix store:
/// build without them and `forge sign` where they are.
#[derive(clap::Args)]
pub struct SigningKeys {
    /// Sign systemd-boot (both its paths) and every UKI for Secure Boot
    /// (Authenticode) with this private key (forge image: with --uki).
    #[arg(long, value_name = "KEY", requires = "secure_boot_cert")]
    secure_boot_key: Option<std::path::PathBuf>,
    /// The X.509 certificate of --secure-boot-key.
    #[arg(long, value_name = "CERT", requires = "secure_boot_key")]
    secure_boot_cert: Option<std::path::PathBuf>,
    /// Sign the root hash into the root-verity-sig partition (a detached
    /// PKCS#7, as systemd-repart makes it) with this private key (forge
    /// image: with --verity).
    #[arg(long, value_name = "KEY", requires = "verity_cert")]
    verity_key: Option<std::path::PathBuf>,
    /// The X.509 certificate of --verity-key.
    #[arg(long, value_name = "CERT", requires = "verity_key")]
    verity_cert: Option<std::path::PathBuf>,
}

impl SigningKeys {
    pub fn secure_boot(&self) -> Option<forge::image::KeyFiles> {
        forge::image::KeyFiles::pair(self.secure_boot_key.clone(), self.secure_boot_cert.clone())
    }
    pub fn verity(&self) -> Option<forge::image::KeyFiles> {
        forge::image::KeyFiles::pair(self.verity_key.clone(), self.verity_cert.clone())
    }
}

/// Standard output, as a fallible write: a reader that went away
/// (`forge … | head`) is an error main() ends quietly on, not a panic.
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($t)*)
    }};
}

/// `123`, `4K`, `512M`, `2G`, `1T` (powers of 1024).
pub fn parse_bytes(s: &str) -> Result<u64> {
    formats::size::parse(s).map_err(anyhow::Error::msg)
}

/// A size argument for clap's `value_parser` (a bad one exits 2 with
/// clap's message).
pub fn size_arg(s: &str) -> Result<u64, String> {
    formats::size::parse(s)
}

/// A size, or a word (`auto`, `none`) in its place.
#[derive(Clone, Copy, Debug)]
pub enum WordOrSize {
    Word,
    Bytes(u64),
}

/// `word` or a size, for clap's `value_parser`.
pub fn word_or_size(s: &str, word: &str) -> Result<WordOrSize, String> {
    if s == word {
        return Ok(WordOrSize::Word);
    }
    size_arg(s)
        .map(WordOrSize::Bytes)
        .map_err(|e| format!("{e} (or {word})"))
}

/// Every timestamp in an image: SOURCE_DATE_EPOCH, or 1 (as in the Nix store).
pub fn epoch() -> Result<u32> {
    formats::time::source_date_epoch().map_err(anyhow::Error::msg)
}

/// `--sector-size`: 512 or 4096.
pub fn sector_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err(format!("{s:?}: sector size must be 512 or 4096")),
    }
}

/// The scratch directory of the running command, removed on SIGINT or
/// SIGTERM before exiting 130 or 143 (SIGKILL leaves it, hidden and named
/// for its process; the next run removes it).
pub(crate) static SCRATCH: std::sync::Mutex<Option<std::path::PathBuf>> =
    std::sync::Mutex::new(None);

pub(crate) fn watch_signals() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
            return;
        };
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let dir = SCRATCH.lock().ok().and_then(|mut d| d.take());
                if let Some(dir) = dir {
                    // Workers may still add files: try until it is gone.
                    for _ in 0..20 {
                        if std::fs::remove_dir_all(&dir).is_ok() || !dir.exists() {
                            break;
                        }
                    }
                }
                std::process::exit(128 + sig);
            }
        });
    });
}
