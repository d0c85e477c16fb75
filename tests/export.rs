//! `forkscope export`: branch traces as Chrome/Perfetto trace-event JSON, against a real
//! daemon and real programs.

use forkscope_tests::{TempDir, daemon::Daemon, parse_jsonl, require_root};
use serde_json::Value;

#[test]
fn a_tree_exports_one_event_per_recorded_event_on_a_track_per_branch() {
    require_root();
    let dir = TempDir::new("export");
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    let d = Daemon::start(dir.path());
    d.run_sleeping("main", &ws);
    d.ok(&[
        "exec",
        "main",
        "--",
        "sh",
        "-c",
        "echo a > a.txt; mkdir sub; mv a.txt sub/",
    ]);
    d.ok(&["fork", "main", "--name", "kid"]);
    d.ok(&["exec", "kid", "--", "sh", "-c", "echo b > b.txt; rm -r sub"]);
    std::thread::sleep(std::time::Duration::from_millis(500)); // the tracer drains
    let out = dir.path().join("trace.json");
    d.ok(&["export", "main", "--tree", "-o", out.to_str().unwrap()]);
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).expect("valid JSON");
    let events = doc["traceEvents"].as_array().expect("a traceEvents array");
    // Tracks: one process per branch, named after it.
    let track = |branch: &str| {
        events
            .iter()
            .find(|e| {
                e["ph"] == "M"
                    && e["name"] == "process_name"
                    && e["args"]["name"] == format!("branch {branch}")
            })
            .and_then(|e| e["pid"].as_u64())
            .unwrap_or_else(|| panic!("no track for {branch}"))
    };
    for (branch, pid) in [("main", track("main")), ("kid", track("kid"))] {
        let exported: Vec<&Value> = events
            .iter()
            .filter(|e| (e["ph"] == "i" || e["ph"] == "X") && e["pid"].as_u64() == Some(pid))
            .collect();
        // Every event has what the trace-event format needs.
        for e in &exported {
            assert!(
                e["ts"].is_number() && e["name"].is_string() && e["tid"].is_number(),
                "{e}"
            );
        }
        // One for one with the branch's recorded events, in order (the trace may have
        // grown since the export: what was exported is its beginning).
        let recorded = parse_jsonl(&d.ok(&["trace", "--branch", branch]));
        assert!(!exported.is_empty(), "{branch}: nothing exported");
        assert!(recorded.len() >= exported.len());
        for (x, r) in exported.iter().zip(&recorded) {
            assert_eq!(&x["args"], r, "{branch}");
            assert_eq!(x["name"], r["kind"]);
            assert_eq!(x["tid"], r["pid"]);
            assert_eq!(
                x["ts"].as_f64().unwrap(),
                r["ts_ns"].as_u64().unwrap() as f64 / 1000.0
            );
        }
        let kinds: Vec<&str> = exported.iter().filter_map(|e| e["name"].as_str()).collect();
        let want = if branch == "main" {
            "file_rename"
        } else {
            "file_unlink"
        };
        assert!(kinds.contains(&want), "{branch}: {kinds:?}");
        // The branch's own operations: its start, and main's fork, a slice as long as the
        // fork took, on the branch-operations track.
        assert!(kinds.contains(&"branch_start"), "{branch}: {kinds:?}");
        if branch == "main" {
            let fork = exported
                .iter()
                .find(|e| e["name"] == "branch_fork")
                .expect("main's fork");
            assert_eq!(
                (fork["ph"].as_str(), fork["tid"].as_u64()),
                (Some("X"), Some(0))
            );
            assert_eq!(
                fork["dur"].as_f64().unwrap(),
                fork["args"]["duration_ns"].as_u64().unwrap() as f64 / 1000.0
            );
            assert_eq!(fork["args"]["children"], serde_json::json!(["kid"]));
        }
        // Processes are named.
        assert!(
            events
                .iter()
                .any(|e| e["name"] == "thread_name" && e["pid"].as_u64() == Some(pid))
        );
    }
}
