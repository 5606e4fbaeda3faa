//! `forge oci` judged by skopeo, umoci, podman, nix-store and a real
//! registry (Debian's docker-registry on 127.0.0.1, started here and
//! stopped after).

use nixforge_tests::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const HELLO: &str = "fixture-hello-1.0";

/// The fixture's hello program: a store path with a small closure.
fn hello(sys: &System) -> String {
    let out = ok(Command::new("sh").arg("-c").arg(format!(
        "basename {}/nix/store/*-{HELLO}",
        sys.root.display()
    )));
    format!("/nix/store/{}", out.trim())
}

fn oci(root: &Path, path: &str, out: &Path) -> Command {
    let mut c = forge();
    c.arg("oci")
        .arg(path)
        .arg("--root")
        .arg(root)
        .arg("-o")
        .arg(out);
    c
}

fn json_of(cmd: &mut Command) -> Value {
    serde_json::from_str(&ok(cmd)).unwrap()
}

#[test]
fn skopeo_and_umoci_read_the_layout_and_the_entrypoint_runs_in_the_unpacked_rootfs() {
    let sys = system("x86_64");
    let hello = hello(&sys);
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("img");
    let report = json_of(
        oci(&sys.root, &hello, &out)
            .args(["--entrypoint", &format!("{hello}/bin/hello")])
            .args([
                "--env",
                "GREETING=hi",
                "--port",
                "8080/tcp",
                "--port",
                "53/udp",
            ])
            .args(["--label", "org.example.app=hello", "--add-user", "app:1000"])
            .args(["--no-cache", "--json"]),
    );
    let layers = report["layers"].as_array().unwrap();
    // Three store paths, each its own layer, and the customisation layer.
    assert_eq!(layers.len(), 4, "{report}");
    let inspect = json_of(
        Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci:{}", out.display())),
    );
    assert_eq!(inspect["Architecture"], "amd64");
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 4);
    assert_eq!(inspect["Digest"], report["manifest"]);
    let config = json_of(
        Command::new("skopeo")
            .args(["inspect", "--config"])
            .arg(format!("oci:{}", out.display())),
    );
    let c = &config["config"];
    assert_eq!(
        c["Entrypoint"],
        serde_json::json!([format!("{hello}/bin/hello")])
    );
    assert_eq!(
        c["Env"],
        serde_json::json!([format!("PATH={hello}/bin:/bin:/usr/bin"), "GREETING=hi"])
    );
    assert_eq!(
        c["ExposedPorts"],
        serde_json::json!({"53/udp": {}, "8080/tcp": {}})
    );
    assert_eq!(c["Labels"]["org.example.app"], "hello");
    assert_eq!(config["created"], "1970-01-01T00:00:01Z");
    assert_eq!(config["history"].as_array().unwrap().len(), 4);

    let bundle = d.path().join("bundle");
    ok(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:latest", out.display()))
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    let closure = sys.nix_store(&["-qR", &hello]);
    for p in closure.lines() {
        ok(Command::new("diff")
            .arg("-r")
            .arg("--no-dereference")
            .arg(sys.physical(p))
            .arg(rootfs.join(p.trim_start_matches('/'))));
    }
    let ran = ok(Command::new("chroot")
        .arg(&rootfs)
        .arg(format!("{hello}/bin/hello")));
    assert_eq!(ran, "hello\n");
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(
        passwd.contains("app:x:1000:1000:app:/home/app:"),
        "{passwd}"
    );
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let tmp = std::fs::metadata(rootfs.join("tmp")).unwrap();
    assert_eq!(tmp.permissions().mode() & 0o7777, 0o1777);
    assert_eq!(
        std::fs::metadata(rootfs.join("home/app")).unwrap().uid(),
        1000
    );

    // Nix, reading the image's own database.
    let store = rootfs.to_str().unwrap();
    ok(Command::new("nix-store").args(["--store", store, "--verify", "--check-contents"]));
    let sorted = |s: String| {
        let mut v: Vec<String> = s.lines().map(String::from).collect();
        v.sort();
        v
    };
    assert_eq!(
        sorted(ok(
            Command::new("nix-store").args(["--store", store, "-qR", &hello])
        )),
        sorted(closure.clone())
    );
    for p in closure.lines() {
        for q in ["--hash", "--references"] {
            assert_eq!(
                sorted(ok(
                    Command::new("nix-store").args(["--store", store, "-q", q, p])
                )),
                sorted(sys.nix_store(&["-q", q, p])),
                "{q} {p}"
            );
        }
    }
}

#[test]
fn the_archive_is_read_by_skopeo_as_docker_archive_and_by_podman_load() {
    let sys = system("x86_64");
    let hello = hello(&sys);
    let d = tempfile::tempdir().unwrap();
    let tar = d.path().join("app.tar");
    let report = json_of(
        oci(&sys.root, &hello, &tar)
            .args(["--entrypoint", &format!("{hello}/bin/hello")])
            .args(["--name", "hello", "--tag", "v1", "--no-cache", "--json"]),
    );
    assert_eq!(dir_entries(d.path()), ["app.tar"]);
    let copied = d.path().join("copied");
    ok(Command::new("skopeo")
        .arg("copy")
        .arg(format!("docker-archive:{}", tar.display()))
        .arg(format!("oci:{}:x", copied.display())));
    let layers = json_of(
        Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci:{}:x", copied.display())),
    );
    assert_eq!(
        layers["Layers"].as_array().unwrap().len(),
        report["layers"].as_array().unwrap().len()
    );
    // The OCI side of the same archive.
    let oci_side = json_of(
        Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci-archive:{}", tar.display())),
    );
    assert_eq!(oci_side["Digest"], report["manifest"]);
    // podman, with its own storage in the test's directory.
    let podman = |args: &[&str]| {
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(d.path().join("podman/root"))
            .arg("--runroot")
            .arg(d.path().join("podman/run"))
            .args(["--storage-driver", "vfs"])
            .args(args);
        c
    };
    let loaded = ok(&mut podman(&["load", "-i", tar.to_str().unwrap()]));
    assert!(loaded.contains("Loaded image"), "{loaded}");
    let images = ok(&mut podman(&[
        "images",
        "--format",
        "{{.Digest}} {{.Repository}}:{{.Tag}}",
    ]));
    assert!(
        images.contains(report["manifest"].as_str().unwrap()),
        "{images} vs {}",
        report["manifest"]
    );
    // Named as given (the index's ref.name), not localhost/v1:latest.
    assert!(images.contains(" localhost/hello:v1"), "{images}");
}

/// A store of `n` paths in a deep graph (path i refers to i+1..i+3; the
/// top to the first ten), found by scanning: no Nix needed.
fn synthetic_store(root: &Path, n: usize) -> Vec<String> {
    const ALPHA: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let name = |i: usize| {
        // Unique: the first two characters are i in base 32.
        let h: String = (0..32)
            .map(|k| match k {
                0 => ALPHA[i / 32 % 32],
                1 => ALPHA[i % 32],
                _ => ALPHA[(k * 13) % 32],
            } as char)
            .collect();
        format!("/nix/store/{h}-p{i:03}")
    };
    let paths: Vec<String> = (0..n).map(name).collect();
    for (i, p) in paths.iter().enumerate() {
        let dir = root.join(p.trim_start_matches('/'));
        std::fs::create_dir_all(dir.join("share")).unwrap();
        let mut text = format!("path {i}\n").repeat(1 + i * 3);
        let refs: Vec<usize> = if i == 0 {
            (1..11).collect()
        } else {
            (i + 1..(i + 4).min(n)).collect()
        };
        for r in refs {
            text.push_str(&format!("needs {}\n", paths[r]));
        }
        std::fs::write(dir.join("share/data"), text).unwrap();
    }
    paths
}

struct Registry {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Registry {
    fn start(dir: &Path) -> Registry {
        let port = free_port();
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let log = dir.join("registry.log");
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
            .stderr(Stdio::from(
                std::fs::File::options().append(true).open(&log).unwrap(),
            ))
            .spawn()
            .expect("docker-registry (scripts/deps.sh installs it)");
        await_listening(&mut child, port, "docker-registry", &log);
        Registry { child, port, log }
    }
    /// Blob uploads completed so far (each a PUT that ends an upload).
    fn uploads(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .filter(|l| {
                l.contains("\"PUT /v2/") && l.contains("/blobs/uploads/") && l.contains("\" 201 ")
            })
            .count()
    }
    fn push(&self, layout: &Path) {
        ok(Command::new("skopeo")
            .args(["copy", "--dest-tls-verify=false"])
            .arg(format!("oci:{}", layout.display()))
            .arg(format!("docker://127.0.0.1:{}/app:t", self.port)));
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn digests_hold_across_threads_layers_stay_in_budget_and_a_push_sends_only_changed_layers() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("store");
    let paths = synthetic_store(&root, 300);
    let build = |out: &Path, cache: &Path, threads: &str| {
        json_of(
            oci(&root, &paths[0], out)
                .env("RAYON_NUM_THREADS", threads)
                .args(["--max-layers", "100", "--json", "--cache"])
                .arg(cache),
        )
    };
    let one = build(&d.path().join("a"), &d.path().join("cache-a"), "1");
    let two = build(&d.path().join("b"), &d.path().join("cache-b"), "2");
    assert_eq!(one["manifest"], two["manifest"]);
    let layers = one["layers"].as_array().unwrap();
    assert!(
        layers.len() <= 100 && layers.len() >= 90,
        "{}",
        layers.len()
    );
    let in_layers: usize = layers
        .iter()
        .map(|l| l["paths"].as_array().unwrap().len())
        .sum();
    assert_eq!(in_layers, 300);
    // And at most 100 as the layout says, by skopeo.
    let inspect = json_of(
        Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci:{}", d.path().join("a").display())),
    );
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), layers.len());

    let reg = Registry::start(d.path());
    reg.push(&d.path().join("a"));
    let first = reg.uploads();
    assert_eq!(first, layers.len() + 1, "every layer and the config");
    reg.push(&d.path().join("a"));
    assert_eq!(reg.uploads(), first, "the same image again uploads nothing");

    // Change one path that has a layer of its own: rebuilt with the cache,
    // only its layer and the customisation layer (its Nix database) differ.
    let own = layers
        .iter()
        .find(|l| {
            l["paths"].as_array().unwrap().len() == 1
                && !l["paths"][0].as_str().unwrap().ends_with("p000")
        })
        .unwrap();
    let changed = own["paths"][0].as_str().unwrap();
    let f = root
        .join(changed.trim_start_matches('/'))
        .join("share/data");
    let mut text = std::fs::read_to_string(&f).unwrap();
    text.push_str("changed\n");
    std::fs::write(&f, text).unwrap();
    let again = build(&d.path().join("a"), &d.path().join("cache-a"), "2");
    let new_layers = again["layers"].as_array().unwrap();
    let differ: Vec<&Value> = new_layers
        .iter()
        .filter(|l| !layers.iter().any(|o| o["digest"] == l["digest"]))
        .collect();
    assert_eq!(differ.len(), 2, "{differ:?}");
    let rebuilt = new_layers.iter().filter(|l| l["cached"] == false).count();
    assert_eq!(
        rebuilt, 2,
        "only the changed layer and the customisation layer were compressed"
    );
    reg.push(&d.path().join("a"));
    assert_eq!(
        reg.uploads(),
        first + 3,
        "the two changed layers and the config"
    );
}

#[test]
fn bad_input_is_one_line_and_leaves_nothing() {
    let sys = system("x86_64");
    let hello = hello(&sys);
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("img");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--add-user", "root:1000"], "clashes with user root"),
        (vec!["--add-user", "toor:0"], "clashes with user root"),
        (vec!["--port", "99999"], "--port \"99999\""),
        (vec!["--port", "80/icmp"], "--port \"80/icmp\""),
        (
            vec!["--compression", "lz4"],
            "--compression \"lz4\": unknown",
        ),
        (vec!["--max-layers", "1"], "--max-layers 1"),
        (vec!["--tag=-x"], "--tag \"-x\""),
        (vec!["--name", "Hello World"], "--name \"Hello World\""),
    ];
    for (args, want) in cases {
        let e = fails(oci(&sys.root, &hello, &out).args(&args).arg("--no-cache"));
        assert!(the_error(&e).contains(want), "{args:?}: {e}");
        assert!(
            dir_entries(d.path()).is_empty(),
            "{args:?}: {:?}",
            dir_entries(d.path())
        );
    }
    // Not in a store; and an output that is something else.
    let e = fails(&mut oci(&sys.root, "/tmp", &out));
    assert!(the_error(&e).contains("/tmp"), "{e}");
    assert!(dir_entries(d.path()).is_empty());
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("mine"), "keep").unwrap();
    let e = fails(oci(&sys.root, &hello, &out).arg("--no-cache"));
    assert!(the_error(&e).contains("is not an OCI image layout"), "{e}");
    assert_eq!(dir_entries(&out), ["mine"]);
    assert_eq!(dir_entries(d.path()), ["img"]);
}

#[test]
fn a_config_file_sets_what_options_do_and_options_win_zstd_on_request() {
    let sys = system("x86_64");
    let hello = hello(&sys);
    let d = tempfile::tempdir().unwrap();
    let toml = d.path().join("image.toml");
    std::fs::write(
        &toml,
        format!(
            "entrypoint = [\"{hello}/bin/hello\"]\nenv = [\"A=1\", \"B=2\"]\nports = [\"80\"]\n\
             add-users = [\"app:1000:100\"]\ncompression = \"zstd:19\"\ntag = \"v2\"\n\
             labels = {{ \"org.example\" = \"file\" }}\n"
        ),
    )
    .unwrap();
    let out = d.path().join("img");
    ok(oci(&sys.root, &hello, &out)
        .arg("--config")
        .arg(&toml)
        .args([
            "--env",
            "B=3",
            "--label",
            "org.example=option",
            "--no-cache",
        ]));
    let config = json_of(
        Command::new("skopeo")
            .args(["inspect", "--config"])
            .arg(format!("oci:{}:v2", out.display())),
    );
    let c = &config["config"];
    assert_eq!(c["Entrypoint"][0], format!("{hello}/bin/hello"));
    assert_eq!(
        c["Env"],
        serde_json::json!([format!("PATH={hello}/bin:/bin:/usr/bin"), "A=1", "B=3"])
    );
    assert_eq!(c["ExposedPorts"], serde_json::json!({"80/tcp": {}}));
    assert_eq!(c["Labels"]["org.example"], "option");
    // zstd layers: skopeo copies them (umoci 0.4 cannot unpack zstd).
    let raw = json_of(
        Command::new("skopeo")
            .args(["inspect", "--raw"])
            .arg(format!("oci:{}:v2", out.display())),
    );
    for l in raw["layers"].as_array().unwrap() {
        assert_eq!(
            l["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+zstd"
        );
        let blob = out
            .join("blobs/sha256")
            .join(l["digest"].as_str().unwrap().trim_start_matches("sha256:"));
        ok(Command::new("zstd").arg("-tq").arg(&blob));
    }
    ok(Command::new("skopeo")
        .arg("copy")
        .arg(format!("oci:{}:v2", out.display()))
        .arg(format!("dir:{}", d.path().join("dir").display())));
    // An unknown key in the file: one line naming the file and the key.
    std::fs::write(&toml, "bogus = 1\n").unwrap();
    let e = fails(
        oci(&sys.root, &hello, &d.path().join("other"))
            .arg("--config")
            .arg(&toml),
    );
    let e = the_error(&e);
    assert!(e.contains("image.toml") && e.contains("bogus"), "{e}");
}

#[test]
fn interrupted_forge_oci_leaves_no_output_and_a_kill_only_its_scratch_which_the_next_run_removes() {
    let sys = system("x86_64");
    let hello = hello(&sys);
    for (signal, out_name) in [("INT", "img"), ("TERM", "app.tar"), ("KILL", "img")] {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join(out_name);
        let mut child = spawn_paused(oci(&sys.root, &hello, &out).arg("--no-cache"), "layers:");
        // Every layer is written by now, in the scratch directory.
        assert_eq!(dir_entries(d.path()).len(), 1, "{signal}");
        ok(Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string()));
        let status = child.wait().unwrap();
        let left = dir_entries(d.path());
        if signal == "KILL" {
            assert_eq!(left.len(), 1);
            assert!(
                left[0].starts_with(".img.") && left[0].ends_with(".tmp"),
                "{left:?}"
            );
            ok(oci(&sys.root, &hello, &out).arg("--no-cache"));
            assert_eq!(
                dir_entries(d.path()),
                ["img"],
                "the next run removed the scratch"
            );
        } else {
            let code = if signal == "INT" { 130 } else { 143 };
            assert_eq!(status.code(), Some(code), "SIG{signal}");
            assert!(left.is_empty(), "SIG{signal} left {left:?}");
        }
    }
}
