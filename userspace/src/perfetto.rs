//! Branch traces in the Chrome/Perfetto trace-event JSON format (opens in ui.perfetto.dev
//! and chrome://tracing): one process track per branch (named after it), one thread track
//! per process of the branch (named after its command), one instant event per recorded
//! event, named by its kind, with every field of the record in `args`. The branch's own
//! operations (`branch_fork`, `branch_commit`, with a duration) are slices on a track of
//! their own, "branch operations" (thread 0).

use serde_json::{Value, json};

/// The trace-event document for `branches`: (branch name, its events as recorded in its
/// trace, one JSON object each).
pub fn export(branches: &[(String, Vec<Value>)]) -> Value {
    let mut events = Vec::new();
    for (track, (name, recorded)) in branches.iter().enumerate() {
        let track = track as u64 + 1;
        events.push(json!({
            "ph": "M", "name": "process_name", "pid": track, "tid": 0,
            "args": {"name": format!("branch {name}")},
        }));
        let mut named = std::collections::BTreeSet::new();
        for e in recorded {
            let pid = e["pid"].as_u64().unwrap_or(0);
            if named.insert(pid) {
                let thread = match pid {
                    0 => "branch operations".to_string(),
                    _ => format!("{} ({pid})", e["comm"].as_str().unwrap_or("?")),
                };
                events.push(json!({
                    "ph": "M", "name": "thread_name", "pid": track, "tid": pid,
                    "args": {"name": thread},
                }));
            }
            let ts_ns = e["ts_ns"].as_u64().unwrap_or(0);
            let kind = e["kind"].as_str().unwrap_or("event");
            let mut event = json!({
                "ph": "i",
                "s": "t",
                "name": kind,
                "cat": kind.split('_').next().unwrap_or("event"),
                "ts": ts_ns as f64 / 1000.0,
                "pid": track,
                "tid": pid,
                "args": e,
            });
            if let Some(ns) = e["duration_ns"].as_u64().filter(|_| kind != "branch_start") {
                event["ph"] = "X".into();
                event["dur"] = (ns as f64 / 1000.0).into();
                event.as_object_mut().expect("an object").remove("s");
            }
            events.push(event);
        }
    }
    json!({ "traceEvents": events, "displayTimeUnit": "ns" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_instant_per_event_on_its_branch_and_process_tracks() {
        let a = vec![
            json!({"ts_ns": 1_500, "pid": 7, "comm": "sh", "kind": "proc_exec"}),
            json!({"ts_ns": 2_000, "pid": 8, "comm": "git", "kind": "file_write"}),
        ];
        let b = vec![
            json!({"ts_ns": 3_000, "pid": 9, "comm": "curl", "kind": "net_connect"}),
            json!({"ts_ns": 4_000, "pid": 0, "comm": "forkscope", "kind": "branch_fork",
                   "duration_ns": 2_500, "children": ["c"]}),
        ];
        let doc = export(&[("main".into(), a), ("b1".into(), b)]);
        let ev = doc["traceEvents"].as_array().unwrap();
        let instants: Vec<&Value> = ev.iter().filter(|e| e["ph"] == "i").collect();
        assert_eq!(instants.len(), 3);
        assert_eq!(instants[0]["ts"], 1.5);
        assert_eq!(
            (instants[2]["pid"].as_u64(), instants[2]["tid"].as_u64()),
            (Some(2), Some(9))
        );
        assert_eq!(instants[1]["cat"], "file");
        assert!(
            ev.iter()
                .any(|e| e["name"] == "process_name" && e["args"]["name"] == "branch b1")
        );
        assert!(
            ev.iter()
                .any(|e| e["name"] == "thread_name" && e["args"]["name"] == "git (8)")
        );
        let fork = ev.iter().find(|e| e["name"] == "branch_fork").unwrap();
        assert_eq!(
            (fork["ph"].as_str(), fork["dur"].as_f64()),
            (Some("X"), Some(2.5))
        );
        assert!(ev.iter().any(|e| e["name"] == "thread_name"
            && e["tid"] == 0
            && e["args"]["name"] == "branch operations"));
    }
}
