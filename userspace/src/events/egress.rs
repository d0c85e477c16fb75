//! `net_send` records for branches traced without per-write detail, made from what the
//! `egress` cgroup_skb program counted in `EGRESS` (bytes and packets per branch and
//! destination): each harvest writes what was sent since the last one. The kernel side
//! knows no process: `pid` and `tid` are 0 and `comm` is empty.
//!
//! The map's entries are running totals that outlive a daemon (the map is pinned), so the
//! totals already written for a branch are kept next to its trace ([`Egress::save`]) and read
//! back when a restarted daemon tracks it again ([`Egress::load`]): nothing is written twice.

use std::{collections::HashMap, path::Path};

use forkscope_common::egress::{EgressCount, EgressKey};

use super::{
    TraceEvent,
    resolve::{addr_text, family_name},
};

/// The counts last turned into records, per key.
#[derive(Default)]
pub struct Egress {
    seen: HashMap<EgressKey, EgressCount>,
}

impl Egress {
    /// Records for what `counts` (the map's current totals, summed over CPUs) holds beyond
    /// what the last harvest saw; only for cgroups `wanted` accepts. A total below the last
    /// one (the LRU map dropped and restarted the entry) counts from zero.
    pub fn harvest(
        &mut self,
        counts: &[(EgressKey, EgressCount)],
        now_ns: u64,
        wanted: impl Fn(u64) -> bool,
    ) -> Vec<TraceEvent> {
        let mut out = Vec::new();
        for (key, now) in counts {
            if !wanted(key.cgroup) {
                continue;
            }
            let last = self.seen.insert(*key, *now).unwrap_or_default();
            let (bytes, packets) = if now.bytes >= last.bytes && now.packets >= last.packets {
                (now.bytes - last.bytes, now.packets - last.packets)
            } else {
                (now.bytes, now.packets)
            };
            if bytes == 0 {
                continue;
            }
            out.push(record(key, bytes, packets, now_ns));
        }
        out
    }

    /// Takes back the totals [`Egress::save`] wrote for cgroup `id` in `path` (none there:
    /// nothing written yet).
    pub fn load(&mut self, id: u64, path: &Path) {
        let Ok(text) = std::fs::read_to_string(path) else {
            return;
        };
        let Ok(saved) = serde_json::from_str::<Vec<Saved>>(&text) else {
            log::warn!("{}: unreadable, ignored", path.display());
            return;
        };
        for s in saved {
            let key = EgressKey {
                cgroup: id,
                addr: s.addr,
                port: s.port,
                family: s.family,
                protocol: s.protocol,
                _pad: [0; 3],
            };
            self.seen.insert(
                key,
                EgressCount {
                    bytes: s.bytes,
                    packets: s.packets,
                },
            );
        }
    }

    /// Writes the totals already turned into records for cgroup `id` to `path` (replaced
    /// whole, by a rename).
    pub fn save(&self, id: u64, path: &Path) -> std::io::Result<()> {
        let saved: Vec<Saved> = self
            .seen
            .iter()
            .filter(|(k, _)| k.cgroup == id)
            .map(|(k, c)| Saved {
                addr: k.addr,
                port: k.port,
                family: k.family,
                protocol: k.protocol,
                bytes: c.bytes,
                packets: c.packets,
            })
            .collect();
        let tmp = path.with_extension("json.new");
        std::fs::write(&tmp, serde_json::to_vec(&saved)?)?;
        std::fs::rename(&tmp, path)
    }

    /// Forgets the counts of cgroup `id` (no longer traced).
    pub fn forget(&mut self, id: u64) {
        self.seen.retain(|k, _| k.cgroup != id);
    }
}

/// One destination's totals as [`Egress::save`] keeps them.
#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    addr: [u8; 16],
    port: u16,
    family: u16,
    protocol: u8,
    bytes: u64,
    packets: u64,
}

fn record(key: &EgressKey, bytes: u64, packets: u64, ts_ns: u64) -> TraceEvent {
    TraceEvent {
        ts_ns,
        cgroup: key.cgroup,
        kind: "net_send".into(),
        family: Some(family_name(key.family)),
        addr: addr_text(key.family, &key.addr),
        port: Some(key.port),
        bytes: Some(bytes as i64),
        packets: Some(packets),
        ..TraceEvent::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(cgroup: u64, port: u16) -> EgressKey {
        EgressKey {
            cgroup,
            addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            port,
            family: 2,
            protocol: 6,
            _pad: [0; 3],
        }
    }

    fn count(bytes: u64, packets: u64) -> EgressCount {
        EgressCount { bytes, packets }
    }

    #[test]
    fn each_harvest_writes_what_was_sent_since_the_last() {
        let mut e = Egress::default();
        let first = e.harvest(&[(key(7, 80), count(1000, 2))], 1, |_| true);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].bytes, Some(1000));
        assert_eq!(first[0].packets, Some(2));
        assert_eq!(first[0].addr.as_deref(), Some("127.0.0.1"));
        assert_eq!(first[0].port, Some(80));
        assert_eq!(first[0].kind, "net_send");
        assert!(
            e.harvest(&[(key(7, 80), count(1000, 2))], 2, |_| true)
                .is_empty(),
            "nothing new"
        );
        let more = e.harvest(&[(key(7, 80), count(1500, 3))], 3, |_| true);
        assert_eq!((more[0].bytes, more[0].packets), (Some(500), Some(1)));
    }

    #[test]
    fn a_restarted_entry_counts_from_zero_and_unwanted_cgroups_are_skipped() {
        let mut e = Egress::default();
        e.harvest(&[(key(7, 80), count(1000, 2))], 1, |_| true);
        let again = e.harvest(&[(key(7, 80), count(300, 1))], 2, |_| true);
        assert_eq!(
            again[0].bytes,
            Some(300),
            "the LRU map dropped the entry in between"
        );
        assert!(
            e.harvest(&[(key(8, 80), count(5, 1))], 3, |c| c == 7)
                .is_empty()
        );
        e.forget(7);
        let after = e.harvest(&[(key(7, 80), count(300, 1))], 4, |_| true);
        assert_eq!(after[0].bytes, Some(300), "forgotten: counted from zero");
    }

    #[test]
    fn saved_totals_taken_back_by_a_new_harvester_are_not_written_again() {
        let dir = std::env::temp_dir().join(format!("egress-saved-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("egress-seen.json");
        let mut before = Egress::default();
        before.harvest(
            &[(key(7, 80), count(1000, 2)), (key(8, 80), count(9, 1))],
            1,
            |_| true,
        );
        before.save(7, &path).unwrap();
        // A restarted daemon: the pinned map still holds the totals, plus what came since.
        let mut after = Egress::default();
        after.load(7, &path);
        let records = after.harvest(&[(key(7, 80), count(1200, 3))], 2, |c| c == 7);
        assert_eq!(records.len(), 1);
        assert_eq!((records[0].bytes, records[0].packets), (Some(200), Some(1)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
