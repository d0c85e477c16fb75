//! The Prometheus exporter end to end: a real daemon, branches forked, committed and aborted
//! through the CLI, `/metrics` scraped over HTTP and checked with `promtool`.

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::Command,
};

use forkscope_tests::{TempDir, daemon::Daemon, require_root};

/// GET http://ADDR/metrics; returns the body.
fn scrape(addr: &str) -> String {
    let mut c = TcpStream::connect(addr).expect("the metrics port answers");
    write!(
        c,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// The value of the series `name` (exact text before the value), if present.
fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == series).then(|| v.parse().ok())?
    })
}

#[test]
fn the_exporter_counts_every_operation_and_passes_promtool() {
    require_root();
    let dir = TempDir::new("metrics");
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::write(ws.join("f"), "x").unwrap();
    let d = Daemon::start_full(
        dir.path(),
        &dir.path().join("api.sock"),
        &[],
        &["--metrics-branch-labels", "10"],
    );
    let addr = d.metrics_addr().expect("the daemon serves metrics");
    let ws_s = ws.to_str().unwrap();
    d.ok(&[
        "run",
        "--name",
        "root",
        "--workspace",
        ws_s,
        "--",
        "python3",
        "-c",
        "open('out', 'w').write('hi')\nimport time\ntime.sleep(1000)",
    ]);
    // (Once python runs: its launcher may still be a shell with python as its child.)
    let start = std::time::Instant::now();
    while d.ok(&[
        "exec",
        "root",
        "--",
        "sh",
        "-c",
        "cat out 2>/dev/null; true",
    ]) != "hi"
    {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "the command starts"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for i in 0..3 {
        d.ok(&["fork", "root", "--name", &format!("k{i}")]);
    }
    d.ok(&["exec", "k0", "--", "sh", "-c", "echo change > f"]);
    d.ok(&["commit", "k0"]);
    d.ok(&["abort", "k2"]);
    let m = scrape(&addr);
    // N forks give a count of N; one commit, one abort.
    assert_eq!(
        value(&m, "forkscope_fork_duration_seconds_count"),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        value(&m, "forkscope_commit_duration_seconds_count"),
        Some(1.0)
    );
    assert_eq!(
        value(&m, "forkscope_abort_duration_seconds_count"),
        Some(1.0)
    );
    for phase in ["freeze", "files", "processes", "thaw", "start"] {
        let series = format!("forkscope_fork_phase_duration_seconds_count{{phase=\"{phase}\"}}");
        assert_eq!(value(&m, &series), Some(3.0), "{series}");
    }
    // Branches by state: root, k0, k1 live.
    assert_eq!(
        value(&m, "forkscope_branches{state=\"running\"}"),
        Some(3.0),
        "{m}"
    );
    assert!(m.contains("forkscope_build_info{version=\""));
    // Traced events by kind (the command wrote a file, exec'd processes).
    assert!(
        m.lines()
            .any(|l| l.starts_with("forkscope_events_total{kind=\"file_write\"}")),
        "{m}"
    );
    assert!(value(&m, "forkscope_lost_events_total").is_some());
    // The eBPF programs' own cost, from the kernel's BPF stats.
    let runs = value(
        &m,
        "forkscope_bpf_program_runs_total{program=\"page_fault\"}",
    );
    assert!(runs.is_some_and(|r| r > 0.0), "{m}");
    // Per-branch series, switched on.
    assert!(
        m.contains("forkscope_branch_private_memory_bytes{branch=\"k1\"}"),
        "{m}"
    );
    // The format is valid for Prometheus.
    let f = dir.path().join("metrics.txt");
    std::fs::write(&f, &m).unwrap();
    let out = Command::new("promtool")
        .arg("check")
        .arg("metrics")
        .stdin(std::fs::File::open(&f).unwrap())
        .output()
        .expect("promtool is installed by scripts/setup");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Without the option, no per-branch series.
    let dir2 = TempDir::new("metrics-plain");
    let d2 = Daemon::start(dir2.path());
    let m2 = scrape(&d2.metrics_addr().unwrap());
    assert!(!m2.contains("branch=\""), "{m2}");
}

#[test]
fn a_metrics_address_in_use_is_a_clear_error() {
    require_root();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = TempDir::new("metrics-busy");
    let out = Command::new(forkscope_tests::forkscope())
        .args(["daemon", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(dir.path().join("api.sock"))
        .args(["--metrics-addr", &addr])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&addr) && err.contains("--metrics-addr"),
        "{err}"
    );
    assert!(!dir.path().join("api.sock").exists());
}
