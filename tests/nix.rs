//! The Nix side, with Debian's nix-bin and no nixpkgs: every .nix file
//! parses; the NixOS module, evaluated against a stub lib and config, sets
//! exactly the options it should for each layout; forge run as the builder
//! of lib.mkImage's derivation, in the Nix sandbox, writes the same bytes
//! as forge run outside Nix; and closure JSON (exportReferencesGraph's
//! .attrs.json) as --closure-info, with its bad cases.

use nixforge_tests::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

fn nix_files() -> Vec<PathBuf> {
    let ws = workspace();
    let mut v = vec![ws.join("flake.nix"), ws.join("default.nix")];
    for d in ["nix", "tests/nix", "fixtures"] {
        for e in std::fs::read_dir(ws.join(d)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "nix") {
                v.push(p);
            }
        }
    }
    v
}

#[test]
fn every_nix_file_parses() {
    let files = nix_files();
    for f in [
        "flake.nix",
        "default.nix",
        "nix/module.nix",
        "nix/package.nix",
    ] {
        assert!(
            files.contains(&workspace().join(f)),
            "{f} is missing from the checkout"
        );
    }
    for f in &files {
        ok(Command::new("nix-instantiate").arg("--parse").arg(f));
    }
    // The README's Nix examples too.
    let d = tempfile::tempdir().unwrap();
    let readme = std::fs::read_to_string(workspace().join("README.md")).unwrap();
    let blocks: Vec<&str> = readme
        .split("```nix\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    assert!(!blocks.is_empty(), "README has no Nix example");
    for (i, b) in blocks.iter().enumerate() {
        let f = d.path().join(format!("readme-{i}.nix"));
        std::fs::write(&f, b).unwrap();
        ok(Command::new("nix-instantiate").arg("--parse").arg(&f));
    }
    // And a file that does not parse is caught (the check can fail).
    let bad = d.path().join("bad.nix");
    std::fs::write(&bad, "{ a = ; }").unwrap();
    fails(Command::new("nix-instantiate").arg("--parse").arg(&bad));
}

/// What nix/module.nix sets, through tests/nix/eval-module.nix.
fn module_config(settings: &str, host_name: &str) -> Value {
    module_config_of(settings, host_name, None)
}

/// The same, for a system with `system.image.version`.
pub(crate) fn module_config_of(settings: &str, host_name: &str, version: Option<&str>) -> Value {
    let mut args = vec!["--argstr", "hostName", host_name];
    if let Some(v) = version {
        args.extend(["--argstr", "imageVersion", v]);
    }
    module_eval(settings, &args)
}

/// What the module sets given `settings` and more of the stub's
/// arguments (`--arg NAME VALUE`, `--argstr NAME VALUE`).
pub(crate) fn module_eval(settings: &str, args: &[&str]) -> Value {
    let mut c = Command::new("nix-instantiate");
    c.args(["--eval", "--strict", "--json"])
        .arg(workspace().join("tests/nix/eval-module.nix"))
        .args(["--arg", "settings", settings])
        .args(args);
    serde_json::from_str(&ok(&mut c)).unwrap()
}

const TOPLEVEL: &str = "/nix/store/00000000000000000000000000000000-nixos-system-stub";
const FORGE: &str = "/nix/store/11111111111111111111111111111111-nixforge/bin/forge";
/// The stub's systemd package and shell (tests/nix/eval-module.nix).
pub(crate) const SYSTEMD: &str = "/nix/store/22222222222222222222222222222222-systemd";
pub(crate) const SHELL: &str = "/nix/store/33333333333333333333333333333333-bash/bin/bash";

/// An image variant as the stub evaluates it: the file's extension and the
/// derivation that runs forge.
fn variant(format: &str, ext: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "image",
        TOPLEVEL,
        "--format",
        format,
        "--closure-info",
        ".attrs.json",
        "--output",
    ];
    // `placeholder "out"`, which Nix replaces with $out in the build.
    let out =
        format!("/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9/nixos-image-stub.{ext}");
    args.push(&out);
    args.extend(extra);
    json!({
        "image": {"extension": ext},
        "system": {"build": {"image": {
            "__structuredAttrs": true,
            "args": args,
            "builder": FORGE,
            "exportReferencesGraph": {"closure": [TOPLEVEL]},
            "name": "nixos-image-stub",
            "system": "x86_64-linux",
        }}}
    })
}

fn fs(device: &str, fs_type: &str, options: &[&str]) -> Value {
    json!({"device": format!("/dev/disk/by-label/{device}"), "fsType": fs_type, "options": options})
}

/// The identity taken from /var/identity, and what a read-only root needs
/// besides (/etc as an immutable overlay, users from userborn).
fn identity(v: &mut Value, ro: bool, host_name_from_identity: bool) {
    let link = |f: &str| json!({"source": format!("/var/identity/{f}"), "mode": "direct-symlink"});
    v["environment"]["etc"]["machine-id"] = link("machine-id");
    if host_name_from_identity {
        v["environment"]["etc"]["hostname"] = link("hostname");
    }
    v["networking"]["hostName"] = json!({"default": ""});
    v["services"]["openssh"]["hostKeys"] = json!({"default": [
        {"path": "/var/identity/ssh_host_ed25519_key", "type": "ed25519"}
    ]});
    if ro {
        v["boot"]["initrd"]["systemd"]["enable"] = json!({"default": true});
        v["system"]["etc"]["overlay"] =
            json!({"enable": {"default": true}, "mutable": {"default": false}});
        v["services"]["userborn"]["enable"] = json!({"default": true});
        v["users"]["mutableUsers"] = json!({"default": false});
    }
}

fn expected(layout: &str, ro: bool) -> Value {
    let mode = if ro { "ro" } else { "rw" };
    let sd_message = "nixforge.layout = \"sd-aarch64\" needs nixforge.firmware: the Pi's firmware files, U-Boot, and the kernel= file config.txt names.";
    let erofs_message =
        "nixforge.rootFs = \"erofs\" is read-only: it needs nixforge.rootMode = \"ro\".";
    let mut v = json!({
        "assertions": [
            {"assertion": layout != "sd-aarch64", "message": sd_message},
            {"assertion": true, "message": erofs_message},
            {"assertion": true, "message": UPDATES_MESSAGE},
            {"assertion": true, "message": VERITY_MESSAGE},
            {"assertion": true, "message": LIVE_MESSAGE},
        ],
        "boot": {"loader": {"grub": {"enable": false}}},
        "fileSystems": {
            "/": fs("nixos", "ext4", &[if ro { "ro" } else { "defaults" }]),
            "/var": {"device": "/dev/disk/by-label/state", "fsType": "ext4", "neededForBoot": true},
        },
    });
    if layout == "raw-efi" {
        v["fileSystems"]["/boot"] = fs("ESP", "vfat", &["fmask=0077", "dmask=0077"]);
        v["boot"]["loader"]["systemd-boot"] = json!({"enable": true});
        v["boot"]["loader"]["efi"] = json!({"canTouchEfiVariables": false});
        v["image"]["modules"] = json!({
            "forge-raw-efi": variant("raw-efi", "img", &["--root-mode", mode]),
            "forge-qcow2": variant("raw-efi", "qcow2", &["--root-mode", mode]),
            "forge-vhd": variant("raw-efi", "vhd", &["--root-mode", mode, "--vhd-type", "dynamic"]),
            "forge-vhdx": variant("raw-efi", "vhdx", &["--root-mode", mode]),
            "forge-vmdk": variant("raw-efi", "vmdk", &["--root-mode", mode]),
            "forge-ova": variant("raw-efi", "ova", &["--root-mode", mode]),
            "forge-gce": variant("raw-efi", "tar.gz", &["--root-mode", mode]),
            "forge-iso": variant("iso", "iso", &["--root-mode", "ro", "--root-fs", "erofs"]),
        });
        // The ISO boots the live system (tests/live_iso.rs).
        v["image"]["modules"]["forge-iso"]["nixforge"] = json!({"live": true});
    } else {
        v["fileSystems"]["/boot/firmware"] = fs("FIRMWARE", "vfat", &["nofail", "noauto"]);
        v["boot"]["loader"]["generic-extlinux-compatible"] = json!({"enable": true});
        v["image"]["modules"] = json!({
            "forge-sd-aarch64": variant("sd-aarch64", "img.zst", &["--root-mode", mode]),
        });
    }
    if ro {
        identity(&mut v, true, true);
    }
    v
}

const UPDATES_MESSAGE: &str = "nixforge.updates needs layout \"raw-efi\", rootMode \"ro\", system.image.version (each version's slot is named for it) and nixforge.updates.url.";

pub(crate) const LIVE_MESSAGE: &str = "nixforge.live (the forge-iso variant) boots a raw-efi system from the ISO's root image: nixforge.updates and nixforge.verity are for disk images.";
const VERITY_MESSAGE: &str =
    "nixforge.verity checks a read-only root: it needs nixforge.rootMode = \"ro\".";

/// A sysupdate.d file as sections of keys and values.
fn ini(text: &str) -> Value {
    let mut v = json!({});
    let mut section = String::new();
    for l in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        if let Some(s) = l.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        let (k, val) = l.split_once('=').unwrap_or_else(|| panic!("{l}"));
        v[&section][k] = json!(val);
    }
    v
}

#[test]
fn the_module_updates_are_the_slots_and_transfers_forge_makes() {
    let url = "https://updates.example/nixos/";
    let settings = format!("{{ enable = true; updates = {{ enable = true; url = \"{url}\"; }}; }}");
    let got = module_config_of(&settings, "", Some("7"));
    same_transfers(&got, url, &["--uki"]);
    assert_eq!(got["assertions"][2]["assertion"], json!(true));
    assert_eq!(
        got["fileSystems"]["/"]["device"],
        "/dev/disk/by-partlabel/nixos_7"
    );
    let args = &got["image"]["modules"]["forge-raw-efi"]["system"]["build"]["image"]["args"];
    assert!(
        args.to_string()
            .ends_with(r#""--slots","2","--uki","--version","7"]"#),
        "{args}"
    );
    // The guard: sysupdate waits for the boot to be marked good.
    let unit = &got["systemd"]["services"]["systemd-sysupdate"];
    assert_eq!(unit["requires"], json!(["boot-complete.target"]));
    let cond = unit["serviceConfig"]["ExecCondition"].as_str().unwrap();
    assert!(
        cond.contains("systemd-bless-boot status) in good|clean) exit 0"),
        "{cond}"
    );

    // Compressed artefacts: the same compression on both sides.
    let xz = format!(
        "{{ enable = true; updates = {{ enable = true; url = \"{url}\"; compression = \"xz\"; }}; }}"
    );
    same_transfers(
        &module_config_of(&xz, "", Some("7")),
        url,
        &["--uki", "--compress", "xz"],
    );
    // A keyring: installed where systemd-pull looks, and every transfer
    // verifies SHA256SUMS, as forge update --sign writes them.
    let ring = "/srv/keys/import-pubring.gpg";
    let signed = format!(
        "{{ enable = true; updates = {{ enable = true; url = \"{url}\"; keyring = \"{ring}\"; }}; }}"
    );
    let got = module_config_of(&signed, "", Some("7"));
    assert_eq!(
        got["environment"]["etc"]["systemd/import-pubring.gpg"]["source"],
        json!(ring)
    );
    let d = tempfile::tempdir().unwrap();
    let (sk, _) = nix_keys_named(d.path(), "updates.example-1");
    same_transfers(&got, url, &["--uki", "--sign", sk.to_str().unwrap()]);
    // Type 1 entries: the image without --uki, the kernel, initrd and
    // entry transfers, as forge update without --uki writes them.
    let type1 = format!(
        "{{ enable = true; updates = {{ enable = true; url = \"{url}\"; bootEntry = \"type1\"; }}; }}"
    );
    let got = module_config_of(&type1, "", Some("7"));
    let args = &got["image"]["modules"]["forge-raw-efi"]["system"]["build"]["image"]["args"];
    assert!(
        args.to_string()
            .ends_with(r#""--slots","2","--version","7"]"#),
        "{args}"
    );
    same_transfers(&got, url, &[]);
    // A system whose bootspec names a devicetree (NixOS's systemd-boot
    // installDeviceTree): its transfer too.
    let sys = system("x86_64");
    let (copy, _) = store_with_devicetree(&sys);
    let got = module_eval(
        &type1,
        &[
            "--argstr",
            "imageVersion",
            "7",
            "--arg",
            "deviceTree",
            "true",
        ],
    );
    assert!(got["systemd"]["sysupdate"]["transfers"]
        .get("61-nixos-devicetree")
        .is_some());
    same_transfers_of(&got, url, &[], Path::new(&sys.toplevel), copy.path());
    // Without a version to name the slot, the module says so.
    let got = module_config_of(&settings, "", None);
    assert_eq!(got["assertions"][2]["assertion"], json!(false));
}

/// The module's transfers (in `got`) are the definitions `forge update
/// --source url` writes, given `extra` options.
fn same_transfers(got: &Value, url: &str, extra: &[&str]) {
    let sys = system("x86_64");
    same_transfers_of(got, url, extra, &sys.result, &sys.root);
}

/// The same for the system `toplevel` in the store under `root`.
fn same_transfers_of(got: &Value, url: &str, extra: &[&str], toplevel: &Path, root: &Path) {
    let d = tempfile::tempdir().unwrap();
    ok(forge()
        .arg("update")
        .arg(toplevel)
        .arg("--root")
        .arg(root)
        .args(extra)
        .args(match extra.contains(&"--uki") {
            true => &["--uki-stub", STUB][..],
            false => &[],
        })
        .args(["--version", "7", "--source", url, "-o"])
        .arg(d.path()));
    let mut files = dir_entries(&d.path().join("sysupdate.d"));
    let mut names: Vec<String> = got["systemd"]["sysupdate"]["transfers"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| format!("{k}.conf"))
        .collect();
    files.sort();
    names.sort();
    assert_eq!(files, names);
    for f in files {
        let forge_says =
            ini(&std::fs::read_to_string(d.path().join("sysupdate.d").join(&f)).unwrap());
        let mut module_says =
            got["systemd"]["sysupdate"]["transfers"][f.trim_end_matches(".conf")].clone();
        // nixpkgs' ini format writes a list space-separated.
        for section in module_says.as_object_mut().unwrap().values_mut() {
            for v in section.as_object_mut().unwrap().values_mut() {
                if let Some(list) = v.as_array() {
                    let words: Vec<&str> = list.iter().map(|w| w.as_str().unwrap()).collect();
                    *v = json!(words.join(" "));
                }
            }
        }
        assert_eq!(forge_says, module_says, "{f}");
    }
}

#[test]
fn the_module_mounts_the_verity_root_systemds_generator_opens_and_tells_forge() {
    let got = module_config("{ enable = true; verity = true; }", "");
    // systemd-veritysetup-generator names the volume of roothash= `root`
    // (ab_updates::version_2_installed runs it on an installed UKI's
    // command line).
    assert_eq!(
        got["fileSystems"]["/"],
        json!({"device": "/dev/mapper/root", "fsType": "ext4", "options": ["ro"]})
    );
    // The generator and dm-verity in a systemd initrd, which wins over
    // the identity's mkDefault.
    assert_eq!(
        got["boot"]["initrd"]["systemd"],
        json!({"enable": true, "dmVerity": {"enable": true}})
    );
    assert_eq!(got["assertions"][3]["assertion"], json!(true));
    let args = &got["image"]["modules"]["forge-qcow2"]["system"]["build"]["image"]["args"];
    assert!(
        args.to_string()
            .ends_with(r#""--root-mode","ro","--verity"]"#),
        "{args}"
    );
    let got = module_config("{ enable = true; verity = true; rootMode = \"rw\"; }", "");
    assert_eq!(got["assertions"][3]["assertion"], json!(false));
    // With updates: the root by its hash in either slot, and the root and
    // hash transfers forge update --verity writes (GUIDs in the names).
    let url = "https://updates.example/nixos";
    for (entry, extra) in [
        ("uki", &["--verity", "--uki"][..]),
        ("type1", &["--verity", "--compress", "xz"][..]),
    ] {
        let xz = if entry == "type1" {
            "compression = \"xz\";"
        } else {
            ""
        };
        let settings = format!(
            "{{ enable = true; verity = true; updates = {{ enable = true; url = \"{url}\"; bootEntry = \"{entry}\"; {xz} }}; }}"
        );
        let got = module_config_of(&settings, "", Some("7"));
        assert_eq!(got["fileSystems"]["/"]["device"], "/dev/mapper/root");
        let args = &got["image"]["modules"]["forge-raw-efi"]["system"]["build"]["image"]["args"];
        assert!(
            args.to_string().contains(r#""--verity","--slots","2","#),
            "{args}"
        );
        same_transfers(&got, url, extra);
    }
}

#[test]
fn the_module_mounts_an_erofs_root_and_tells_forge() {
    // Mounted as such, forge told so, and only read-only.
    let got = module_config("{ enable = true; rootFs = \"erofs\"; }", "");
    let mut want = expected("raw-efi", true);
    want["fileSystems"]["/"]["fsType"] = json!("erofs");
    for (k, v) in want.as_object().unwrap() {
        if k != "image" {
            assert_eq!(&got[k], v, "{k}");
        }
    }
    let args = &got["image"]["modules"]["forge-raw-efi"]["system"]["build"]["image"]["args"];
    assert!(
        args.to_string()
            .ends_with(r#""--root-mode","ro","--root-fs","erofs"]"#),
        "{args}"
    );
    let got = module_config(
        "{ enable = true; rootFs = \"erofs\"; rootMode = \"rw\"; }",
        "",
    );
    assert_eq!(got["assertions"][1]["assertion"], json!(false));
}

#[test]
fn the_module_sets_exactly_the_options_each_layout_needs() {
    assert_eq!(module_config("{ }", ""), Value::Null, "disabled: nothing");
    for layout in ["raw-efi", "sd-aarch64"] {
        for ro in [true, false] {
            let settings = format!(
                "{{ enable = true; layout = \"{layout}\"; rootMode = \"{}\"; }}",
                if ro { "ro" } else { "rw" }
            );
            assert_eq!(
                module_config(&settings, ""),
                expected(layout, ro),
                "{settings}"
            );
        }
    }
    // Firmware for the Pi: its paths reach forge, the assertion holds.
    let got = module_config(
        "{ enable = true; layout = \"sd-aarch64\"; firmware = [ \"/nix/store/22222222222222222222222222222222-raspberrypi-firmware\" \"u-boot-rpi3.bin=/nix/store/33333333333333333333333333333333-uboot/u-boot.bin\" ]; }",
        "",
    );
    assert_eq!(got["assertions"][0]["assertion"], json!(true));
    let args =
        json_strs(&got["image"]["modules"]["forge-sd-aarch64"]["system"]["build"]["image"]["args"]);
    assert_eq!(
        &args[args.len() - 6..],
        [
            "--root-mode",
            "ro",
            "--firmware",
            "/nix/store/22222222222222222222222222222222-raspberrypi-firmware",
            "--firmware",
            "u-boot-rpi3.bin=/nix/store/33333333333333333333333333333333-uboot/u-boot.bin"
        ]
    );
    // A hostname the configuration sets wins over /var/identity's.
    let mut want = expected("raw-efi", true);
    want["environment"]["etc"]
        .as_object_mut()
        .unwrap()
        .remove("hostname");
    assert_eq!(module_config("{ enable = true; }", "pi-7"), want);
    // A VM base without a state partition: no /var, no identity, and forge
    // is told so.
    let got = module_config("{ enable = true; state = false; }", "");
    assert!(got["fileSystems"].get("/var").is_none());
    assert!(got.get("environment").is_none() && got.get("users").is_none());
    let args = &got["image"]["modules"]["forge-raw-efi"]["system"]["build"]["image"]["args"];
    assert!(
        args.to_string()
            .ends_with(r#""--root-mode","ro","--state-size","none"]"#),
        "{args}"
    );
    // A VM made by forge vm: its identity disk at /var/identity.
    let got = module_config("{ enable = true; identityDisk = true; }", "");
    let mut want = expected("raw-efi", true);
    want["fileSystems"]["/var/identity"] = json!({
        "device": "/dev/disk/by-label/identity", "fsType": "ext4",
        "options": ["ro", "nofail"], "neededForBoot": true,
    });
    assert_eq!(got, want);
    // The base of a fleet: no state partition in the image, /var and the
    // identity from the VM's own disks.
    let got = module_config("{ enable = true; state = false; identityDisk = true; }", "");
    for (k, v) in want.as_object().unwrap() {
        if k != "image" {
            assert_eq!(&got[k], v, "{k}");
        }
    }
    let args = &got["image"]["modules"]["forge-qcow2"]["system"]["build"]["image"]["args"];
    assert!(
        args.to_string().ends_with(r#""--state-size","none"]"#),
        "{args}"
    );
    // Extra forge options reach every variant, after the module's own.
    let got = module_config(
        "{ enable = true; extraArgs = [ \"--disk-size\" \"8G\" ]; }",
        "",
    );
    for v in [
        "forge-raw-efi",
        "forge-qcow2",
        "forge-vhd",
        "forge-vhdx",
        "forge-vmdk",
        "forge-ova",
        "forge-gce",
        "forge-iso",
    ] {
        let args = &got["image"]["modules"][v]["system"]["build"]["image"]["args"];
        assert!(
            args.to_string().ends_with(r#""--disk-size","8G"]"#),
            "{v}: {args}"
        );
    }
}

/// The static forge the sandbox can run (`make static`).
fn static_forge() -> PathBuf {
    let p = std::env::var_os("NIXFORGE_STATIC_FORGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/x86_64-unknown-linux-gnu/release/forge"));
    assert!(
        p.exists(),
        "{}: no static forge; run `make static`",
        p.display()
    );
    p
}

/// Build `tests/nix/FILE` with nix-build in a copy of the fixture store,
/// in the sandbox, with the static forge imported as `forgeDir`; `args`
/// adds the file's other arguments. The copy (kept alive by the returned
/// directory) and the output's physical path.
fn sandbox_build(
    sys: &System,
    file: &str,
    args: &dyn Fn(&mut Command),
) -> (tempfile::TempDir, tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let store = copy_store(sys, true, false);
    let forge_dir = d.path().join("forge");
    std::fs::create_dir_all(forge_dir.join("bin")).unwrap();
    std::fs::copy(static_forge(), forge_dir.join("bin/forge")).unwrap();
    let result = d.path().join("result");
    let mut c = Command::new("nix-build");
    c.arg("--store")
        .arg(store.path())
        .arg(workspace().join("tests/nix").join(file))
        .arg("--arg")
        .arg("forgeDir")
        .arg(&forge_dir);
    args(&mut c);
    ok(c.args(["--option", "sandbox", "true"])
        .args(["--option", "build-users-group", ""])
        .args(["--option", "substituters", ""])
        .arg("-o")
        .arg(&result));
    let built = store.path().join(
        std::fs::read_link(&result)
            .unwrap()
            .to_str()
            .unwrap()
            .trim_start_matches('/'),
    );
    (d, store, built)
}

#[test]
fn forge_as_the_builder_of_a_sandboxed_nix_build_writes_the_bytes_it_writes_outside() {
    let sys = system("x86_64");
    let (d, _store, built) = sandbox_build(&sys, "sandbox-image.nix", &|c| {
        c.args(["--argstr", "toplevel", &sys.toplevel]);
    });
    let names = ["nixos.img", "nixos.img.bmap", "nixos.img.layout.json"];
    assert_eq!(dir_entries(&built), names);

    // Outside Nix: the closure from the store's database rather than
    // .attrs.json, into a directory forge creates.
    let outside = d.path().join("outside");
    ok(forge_image_of(&sys)
        .env_remove("SOURCE_DATE_EPOCH")
        .args(["--format", "raw-efi", "-o"])
        .arg(outside.join("nixos.img")));
    for n in names {
        assert_eq!(
            sha256_file(&built.join(n)),
            sha256_file(&outside.join(n)),
            "{n}"
        );
    }
    ok(Command::new("sgdisk")
        .arg("-v")
        .arg(built.join("nixos.img")));
}

#[test]
fn forge_oci_in_a_sandboxed_nix_build_writes_the_archive_it_writes_outside() {
    let sys = system("x86_64");
    let hello = ok(Command::new("sh").arg("-c").arg(format!(
        "basename {}/nix/store/*-fixture-hello-1.0",
        sys.root.display()
    )));
    let hello = format!("/nix/store/{}", hello.trim());
    let entry = format!("{hello}/bin/hello");
    let (d, _store, built) = sandbox_build(&sys, "sandbox-oci.nix", &|c| {
        c.args(["--argstr", "path", &hello]).args([
            "--arg",
            "extraArgs",
            &format!("[ \"--entrypoint\" \"{entry}\" ]"),
        ]);
    });
    assert_eq!(dir_entries(&built), ["image.tar"]);
    let outside = d.path().join("outside/image.tar");
    ok(forge()
        .env_remove("SOURCE_DATE_EPOCH")
        .args(["oci", &hello, "--root"])
        .arg(&sys.root)
        .args(["--entrypoint", &entry, "--no-cache", "-o"])
        .arg(&outside));
    assert_eq!(sha256_file(&built.join("image.tar")), sha256_file(&outside));
}

/// The fixture's closure as exportReferencesGraph writes it into
/// .attrs.json, from Nix's own database; `sri` writes every other narHash
/// as SRI (`sha256-…`, as newer Nix's path-info prints).
fn attrs_json(sys: &System, sri: bool) -> Value {
    let mut records = Vec::new();
    for (i, p) in sys.nix_store(&["-qR", &sys.toplevel]).lines().enumerate() {
        let q = |what: &str| sys.nix_store(&["-q", what, p]);
        let mut hash = q("--hash").trim().to_string();
        if sri && i % 2 == 0 {
            hash = ok(Command::new("nix")
                .args(["--extra-experimental-features", "nix-command"])
                .args(["hash", "to-sri", &hash]))
            .trim()
            .to_string();
        }
        records.push(json!({
            "path": p,
            "narHash": hash,
            "narSize": q("--size").trim().parse::<u64>().unwrap(),
            "references": q("--references").lines().collect::<Vec<_>>(),
        }));
    }
    json!({"builder": "/nix/store/x-forge/bin/forge", "closure": records})
}

fn closure_with(sys: &System, root: &Path, info: &Path, extra: &[&str]) -> Command {
    let mut c = forge();
    c.arg("closure")
        .arg(&sys.result)
        .arg("--root")
        .arg(root)
        .arg("--closure-info")
        .arg(info)
        .arg("--json")
        .args(extra);
    c
}

#[test]
fn attrs_json_is_closure_info_and_its_bad_cases_are_named() {
    let sys = system("x86_64");
    let d = tempfile::tempdir().unwrap();
    let info = d.path().join(".attrs.json");
    let write = |v: &Value| std::fs::write(&info, serde_json::to_vec(v).unwrap()).unwrap();
    let db_view: Value = serde_json::from_str(&ok(forge()
        .arg("closure")
        .arg(&sys.result)
        .arg("--root")
        .arg(&sys.root)
        .arg("--json")))
    .unwrap();
    // The database knows derivers; .attrs.json does not (nor do images).
    let mut db_view = db_view;
    for p in db_view["paths"].as_array_mut().unwrap() {
        p.as_object_mut().unwrap().remove("deriver");
    }
    write(&attrs_json(&sys, true));
    for extra in [&[][..], &["--verify-nar"][..]] {
        let got: Value =
            serde_json::from_str(&ok(&mut closure_with(&sys, &sys.root, &info, extra))).unwrap();
        assert_eq!(got["source"], json!("closure-info"));
        assert_eq!(got["paths"], db_view["paths"], "{extra:?}");
    }

    // A changed file with --verify-nar: named with its store path.
    let copy = copy_store(&sys, false, false);
    let data = ok(Command::new("sh").arg("-c").arg(format!(
        "ls -d {}/nix/store/*-fixture-data-1.0",
        copy.path().display()
    )));
    let data = data.trim();
    let f = Path::new(data).join("share/one-byte");
    std::fs::write(&f, "y").unwrap();
    let e = fails(&mut closure_with(
        &sys,
        copy.path(),
        &info,
        &["--verify-nar"],
    ));
    let store_path = format!(
        "/nix/store/{}",
        Path::new(data).file_name().unwrap().to_str().unwrap()
    );
    let e = the_error(&e);
    assert!(e.contains(&store_path) && e.contains("hash"), "{e}");

    // Another system's closure, a reference with no record, a hash that
    // is not SHA-256, and a file with no records: one line naming the file.
    let good = attrs_json(&sys, false);
    let mut other = good.clone();
    let recs = other["closure"].as_array_mut().unwrap();
    recs.retain(|r| r["path"] != json!(sys.toplevel));
    write(&other);
    let e = fails(&mut closure_with(&sys, &sys.root, &info, &[]));
    assert!(
        the_error(&e).contains("does not list") && e.contains(".attrs.json"),
        "{e}"
    );

    let mut missing = good.clone();
    let recs = missing["closure"].as_array_mut().unwrap();
    recs.retain(|r| !r["path"].as_str().unwrap().ends_with("-fixture-lib-1.0"));
    write(&missing);
    let e = fails(&mut closure_with(&sys, &sys.root, &info, &[]));
    let e = the_error(&e);
    assert!(e.contains("-fixture-lib-1.0, which has no record"), "{e}");

    let mut md5 = good.clone();
    md5["closure"][0]["narHash"] = json!("md5:0123456789abcdef0123456789abcdef");
    write(&md5);
    let e = fails(&mut closure_with(&sys, &sys.root, &info, &[]));
    assert!(the_error(&e).contains("is not a SHA-256 hash"), "{e}");

    write(&json!({"builder": "x", "closure": []}));
    let e = fails(&mut closure_with(&sys, &sys.root, &info, &[]));
    assert!(the_error(&e).contains("no list of path records"), "{e}");
}
