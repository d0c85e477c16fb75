//! `forkscope report`: what a trace of one branch or a tree of branches shows, per branch:
//! events by kind, the files written and destinations sent to that weigh most, dirtied
//! pages, and the latency of each fork and commit the branch made (from the
//! `branch_fork`/`branch_commit` records the daemon writes into traces); as text for a
//! person, as JSON, or as an SVG chart of the branch tree over time ([`svg`]).
//!
//! Input: branch traces as recorded (one JSON object per event), fetched from the daemon
//! or read back from a `forkscope export` file ([`from_perfetto`]).

pub mod svg;

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;
use serde_json::Value;

use crate::events::{TraceEvent, summary::Summary};

/// Files and destinations listed per branch (the ones with the most bytes).
pub const TOP: usize = 10;

/// One file written, with its totals.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileRow {
    pub path: String,
    pub bytes: u64,
    pub writes: u64,
}

/// One destination sent to, with its totals.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DestRow {
    pub dest: String,
    pub bytes: u64,
    pub sends: u64,
    pub connects: u64,
}

/// A fork or a commit the branch made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Operation {
    /// When it started (CLOCK_MONOTONIC ns).
    pub ts_ns: u64,
    pub duration_ns: u64,
    /// Fork: the branches made; commit: what it wrote into.
    pub into: Vec<String>,
    /// Where the time went, microseconds per phase.
    pub phases_us: BTreeMap<String, u64>,
}

/// What one branch's trace shows.
#[derive(Clone, Debug, Serialize)]
pub struct BranchReport {
    pub name: String,
    /// The branch it was forked from, as its `branch_start` record says.
    pub parent: Option<String>,
    /// When it started (its `branch_start`), else its first record; none without records.
    pub start_ns: Option<u64>,
    /// The end of its last record (an operation ends after its duration).
    pub end_ns: Option<u64>,
    /// Events of its processes (the branch's own operations not counted).
    pub events: u64,
    pub kinds: BTreeMap<String, u64>,
    /// Distinct files written and destinations sent to.
    pub files_written: usize,
    pub destinations: usize,
    /// The [`TOP`] files and destinations with the most bytes.
    pub top_files: Vec<FileRow>,
    pub top_destinations: Vec<DestRow>,
    pub dirtied_pages: u64,
    pub forks: Vec<Operation>,
    pub commits: Vec<Operation>,
    /// Records that were not events of the known shape (skipped).
    pub unreadable: u64,
}

/// What a set of branch traces shows.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub branches: Vec<BranchReport>,
    /// The earliest and latest instants of the whole set.
    pub start_ns: u64,
    pub end_ns: u64,
}

/// Whether `kind` is one of the branch's own operations (written by the daemon), not an
/// event of its processes.
pub(crate) fn is_operation(kind: &str) -> bool {
    kind.starts_with("branch_")
}

fn operation(e: &TraceEvent, into: Vec<String>) -> Operation {
    Operation {
        ts_ns: e.ts_ns,
        duration_ns: e.duration_ns.unwrap_or(0),
        into,
        phases_us: e.phases_us.clone().unwrap_or_default(),
    }
}

fn branch(name: &str, records: &[Value]) -> BranchReport {
    let mut summary = Summary::default();
    let mut r = BranchReport {
        name: name.to_string(),
        parent: None,
        start_ns: None,
        end_ns: None,
        events: 0,
        kinds: BTreeMap::new(),
        files_written: 0,
        destinations: 0,
        top_files: Vec::new(),
        top_destinations: Vec::new(),
        dirtied_pages: 0,
        forks: Vec::new(),
        commits: Vec::new(),
        unreadable: 0,
    };
    let mut started = None;
    for v in records {
        let Ok(e) = serde_json::from_value::<TraceEvent>(v.clone()) else {
            r.unreadable += 1;
            continue;
        };
        let end = e.ts_ns.saturating_add(e.duration_ns.unwrap_or(0));
        r.start_ns = Some(r.start_ns.map_or(e.ts_ns, |s| s.min(e.ts_ns)));
        r.end_ns = Some(r.end_ns.map_or(end, |x| x.max(end)));
        match e.kind.as_ref() {
            "branch_start" => {
                started = Some(e.ts_ns);
                r.parent = e.parent.clone();
            }
            "branch_fork" => r
                .forks
                .push(operation(&e, e.children.clone().unwrap_or_default())),
            "branch_commit" => r
                .commits
                .push(operation(&e, e.target.clone().into_iter().collect())),
            k if is_operation(k) => {}
            _ => {
                r.events += 1;
                summary.add(&e);
            }
        }
    }
    if started.is_some() {
        r.start_ns = started;
    }
    r.end_ns = r.end_ns.max(r.start_ns);
    r.kinds = summary
        .kinds
        .iter()
        .map(|(k, n)| (k.to_string(), *n))
        .collect();
    r.files_written = summary.files.len();
    r.destinations = summary.destinations.len();
    r.top_files = heaviest(
        summary.files.into_iter().map(|(path, t)| FileRow {
            path,
            bytes: t.bytes,
            writes: t.writes,
        }),
        |f| (f.bytes, &f.path),
    );
    r.top_destinations = heaviest(
        summary.destinations.into_iter().map(|(dest, t)| DestRow {
            dest,
            bytes: t.bytes,
            sends: t.sends,
            connects: t.connects,
        }),
        |d| (d.bytes, &d.dest),
    );
    r.dirtied_pages = summary.pages.iter().map(|p| p.pages).sum();
    r
}

/// The [`TOP`] rows with the most bytes (`key`: bytes and name), ties by name.
fn heaviest<T>(rows: impl Iterator<Item = T>, key: impl Fn(&T) -> (u64, &String)) -> Vec<T> {
    let mut rows: Vec<T> = rows.collect();
    rows.sort_by(|a, b| {
        let ((ab, an), (bb, bn)) = (key(a), key(b));
        bb.cmp(&ab).then(an.cmp(bn))
    });
    rows.truncate(TOP);
    rows
}

/// The report of `branches`: (name, its records as recorded), in the order given.
pub fn report(branches: &[(String, Vec<Value>)]) -> Report {
    let branches: Vec<BranchReport> = branches.iter().map(|(n, r)| branch(n, r)).collect();
    // Branches without records have no place in time.
    let start_ns = branches
        .iter()
        .filter_map(|b| b.start_ns)
        .min()
        .unwrap_or(0);
    let end_ns = branches
        .iter()
        .filter_map(|b| b.end_ns)
        .max()
        .unwrap_or(0)
        .max(start_ns);
    Report {
        branches,
        start_ns,
        end_ns,
    }
}

/// The branch traces in a `forkscope export` document (see [`crate::perfetto`]): each
/// branch track's name and the records its events carry, in order.
pub fn from_perfetto(doc: &Value) -> Result<Vec<(String, Vec<Value>)>, String> {
    let events = doc["traceEvents"]
        .as_array()
        .ok_or("not a trace-event document (no traceEvents array): give a file written by `forkscope export`")?;
    let mut tracks: Vec<(u64, String, Vec<Value>)> = Vec::new();
    for e in events {
        let pid = e["pid"].as_u64().unwrap_or(0);
        if e["ph"] == "M" && e["name"] == "process_name" {
            let name = e["args"]["name"].as_str().unwrap_or("");
            if let Some(branch) = name.strip_prefix("branch ") {
                tracks.push((pid, branch.to_string(), Vec::new()));
            }
        } else if (e["ph"] == "i" || e["ph"] == "X")
            && let Some(t) = tracks.iter_mut().find(|t| t.0 == pid)
        {
            t.2.push(e["args"].clone());
        }
    }
    if tracks.is_empty() {
        return Err(
            "no branch tracks in this trace: give a file written by `forkscope export`".into(),
        );
    }
    Ok(tracks.into_iter().map(|(_, n, r)| (n, r)).collect())
}

fn ms(ns: u64) -> String {
    format!("{:.2} ms", ns as f64 / 1e6)
}

/// Phases in the order they happen (see `ForkPhases` and `CommitPhases`).
const PHASE_ORDER: [&str; 8] = [
    "freeze",
    "files",
    "plan",
    "stage",
    "apply",
    "thaw",
    "start",
    "processes",
];

fn phases(p: &BTreeMap<String, u64>) -> String {
    let mut ordered: Vec<(&String, &u64)> = p.iter().collect();
    ordered.sort_by_key(|(k, _)| {
        PHASE_ORDER
            .iter()
            .position(|o| o == k)
            .unwrap_or(PHASE_ORDER.len())
    });
    let mut v: Vec<String> = ordered
        .into_iter()
        .filter(|(_, us)| **us > 0)
        .map(|(k, us)| format!("{k} {:.2}", *us as f64 / 1000.0))
        .collect();
    if v.is_empty() {
        return String::new();
    }
    v.push("ms".into());
    format!(" ({})", v.join(", ").replacen(", ms", " ms", 1))
}

fn latencies(ops: &[Operation]) -> String {
    let mut d: Vec<u64> = ops.iter().map(|o| o.duration_ns).collect();
    d.sort_unstable();
    match d.len() {
        0 => String::new(),
        n => format!(
            ": median {}, max {}",
            ms(d[(n - 1) / 2]),
            ms(*d.last().expect("not empty"))
        ),
    }
}

impl Report {
    /// Seconds since the report's start, for display.
    fn at(&self, ns: u64) -> String {
        format!("{:.3} s", ns.saturating_sub(self.start_ns) as f64 / 1e9)
    }

    /// The report as text for a person.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "forkscope report: {} branch{}, {:.3} s from the first record to the last",
            self.branches.len(),
            if self.branches.len() == 1 { "" } else { "es" },
            self.end_ns.saturating_sub(self.start_ns) as f64 / 1e9
        );
        for b in &self.branches {
            let origin = match &b.parent {
                Some(p) => format!("forked from {p}"),
                None => "root".into(),
            };
            let when = match (b.start_ns, b.end_ns) {
                (Some(a), Some(z)) => format!("{} to {}", self.at(a), self.at(z)),
                _ => "no records".into(),
            };
            let _ = writeln!(
                s,
                "\nbranch {} ({origin}), {when}: {} events",
                b.name, b.events
            );
            let kinds: Vec<String> = b.kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
            if !kinds.is_empty() {
                let _ = writeln!(s, "  by kind: {}", kinds.join(", "));
            }
            if !b.top_files.is_empty() {
                let _ = writeln!(s, "  top files (of {} written):", b.files_written);
                for f in &b.top_files {
                    let _ = writeln!(
                        s,
                        "    {:>12} bytes in {:>6} writes  {}",
                        f.bytes, f.writes, f.path
                    );
                }
            }
            if !b.top_destinations.is_empty() {
                let _ = writeln!(s, "  top destinations (of {}):", b.destinations);
                for d in &b.top_destinations {
                    let _ = writeln!(
                        s,
                        "    {:>12} bytes in {:>6} sends, {} connects  {}",
                        d.bytes, d.sends, d.connects, d.dest
                    );
                }
            }
            if b.dirtied_pages > 0 {
                let _ = writeln!(s, "  dirtied pages: {}", b.dirtied_pages);
            }
            for (what, ops) in [("forks", &b.forks), ("commits", &b.commits)] {
                if ops.is_empty() {
                    continue;
                }
                let _ = writeln!(s, "  {what} ({}){}", ops.len(), latencies(ops));
                for o in ops.iter() {
                    let _ = writeln!(
                        s,
                        "    at {} -> {}: {}{}",
                        self.at(o.ts_ns),
                        o.into.join(", "),
                        ms(o.duration_ns),
                        phases(&o.phases_us)
                    );
                }
            }
            if b.unreadable > 0 {
                let _ = writeln!(s, "  records not understood (skipped): {}", b.unreadable);
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn traces() -> Vec<(String, Vec<Value>)> {
        vec![
            (
                "main".into(),
                vec![
                    json!({"ts_ns": 1_000, "cgroup": 1, "pid": 0, "tid": 0, "comm": "forkscope", "kind": "branch_start", "duration_ns": 500}),
                    json!({"ts_ns": 2_000, "cgroup": 1, "pid": 7, "tid": 7, "comm": "sh", "kind": "file_write", "path": "/w/a", "bytes": 10}),
                    json!({"ts_ns": 2_500, "cgroup": 1, "pid": 7, "tid": 7, "comm": "sh", "kind": "file_write", "path": "/w/b", "bytes": 30}),
                    json!({"ts_ns": 3_000, "cgroup": 1, "pid": 7, "tid": 7, "comm": "sh", "kind": "net_send", "family": "inet", "addr": "127.0.0.1", "port": 80, "bytes": 5}),
                    json!({"ts_ns": 4_000, "cgroup": 1, "pid": 0, "tid": 0, "comm": "forkscope", "kind": "branch_fork", "duration_ns": 3_000_000, "children": ["kid"], "phases_us": {"freeze": 200, "files": 900}}),
                ],
            ),
            (
                "kid".into(),
                vec![
                    json!({"ts_ns": 3_004_000, "cgroup": 2, "pid": 0, "tid": 0, "comm": "forkscope", "kind": "branch_start", "parent": "main"}),
                    json!({"ts_ns": 5_000_000, "cgroup": 2, "pid": 0, "tid": 0, "comm": "forkscope", "kind": "branch_commit", "duration_ns": 1_000_000, "target": "main"}),
                    json!({"not": "an event"}),
                ],
            ),
        ]
    }

    #[test]
    fn figures_per_branch() {
        let r = report(&traces());
        let main = &r.branches[0];
        assert_eq!(main.events, 3);
        assert_eq!(main.kinds["file_write"], 2);
        assert_eq!(main.top_files[0].path, "/w/b");
        assert_eq!(main.top_destinations[0].dest, "127.0.0.1:80");
        assert_eq!(main.forks.len(), 1);
        assert_eq!(main.forks[0].into, ["kid"]);
        assert_eq!((main.start_ns, main.end_ns), (Some(1_000), Some(3_004_000)));
        let kid = &r.branches[1];
        assert_eq!(kid.parent.as_deref(), Some("main"));
        assert_eq!(kid.commits[0].duration_ns, 1_000_000);
        assert_eq!(kid.unreadable, 1);
        assert_eq!((r.start_ns, r.end_ns), (1_000, 6_000_000));
        let text = r.render();
        assert!(
            text.contains("forks (1): median 3.00 ms, max 3.00 ms"),
            "{text}"
        );
        assert!(
            text.contains("-> kid: 3.00 ms (freeze 0.20, files 0.90 ms)"),
            "{text}"
        );
        assert!(text.contains("branch kid (forked from main)"), "{text}");
    }

    #[test]
    fn a_branch_without_records_keeps_the_others_in_place() {
        let mut t = traces();
        t.push(("empty".into(), Vec::new()));
        t.push((
            "huge".into(),
            vec![json!({"ts_ns": u64::MAX, "cgroup": 3, "pid": 0, "tid": 0, "comm": "forkscope", "kind": "branch_commit", "duration_ns": u64::MAX})],
        ));
        let r = report(&t);
        assert_eq!(r.branches[2].start_ns, None);
        assert_eq!(r.start_ns, 1_000);
        assert!(
            r.render()
                .contains("branch empty (root), no records: 0 events")
        );
        let svg = svg::chart(&r, &svg::event_times(&t));
        assert_eq!(svg.matches(r#"class="branch""#).count(), 4);
    }

    #[test]
    fn an_export_reads_back_as_the_same_traces() {
        let t = traces();
        let doc = crate::perfetto::export(&t);
        let back = from_perfetto(&doc).unwrap();
        assert_eq!(back, t);
        assert!(from_perfetto(&json!({"x": 1})).is_err());
    }
}
