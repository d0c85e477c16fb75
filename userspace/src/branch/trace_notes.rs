//! A branch's own operations, written into its trace between its processes' events, so
//! that a trace tells when the branch started, forked and committed and how long each took
//! (read by `forkscope report` and the Perfetto export): `branch_start` (in a new branch's
//! trace, with its parent), `branch_fork` (in the parent's, with the children, the duration
//! and its phases) and `branch_commit` (in the committed branch's, with its target).
//! Nothing is written when the daemon does not trace.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{BranchRecord, Manager};
use crate::{cgroup::Cgroup, events::TraceEvent};

/// Now on the clock of the kernel's events.
pub(super) use crate::events::record::now_ns;

/// `{"freeze_us": 3, ...}` as `{"freeze": 3, ...}`.
fn phases_us(phases: &impl Serialize) -> BTreeMap<String, u64> {
    let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(phases) else {
        return BTreeMap::new();
    };
    fields
        .into_iter()
        .filter_map(|(k, v)| Some((k.strip_suffix("_us")?.to_string(), v.as_u64()?)))
        .collect()
}

impl Manager {
    fn note(&self, b: &BranchRecord, kind: &'static str, ts_ns: u64, fill: TraceEvent) {
        let Some(t) = &self.tracker else {
            return;
        };
        let Ok(cg) = Cgroup::open(&b.cgroup) else {
            return;
        };
        t.note(
            cg.id(),
            &TraceEvent {
                ts_ns,
                cgroup: cg.id(),
                comm: "forkscope".into(),
                kind: kind.into(),
                ..fill
            },
        );
    }

    /// `b` started at `since` (forked from `parent`, or run).
    pub(super) fn note_start(&self, b: &BranchRecord, since: u64) {
        let fill = TraceEvent {
            parent: b.parent.clone(),
            duration_ns: Some(now_ns().saturating_sub(since)),
            ..Default::default()
        };
        self.note(b, "branch_start", since, fill);
    }

    /// `parent` was forked into `children` from `since` until now.
    pub(super) fn note_fork(
        &self,
        parent: &BranchRecord,
        children: &[BranchRecord],
        since: u64,
        phases: &impl Serialize,
    ) {
        let end = now_ns();
        let fill = TraceEvent {
            children: Some(children.iter().map(|c| c.name.clone()).collect()),
            duration_ns: Some(end.saturating_sub(since)),
            // `held` overlaps the others (the parent's processes held meanwhile) and `total`
            // is the duration: not phases.
            phases_us: Some(
                phases_us(phases)
                    .into_iter()
                    .filter(|(k, _)| k != "held" && k != "total")
                    .collect(),
            ),
            ..Default::default()
        };
        self.note(parent, "branch_fork", since, fill);
        // A child's life starts with the fork (its clones run before the fork returns).
        for c in children {
            self.note(
                c,
                "branch_start",
                since,
                TraceEvent {
                    parent: Some(parent.name.clone()),
                    ..Default::default()
                },
            );
        }
    }

    /// `b` was committed into `target` from `since` until now.
    pub(super) fn note_commit(
        &self,
        b: &BranchRecord,
        target: &str,
        since: u64,
        phases: &impl Serialize,
    ) {
        let fill = TraceEvent {
            target: Some(target.to_string()),
            duration_ns: Some(now_ns().saturating_sub(since)),
            phases_us: Some(phases_us(phases)),
            ..Default::default()
        };
        self.note(b, "branch_commit", since, fill);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_named_without_their_unit() {
        let p = super::super::ForkPhases {
            freeze_us: 3,
            files_us: 9,
            ..Default::default()
        };
        let m = phases_us(&p);
        assert_eq!(m["freeze"], 3);
        assert_eq!(m["files"], 9);
        assert_eq!(m["processes"], 0);
    }
}
