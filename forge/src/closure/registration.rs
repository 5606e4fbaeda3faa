//! Nix's "validity registration" text, as written by `nix-store --dump-db`
//! and closureInfo, and read by `nix-store --load-db`. Per path:
//! path, narHash, narSize, deriver (empty line if none), the number of
//! references, then the references, one per line.

use std::collections::BTreeMap;
use std::path::Path;

use super::{ClosureError, Graph, Node, PathInfo};
use formats::nar::format_hash;

/// The registration text; with `derivers` false every deriver line is
/// empty (what an image carries: forge knows derivers only from a Nix
/// database, and the image's bytes must not depend on how the closure was
/// found).
pub fn render(paths: &[PathInfo], derivers: bool) -> String {
    let mut s = String::new();
    for p in paths {
        s.push_str(&p.path);
        s.push('\n');
        s.push_str(&format_hash(&p.nar_hash));
        s.push('\n');
        s.push_str(&p.nar_size.to_string());
        s.push('\n');
        if derivers {
            s.push_str(p.deriver.as_deref().unwrap_or(""));
        }
        s.push('\n');
        s.push_str(&p.references.len().to_string());
        s.push('\n');
        for r in &p.references {
            s.push_str(r);
            s.push('\n');
        }
    }
    s
}

/// One record of a registration file.
pub struct Record {
    pub path: String,
    pub hash: String,
    pub nar_size: Option<u64>,
    pub deriver: Option<String>,
    pub references: Vec<String>,
}

pub fn parse(text: &str, file: &Path) -> Result<Vec<Record>, ClosureError> {
    let mut lines = text.lines().enumerate();
    let mut out = Vec::new();
    let err = |n: usize, problem: &str| ClosureError::ClosureInfo {
        file: file.to_owned(),
        problem: format!("line {}: {problem}", n + 1),
    };
    while let Some((n, path)) = lines.next() {
        if path.is_empty() {
            continue;
        }
        if super::store::store_path_of(path).as_deref() != Some(path) {
            return Err(err(n, &format!("{path:?} is not a store path")));
        }
        let mut field = |what: &str| {
            lines
                .next()
                .map(|(_, l)| l.to_string())
                .ok_or_else(|| err(n, &format!("record for {path} ends before its {what}")))
        };
        let hash = field("narHash")?;
        let nar_size = field("narSize")?.parse().ok();
        let deriver = field("deriver")?;
        let count: usize = field("reference count")?
            .parse()
            .map_err(|_| err(n, &format!("bad reference count in record for {path}")))?;
        // The count is the file's word: reserve no more than is sane.
        let mut references = Vec::with_capacity(count.min(1 << 12));
        for _ in 0..count {
            references.push(field("references")?);
        }
        out.push(Record {
            path: path.to_string(),
            hash,
            nar_size,
            deriver: (!deriver.is_empty()).then_some(deriver),
            references,
        });
    }
    Ok(out)
}

/// Read what `--closure-info` names: nixpkgs' `closureInfo` output
/// directory, or a JSON file of path records (see [`read_json`]).
pub(super) fn read_closure_info(path: &Path) -> Result<Graph, ClosureError> {
    if path.is_dir() {
        read_closure_info_dir(path)
    } else {
        read_json(path)
    }
}

/// Path records as JSON: the `.attrs.json` a builder finds in its build
/// directory when its derivation has `__structuredAttrs = true` and
/// `exportReferencesGraph` (what closureInfo itself is made from, so a
/// builder needs no jq), or a list as `nix path-info --json --recursive`
/// prints it. Every list of records `{path, narHash, narSize, references}`
/// at the top level is taken; together they are the closure.
fn read_json(file: &Path) -> Result<Graph, ClosureError> {
    use serde_json::Value;
    let err = |problem: String| ClosureError::ClosureInfo {
        file: file.to_owned(),
        problem,
    };
    let text = std::fs::read(file).map_err(|e| err(e.to_string()))?;
    let v: Value = serde_json::from_slice(&text)
        .map_err(|e| err(format!("neither a closureInfo directory nor JSON: {e}")))?;
    let is_record = |r: &Value| r.get("path").is_some() && r.get("narHash").is_some();
    let lists: Vec<&Vec<Value>> = match &v {
        Value::Array(a) => vec![a],
        Value::Object(o) => o
            .values()
            .filter_map(Value::as_array)
            .filter(|a| !a.is_empty() && a.iter().all(is_record))
            .collect(),
        _ => vec![],
    };
    if lists.is_empty() {
        return Err(err(
            "holds no list of path records {path, narHash, narSize, references} \
             (exportReferencesGraph needs __structuredAttrs = true)"
                .into(),
        ));
    }
    let mut nodes = BTreeMap::new();
    for (i, r) in lists.into_iter().flatten().enumerate() {
        let field = |k: &str| {
            r.get(k)
                .ok_or_else(|| err(format!("record {i} has no {k}")))
        };
        let path = field("path")?
            .as_str()
            .filter(|p| super::store::store_path_of(p).as_deref() == Some(*p))
            .ok_or_else(|| err(format!("record {i}: path is not a store path")))?;
        let hash = field("narHash")?
            .as_str()
            .ok_or_else(|| err(format!("{path}: narHash is not a string")))?;
        let size = field("narSize")?
            .as_u64()
            .ok_or_else(|| err(format!("{path}: narSize is not a number")))?;
        let references = field("references")?
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_str().map(String::from)).collect())
            .ok_or_else(|| err(format!("{path}: references is not a list of paths")))?;
        nodes.insert(
            path.to_string(),
            Node {
                references,
                deriver: None,
                recorded_hash: Some(hash.to_string()),
                recorded_size: Some(size),
            },
        );
    }
    Ok(Graph { nodes })
}

fn read_closure_info_dir(dir: &Path) -> Result<Graph, ClosureError> {
    let read = |name: &str| {
        let f = dir.join(name);
        std::fs::read_to_string(&f).map_err(|e| ClosureError::ClosureInfo {
            file: f,
            problem: e.to_string(),
        })
    };
    let paths = read("store-paths")?;
    let reg_file = dir.join("registration");
    let records = parse(&read("registration")?, &reg_file)?;
    let mut by_path: BTreeMap<String, Record> =
        records.into_iter().map(|r| (r.path.clone(), r)).collect();
    let mut nodes = BTreeMap::new();
    for p in paths.lines().filter(|l| !l.is_empty()) {
        let r = by_path.remove(p).ok_or_else(|| ClosureError::ClosureInfo {
            file: reg_file.clone(),
            problem: format!("{p} is listed in store-paths but has no registration record"),
        })?;
        nodes.insert(
            p.to_string(),
            Node {
                references: r.references.into_iter().collect(),
                deriver: r.deriver,
                recorded_hash: Some(r.hash),
                recorded_size: r.nar_size,
            },
        );
    }
    Ok(Graph { nodes })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-a\nsha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s\n123\n\n2\n/nix/store/0123456789abcdfghijklmnpqrsvwxyz-a\n/nix/store/1123456789abcdfghijklmnpqrsvwxyz-b\n";

    #[test]
    fn parses_a_record() {
        let r = parse(GOOD, Path::new("registration")).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].references.len(), 2);
        assert_eq!(r[0].deriver, None);
    }

    #[test]
    fn arbitrary_and_mutated_registrations_never_panic() {
        let lines = [
            "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-a",
            "",
            "2",
            "18446744073709551615",
            "99999999999999999999",
            "sha256:x",
            "-1",
            "\u{0}",
        ];
        formats::fuzz::run("registration::parse", 3000, |r| {
            let mut b = GOOD.as_bytes().to_vec();
            r.mutate(&mut b, 6);
            let _ = parse(&String::from_utf8_lossy(&b), Path::new("r"));
            let t: Vec<&str> = (0..r.below(30))
                .map(|_| lines[r.below(lines.len())])
                .collect();
            let _ = parse(&t.join("\n"), Path::new("r"));
        });
    }
}
