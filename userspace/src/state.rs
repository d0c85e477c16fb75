//! The daemon's durable state: every live branch's record, in an SQLite database in the state
//! directory, written before an operation is acknowledged. One daemon per state directory
//! (a lock on `<state>/lock`, see [`lock`]).
//!
//! Durability: WAL with `synchronous = NORMAL`: a transaction is in the kernel (the WAL
//! written, not fsynced) before it is acknowledged, so a daemon killed at any instant loses
//! nothing it answered. An operating-system crash may lose the last transactions, never
//! the database's consistency; what the records describe (the branches' processes, cgroups
//! and mounts) does not outlive such a crash either, nor are a fork's layers fsynced, and
//! branch directories no record names are removed when the registry next opens. A sync per
//! record cost every fork 0.6-0.8 ms here. Commits into a workspace make their own writes
//! durable (see `crate::commit`).

pub mod lock;

use std::{
    fs,
    path::{Path, PathBuf},
};

use rusqlite::{Connection, OptionalExtension, params};

use crate::{
    branch::BranchRecord,
    error::{Error, Result},
};

/// The registry of live branches.
pub struct Registry {
    db: Connection,
    /// `lock` in the state directory, held while the registry is open.
    _lock: lock::StateLock,
}

fn db_err(e: rusqlite::Error) -> Error {
    Error::State(e.to_string())
}

impl Registry {
    /// Opens (creating if needed) the registry in `dir`, taking its lock.
    pub fn open(dir: &Path) -> Result<Self> {
        let unusable = |e: std::io::Error| {
            Error::Invalid(format!(
                "the state directory {} cannot be used: {e} (give a writable --state-dir)",
                dir.display()
            ))
        };
        fs::create_dir_all(dir).map_err(unusable)?;
        let lock_path = dir.join("lock");
        let lock = lock::take(&lock_path).map_err(|e| match e {
            lock::Refused::Io(e) => unusable(e),
            lock::Refused::Held { pid } => Error::State(format!(
                "another forkscope daemon{} uses the state directory {} (it holds {}); stop it or pick another --state-dir",
                pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
                dir.display(),
                lock_path.display()
            )),
        })?;
        let db = Connection::open(dir.join("forkscope.db")).map_err(db_err)?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS branches (
                 id INTEGER PRIMARY KEY,
                 name TEXT NOT NULL UNIQUE,
                 record TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);",
        )
        .map_err(db_err)?;
        Ok(Self { db, _lock: lock })
    }

    /// A new branch id, never reused.
    pub fn next_id(&self) -> Result<u64> {
        let v: i64 = self
            .db
            .prepare_cached(
                "INSERT INTO counters(name, value) VALUES ('branch', 1)
                 ON CONFLICT(name) DO UPDATE SET value = value + 1 RETURNING value",
            )
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(db_err)?;
        Ok(v as u64)
    }

    /// Inserts or replaces a branch's record.
    pub fn put(&self, b: &BranchRecord) -> Result<()> {
        self.put_all(&[b])
    }

    /// Writes several records in one transaction (one sync): all of them or none.
    pub fn put_all(&self, records: &[&BranchRecord]) -> Result<()> {
        let tx = self.db.unchecked_transaction().map_err(db_err)?;
        for b in records {
            let text = serde_json::to_string(b).map_err(std::io::Error::from)?;
            tx.prepare_cached(
                "INSERT INTO branches(id, name, record) VALUES (?1, ?2, ?3)
                 ON CONFLICT(id) DO UPDATE SET name = ?2, record = ?3",
            )
            .and_then(|mut s| s.execute(params![b.id as i64, b.name, text]))
            .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    /// The live branch named `name`.
    pub fn get(&self, name: &str) -> Result<Option<BranchRecord>> {
        let text: Option<String> = self
            .db
            .prepare_cached("SELECT record FROM branches WHERE name = ?1")
            .and_then(|mut s| s.query_row([name], |r| r.get(0)).optional())
            .map_err(db_err)?;
        text.map(|t| {
            serde_json::from_str(&t).map_err(|e| Error::State(format!("record of {name}: {e}")))
        })
        .transpose()
    }

    /// Every live branch, by id.
    pub fn all(&self) -> Result<Vec<BranchRecord>> {
        let mut stmt = self
            .db
            .prepare_cached("SELECT record FROM branches ORDER BY id")
            .map_err(db_err)?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(db_err)?;
        let mut out = Vec::new();
        for t in rows {
            let t = t.map_err(db_err)?;
            out.push(
                serde_json::from_str(&t)
                    .map_err(|e| Error::State(format!("branch record: {e}")))?,
            );
        }
        Ok(out)
    }

    /// Forgets a branch (its name becomes free again).
    pub fn remove(&self, id: u64) -> Result<()> {
        self.db
            .prepare_cached("DELETE FROM branches WHERE id = ?1")
            .and_then(|mut s| s.execute([id as i64]))
            .map_err(db_err)?;
        Ok(())
    }
}

/// Where a branch's files live: `<state>/branches/<id>`.
pub fn branch_dir(state: &Path, id: u64) -> PathBuf {
    state.join("branches").join(id.to_string())
}
