//! Processes outside the traced cgroup never appear, even while they run the same workload;
//! and a trace hooks nothing it does not use.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use forkscope_tests::{TempDir, require_root, trace};

#[test]
fn processes_outside_the_traced_cgroup_never_appear() {
    require_root();
    let dir = TempDir::new("isolation");
    let inside = dir.path().join("inside");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&inside).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    // The same workload, outside any traced cgroup, running all the while.
    let script = "while true; do echo data > f.txt; mkdir -p d; rm -r d; python3 -c 'open(\"p.txt\",\"w\").write(\"x\"*100)'; done";
    let mut bg = Command::new("sh")
        .args(["-c", script])
        .current_dir(&outside)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let inside_script = "for i in 1 2 3 4 5; do echo data > f.txt; mkdir -p d; rm -r d; python3 -c 'open(\"p.txt\",\"w\").write(\"x\"*100)'; done";
    let run = trace(&inside, &[], &["sh", "-c", inside_script]);
    let _ = bg.kill();
    let _ = bg.wait();
    assert_eq!(run.code(), Some(0), "{}", run.stderr());

    let outside_s = outside.to_string_lossy().into_owned();
    let cgroups: std::collections::BTreeSet<u64> = run
        .events
        .iter()
        .map(|e| e["cgroup"].as_u64().unwrap())
        .collect();
    assert_eq!(
        cgroups.len(),
        1,
        "every event comes from the one traced cgroup: {cgroups:?}"
    );
    for e in &run.events {
        for field in ["path", "new_path", "filename"] {
            if let Some(p) = e[field].as_str() {
                assert!(
                    !p.starts_with(&outside_s),
                    "an outside process leaked into the trace: {e}"
                );
            }
        }
    }
    // The traced side is complete: 5 rounds of each write, mkdir and unlink.
    let f = inside.join("f.txt").to_string_lossy().into_owned();
    assert_eq!(
        run.of_kind("file_write")
            .filter(|e| e["path"] == f.as_str())
            .count(),
        5
    );
    assert_eq!(run.of_kind("file_mkdir").count(), 5);
    // Every pid in the trace descends from the traced command: each first appears as a fork
    // child (or is the command itself, which execs first).
    let mut known: std::collections::BTreeSet<u64> = Default::default();
    let first = run.events.first().unwrap();
    assert_eq!(
        first["kind"], "proc_exec",
        "the trace starts with the command's exec"
    );
    known.insert(first["pid"].as_u64().unwrap());
    for e in &run.events {
        if e["kind"] == "page_dirty_summary" {
            continue;
        }
        let pid = e["pid"].as_u64().unwrap();
        assert!(
            known.contains(&pid),
            "pid {pid} appeared without being forked by a traced process: {e}"
        );
        if e["kind"] == "proc_fork" {
            known.insert(e["child_pid"].as_u64().unwrap());
        }
    }
}

/// Writes to links.txt the kinds of the eBPF links the shell's parent holds (`link_type` in
/// each of its descriptors' fdinfo).
/// (A descriptor closed meanwhile is skipped.)
const LINK_TYPES: &str = "for f in /proc/$PPID/fdinfo/*; do sed -n 's/^link_type:[[:space:]]*//p' \"$f\" 2>/dev/null; done > links.txt; true";

#[test]
fn a_trace_attaches_no_cgroup_hook_so_its_packets_run_no_program() {
    require_root();
    let dir = TempDir::new("trace-hooks");
    // The traced command's parent is `forkscope trace` itself: it lists the kinds of the
    // links that process holds while the trace runs.
    let run = trace(dir.path(), &[], &["sh", "-c", LINK_TYPES]);
    assert_eq!(run.code(), Some(0), "{}", run.stderr());
    let kinds = std::fs::read_to_string(dir.path().join("links.txt")).unwrap();
    let kinds: Vec<&str> = kinds.lines().collect();
    // The tracer's own hooks: the syscall dispatcher and the page-fault and fork programs
    // (raw tracepoints), exec and exit (perf tracepoints).
    assert!(
        kinds.iter().filter(|k| **k == "raw_tracepoint").count() >= 4,
        "the trace's raw tracepoint links are listed: {kinds:?}"
    );
    // The socket-address and egress programs serve network policies and branches without
    // per-write detail, neither of which a trace has: attached, they would run for every
    // packet the command sends.
    assert!(
        !kinds.contains(&"cgroup"),
        "a trace holds no cgroup link: {kinds:?}"
    );
}
