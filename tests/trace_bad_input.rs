//! Bad input and interruptions: clear messages, the right exit codes, nothing left behind.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use forkscope_tests::{
    TempDir, forkscope, leftover_cgroups, parse_jsonl, require_root, trace, workload,
};

#[test]
fn command_not_found_exits_127_with_a_message() {
    require_root();
    let dir = TempDir::new("notfound");
    let child = Command::new(forkscope())
        .args(["trace", "-o", "/dev/null", "--", "no-such-command-xyz"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(127));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("command not found: no-such-command-xyz"),
        "{err}"
    );
    assert!(leftover_cgroups(pid).is_empty(), "cgroup leaked");
    drop(dir);
}

#[test]
fn not_executable_exits_126() {
    require_root();
    let dir = TempDir::new("noexec");
    let f = dir.path().join("script.sh");
    std::fs::write(&f, "#!/bin/sh\necho hi\n").unwrap();
    let run = trace(dir.path(), &[], &[f.to_str().unwrap()]);
    assert_eq!(run.code(), Some(126), "{}", run.stderr());
    assert!(run.stderr().contains("cannot execute"), "{}", run.stderr());
}

#[test]
fn the_commands_exit_status_is_returned() {
    require_root();
    let dir = TempDir::new("status");
    let run = trace(dir.path(), &[], &["sh", "-c", "exit 42"]);
    assert_eq!(run.code(), Some(42));
    let exit = run.of_kind("proc_exit").last().unwrap();
    assert_eq!(exit["exit_code"], 42);
    let run = trace(dir.path(), &[], &["sh", "-c", "kill -TERM $$"]);
    assert_eq!(run.code(), Some(128 + 15));
    assert_eq!(run.of_kind("proc_exit").last().unwrap()["signal"], 15);
}

#[test]
fn not_root_gets_a_clear_message() {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(forkscope())
        .args(["trace", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs root"), "{err}");
}

#[test]
fn usage_errors_are_explained() {
    let out = Command::new(forkscope()).args(["trace"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("CMD"));
    let out = Command::new(forkscope())
        .args(["trace", "--ring-mb", "3", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("power of two"));
    let out = Command::new(forkscope())
        .args(["trace", "-o", "/nonexistent/dir/x", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("cannot create output file /nonexistent/dir/x")
    );
}

fn wait_for(path: &std::path::Path, timeout: Duration) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < timeout,
            "timed out waiting for {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `pid` is a live process (a zombie, killed but not yet reaped, is not).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

#[test]
fn ctrl_c_flushes_output_kills_the_tree_and_removes_the_cgroup() {
    require_root();
    let dir = TempDir::new("ctrlc");
    let events = dir.path().join("events.jsonl");
    let script = "sleep 1000 & echo $! > bgpid; echo started > marker; wait";
    let child = Command::new(forkscope())
        .current_dir(dir.path())
        .args([
            "trace",
            "-o",
            events.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            script,
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    wait_for(&dir.path().join("marker"), Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(100));
    let bg: i32 = std::fs::read_to_string(dir.path().join("bgpid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(bg));
    // SAFETY: sends SIGINT to the forkscope process we started.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("interrupted"), "{err}");
    assert!(
        err.contains("lost events: 0"),
        "the summary is printed: {err}"
    );
    assert!(!alive(bg), "the command's background process was killed");
    assert!(leftover_cgroups(pid).is_empty(), "cgroup removed");
    let evs = parse_jsonl(&std::fs::read_to_string(&events).unwrap());
    let marker = dir.path().join("marker").to_string_lossy().into_owned();
    assert!(
        evs.iter()
            .any(|e| e["kind"] == "file_write" && e["path"] == marker.as_str()),
        "output flushed"
    );
    assert!(
        evs.iter()
            .any(|e| e["kind"] == "proc_exit" && e["signal"] == 9),
        "kills are traced"
    );
}

#[test]
fn lost_events_are_counted_and_shown() {
    require_root();
    let dir = TempDir::new("lost");
    let events = dir.path().join("events.jsonl");
    let summary = dir.path().join("summary.json");
    let wl = workload("syscall_workload");
    let writes = 60_000;
    let script = format!(
        "echo > started; sleep 1; {} --writes {writes} --sends 0 --dir {} > done.tmp; mv done.tmp done",
        wl.display(),
        dir.path().display()
    );
    let child = Command::new(forkscope())
        .current_dir(dir.path())
        // One record per write, so the writes fill the ring buffer.
        .args(["trace", "--every-write", "--ring-mb", "1"])
        .args(["-o", events.to_str().unwrap()])
        .args([
            "--summary-json",
            summary.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    wait_for(&dir.path().join("started"), Duration::from_secs(20));
    // Stop the consumer so the 1 MiB ring buffer overflows while the workload writes.
    // SAFETY: signals to the forkscope process we started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    wait_for(&dir.path().join("done"), Duration::from_secs(60));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    let lost = s["stats"]["lost"].as_u64().unwrap();
    assert!(
        lost > 0,
        "a stopped consumer with a 1 MiB buffer must lose events"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("lost events: {lost}")), "{err}");
    let seen = parse_jsonl(&std::fs::read_to_string(&events).unwrap())
        .iter()
        .filter(|e| e["kind"] == "file_write" && e["comm"] == "syscall_workloa")
        .count() as u64;
    assert!(
        seen + lost >= writes,
        "every write is either reported or counted lost ({seen} + {lost})"
    );
}

#[test]
fn ctrl_c_while_starting_up_leaves_nothing_behind() {
    require_root();
    for delay_ms in [50, 200, 400] {
        let child = Command::new(forkscope())
            .args(["trace", "-q", "-o", "/dev/null", "--", "sleep", "1001.5"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        std::thread::sleep(Duration::from_millis(delay_ms));
        // SAFETY: sends SIGINT to the forkscope process we started.
        unsafe { libc::kill(pid as i32, libc::SIGINT) };
        let out = child.wait_with_output().unwrap();
        use std::os::unix::process::ExitStatusExt;
        let interrupted =
            out.status.code() == Some(130) || out.status.signal() == Some(libc::SIGINT);
        assert!(
            interrupted,
            "after {delay_ms} ms: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            leftover_cgroups(pid).is_empty(),
            "cgroup leaked after an interrupt at {delay_ms} ms"
        );
    }
    let sleepers = Command::new("pgrep")
        .args(["-x", "-f", "sleep 1001.5"])
        .output()
        .unwrap();
    assert!(
        sleepers.stdout.is_empty(),
        "a traced command survived its interrupted trace"
    );
}
