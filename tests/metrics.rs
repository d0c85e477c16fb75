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
    let (status, body) = get(addr, "/metrics");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    body
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
    for phase in forkscope_tests::FORK_PHASES {
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
    assert!(
        value(&m, "forkscope_branch_events_total{branch=\"root\"}").is_some_and(|n| n > 0.0),
        "{m}"
    );
    assert!(m.contains("forkscope_branch_side_effects{branch=\"k1\",state=\"held\"} 0"));
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
fn scrapes_during_a_fork_storm_see_correct_figures_and_never_stall_the_daemon() {
    require_root();
    let dir = TempDir::new("metrics-storm");
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    let d = Daemon::start(dir.path());
    let addr = d.metrics_addr().unwrap();
    d.run_sleeping("root", &ws);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraper = {
        let (done, addr) = (done.clone(), addr.clone());
        std::thread::spawn(move || {
            let mut counts = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let m = scrape(&addr);
                counts.push(value(&m, "forkscope_fork_duration_seconds_count").unwrap_or(0.0));
            }
            counts
        })
    };
    for i in 0..10 {
        d.ok(&["fork", "root", "--name", &format!("s{i}")]);
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let counts = scraper.join().unwrap();
    // (A scrape within half a second of another gets the same text.)
    std::thread::sleep(std::time::Duration::from_millis(600));
    assert!(!counts.is_empty());
    // Never backwards, never beyond what happened; after the storm, exactly 10.
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
    assert!(counts.iter().all(|c| *c <= 10.0), "{counts:?}");
    assert_eq!(
        value(&scrape(&addr), "forkscope_fork_duration_seconds_count"),
        Some(10.0)
    );
    assert_eq!(
        value(&scrape(&addr), "forkscope_branches{state=\"running\"}"),
        Some(11.0)
    );
}

#[test]
fn an_unwritable_state_directory_is_a_clear_error() {
    require_root();
    let dir = TempDir::new("metrics-rostate");
    let out = Command::new(forkscope_tests::forkscope())
        .args(["daemon", "--state-dir", "/proc/forkscope-state"])
        .arg("--socket")
        .arg(dir.path().join("api.sock"))
        .args(["--metrics-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/proc/forkscope-state") && err.contains("writable --state-dir"),
        "{err}"
    );
    assert!(!dir.path().join("api.sock").exists());
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

/// GET http://ADDR{path}; returns (status line, body).
fn get(addr: &str, path: &str) -> (String, String) {
    let mut c = TcpStream::connect(addr).expect("the server answers");
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = Vec::new();
    c.read_to_end(&mut text).unwrap();
    let text = String::from_utf8_lossy(&text).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    // Prometheus answers small bodies in one piece, larger ones chunked.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        out
    } else {
        body.to_string()
    };
    (head.lines().next().unwrap_or("").to_string(), body)
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every `"expr"` of the dashboards, with Grafana's variables substituted.
fn dashboard_queries() -> Vec<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/grafana");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let d: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(e.path()).unwrap()).unwrap();
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                let expr = t["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$__rate_interval", "1m")
                    .replace("$__range", "1h")
                    .replace("$instance", ".*")
                    .replace("$branch", ".*");
                out.push((format!("{} / {}", d["title"], p["title"]), expr));
            }
        }
    }
    out
}

#[test]
fn a_real_prometheus_scrapes_the_daemon_and_every_dashboard_and_alert_query_reads_data() {
    require_root();
    let dir = TempDir::new("metrics-prom");
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    let d = Daemon::start_full(
        dir.path(),
        &dir.path().join("api.sock"),
        &[],
        &["--metrics-branch-labels", "10"],
    );
    let target = d.metrics_addr().unwrap();
    let alerts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/alerts.yml");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let web = format!("127.0.0.1:{port}");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: forkscope\n    static_configs:\n      - targets: [\"{target}\"]\n",
            alerts.display()
        ),
    )
    .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut prom = Kill(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus is installed by scripts/setup"),
    );
    let start = std::time::Instant::now();
    while !std::net::TcpStream::connect(&web).is_ok_and(|_| get(&web, "/-/ready").0.contains("200"))
    {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "prometheus starts"
        );
        assert!(prom.0.try_wait().unwrap().is_none(), "prometheus exited");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Its first scrape comes once service discovery settles (a few seconds).
    let start = std::time::Instant::now();
    while !get(&web, "/api/v1/query?query=up").1.contains("\"1\"]") {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "prometheus scrapes the daemon"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // Work for it to see: files, a connection, processes, forks, a commit, an abort.
    d.run_sleeping("root", &ws);
    d.ok(&[
        "exec",
        "root",
        "--",
        "python3",
        "-c",
        "import socket\nopen('f', 'w').write('x')\ns = socket.socket()\ntry:\n    s.connect(('127.0.0.1', 9))\nexcept OSError:\n    pass",
    ]);
    for i in 0..3 {
        d.ok(&["fork", "root", "--name", &format!("k{i}")]);
    }
    d.ok(&["exec", "k0", "--", "sh", "-c", "echo y > f"]);
    d.ok(&["commit", "k0"]);
    d.ok(&["abort", "k2"]);
    // Several scrapes after the work, so that rates over a minute have two samples.
    std::thread::sleep(std::time::Duration::from_secs(5));
    let mut empty = Vec::new();
    for (what, expr) in dashboard_queries() {
        let (status, body) = get(&web, &format!("/api/v1/query?query={}", urlencode(&expr)));
        assert!(status.contains("200"), "{what}: {expr}: {status} {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "success", "{what}: {expr}: {body}");
        if v["data"]["result"].as_array().is_none_or(|r| r.is_empty()) {
            empty.push(format!("{what}: {expr}"));
        }
    }
    assert!(
        empty.is_empty(),
        "queries with no data:\n{}\nprometheus's targets: {}",
        empty.join("\n"),
        get(&web, "/api/v1/targets").1
    );
    // Every alert expression parses, and every series it reads exists.
    let rules = std::fs::read_to_string(&alerts).unwrap();
    for line in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr: "))
    {
        let (status, body) = get(&web, &format!("/api/v1/query?query={}", urlencode(line)));
        assert!(status.contains("200"), "alert {line}: {body}");
        for name in line
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("forkscope_"))
        {
            let (_, body) = get(&web, &format!("/api/v1/series?match[]={name}"));
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert!(
                v["data"].as_array().is_some_and(|s| !s.is_empty()),
                "alert {line}: no series {name}"
            );
        }
    }
    promtool_check("rules", &alerts);
    // The shipped scrape configuration is valid too (it loads the rules).
    promtool_check("config", &alerts.with_file_name("prometheus.yml"));
}

/// `promtool check WHAT FILE` must pass.
fn promtool_check(what: &str, file: &std::path::Path) {
    let out = Command::new("promtool")
        .args(["check", what])
        .arg(file)
        .output()
        .expect("promtool is installed by scripts/setup");
    assert!(
        out.status.success(),
        "promtool check {what} {}: {}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_systemd_unit_verifies_with_the_built_binary() {
    // (Not started: the test machines do not run systemd as their init.)
    let unit = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/systemd/forkscope.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    let dir = TempDir::new("metrics-unit");
    let copy = dir.path().join("forkscope.service");
    let bin = forkscope_tests::forkscope();
    std::fs::write(
        &copy,
        text.replace("/usr/local/bin/forkscope", bin.to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .expect("systemd-analyze (systemd) is installed");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Its command line is one the daemon accepts (checked without starting it: --help
    // comes after every option it gives).
    let exec = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    let args: Vec<&str> = exec.split_whitespace().skip(1).collect();
    let out = Command::new(&bin)
        .args(&args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_start_that_fails_late_leaves_no_programs_pinned() {
    require_root();
    let dir = TempDir::new("metrics-late");
    let d = Daemon::start(dir.path());
    let pins_before = d.pins();
    // A second daemon, another state directory, the same socket: refused once its eBPF
    // programs are loaded and pinned; they must go with it.
    let other = dir.path().join("other-state");
    let out = Command::new(forkscope_tests::forkscope())
        .args(["daemon", "--metrics-addr", "127.0.0.1:0", "--state-dir"])
        .arg(&other)
        .arg("--socket")
        .arg(&d.socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another daemon is listening"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.pins(), pins_before);
    use std::os::unix::fs::MetadataExt;
    let tag = format!("{:x}-", std::fs::metadata(&other).unwrap().ino());
    let left: Vec<_> = std::fs::read_dir("/sys/fs/bpf/forkscope")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&tag))
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "the failed daemon left its pins: {left:?}");
}
