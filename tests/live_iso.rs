//! The NixOS module's `forge-iso` variant (issue 29): the live system it
//! describes, checked against the ISO forge writes with the variant's
//! arguments. The host kernel has no iso9660, so the ISO is read with
//! blkid (the label udev links by) and osirrox (its root image); the rest
//! of the live boot runs as the initrd and the module's service would, in
//! a mount namespace whose /nix is memory: the root image loop-mounted,
//! the store overlay, the database copied by the service's own script,
//! then real Nix verifies the store it sees.

use crate::nix::{module_eval, LIVE_MESSAGE};
use nixforge_tests::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

/// `blkid -p` of `path`: its udev properties.
fn udev_props(path: &Path) -> String {
    ok(Command::new("blkid").args(["-p", "-o", "udev"]).arg(path))
}

#[test]
fn the_live_system_of_the_iso_variant_is_the_iso_forge_writes() {
    let got = module_eval("{ enable = true; live = true; }", &[]);
    let fs = &got["fileSystems"];
    // The disk's file systems are replaced whole: no ESP, no state, no
    // identity (a live system has none).
    let mut mounts: Vec<&str> = fs.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    mounts.sort();
    assert_eq!(
        mounts,
        ["/", "/iso", "/nix/.ro-root", "/nix/.rw-store", "/nix/store"]
    );
    assert_eq!(fs["/"]["fsType"], "tmpfs");
    assert!(got.get("environment").is_none(), "{got}");
    assert_eq!(
        got["assertions"][4],
        json!({"assertion": true, "message": LIVE_MESSAGE})
    );
    // With systemd in the initrd, the loop file is named under /sysroot.
    let sd = module_eval(
        "{ enable = true; live = true; }",
        &["--arg", "systemdInitrd", "true"],
    );
    assert_eq!(
        sd["fileSystems"]["/nix/.ro-root"]["device"],
        "/sysroot/iso/root.img"
    );
    let bad = module_eval("{ enable = true; live = true; verity = true; }", &[]);
    assert_eq!(bad["assertions"][4]["assertion"], json!(false));

    // The ISO forge writes with the variant's arguments.
    let variant = module_eval("{ enable = true; }", &[]);
    let args =
        json_strs(&variant["image"]["modules"]["forge-iso"]["system"]["build"]["image"]["args"]);
    let out = args.iter().position(|a| *a == "--output").unwrap();
    let sys = system("x86_64");
    let d = tempfile::tempdir().unwrap();
    let iso = d.path().join("nixos.iso");
    ok(forge_image_of(&sys)
        .args(["--format", args[3]])
        .args(&args[out + 2..])
        .arg("-o")
        .arg(&iso));
    // /iso: the volume by its label, as udev links it.
    let label = fs["/iso"]["device"].as_str().unwrap();
    let props = udev_props(&iso);
    let want = format!(
        "ID_FS_LABEL={}\n",
        label.trim_start_matches("/dev/disk/by-label/")
    );
    assert!(props.contains(&want), "{props}");
    assert!(props.contains(&format!(
        "ID_FS_TYPE={}\n",
        fs["/iso"]["fsType"].as_str().unwrap()
    )));
    // /nix/.ro-root: the file the device names in the volume.
    let ro = &fs["/nix/.ro-root"];
    let in_iso = ro["device"].as_str().unwrap().strip_prefix("/iso").unwrap();
    let root_img = d.path().join("root.img");
    ok(Command::new("osirrox")
        .arg("-indev")
        .arg(format!("stdio:{}", iso.display()))
        .args(["-extract", in_iso])
        .arg(&root_img));
    let fs_type = ro["fsType"].as_str().unwrap();
    assert!(udev_props(&root_img).contains(&format!("ID_FS_TYPE={fs_type}\n")));

    let script = live_boot_script(&got, &root_img);
    let want_closure = sys.nix_store(&["-qR", &sys.toplevel]);
    let seen = ok(Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-euc"])
        .arg(format!(
            "{script}\nnix-store -qR {}\ntest -x {}/init",
            sys.toplevel, sys.toplevel
        )));
    let sorted = |s: &str| {
        let mut v: Vec<String> = s.lines().map(str::to_string).collect();
        v.sort();
        v
    };
    assert_eq!(sorted(&seen), sorted(&want_closure), "{seen}");
}

/// The live boot's mounts under a memory /nix, as the module's file
/// systems say (the root image from `root_img`, where the ISO would be
/// mounted), the database service's script when its condition holds, and
/// `nix-store --verify --check-contents` of what is then the store.
fn live_boot_script(got: &Value, root_img: &Path) -> String {
    let fs = &got["fileSystems"];
    let mount = |at: &str, device: &str| {
        let f = &fs[at];
        let opts = json_strs(&f["options"]);
        format!(
            "mkdir -p {at}\nmount -t {} -o {} {device} {at}\n",
            f["fsType"].as_str().unwrap(),
            opts.join(",")
        )
    };
    let overlay = &fs["/nix/store"]["overlay"];
    let lower = overlay["lowerdir"][0].as_str().unwrap();
    let upper = overlay["upperdir"].as_str().unwrap();
    let work = overlay["workdir"].as_str().unwrap();
    let service = &got["systemd"]["services"]["nixforge-live-db"];
    let condition = service["unitConfig"]["ConditionPathExists"]
        .as_str()
        .unwrap();
    let absent = condition
        .strip_prefix('!')
        .expect("a path that must not exist");
    format!(
        "mount -t tmpfs none /nix\n{}{}mkdir -p {upper} {work} /nix/store\n\
         mount -t overlay overlay -o lowerdir={lower},upperdir={upper},workdir={work} /nix/store\n\
         test ! -e {absent}\n{}\nnix-store --verify --check-contents",
        mount("/nix/.ro-root", &root_img.display().to_string()),
        mount(
            "/nix/.rw-store",
            fs["/nix/.rw-store"]["device"].as_str().unwrap()
        ),
        service["script"].as_str().unwrap(),
    )
}
