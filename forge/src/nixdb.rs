//! A Nix database for a closure, as the Nix in it expects to find under
//! /nix/var/nix/db: `db.sqlite` (schema version 10: ValidPaths, Refs,
//! DerivationOutputs) and the `schema` file. Deterministic: paths are
//! registered in sorted order at one time (SOURCE_DATE_EPOCH), with no
//! deriver (forge does not always know it, and the bytes must not depend
//! on how the closure was found), through the bundled SQLite.

use anyhow::{Context, Result};
use rusqlite::Connection;
use std::collections::BTreeMap;

use crate::closure::PathInfo;
use formats::tree::Node;

/// Nix's local store schema version the database follows.
pub const SCHEMA_VERSION: &str = "10";

const SCHEMA: &str = "
create table if not exists ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null,
    registrationTime integer not null,
    deriver          text,
    narSize          integer,
    ultimate         integer,
    sigs             text,
    ca               text
);
create table if not exists Refs (
    referrer  integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
);
create index if not exists IndexReferrer on Refs(referrer);
create index if not exists IndexReference on Refs(reference);
create trigger if not exists DeleteSelfRefs before delete on ValidPaths
  begin
    delete from Refs where referrer = old.id and reference = old.id;
  end;
create table if not exists DerivationOutputs (
    drv  integer not null,
    id   text not null,
    path text not null,
    primary key (drv, id),
    foreign key (drv) references ValidPaths(id) on delete cascade
);
create index if not exists IndexDerivationOutputs on DerivationOutputs(path);
";

/// The bytes of `db.sqlite` registering `paths` (every reference among
/// them) at `epoch`.
pub fn sqlite(paths: &[PathInfo], epoch: u32) -> Result<Vec<u8>> {
    let dir = tempfile::tempdir().context("a temporary directory for the Nix database")?;
    let file = dir.path().join("db.sqlite");
    let what = || "writing the Nix database".to_string();
    {
        let mut c = Connection::open(&file).with_context(what)?;
        c.execute_batch(
            "pragma page_size = 4096; pragma journal_mode = delete; pragma synchronous = off;",
        )
        .with_context(what)?;
        c.execute_batch(SCHEMA).with_context(what)?;
        let tx = c.transaction().with_context(what)?;
        let mut sorted: Vec<&PathInfo> = paths.iter().collect();
        sorted.sort_by(|a, b| a.path.cmp(&b.path));
        let mut ids = BTreeMap::new();
        {
            let mut ins = tx
                .prepare("insert into ValidPaths (path, hash, registrationTime, narSize) values (?1, ?2, ?3, ?4)")
                .with_context(what)?;
            for p in &sorted {
                let hex: String = p.nar_hash.iter().map(|b| format!("{b:02x}")).collect();
                ins.execute(rusqlite::params![
                    p.path,
                    format!("sha256:{hex}"),
                    epoch,
                    p.nar_size as i64
                ])
                .with_context(what)?;
                ids.insert(p.path.as_str(), tx.last_insert_rowid());
            }
            let mut r = tx
                .prepare("insert into Refs (referrer, reference) values (?1, ?2)")
                .with_context(what)?;
            for p in &sorted {
                for reference in &p.references {
                    let Some(&to) = ids.get(reference.as_str()) else {
                        anyhow::bail!(
                            "{} refers to {reference}, which is not in the closure",
                            p.path
                        );
                    };
                    r.execute([ids[p.path.as_str()], to]).with_context(what)?;
                }
            }
        }
        tx.commit().with_context(what)?;
        c.close().map_err(|(_, e)| e).with_context(what)?;
    }
    std::fs::read(&file).with_context(what)
}

/// Put the database of `paths` into a tree at `/nix/var/nix/db`
/// (`db.sqlite` and `schema`): the root filesystem of an image and an OCI
/// image's customisation layer carry the same.
pub fn add_to(t: &mut formats::tree::Tree, paths: &[PathInfo], epoch: u32) -> Result<()> {
    let db = t.mkdir_p(b"/nix/var/nix/db", 0o755)?;
    t.insert(db, b"db.sqlite", Node::bytes(sqlite(paths, epoch)?, 0o644))?;
    t.insert(
        db,
        b"schema",
        Node::bytes(SCHEMA_VERSION.as_bytes().to_vec(), 0o644),
    )?;
    Ok(())
}
