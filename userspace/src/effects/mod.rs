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
    /// cgroup ids of the branches whose effects were dropped (aborted): nothing more is
    /// recorded for them, such as a request the proxy finishes reading after the abort.
    /// Taken with `db` held.
    closed: Arc<Mutex<std::collections::HashSet<u64>>>,
}

fn db_err(e: rusqlite::Error) -> Error {
    Error::State(format!("effects journal: {e}"))
}

/// Whether the journal's table has column `name` (added to journals made before it was).
fn has_column(db: &Connection, name: &str) -> Result<bool> {
    db.prepare("SELECT 1 FROM pragma_table_info('effects') WHERE name = ?1")
        .and_then(|mut q| q.exists([name]))
        .map_err(db_err)
}

/// The columns a payload's [`payloads::Location`] is read from (see [`location`]).
const LOCATION: &str = "payload_file, coalesce(payload_off, 0), payload_len";

/// A payload's [`payloads::Location`] from the [`LOCATION`] columns (the first three of the
/// row).
fn location(r: &rusqlite::Row<'_>) -> rusqlite::Result<payloads::Location> {
    location_at(r, 0)
}

/// As [`location`], from the columns at `first` and the next two.
fn location_at(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<payloads::Location> {
    Ok(payloads::Location {
        segment: r.get(first)?,
        offset: r.get::<_, i64>(first + 1)? as u64,
        len: r.get::<_, Option<i64>>(first + 2)?.unwrap_or(0) as u64,
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Journal {
    /// Opens (creating) the journal in state directory `state`, whose lock the caller holds
    /// (the registry's, see `state::Registry::open`): opening removes the payload segments no
    /// record names, which a second daemon must not do to a running one's.
    ///
    /// Durability: a record is in the kernel (WAL, synchronous=NORMAL: no fsync) when
    /// [`Journal::record`] returns, so a daemon killed at any moment loses nothing. A power
    /// loss may lose the last records, but an effect never outlives its branch, and no
    /// branch outlives the machine (its processes): after a reboot [`Journal::retain`] drops
    /// every record, so syncing them to disk would protect nothing.
    pub fn open(state: &Path) -> Result<Journal> {
        let path = state.join("effects.db");
        let db = Connection::open(&path).map_err(db_err)?;
        // Pages of 4 KiB (SQLite's default): a record touches four pages (the row, two
        // indexes, and `sqlite_sequence` for AUTOINCREMENT), so each commit appends 16 KiB
        // to the WAL (64 KiB with the 16 KiB pages used before), and an inline payload (at
        // most 64 KiB, larger ones are in segment files) fills overflow pages. The size only
        // applies to a new journal: one made before keeps its 16 KiB pages.
        db.execute_batch(
            "PRAGMA page_size=4096;
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
        // Payloads kept in segment files (see `payloads`): the segment's name and the
        // payload's length. Added to journals made before.
        if !has_column(&db, "payload_file")? {
            // Both or neither: a daemon killed in between must not leave half a schema.
            db.execute_batch(
                "BEGIN;
                 ALTER TABLE effects ADD COLUMN payload_file TEXT;
                 ALTER TABLE effects ADD COLUMN payload_len INTEGER;
                 COMMIT;",
            )
            .map_err(db_err)?;
        }
        // Where in the segment file (rows from before segments: 0, a file each).
        if !has_column(&db, "payload_off")? {
            db.execute_batch("ALTER TABLE effects ADD COLUMN payload_off INTEGER;")
                .map_err(db_err)?;
        }
        let mut named = std::collections::HashMap::new();
        for at in Self::payload_files(&db, None)? {
            *named.entry(at.segment).or_default() += 1;
        }
        let (payloads, swept) = payloads::PayloadDir::open(state, named)?;
        if swept > 0 {
            log::info!(
                "removed {swept} payload segments no recorded effect is in (a daemon killed while recording)"
            );
        }
        Ok(Journal {
            db: Arc::new(Mutex::new(db)),
            payloads: Arc::new(payloads),
            closed: Arc::default(),
        })
    }

    /// Where the payloads of the effects of branch `cgroup` (none: of every branch) kept
    /// in segment files are.
    fn payload_files(db: &Connection, cgroup: Option<i64>) -> Result<Vec<payloads::Location>> {
        let mut q = db
            .prepare(&format!(
                "SELECT {LOCATION} FROM effects
                 WHERE payload_file IS NOT NULL AND (?1 IS NULL OR cgroup = ?1)"
            ))
            .map_err(db_err)?;
        let rows = q.query_map(params![cgroup], location).map_err(db_err)?;
        rows.collect::<std::result::Result<_, _>>().map_err(db_err)
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn closed(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<u64>> {
        self.closed.lock().unwrap_or_else(|p| p.into_inner())
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
            let mut f = self.payload_file(payload.len() as u64)?;
            f.write(payload)?;
            return self.record_file(f, cgroup, kind, addr, port, summary);
        }
        self.insert(cgroup, kind, addr, port, summary, payload, None)
    }

    /// Room for a large effect of `len` bytes, written as it comes and recorded with
    /// [`Journal::record_file`].
    pub fn payload_file(&self, len: u64) -> Result<payloads::PayloadFile> {
        self.payloads.create(len)
    }

    /// Records an effect whose payload is in `file` (as [`Journal::record`] does).
    pub fn record_file(
        &self,
        file: payloads::PayloadFile,
        cgroup: u64,
        kind: &str,
        addr: &str,
        port: u16,
        summary: &str,
    ) -> Result<i64> {
        let at = file.location();
        let id = self.insert(cgroup, kind, addr, port, summary, &[], Some(&at))?;
        file.recorded();
        Ok(id)
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
        file: Option<&payloads::Location>,
    ) -> Result<i64> {
        let len = file.map_or(inline.len() as u64, |at| at.len);
        let offset = file.map(|at| at.offset as i64);
        let file = file.map(|at| at.segment.as_str());
        let db = self.db();
        if self.closed().contains(&cgroup) {
            return Err(Error::Conflict(format!(
                "not recorded: the branch (cgroup {cgroup}) was aborted, its effects are dropped"
            )));
        }
        let inserted = db
            .prepare_cached(
            "INSERT INTO effects (cgroup, kind, addr, port, summary, payload, payload_file, payload_off, payload_len, state, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'held', ?10)",
            )
            .and_then(|mut q| q.execute(params![
                cgroup as i64,
                kind,
                addr,
                port,
                summary,
                inline,
                file,
                offset,
                len as i64,
                now_ms() as i64
            ]));
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
            .prepare_cached(&format!(
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
        let (inline, file): (Vec<u8>, Option<payloads::Location>) = self
            .db()
            .query_row(
                &format!("SELECT payload, {LOCATION} FROM effects WHERE id = ?1"),
                params![id],
                |r| {
                    let file: Option<String> = r.get(1)?;
                    Ok((r.get(0)?, file.map(|_| location_at(r, 1)).transpose()?))
                },
            )
            .optional()
            .map_err(db_err)?
            .ok_or_else(|| Error::NotFound(format!("effect {id}")))?;
        match file {
            Some(at) => self.payloads.read(&at),
            None => Ok(inline),
        }
    }

    /// Replaces the recorded bytes of effect `id` (kept in its row).
    pub fn set_payload(&self, id: i64, payload: &[u8]) -> Result<()> {
        let db = self.db();
        let old: Option<payloads::Location> = db
            .query_row(
                &format!(
                    "SELECT {LOCATION} FROM effects WHERE id = ?1 AND payload_file IS NOT NULL"
                ),
                params![id],
                location,
            )
            .optional()
            .map_err(db_err)?;
        db.execute(
            "UPDATE effects SET payload = ?2, payload_file = NULL, payload_off = NULL,
             payload_len = ?3 WHERE id = ?1",
            params![id, payload, payload.len() as i64],
        )
        .map_err(db_err)?;
        if let Some(at) = old {
            self.payloads.release(&at);
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
                for at in files {
                    self.payloads.release(&at);
                }
            }
        }
        Ok(dropped)
    }

    /// Forgets every effect of the branch with cgroup id `cgroup` (its abort: what was held
    /// never happens), and records none for it from now on. Returns how many were still held.
    pub fn drop_branch(&self, cgroup: u64) -> Result<usize> {
        let db = self.db();
        self.closed().insert(cgroup);
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
        for at in files {
            self.payloads.release(&at);
        }
        Ok(held as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> std::path::PathBuf {
        let d =
            std::env::temp_dir().join(format!("forkscope-effects-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn segments(state: &Path) -> usize {
        std::fs::read_dir(state.join("effects")).unwrap().count()
    }

    fn body(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn large_payloads_share_a_segment_that_goes_with_the_last_of_them() {
        let state = scratch("segments");
        let j = Journal::open(&state).unwrap();
        let (a, b, c) = (body(300_000, 1), body(100_000, 2), body(70_000, 3));
        let ia = j.record(1, "http", "127.0.0.2", 80, "POST /a", &a).unwrap();
        let ib = j.record(2, "http", "127.0.0.2", 80, "POST /b", &b).unwrap();
        // Written as it comes (the proxy's way) into the same segment.
        let mut f = j.payload_file(c.len() as u64).unwrap();
        f.write(&c[..1000]).unwrap();
        f.write(&c[1000..]).unwrap();
        assert!(f.write(b"x").is_err(), "longer than announced");
        let ic = j
            .record_file(f, 1, "http", "127.0.0.2", 80, "POST /c")
            .unwrap();
        let small = j
            .record(1, "http", "127.0.0.2", 80, "GET /", b"hi")
            .unwrap();
        assert_eq!(segments(&state), 1, "one segment for the three");
        assert_eq!(j.payload(ia).unwrap(), a);
        assert_eq!(j.payload(ib).unwrap(), b);
        assert_eq!(j.payload(ic).unwrap(), c);
        assert_eq!(j.payload(small).unwrap(), b"hi");
        // A payload dropped before its row is written frees its range, nothing else.
        let mut lost = j.payload_file(200_000).unwrap();
        lost.write(&body(200_000, 4)).unwrap();
        drop(lost);
        // Reopened (a daemon restart): the rows still find their bytes.
        drop(j);
        let j = Journal::open(&state).unwrap();
        assert_eq!(j.payload(ia).unwrap(), a);
        assert_eq!(j.payload(ic).unwrap(), c);
        // Branch 1's abort frees its ranges (their disk blocks); branch 2's payload keeps
        // the segment.
        let blocks = || {
            use std::os::unix::fs::MetadataExt;
            let seg = std::fs::read_dir(state.join("effects"))
                .unwrap()
                .next()
                .unwrap();
            seg.unwrap().metadata().unwrap().blocks()
        };
        let before = blocks();
        j.drop_branch(1).unwrap();
        assert_eq!(segments(&state), 1);
        assert!(blocks() < before, "{} blocks, {before} before", blocks());
        // Nothing more is recorded for an aborted branch, such as a request the proxy
        // finishes reading after the abort: refused, and its range freed (with the new
        // segment it was the only payload of: a reopened journal starts a new one).
        let mut late = j.payload_file(100_000).unwrap();
        late.write(&body(100_000, 6)).unwrap();
        assert_eq!(segments(&state), 2);
        let refused = j.record_file(late, 1, "http", "127.0.0.2", 80, "POST /late");
        assert!(refused.unwrap_err().to_string().contains("aborted"));
        assert_eq!(segments(&state), 1);
        assert!(j.record(1, "http", "127.0.0.2", 80, "GET /", b"x").is_err());
        assert!(j.list(1).unwrap().is_empty());
        assert_eq!(j.payload(ib).unwrap(), b);
        // Kept inline instead: the last payload in the segment is gone, and so is the segment.
        j.set_payload(ib, b"short").unwrap();
        assert_eq!(j.payload(ib).unwrap(), b"short");
        assert_eq!(segments(&state), 0, "nothing left once no payload is held");
        // The next large payload starts a new segment.
        let id = j.record(2, "http", "127.0.0.2", 80, "POST /d", &a).unwrap();
        assert_eq!((segments(&state), j.payload(id).unwrap()), (1, a));
        let _ = std::fs::remove_dir_all(&state);
    }

    #[test]
    fn a_segment_no_row_names_is_removed_when_the_journal_opens() {
        let state = scratch("sweep");
        let j = Journal::open(&state).unwrap();
        let kept = body(100_000, 5);
        let id = j
            .record(1, "http", "127.0.0.2", 80, "POST /", &kept)
            .unwrap();
        drop(j);
        // What a daemon killed between a payload and its row leaves behind.
        std::fs::write(state.join("effects/stray.bin"), "half").unwrap();
        assert_eq!(segments(&state), 2);
        let j = Journal::open(&state).unwrap();
        assert_eq!(segments(&state), 1);
        assert_eq!(j.payload(id).unwrap(), kept);
        let _ = std::fs::remove_dir_all(&state);
    }
}
