//! Totals of a trace and their human-readable rendering (printed after `forkscope trace`).

use std::{borrow::Cow, collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use super::TraceEvent;
use crate::bpf::Stats;

/// Processes listed by name in the rendered summary (the ones that dirtied most pages).
const TOP_PROCESSES: usize = 10;

/// Bytes and calls per file written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FileTotals {
    pub bytes: u64,
    pub writes: u64,
}

/// Bytes, sends and connects per destination.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DestTotals {
    pub bytes: u64,
    pub sends: u64,
    pub connects: u64,
}

/// Pages dirtied by one process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProcPages {
    pub pid: u32,
    pub comm: String,
    pub pages: u64,
}

/// What a trace saw, in total.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// Files written (path -> totals).
    pub files: BTreeMap<String, FileTotals>,
    /// Destinations sent to (`addr:port`, `[addr]:port`, or the family name) -> totals.
    pub destinations: BTreeMap<String, DestTotals>,
    /// Dirtied pages per process.
    pub pages: Vec<ProcPages>,
    /// Events per kind.
    pub kinds: BTreeMap<Cow<'static, str>, u64>,
    /// Counters from the kernel side (events lost among them).
    pub stats: Stats,
    /// Paths that could not be made absolute.
    pub unresolved_paths: u64,
    /// Processes whose dirty-page count is inexact: the kernel's page set was full and
    /// evicted some of their entries (their page_dirty_summary has `pages_recorded`).
    pub pages_inexact: u64,
}

/// `addr:port` for IPv4, `[addr]:port` for IPv6, else the family name.
pub fn destination(e: &TraceEvent) -> String {
    match (e.family.as_deref(), &e.addr, e.port) {
        (Some("inet"), Some(a), Some(p)) => format!("{a}:{p}"),
        (Some("inet6"), Some(a), Some(p)) => format!("[{a}]:{p}"),
        (Some(f), _, _) => f.to_string(),
        _ => "unknown".into(),
    }
}

impl Summary {
    /// Adds one event.
    pub fn add(&mut self, e: &TraceEvent) {
        *self.kinds.entry(e.kind.clone()).or_default() += 1;
        match e.kind.as_ref() {
            "file_write" => {
                let path = e.path.as_deref().unwrap_or("?");
                if !self.files.contains_key(path) {
                    self.files.insert(path.to_string(), FileTotals::default());
                }
                let f = self.files.get_mut(path).expect("inserted above");
                f.bytes += e.bytes.unwrap_or(0).max(0) as u64;
                f.writes += e.calls.unwrap_or(1);
            }
            "net_send" => {
                let d = self.destinations.entry(destination(e)).or_default();
                d.bytes += e.bytes.unwrap_or(0).max(0) as u64;
                d.sends += e.calls.unwrap_or(1);
            }
            "net_connect" => {
                self.destinations
                    .entry(destination(e))
                    .or_default()
                    .connects += 1
            }
            "page_dirty_summary" => {
                self.pages.push(ProcPages {
                    pid: e.pid,
                    comm: e.comm.clone(),
                    pages: e.pages.unwrap_or(0),
                });
                self.pages_inexact += u64::from(e.pages_recorded.is_some());
            }
            _ => {}
        }
    }

    /// The summary as text for a person.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let total: u64 = self.kinds.values().sum();
        let _ = writeln!(s, "forkscope trace summary: {total} events");
        let _ = writeln!(s, "files written ({}):", self.files.len());
        for (p, t) in &self.files {
            let _ = writeln!(s, "  {:>12} bytes in {:>6} writes  {p}", t.bytes, t.writes);
        }
        let _ = writeln!(s, "destinations ({}):", self.destinations.len());
        for (d, t) in &self.destinations {
            let _ = writeln!(
                s,
                "  {:>12} bytes in {:>6} sends, {} connects  {d}",
                t.bytes, t.sends, t.connects
            );
        }
        let total_pages: u64 = self.pages.iter().map(|p| p.pages).sum();
        let _ = writeln!(
            s,
            "dirtied pages: {total_pages} ({} KiB) in {} processes",
            total_pages * 4,
            self.pages.len()
        );
        let mut top: Vec<&ProcPages> = self.pages.iter().collect();
        top.sort_by(|a, b| b.pages.cmp(&a.pages).then(a.pid.cmp(&b.pid)));
        for p in top.iter().take(TOP_PROCESSES) {
            let _ = writeln!(
                s,
                "  {:>8} pages ({} KiB)  pid {} {}",
                p.pages,
                p.pages * 4,
                p.pid,
                p.comm
            );
        }
        if top.len() > TOP_PROCESSES {
            let rest: u64 = top[TOP_PROCESSES..].iter().map(|p| p.pages).sum();
            let _ = writeln!(
                s,
                "  {:>8} pages in {} more processes",
                rest,
                top.len() - TOP_PROCESSES
            );
        }
        let _ = writeln!(
            s,
            "lost events: {}{}",
            self.stats.lost,
            if self.stats.lost > 0 {
                "  (ring buffer full: raise --ring-mb)"
            } else {
                ""
            }
        );
        if self.stats.pages_overflow > 0 {
            let _ = writeln!(
                s,
                "pages not recorded (page set full): {}",
                self.stats.pages_overflow
            );
        }
        if self.pages_inexact > 0 {
            let _ = writeln!(
                s,
                "dirtied pages inexact for {} processes (the page set was full and evicted entries: raise --dirty-regions)",
                self.pages_inexact
            );
        }
        if self.unresolved_paths > 0 {
            let _ = writeln!(
                s,
                "paths left relative (directory unknown): {}",
                self.unresolved_paths
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: &str) -> TraceEvent {
        TraceEvent {
            kind: kind.to_string().into(),
            ..Default::default()
        }
    }

    #[test]
    fn totals_files_and_destinations() {
        let mut s = Summary::default();
        for n in [10, 20] {
            s.add(&TraceEvent {
                path: Some("/t/a".into()),
                bytes: Some(n),
                ..ev("file_write")
            });
        }
        let send = TraceEvent {
            family: Some("inet".into()),
            addr: Some("127.0.0.1".into()),
            port: Some(9),
            bytes: Some(5),
            ..ev("net_send")
        };
        s.add(&send);
        s.add(&TraceEvent {
            bytes: None,
            ..TraceEvent {
                kind: "net_connect".into(),
                ..send.clone()
            }
        });
        assert_eq!(
            s.files["/t/a"],
            FileTotals {
                bytes: 30,
                writes: 2
            }
        );
        assert_eq!(
            s.destinations["127.0.0.1:9"],
            DestTotals {
                bytes: 5,
                sends: 1,
                connects: 1
            }
        );
        let text = s.render();
        assert!(text.contains("30 bytes in      2 writes  /t/a"), "{text}");
        assert!(text.contains("lost events: 0"), "{text}");
    }

    #[test]
    fn a_page_count_the_full_set_made_inexact_is_shown() {
        let mut s = Summary::default();
        s.add(&TraceEvent {
            pid: 7,
            pages: Some(40),
            ..ev("page_dirty_summary")
        });
        assert_eq!(s.pages_inexact, 0);
        assert!(!s.render().contains("inexact"), "{}", s.render());
        s.add(&TraceEvent {
            pid: 8,
            pages: Some(300),
            pages_recorded: Some(120),
            ..ev("page_dirty_summary")
        });
        assert_eq!(s.pages_inexact, 1);
        let text = s.render();
        assert!(
            text.contains("dirtied pages inexact for 1 processes")
                && text.contains("raise --dirty-regions"),
            "{text}"
        );
    }
}
