//! `make demo`, the first of the two commands the README promises: it
//! forges the x86_64 fixture into the default raw-efi image and boots it
//! under OVMF (the only boot of that image in the tests).

use nixforge_tests::*;
use std::process::Command;

#[test]
fn make_demo_forges_and_boots_the_fixture() {
    // `make demo` is one of the two commands the README promises.
    let out = tempfile::tempdir().unwrap();
    let o = ok(Command::new("scripts/demo.sh")
        .current_dir(workspace())
        .arg(fixtures())
        .arg(out.path()));
    assert!(o.contains("== demo OK: the forged image booted"), "{o}");
    // The marker line of the default raw-efi image, whole.
    assert!(
        o.lines()
            .any(|l| l.trim() == "NIXFORGE-BOOT-OK root=ro var=rw table=gpt init=found"),
        "{o}"
    );
    assert!(
        o.contains("label nixos") && o.contains("(read-only)"),
        "{o}"
    );
}
