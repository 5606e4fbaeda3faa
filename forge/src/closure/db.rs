//! Reading references from a Nix store's SQLite database (schema 10:
//! `ValidPaths(id, path, hash, …, deriver)`, `Refs(referrer, reference)`).

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use std::collections::BTreeMap;
use std::path::Path;

use super::{ClosureError, Graph, Node};

pub(super) fn closure(db: &Path, toplevel: &str) -> Result<Graph, ClosureError> {
    let err = |e: rusqlite::Error| ClosureError::Db {
        db: db.to_owned(),
        problem: e.to_string(),
    };
    // immutable=1: read without the WAL's shared-memory file, so a
    // read-only store (or one owned by another user) can be read.
    let uri = format!("file:{}?immutable=1", db.display());
    let conn = Connection::open_with_flags(
        uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
    )
    .map_err(err)?;
    let mut info = conn
        .prepare("SELECT id, hash, deriver, narSize FROM ValidPaths WHERE path = ?1")
        .map_err(err)?;
    let mut refs = conn
        .prepare(
            "SELECT v.path FROM Refs r JOIN ValidPaths v ON r.reference = v.id \
             WHERE r.referrer = ?1",
        )
        .map_err(err)?;
    let mut nodes = BTreeMap::new();
    let mut todo = vec![toplevel.to_string()];
    while let Some(path) = todo.pop() {
        if nodes.contains_key(&path) {
            continue;
        }
        type Row = (i64, String, Option<String>, Option<i64>);
        let row: Option<Row> = info
            .query_row([&path], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()
            .map_err(err)?;
        let Some((id, hash, deriver, nar_size)) = row else {
            return Err(ClosureError::Db {
                db: db.to_owned(),
                problem: format!("{path} is not registered as valid"),
            });
        };
        let references: Vec<String> = refs
            .query_map([id], |r| r.get(0))
            .map_err(err)?
            .collect::<Result<_, _>>()
            .map_err(err)?;
        for r in &references {
            if !nodes.contains_key(r) {
                todo.push(r.clone());
            }
        }
        nodes.insert(
            path,
            Node {
                references: references.into_iter().collect(),
                deriver: deriver.filter(|d| !d.is_empty()),
                recorded_hash: Some(hash),
                recorded_size: nar_size.and_then(|n| u64::try_from(n).ok()),
            },
        );
    }
    Ok(Graph { nodes })
}
