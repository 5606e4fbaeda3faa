//! forge's progress (issue 28): on a terminal (tmux) the image's bytes,
//! an OCI image's layers and a fleet's VMs show as bars; piped (as in CI) a line per
//! stage and no escape codes; `--quiet` prints nothing.

use nixforge_tests::*;
use std::time::{Duration, Instant};

#[test]
fn forge_shows_a_bar_on_a_terminal_stage_lines_when_piped_and_nothing_with_quiet() {
    let d = tempfile::tempdir().unwrap();
    let sys = system("x86_64");
    let img = d.path().join("bar.img");
    let oci = d.path().join("app.tar");
    let (base, ids, fleet) = (
        d.path().join("base.qcow2"),
        d.path().join("ids"),
        d.path().join("fleet"),
    );
    for m in ["a", "b", "c"] {
        std::fs::create_dir_all(ids.join(m)).unwrap();
    }
    std::fs::create_dir(&fleet).unwrap();
    let forge = bin("forge");
    let (top, root) = (sys.result.display(), sys.root.display());
    let cmd = format!(
        "{f} image {top} --root {root} --format raw-efi -o {i} && {f} oci {top} --root {root} -o {o} \
         && {f} --quiet image {top} --root {root} --state-size none -o {b} \
         && {f} vm --base {b} --identities {ids} -o {fl}; echo exited $?; sleep 600",
        f = forge.display(),
        i = img.display(),
        o = oci.display(),
        b = base.display(),
        ids = ids.display(),
        fl = fleet.display()
    );
    let t = Tmux::start(&format!("forge-bar-{}", std::process::id()), &cmd);
    let start = Instant::now();
    while !t.screen().contains("exited") {
        assert!(start.elapsed() < Duration::from_secs(120), "{}", t.screen());
        std::thread::sleep(Duration::from_millis(200));
    }
    let screen = t.screen();
    assert!(screen.contains("exited 0"), "{screen}");
    let bar = screen
        .lines()
        .find(|l| l.starts_with(&format!("forge: writing {}", img.display())))
        .unwrap_or_else(|| panic!("no bar: {screen}"));
    assert!(bar.contains("[=====") && bar.contains("MiB/s"), "{bar}");
    let layers = screen
        .lines()
        .find(|l| l.starts_with(&format!("forge: layers of {}", oci.display())))
        .unwrap_or_else(|| panic!("no bar for the layers: {screen}"));
    assert!(
        layers.contains("[=====") && layers.contains("ETA"),
        "{layers}"
    );
    let vms = screen
        .lines()
        .find(|l| l.starts_with(&format!("forge: VMs in {}", fleet.display())))
        .unwrap_or_else(|| panic!("no bar for the VMs: {screen}"));
    assert!(vms.contains("[=====") && vms.contains("3/3 VMs"), "{vms}");
    assert!(screen.contains("done: "), "{screen}");
    // Piped: the stage lines, no escape codes.
    let out = forge_image_of(&sys)
        .args(["--format", "raw-efi", "-o"])
        .arg(d.path().join("piped.img"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("forge: [") && err.contains("done: "), "{err}");
    assert!(!err.contains('\u{1b}'), "escape codes when piped: {err:?}");
    // --quiet: nothing at all.
    let out = forge_image_of(&sys)
        .args(["--format", "raw-efi", "--quiet", "-o"])
        .arg(d.path().join("quiet.img"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}
