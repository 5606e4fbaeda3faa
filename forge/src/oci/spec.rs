//! The image's JSON documents: the config, the manifest, the OCI layout's
//! index, and docker's `manifest.json` for archives. Keys are sorted and
//! the JSON compact, so equal inputs give equal digests.

use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

use super::blob::{hex, Blob};

pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// What runs, as the image config's `config` says it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunConfig {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: Vec<String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    /// `8080/tcp`, `53/udp`.
    pub ports: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

/// `PORT[/tcp|udp|sctp]` as the config's ExposedPorts key.
pub fn port(s: &str) -> Result<String, String> {
    let (num, proto) = s.split_once('/').unwrap_or((s, "tcp"));
    let ok_num = num.parse::<u16>().is_ok_and(|n| n > 0) && !num.starts_with('0');
    if !ok_num || !["tcp", "udp", "sctp"].contains(&proto) {
        return Err(format!(
            "--port {s:?}: expected PORT[/tcp|udp|sctp] with PORT in 1-65535"
        ));
    }
    Ok(format!("{num}/{proto}"))
}

/// `2024-01-02T03:04:05Z` for a Unix time.
pub fn rfc3339(unix: u32) -> String {
    let (y, m, d, s) = formats::time::civil(i64::from(unix));
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// `sha256:<hex>`.
pub fn digest(b: &Blob) -> String {
    format!("sha256:{}", hex(&b.digest))
}

pub struct Platform {
    pub architecture: String,
    pub variant: Option<String>,
}

/// Docker/OCI names for a Nix system double's CPU.
pub fn platform(system: &str) -> Option<Platform> {
    let cpu = system.split('-').next()?;
    let (a, v) = match cpu {
        "x86_64" => ("amd64", None),
        "aarch64" => ("arm64", Some("v8")),
        "i686" => ("386", None),
        "armv7l" => ("arm", Some("v7")),
        "armv6l" => ("arm", Some("v6")),
        "riscv64" => ("riscv64", None),
        "powerpc64le" => ("ppc64le", None),
        "s390x" => ("s390x", None),
        _ => return None,
    };
    Some(Platform {
        architecture: a.into(),
        variant: v.map(String::from),
    })
}

pub struct Layer<'a> {
    pub blob: &'a Blob,
    /// What the layer holds, for the history.
    pub comment: String,
}

pub fn config(run: &RunConfig, p: &Platform, created: &str, layers: &[Layer]) -> Vec<u8> {
    let mut c = Map::new();
    let mut put = |k: &str, v: Value| {
        c.insert(k.into(), v);
    };
    if let Some(e) = &run.entrypoint {
        put("Entrypoint", json!(e));
    }
    if let Some(e) = &run.cmd {
        put("Cmd", json!(e));
    }
    if !run.env.is_empty() {
        put("Env", json!(run.env));
    }
    if let Some(u) = &run.user {
        put("User", json!(u));
    }
    if let Some(w) = &run.workdir {
        put("WorkingDir", json!(w));
    }
    if !run.ports.is_empty() {
        let ports: BTreeMap<&str, Value> =
            run.ports.iter().map(|p| (p.as_str(), json!({}))).collect();
        put("ExposedPorts", json!(ports));
    }
    if !run.labels.is_empty() {
        put("Labels", json!(run.labels));
    }
    let mut doc = json!({
        "created": created,
        "architecture": p.architecture,
        "os": "linux",
        "config": c,
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| format!("sha256:{}", hex(&l.blob.diff_id))).collect::<Vec<_>>(),
        },
        "history": layers.iter().map(|l| json!({
            "created": created,
            "created_by": "forge oci",
            "comment": l.comment,
        })).collect::<Vec<_>>(),
    });
    if let Some(v) = &p.variant {
        doc["variant"] = json!(v);
    }
    serde_json::to_vec(&doc).expect("JSON of plain values")
}

fn descriptor(media: &str, b: &Blob) -> Value {
    json!({"mediaType": media, "digest": digest(b), "size": b.size})
}

pub fn manifest(
    config: &Blob,
    layers: &[(&Blob, &str)],
    annotations: &BTreeMap<String, String>,
) -> Vec<u8> {
    let doc = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": descriptor(CONFIG, config),
        "layers": layers.iter().map(|(b, media)| descriptor(media, b)).collect::<Vec<_>>(),
        "annotations": annotations,
    });
    serde_json::to_vec(&doc).expect("JSON of plain values")
}

pub fn index(manifest: &Blob, p: &Platform, tag: &str) -> Vec<u8> {
    let mut d = descriptor(MANIFEST, manifest);
    d["platform"] = json!({"architecture": p.architecture, "os": "linux"});
    if let Some(v) = &p.variant {
        d["platform"]["variant"] = json!(v);
    }
    d["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
    let doc = json!({"schemaVersion": 2, "mediaType": INDEX, "manifests": [d]});
    serde_json::to_vec(&doc).expect("JSON of plain values")
}

pub const LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// docker's `manifest.json` (as `docker save` writes beside the OCI
/// layout since Docker 25), for `docker-archive:` and `podman load`.
pub fn docker_manifest(config: &Blob, layers: &[&Blob], repo_tag: &str) -> Vec<u8> {
    let path = |b: &Blob| format!("blobs/sha256/{}", hex(&b.digest));
    let doc = json!([{
        "Config": path(config),
        "RepoTags": [repo_tag],
        "Layers": layers.iter().map(|b| path(b)).collect::<Vec<_>>(),
    }]);
    serde_json::to_vec(&doc).expect("JSON of plain values")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_checked() {
        assert_eq!(port("8080").unwrap(), "8080/tcp");
        assert_eq!(port("53/udp").unwrap(), "53/udp");
        for bad in ["0", "65536", "http", "80/icmp", "", "/tcp", "080", "-1"] {
            assert!(port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(1), "1970-01-01T00:00:01Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
