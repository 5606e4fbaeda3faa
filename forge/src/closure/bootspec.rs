//! The NixOS bootspec (`boot.json`, `org.nixos.bootspec.v1`, RFC 0125).
//!
//! Where a system has no `boot.json`, one is synthesized from the toplevel's
//! `kernel`, `initrd`, `init`, `kernel-params`, `nixos-version` and
//! `system` files, as bootspec's own `synthesize` tool does.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::store::Store;

pub const V1: &str = "org.nixos.bootspec.v1";
pub const SPECIALISATION_V1: &str = "org.nixos.specialisation.v1";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BootSpec {
    pub system: String,
    pub init: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    pub kernel: String,
    pub kernel_params: Vec<String>,
    pub label: String,
    pub toplevel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devicetree: Option<String>,
}

/// A system's bootspec and those of its specialisations.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Boot {
    pub spec: BootSpec,
    /// `org.nixos.systemd-boot.sortKey` when present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sort_key: Option<String>,
    pub specialisations: BTreeMap<String, Boot>,
    /// True when there was no boot.json and this was synthesized.
    pub synthesized: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BootSpecError {
    #[error("{file}: {err}")]
    Io { file: PathBuf, err: std::io::Error },
    #[error("{file}: malformed JSON: {err}")]
    Json {
        file: PathBuf,
        err: serde_json::Error,
    },
    #[error("{file}: no \"{V1}\" document (found keys: {found}); only bootspec v1 is understood")]
    Version { file: PathBuf, found: String },
    #[error("{file}: {field}: {problem}")]
    Field {
        file: PathBuf,
        field: String,
        problem: String,
    },
    #[error("{file}: missing, and the system has no {what} to synthesize a bootspec from")]
    Missing { file: PathBuf, what: String },
}

/// Read the bootspec of the toplevel `toplevel` (logical path).
pub fn read(store: &Store, toplevel: &str) -> Result<Boot, BootSpecError> {
    let file = store.physical(&format!("{toplevel}/boot.json"));
    match std::fs::read(&file) {
        Ok(bytes) => {
            let v: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|err| BootSpecError::Json {
                    file: file.clone(),
                    err,
                })?;
            parse_document(&file, &v, "")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => synthesize(store, toplevel, &file),
        Err(err) => Err(BootSpecError::Io { file, err }),
    }
}

fn parse_document(file: &Path, v: &serde_json::Value, prefix: &str) -> Result<Boot, BootSpecError> {
    let obj = v.as_object().ok_or_else(|| BootSpecError::Field {
        file: file.to_owned(),
        field: prefix.trim_end_matches('.').to_string(),
        problem: "not a JSON object".into(),
    })?;
    let doc = obj.get(V1).ok_or_else(|| BootSpecError::Version {
        file: file.to_owned(),
        found: obj.keys().cloned().collect::<Vec<_>>().join(", "),
    })?;
    let mut spec = parse_v1(file, doc, &format!("{prefix}{V1}"))?;
    // NixOS's systemd-boot builder reads these from its extension.
    let ext = |k: &str| {
        obj.get("org.nixos.systemd-boot")
            .and_then(|s| s.get(k))
            .and_then(|s| s.as_str())
            .map(str::to_string)
    };
    let sort_key = ext("sortKey");
    if let Some(dt) = ext("devicetree") {
        spec.devicetree = Some(dt);
    }
    let mut specialisations = BTreeMap::new();
    if let Some(sp) = obj.get(SPECIALISATION_V1) {
        let field = format!("{prefix}{SPECIALISATION_V1}");
        let sp = sp.as_object().ok_or_else(|| BootSpecError::Field {
            file: file.to_owned(),
            field: field.clone(),
            problem: "not a JSON object".into(),
        })?;
        for (name, doc) in sp {
            let b = parse_document(file, doc, &format!("{field}.{name}."))?;
            specialisations.insert(name.clone(), b);
        }
    }
    Ok(Boot {
        spec,
        sort_key,
        specialisations,
        synthesized: false,
    })
}

fn parse_v1(file: &Path, doc: &serde_json::Value, field: &str) -> Result<BootSpec, BootSpecError> {
    let bad = |f: &str, problem: String| BootSpecError::Field {
        file: file.to_owned(),
        field: format!("{field}.{f}"),
        problem,
    };
    let obj = doc
        .as_object()
        .ok_or_else(|| bad("", "not a JSON object".into()))?;
    let string = |f: &str, required: bool| -> Result<Option<String>, BootSpecError> {
        match obj.get(f) {
            None | Some(serde_json::Value::Null) if !required => Ok(None),
            None => Err(bad(f, "missing".into())),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(bad(f, format!("expected a string, found {other}"))),
        }
    };
    let req = |f: &str| string(f, true).map(|s| s.unwrap_or_default());
    // Fields are checked in bootspec's order, so the first problem is named.
    let system = req("system")?;
    let init = req("init")?;
    let initrd = string("initrd", false)?;
    let kernel = req("kernel")?;
    let kernel_params = match obj.get("kernelParams") {
        None => return Err(bad("kernelParams", "missing".into())),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|p| {
                p.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad("kernelParams", format!("expected strings, found {p}")))
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => {
            return Err(bad(
                "kernelParams",
                format!("expected a list, found {other}"),
            ))
        }
    };
    let spec = BootSpec {
        system,
        init,
        initrd,
        kernel,
        kernel_params,
        label: req("label")?,
        toplevel: req("toplevel")?,
        devicetree: string("devicetree", false)?,
    };
    for (f, v) in [
        ("init", &spec.init),
        ("kernel", &spec.kernel),
        ("toplevel", &spec.toplevel),
    ] {
        if super::store::store_path_of(v).is_none() {
            return Err(bad(f, format!("{v:?} is not in the Nix store")));
        }
    }
    Ok(spec)
}

fn synthesize(store: &Store, toplevel: &str, file: &Path) -> Result<Boot, BootSpecError> {
    let link = |name: &str| -> Result<String, BootSpecError> {
        let p = store.physical(&format!("{toplevel}/{name}"));
        match std::fs::read_link(&p) {
            Ok(t) => Ok(t.to_string_lossy().into_owned()),
            Err(_) if p.exists() => Ok(format!("{toplevel}/{name}")),
            Err(_) => Err(BootSpecError::Missing {
                file: file.to_owned(),
                what: name.to_string(),
            }),
        }
    };
    let text = |name: &str| -> Option<String> {
        std::fs::read_to_string(store.physical(&format!("{toplevel}/{name}")))
            .ok()
            .map(|s| s.trim().to_string())
    };
    let kernel = link("kernel")?;
    let init = link("init")?;
    let initrd = link("initrd").ok();
    let system = text("system").ok_or_else(|| BootSpecError::Missing {
        file: file.to_owned(),
        what: "system".into(),
    })?;
    let kernel_params = text("kernel-params")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let version = text("nixos-version").unwrap_or_else(|| "unknown".into());
    Ok(Boot {
        spec: BootSpec {
            system,
            init,
            initrd,
            kernel,
            kernel_params,
            label: format!("NixOS {version}"),
            toplevel: toplevel.to_string(),
            devicetree: None,
        },
        sort_key: None,
        specialisations: BTreeMap::new(),
        synthesized: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(v1: serde_json::Value) -> serde_json::Value {
        serde_json::json!({ V1: v1 })
    }

    fn good() -> serde_json::Value {
        let t = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system";
        serde_json::json!({
            "system": "x86_64-linux", "init": format!("{t}/init"),
            "initrd": "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-initrd/initrd",
            "kernel": "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-linux/bzImage",
            "kernelParams": ["console=ttyS0"], "label": "NixOS", "toplevel": t,
        })
    }

    #[test]
    fn arbitrary_and_mutated_documents_never_panic() {
        let mut base = doc(good());
        base[SPECIALISATION_V1] = serde_json::json!({ "debug": doc(good()) });
        let text = serde_json::to_string(&base).unwrap();
        formats::fuzz::run("bootspec::parse_document", 3000, |r| {
            let mut b = text.clone().into_bytes();
            r.mutate(&mut b, 4);
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b) {
                let _ = parse_document(Path::new("boot.json"), &v, "");
            }
            // Valid JSON with fields of the wrong kinds.
            let mut v = base.clone();
            let wrong = [
                serde_json::json!(null),
                serde_json::json!(7),
                serde_json::json!([]),
                serde_json::json!({}),
                serde_json::json!("x"),
                serde_json::json!(["/nix/store"]),
            ];
            for k in [
                "system",
                "init",
                "initrd",
                "kernel",
                "kernelParams",
                "label",
                "toplevel",
            ] {
                if r.below(3) == 0 {
                    v[V1][k] = wrong[r.below(wrong.len())].clone();
                }
            }
            let _ = parse_document(Path::new("boot.json"), &v, "");
        });
    }

    #[test]
    fn parses_v1_with_specialisation() {
        let mut d = doc(good());
        d[SPECIALISATION_V1] = serde_json::json!({ "debug": doc(good()) });
        let b = parse_document(Path::new("boot.json"), &d, "").unwrap();
        assert_eq!(b.spec.kernel_params, vec!["console=ttyS0"]);
        assert_eq!(b.specialisations.len(), 1);
    }

    #[test]
    fn devicetree_comes_from_the_systemd_boot_extension() {
        let mut d = doc(good());
        d["org.nixos.systemd-boot"] = serde_json::json!({ "sortKey": "b", "devicetree": "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-dtbs/x.dtb" });
        let b = parse_document(Path::new("boot.json"), &d, "").unwrap();
        assert_eq!(b.sort_key.as_deref(), Some("b"));
        assert_eq!(
            b.spec.devicetree.as_deref(),
            Some("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-dtbs/x.dtb")
        );
    }

    #[test]
    fn wrong_version_names_keys() {
        let d = serde_json::json!({ "org.nixos.bootspec.v2": good() });
        let e = parse_document(Path::new("/x/boot.json"), &d, "").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("/x/boot.json") && msg.contains("org.nixos.bootspec.v2"),
            "{msg}"
        );
    }

    #[test]
    fn missing_and_mistyped_fields_are_named() {
        let mut g = good();
        g.as_object_mut().unwrap().remove("kernel");
        let e = parse_document(Path::new("b.json"), &doc(g), "").unwrap_err();
        assert!(
            e.to_string()
                .contains("org.nixos.bootspec.v1.kernel: missing"),
            "{e}"
        );
        let mut g = good();
        g["kernelParams"] = serde_json::json!("console=ttyS0");
        let e = parse_document(Path::new("b.json"), &doc(g), "").unwrap_err();
        assert!(
            e.to_string().contains("kernelParams: expected a list"),
            "{e}"
        );
        let mut g = good();
        g["init"] = serde_json::json!("/sbin/init");
        let e = parse_document(Path::new("b.json"), &doc(g), "").unwrap_err();
        assert!(
            e.to_string()
                .contains("init: \"/sbin/init\" is not in the Nix store"),
            "{e}"
        );
    }
}
