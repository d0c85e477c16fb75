//! `forkscope report`: per-branch figures and the SVG chart of the branch tree, from a real
//! daemon's traces (real programs writing files and talking to a server on loopback),
//! checked against the trace they summarize and against what the fork and commit reported.

use std::{collections::BTreeMap, path::Path};

use forkscope_tests::{TempDir, daemon::Daemon, http::recording_http_server, require_root};
use serde_json::Value;

/// The phases a `fork` or `commit` printed (`freeze 12 us, files 40 us, ...`).
fn printed_phases(text: &str) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c == ',' || c == ':' || c == '(' || c == ')')
        .filter(|w| !w.is_empty())
        .collect();
    for w in words.windows(3) {
        if w[2] == "us"
            && let Ok(n) = w[1].parse()
        {
            m.insert(w[0].to_string(), n);
        }
    }
    m
}

/// Figures computed here from the records themselves: events by kind, bytes per file
/// written, bytes per destination.
struct Expected {
    kinds: BTreeMap<String, u64>,
    files: BTreeMap<String, u64>,
    dests: BTreeMap<String, u64>,
}

fn expected(records: &[Value]) -> Expected {
    let mut x = Expected {
        kinds: BTreeMap::new(),
        files: BTreeMap::new(),
        dests: BTreeMap::new(),
    };
    for r in records {
        let kind = r["kind"].as_str().unwrap();
        if kind.starts_with("branch_") {
            continue;
        }
        *x.kinds.entry(kind.to_string()).or_default() += 1;
        let bytes = r["bytes"].as_i64().unwrap_or(0).max(0) as u64;
        if kind == "file_write" {
            *x.files
                .entry(r["path"].as_str().unwrap_or("?").to_string())
                .or_default() += bytes;
        }
        if kind == "net_send" {
            // As the report names them: addr:port, [addr]:port, else the family.
            let dest = match r["family"].as_str().unwrap_or("unknown") {
                "inet" => format!("{}:{}", r["addr"].as_str().unwrap(), r["port"]),
                "inet6" => format!("[{}]:{}", r["addr"].as_str().unwrap(), r["port"]),
                family => family.to_string(),
            };
            *x.dests.entry(dest).or_default() += bytes;
        }
    }
    x
}

fn records_of(doc: &Value, branch: &str) -> Vec<Value> {
    let events = doc["traceEvents"].as_array().unwrap();
    let track = events
        .iter()
        .find(|e| e["name"] == "process_name" && e["args"]["name"] == format!("branch {branch}"))
        .unwrap_or_else(|| panic!("no track for {branch}"))["pid"]
        .clone();
    events
        .iter()
        .filter(|e| (e["ph"] == "i" || e["ph"] == "X") && e["pid"] == track)
        .map(|e| e["args"].clone())
        .collect()
}

fn python_count(svg: &Path, xpath: &str) -> usize {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, xml.etree.ElementTree as E\n\
             root = E.parse(sys.argv[1]).getroot()\n\
             print(len(root.findall(sys.argv[2], {'s': 'http://www.w3.org/2000/svg'})))",
            svg.to_str().unwrap(),
            xpath,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the SVG parses as XML: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn the_report_and_its_chart_match_the_trace_of_an_exploration() {
    require_root();
    let dir = TempDir::new("report");
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    let (port, requests) = recording_http_server("127.0.0.1");
    let d = Daemon::start(dir.path());
    d.run_sleeping("main", &ws);
    d.ok(&[
        "exec",
        "main",
        "--",
        "sh",
        "-c",
        &format!(
            "dd if=/dev/zero of=big.bin bs=4096 count=3 2>/dev/null; echo hi > small.txt; \
             head -c 1500 /dev/zero | curl -s -o /dev/null --data-binary @- http://127.0.0.1:{port}/"
        ),
    ]);
    // The server got the request (so main's trace has the send to it).
    let (_, body) = requests
        .recv_timeout(std::time::Duration::from_secs(5))
        .unwrap();
    assert_eq!(body.len(), 1500);
    let fork = d.cli(&["fork", "main", "-n", "2"]);
    assert!(fork.status.success());
    let kids: Vec<String> = String::from_utf8_lossy(&fork.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(kids.len(), 2);
    let fork_phases = printed_phases(&String::from_utf8_lossy(&fork.stderr));
    d.ok(&["exec", &kids[0], "--", "sh", "-c", "printf 12345 > fix.txt"]);
    d.ok(&[
        "exec",
        &kids[1],
        "--",
        "sh",
        "-c",
        "rm small.txt; seq 1000 > other.txt",
    ]);
    let commit: Value = serde_json::from_str(&d.ok(&["commit", &kids[0], "--json"])).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500)); // the tracer drains
    let export = dir.path().join("trace.json");
    d.ok(&["export", "main", "--tree", "-o", export.to_str().unwrap()]);
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&export).unwrap()).unwrap();

    let svg = dir.path().join("tree.svg");
    let from_file: Value = serde_json::from_str(&d.ok(&[
        "report",
        "--input",
        export.to_str().unwrap(),
        "--json",
        "--svg",
        svg.to_str().unwrap(),
    ]))
    .unwrap();
    let branches = from_file["branches"].as_array().unwrap();
    let names: Vec<&str> = branches
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["main", kids[0].as_str(), kids[1].as_str()]);
    for b in branches {
        let name = b["name"].as_str().unwrap();
        let records = records_of(&doc, name);
        let x = expected(&records);
        // Events by kind, one for one with the trace.
        let kinds: BTreeMap<String, u64> = serde_json::from_value(b["kinds"].clone()).unwrap();
        assert_eq!(kinds, x.kinds, "{name}");
        assert_eq!(
            b["events"].as_u64().unwrap(),
            x.kinds.values().sum::<u64>(),
            "{name}"
        );
        // The top files and destinations: the heaviest, with the trace's totals.
        assert_eq!(b["files_written"].as_u64().unwrap() as usize, x.files.len());
        let mut heaviest: Vec<(&String, &u64)> = x.files.iter().collect();
        heaviest.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let top: Vec<(String, u64)> = b["top_files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["path"].as_str().unwrap().to_string(),
                    f["bytes"].as_u64().unwrap(),
                )
            })
            .collect();
        let want: Vec<(String, u64)> = heaviest
            .iter()
            .take(10)
            .map(|(p, n)| ((*p).clone(), **n))
            .collect();
        assert_eq!(top, want, "{name}");
        for dest in b["top_destinations"].as_array().unwrap() {
            let key = dest["dest"].as_str().unwrap();
            assert_eq!(dest["bytes"].as_u64(), x.dests.get(key).copied(), "{key}");
        }
        assert_eq!(b["destinations"].as_u64().unwrap() as usize, x.dests.len());
        // Its start and parent, from its branch_start record.
        let start: Vec<&Value> = records
            .iter()
            .filter(|r| r["kind"] == "branch_start")
            .collect();
        assert_eq!(start.len(), 1, "{name}: one branch_start");
        assert_eq!(b["parent"], start[0]["parent"]);
        assert_eq!(b["start_ns"], start[0]["ts_ns"]);
    }
    // The workload: main wrote big.bin in 3 writes of 4096 bytes and sent the request.
    let main = &branches[0];
    let big = main["top_files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"].as_str().unwrap().ends_with("/big.bin"))
        .expect("big.bin among main's top files");
    assert_eq!(
        (big["bytes"].as_u64(), big["writes"].as_u64()),
        (Some(12288), Some(3))
    );
    let server = format!("127.0.0.1:{port}");
    let sent = main["top_destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["dest"] == server.as_str())
        .expect("the server among main's destinations");
    assert!(sent["bytes"].as_u64().unwrap() >= 1500, "{sent}");
    assert_eq!(sent["connects"], 1);
    // The fork: one operation into both children, its phases those `fork` printed.
    let forks = main["forks"].as_array().unwrap();
    assert_eq!(forks.len(), 1);
    let into: Vec<&str> = forks[0]["into"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(into, [kids[0].as_str(), kids[1].as_str()]);
    for phase in forkscope_tests::FORK_PHASES {
        // The words `forkscope fork` prints for them.
        let us = match phase {
            "start" => "sandboxes",
            "processes" => "clones",
            p => p,
        };
        assert_eq!(
            forks[0]["phases_us"][phase].as_u64(),
            fork_phases.get(us).copied(),
            "fork phase {phase}: {fork_phases:?}"
        );
    }
    let fork_ns = forks[0]["duration_ns"].as_u64().unwrap();
    assert_eq!(forks[0]["phases_us"].get("total"), None, "not a phase");
    assert_eq!(forks[0]["phases_us"].get("held"), None, "not a phase");
    let phase_sum: u64 = forkscope_tests::FORK_PHASES
        .iter()
        .map(|p| forks[0]["phases_us"][p].as_u64().unwrap())
        .sum();
    assert!(
        fork_ns >= phase_sum * 1000,
        "{fork_ns} ns < phases {phase_sum} us"
    );
    // The commit: in the committed branch, into main, its phases those `commit` returned.
    let commits = branches[1]["commits"].as_array().unwrap();
    assert_eq!(commits.len(), 1);
    assert_eq!(commits[0]["into"], serde_json::json!(["main"]));
    for phase in ["freeze", "plan", "stage", "apply", "thaw"] {
        assert_eq!(
            commits[0]["phases_us"][phase],
            commit["phases"][format!("{phase}_us")],
            "commit phase {phase}"
        );
    }
    assert!(branches[2]["commits"].as_array().unwrap().is_empty());

    // The same figures straight from the daemon.
    let live: Value = serde_json::from_str(&d.ok(&["report", "main", "--tree", "--json"])).unwrap();
    for (a, b) in live["branches"].as_array().unwrap().iter().zip(branches) {
        for key in ["name", "parent", "kinds", "top_files", "forks", "commits"] {
            assert_eq!(a[key], b[key], "{key}");
        }
    }
    // The text names every branch, the fork's latency and the commit.
    let text = d.ok(&["report", "--input", export.to_str().unwrap()]);
    assert!(
        text.contains(&format!("branch {} (forked from main)", kids[1])),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "-> {}, {}: {:.2} ms",
            kids[0],
            kids[1],
            fork_ns as f64 / 1e6
        )),
        "{text}"
    );
    assert!(text.contains("commits (1)"), "{text}");

    // The chart: valid XML, a row per branch, a connector per child, a commit mark.
    assert_eq!(python_count(&svg, ".//s:g[@class='branch']"), 3);
    assert_eq!(python_count(&svg, ".//s:path[@class='fork']"), 2);
    assert_eq!(python_count(&svg, ".//s:path[@class='commit']"), 1);
    assert!(python_count(&svg, ".//s:rect[@class='tick']") > 0);
}

#[test]
fn bad_input_is_explained() {
    require_root();
    let dir = TempDir::new("report-bad");
    let d = Daemon::start(dir.path());
    let fails = |args: &[&str], says: &str| {
        let out = d.cli(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains(says), "{args:?}: {err}");
    };
    fails(&["report"], "--input");
    let missing = dir.path().join("missing.json");
    fails(
        &["report", "--input", missing.to_str().unwrap()],
        "missing.json",
    );
    let not_json = dir.path().join("notes.txt");
    std::fs::write(&not_json, "hello").unwrap();
    fails(
        &["report", "--input", not_json.to_str().unwrap()],
        "written by `forkscope export`",
    );
    let other = dir.path().join("other.json");
    std::fs::write(&other, r#"{"traceEvents": []}"#).unwrap();
    fails(
        &["report", "--input", other.to_str().unwrap()],
        "no branch tracks",
    );
    fails(&["report", "nosuch"], "nosuch");
}
