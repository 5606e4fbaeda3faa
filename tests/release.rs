//! What ships: the binaries `make build` makes (and `make install` and the
//! Nix package install) carry none of the test hooks the end-to-end tests
//! drive (`NIXFORGE_*_PAUSE`), while the test binaries do.

use nixforge_tests::*;
use std::path::PathBuf;

/// The plain release binaries' directory (`make test` names it).
fn release_dir() -> PathBuf {
    std::env::var_os("NIXFORGE_RELEASE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/release"))
}

fn has(file: &std::path::Path, needle: &[u8]) -> bool {
    let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    bytes.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn release_binaries_carry_no_pause_hooks_and_the_test_binaries_do() {
    for (name, var) in [
        ("forge", &b"NIXFORGE_FORGE_PAUSE"[..]),
        ("flash", &b"NIXFORGE_FLASH_PAUSE"[..]),
    ] {
        let shipped = release_dir().join(name);
        assert!(
            !has(&shipped, var),
            "{} holds {}",
            shipped.display(),
            String::from_utf8_lossy(var)
        );
        // The control: the same search finds the hook where it is built in.
        if std::env::var_os("NIXFORGE_RELEASE_DIR").is_some() {
            assert!(
                has(&bin(name), var),
                "{} lacks its hook",
                bin(name).display()
            );
        }
    }
}
