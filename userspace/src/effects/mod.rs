//! Side effects held back for a branch's commit: the journal ([`Journal`], SQLite in the
//! state directory, each effect recorded before the program that made it is answered, so a
//! daemon killed at any moment loses none), the recording proxy that `buffer` rules send connections to ([`proxy`]), and
//! their replay on commit ([`replay`]).
//!
//! An effect belongs to the branch whose process made it (by cgroup id, which a branch
//! keeps for its life): that branch's commit releases it, in the order effects were made,
//! whatever the branch's depth; its abort drops it.

pub mod defer;
pub mod payloads;
pub mod proxy;
pub mod replay;

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where an effect stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EffectState {
    /// Recorded, waiting for the branch's commit.
    Held,
    /// Delivered to its destination at the commit.
    Done,
    /// Its delivery failed; kept, retried at the next commit.
    Failed,
}

impl EffectState {
    fn text(self) -> &'static str {
        match self {
            EffectState::Held => "held",
            EffectState::Done => "done",
            EffectState::Failed => "failed",
        }
    }

    fn parse(s: &str) -> EffectState {
        match s {
            "done" => EffectState::Done,
            "failed" => EffectState::Failed,
            _ => EffectState::Held,
        }
    }
}

/// One recorded side effect.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Effect {
    /// Its number, in the order effects were made (also its HTTP idempotency key's).
    pub id: i64,
    /// cgroup id of the branch that made it.
    pub cgroup: u64,
    /// `http` (one request), `tcp` (the bytes of one connection) or `defer` (a held call).
    pub kind: String,
    /// The real destination.
    pub addr: String,
    pub port: u16,
    /// HTTP: method and target of the request.
    pub summary: String,
    /// Bytes recorded.
    pub bytes: u64,
    pub state: EffectState,
    /// What the delivery answered (HTTP status line) or why it failed.
    pub result: Option<String>,
    /// When it was recorded (Unix time, milliseconds).
    pub created_ms: u64,
    /// Seconds since it was recorded.
    #[serde(default)]
    pub age_s: f64,
}

/// The effects journal (`<state>/effects.db`, large payloads in `<state>/effects/`), shared
/// by the proxy and the branch manager.
#[derive(Clone)]
pub struct Journal {
    db: Arc<Mutex<Connection>>,
    payloads: Arc<payloads::PayloadDir>,
}

fn db_err(e: rusqlite::Error) -> Error {
    Error::State(format!("effects journal: {e}"))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Journal {
    /// Opens (creating) the journal in state directory `state`.
    ///
    /// Durability: a record is in the kernel (WAL, synchronous=NORMAL: no fsync) when
    /// [`Journal::record`] returns, so a daemon killed at any moment loses nothing. A power
    /// loss may lose the last records, but an effect never outlives its branch, and no
    /// branch outlives the machine (its processes): after a reboot [`Journal::retain`] drops
    /// every record, so syncing them to disk would protect nothing.
    pub fn open(state: &Path) -> Result<Journal> {
        let path = state.join("effects.db");
        let db = Connection::open(&path).map_err(db_err)?;
        // Pages of 16 KiB (set before the file is first written): a row with an inline
        // payload (at most 64 KiB, larger ones are files) is a few pages, and a commit does
        // not write 64 KiB per page it touches.
        db.execute_batch(
            "PRAGMA page_size=16384;
             PRAGMA journal_mode=WAL;
             PRAGMA synchronous=NORMAL;
             PRAGMA wal_autocheckpoint=1024;
             CREATE TABLE IF NOT EXISTS effects (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 cgroup INTEGER NOT NULL,
                 kind TEXT NOT NULL,
                 addr TEXT NOT NULL,
                 port INTEGER NOT NULL,
                 summary TEXT NOT NULL,
                 payload BLOB NOT NULL,
                 state TEXT NOT NULL,
                 result TEXT,
                 created_ms INTEGER NOT NULL
             );
             CREATE INDEX IF NOT EXISTS effects_by_state ON effects (state, kind, created_ms);
             CREATE INDEX IF NOT EXISTS effects_by_cgroup ON effects (cgroup, state);",
        )
        .map_err(db_err)?;
        // Payloads kept in files (see `payloads`): the file's name and the length. Added to
        // journals made before.
        let has_file_column = db
            .prepare("SELECT 1 FROM pragma_table_info('effects') WHERE name = 'payload_file'")
            .and_then(|mut q| q.exists([]))
            .map_err(db_err)?;
        if !has_file_column {
            // Both or neither: a daemon killed in between must not leave half a schema.
            db.execute_batch(
                "BEGIN;
                 ALTER TABLE effects ADD COLUMN payload_file TEXT;
                 ALTER TABLE effects ADD COLUMN payload_len INTEGER;
                 COMMIT;",
            )
            .map_err(db_err)?;
        }
        let payloads = payloads::PayloadDir::open(state)?;
        let named = Self::payload_files(&db, None)?.into_iter().collect();
        let swept = payloads.sweep(&named);
        if swept > 0 {
            log::info!(
                "removed {swept} payload files no recorded effect names (a daemon killed while recording)"
            );
        }
        Ok(Journal {
            db: Arc::new(Mutex::new(db)),
            payloads: Arc::new(payloads),
        })
    }

    /// The payload files of the effects of branch `cgroup` (none: of every branch).
    fn payload_files(db: &Connection, cgroup: Option<i64>) -> Result<Vec<String>> {
        let mut q = db
            .prepare(
                "SELECT payload_file FROM effects
                 WHERE payload_file IS NOT NULL AND (?1 IS NULL OR cgroup = ?1)",
            )
            .map_err(db_err)?;
        let rows = q.query_map(params![cgroup], |r| r.get(0)).map_err(db_err)?;
        rows.collect::<std::result::Result<_, _>>().map_err(db_err)
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an effect (in the kernel when this returns: see [`Journal::open`]); returns
    /// its number.
    pub fn record(
        &self,
        cgroup: u64,
        kind: &str,
        addr: &str,
        port: u16,
        summary: &str,
        payload: &[u8],
    ) -> Result<i64> {
        if payload.len() > payloads::INLINE_MAX {
            let mut f = self.payload_file()?;
            f.write(payload)?;
            return self.record_file(f, cgroup, kind, addr, port, summary);
        }
        self.insert(cgroup, kind, addr, port, summary, payload, None)
    }

    /// A payload file to write a large effect into as it comes, recorded with
    /// [`Journal::record_file`].
    pub fn payload_file(&self) -> Result<payloads::PayloadFile> {
        self.payloads.create()
    }

    /// Records an effect whose payload is `file` (as [`Journal::record`] does).
    pub fn record_file(
        &self,
        file: payloads::PayloadFile,
        cgroup: u64,
        kind: &str,
        addr: &str,
        port: u16,
        summary: &str,
    ) -> Result<i64> {
        let (name, len) = file.finish()?;
        let r = self.insert(cgroup, kind, addr, port, summary, &[], Some((&name, len)));
        if r.is_err() {
            self.payloads.remove(&name);
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn insert(
        &self,
        cgroup: u64,
        kind: &str,
        addr: &str,
        port: u16,
        summary: &str,
        inline: &[u8],
        file: Option<(&str, u64)>,
    ) -> Result<i64> {
        let len = file.map_or(inline.len() as u64, |(_, l)| l);
        let file = file.map(|(n, _)| n);
        let db = self.db();
        let inserted = db.execute(
            "INSERT INTO effects (cgroup, kind, addr, port, summary, payload, payload_file, payload_len, state, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'held', ?9)",
            params![
                cgroup as i64,
                kind,
                addr,
                port,
                summary,
                inline,
                file,
                len as i64,
                now_ms() as i64
            ],
        );
        inserted.map_err(db_err)?;
        Ok(db.last_insert_rowid())
    }

    /// The effects of the branch with cgroup id `cgroup`, oldest first.
    pub fn list(&self, cgroup: u64) -> Result<Vec<Effect>> {
        self.select("WHERE cgroup = ?1 ORDER BY id", params![cgroup as i64])
    }

    /// The effects a `WHERE ... ORDER BY ...` clause picks.
    fn select(&self, clause: &str, args: impl rusqlite::Params) -> Result<Vec<Effect>> {
        let db = self.db();
        let mut q = db
            .prepare(&format!(
                "SELECT id, cgroup, kind, addr, port, summary, coalesce(payload_len, length(payload)), state, result, created_ms
                 FROM effects {clause}"
            ))
            .map_err(db_err)?;
        let now = now_ms();
        let rows = q
            .query_map(args, |r| {
                let created_ms = r.get::<_, i64>(9)? as u64;
                Ok(Effect {
                    id: r.get(0)?,
                    cgroup: r.get::<_, i64>(1)? as u64,
                    kind: r.get(2)?,
                    addr: r.get(3)?,
                    port: r.get(4)?,
                    summary: r.get(5)?,
                    bytes: r.get::<_, i64>(6)? as u64,
                    state: EffectState::parse(&r.get::<_, String>(7)?),
                    result: r.get(8)?,
                    created_ms,
                    age_s: now.saturating_sub(created_ms) as f64 / 1000.0,
                })
            })
            .map_err(db_err)?;
        rows.collect::<std::result::Result<_, _>>().map_err(db_err)
    }

    /// The recorded bytes of effect `id`.
    pub fn payload(&self, id: i64) -> Result<Vec<u8>> {
        let (inline, file): (Vec<u8>, Option<String>) = self
            .db()
            .query_row(
                "SELECT payload, payload_file FROM effects WHERE id = ?1",
                params![id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(db_err)?
            .ok_or_else(|| Error::NotFound(format!("effect {id}")))?;
        match file {
            Some(f) => self.payloads.read(&f),
            None => Ok(inline),
        }
    }

    /// Replaces the recorded bytes of effect `id` (kept in its row).
    pub fn set_payload(&self, id: i64, payload: &[u8]) -> Result<()> {
        let db = self.db();
        let old: Option<String> = db
            .query_row(
                "SELECT payload_file FROM effects WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)?
            .flatten();
        db.execute(
            "UPDATE effects SET payload = ?2, payload_file = NULL, payload_len = ?3 WHERE id = ?1",
            params![id, payload, payload.len() as i64],
        )
        .map_err(db_err)?;
        if let Some(f) = old {
            self.payloads.remove(&f);
        }
        Ok(())
    }

    /// Records the outcome of delivering effect `id`.
    pub fn set_state(&self, id: i64, state: EffectState, result: &str) -> Result<()> {
        self.db()
            .execute(
                "UPDATE effects SET state = ?2, result = ?3 WHERE id = ?1",
                params![id, state.text(), result],
            )
            .map_err(db_err)?;
        Ok(())
    }

    /// Every deferred call still held, with its ticket (see [`defer`]).
    pub fn held_defers(&self) -> Result<Vec<(Effect, Vec<u8>)>> {
        self.select("WHERE kind = 'defer' AND state = 'held' ORDER BY id", [])?
            .into_iter()
            .map(|e| {
                let ticket = self.payload(e.id)?;
                Ok((e, ticket))
            })
            .collect()
    }

    /// Age in seconds of the oldest effect still held, if any.
    pub fn oldest_held_s(&self) -> Result<Option<f64>> {
        let oldest: Option<i64> = self
            .db()
            .query_row(
                "SELECT min(created_ms) FROM effects WHERE state = 'held'",
                [],
                |r| r.get(0),
            )
            .map_err(db_err)?;
        Ok(oldest.map(|ms| now_ms().saturating_sub(ms as u64) as f64 / 1000.0))
    }

    /// How many effects there are of each (cgroup, state).
    pub fn counts_per_cgroup(&self) -> Result<std::collections::HashMap<(u64, String), u64>> {
        let db = self.db();
        let mut q = db
            .prepare("SELECT cgroup, state, count(*) FROM effects GROUP BY cgroup, state")
            .map_err(db_err)?;
        let rows = q
            .query_map([], |r| {
                Ok((
                    (r.get::<_, i64>(0)? as u64, r.get(1)?),
                    r.get::<_, i64>(2)? as u64,
                ))
            })
            .map_err(db_err)?;
        rows.collect::<std::result::Result<_, _>>().map_err(db_err)
    }

    /// How many effects there are of each (kind, state).
    pub fn counts(&self) -> Result<std::collections::HashMap<(String, String), u64>> {
        let db = self.db();
        let mut q = db
            .prepare("SELECT kind, state, count(*) FROM effects GROUP BY kind, state")
            .map_err(db_err)?;
        let rows = q
            .query_map([], |r| {
                Ok(((r.get(0)?, r.get(1)?), r.get::<_, i64>(2)? as u64))
            })
            .map_err(db_err)?;
        rows.collect::<std::result::Result<_, _>>().map_err(db_err)
    }

    /// Forgets the effects of every branch whose cgroup id is not in `live` (their branches
    /// are gone, after a reboot for instance, and cgroup ids are used again).
    pub fn retain(&self, live: &[u64]) -> Result<usize> {
        let db = self.db();
        let all: Vec<i64> = {
            let mut q = db
                .prepare("SELECT DISTINCT cgroup FROM effects")
                .map_err(db_err)?;
            let rows = q.query_map([], |r| r.get(0)).map_err(db_err)?;
            rows.collect::<std::result::Result<_, _>>()
                .map_err(db_err)?
        };
        let mut dropped = 0;
        for cg in all {
            if !live.contains(&(cg as u64)) {
                let files = Self::payload_files(&db, Some(cg))?;
                dropped += db
                    .execute("DELETE FROM effects WHERE cgroup = ?1", params![cg])
                    .map_err(db_err)?;
                for f in files {
                    self.payloads.remove(&f);
                }
            }
        }
        Ok(dropped)
    }

    /// Forgets every effect of the branch with cgroup id `cgroup` (its abort: what was held
    /// never happens). Returns how many were still held.
    pub fn drop_branch(&self, cgroup: u64) -> Result<usize> {
        let db = self.db();
        let held: i64 = db
            .query_row(
                "SELECT count(*) FROM effects WHERE cgroup = ?1 AND state != 'done'",
                params![cgroup as i64],
                |r| r.get(0),
            )
            .map_err(db_err)?;
        let files = Self::payload_files(&db, Some(cgroup as i64))?;
        db.execute(
            "DELETE FROM effects WHERE cgroup = ?1",
            params![cgroup as i64],
        )
        .map_err(db_err)?;
        for f in files {
            self.payloads.remove(&f);
        }
        Ok(held as usize)
    }
}
