//! Per-write detail on request: the daemon attaches its syscall programs only while some
//! branch asks for per-write detail (`run --write-detail on`, the default), so a host whose
//! branches run with `--write-detail off` pays nothing for them. The attachments are read
//! from the kernel (`bpftool link list`), not from the daemon's own report.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use forkscope_tests::{TempDir, daemon::Daemon, parse_jsonl, require_root};
use serde_json::Value;

fn workspace(dir: &Path) -> PathBuf {
    let ws = dir.join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    ws
}

fn bpftool(args: &[&str]) -> Value {
    let out = std::process::Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("bpftool (installed by scripts/setup)");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Kernel links of this daemon's syscall programs (those pinned under its pin directory).
fn syscall_links(d: &Daemon) -> usize {
    let pins = d.pins();
    assert_eq!(pins.len(), 1, "one pin set per daemon: {pins:?}");
    let progs: Vec<u64> = std::fs::read_dir(pins[0].join("progs"))
        .expect("the syscall programs are pinned")
        .flatten()
        .map(|e| {
            bpftool(&["prog", "show", "pinned", e.path().to_str().unwrap()])["id"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(progs.len(), 4, "four syscall programs: {progs:?}");
    bpftool(&["link", "list"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["prog_id"].as_u64().is_some_and(|p| progs.contains(&p)))
        .count()
}

/// Waits up to `within` for `syscall_links` to be `want` (detaching happens a few seconds
/// after the last branch that asked goes).
fn wait_links(d: &Daemon, want: impl Fn(usize) -> bool, within: Duration) -> usize {
    let start = Instant::now();
    loop {
        let n = syscall_links(d);
        if want(n) || start.elapsed() > within {
            return n;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn trace(d: &Daemon, branch: &str) -> Vec<Value> {
    parse_jsonl(&d.ok(&["trace", "--branch", branch]))
}

fn kinds(events: &[Value]) -> Vec<&str> {
    events.iter().filter_map(|e| e["kind"].as_str()).collect()
}

fn attached_in_status(d: &Daemon) -> bool {
    let s: Value = serde_json::from_str(&d.ok(&["status", "--json"])).unwrap();
    s["trace"]["syscall_programs_attached"].as_bool().unwrap()
}

#[test]
fn syscall_programs_are_attached_only_while_a_branch_asks_for_per_write_detail() {
    require_root();
    let dir = TempDir::new("write-detail");
    let ws = workspace(dir.path());
    let w = ws.to_str().unwrap();
    let d = Daemon::start(dir.path());
    assert_eq!(
        syscall_links(&d),
        0,
        "an idle daemon attaches no syscall program"
    );
    assert!(!attached_in_status(&d));

    // A branch without per-write detail: still none.
    d.ok(&[
        "run",
        "--name",
        "quiet",
        "--write-detail",
        "off",
        "--workspace",
        w,
        "--",
        "sleep",
        "1000",
    ]);
    d.sh("quiet", "echo quiet > quiet.txt");
    assert_eq!(
        syscall_links(&d),
        0,
        "a branch with --write-detail off attaches nothing"
    );
    let quiet = trace(&d, "quiet");
    assert!(
        quiet
            .iter()
            .any(|e| e["kind"] == "proc_exec" && e["filename"] == "/usr/bin/sh"),
        "processes are still traced: {:?}",
        kinds(&quiet)
    );
    assert!(
        !kinds(&quiet).iter().any(|k| k.starts_with("file_")),
        "no per-write events: {:?}",
        kinds(&quiet)
    );
    assert_eq!(
        d.ok(&["diff", "quiet"]),
        "A quiet.txt\n",
        "its files are known from its layers"
    );

    // A branch asking for it: every syscall tracepoint attached, before its command runs.
    d.ok(&[
        "run",
        "--name",
        "loud",
        "--workspace",
        w,
        "--",
        "sh",
        "-c",
        "echo early > early.txt; sleep 1000",
    ]);
    let attached = syscall_links(&d);
    assert!(
        attached >= 50,
        "the syscall programs are attached ({attached} links)"
    );
    assert!(attached_in_status(&d));
    d.sh("loud", "echo loud > loud.txt");
    d.sh("quiet", "echo again > again.txt");
    let loud = trace(&d, "loud");
    for file in ["early.txt", "loud.txt"] {
        assert!(
            loud.iter().any(|e| e["kind"] == "file_write"
                && e["path"].as_str().is_some_and(|p| p.ends_with(file))),
            "{file} written in the loud branch is in its trace"
        );
    }
    let quiet = trace(&d, "quiet");
    assert!(
        !kinds(&quiet).iter().any(|k| k.starts_with("file_")),
        "while attached for another branch, the quiet one still has no per-write events: {:?}",
        kinds(&quiet)
    );

    // Forks inherit the setting.
    let kid = d.ok(&["fork", "quiet"]).trim().to_string();
    let listed: Value = serde_json::from_str(&d.ok(&["ls", "--json"])).unwrap();
    let rec = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == kid.as_str())
        .unwrap();
    assert_eq!(
        rec["write_detail"], false,
        "the fork of a quiet branch is quiet: {rec}"
    );

    // The last branch that asked goes: detached a few seconds later.
    d.ok(&["abort", "loud"]);
    let left = wait_links(&d, |n| n == 0, Duration::from_secs(20));
    assert_eq!(
        left, 0,
        "detached after the last branch asking for detail was aborted"
    );
    assert!(!attached_in_status(&d));
    // And attached again when another asks.
    d.run_sleeping("loud2", &ws);
    assert_eq!(
        syscall_links(&d),
        attached,
        "attached again for a new branch"
    );
}

#[test]
fn a_restarted_daemon_keeps_or_drops_the_syscall_programs_as_its_branches_need() {
    require_root();
    let dir = TempDir::new("write-detail-restart");
    let ws = workspace(dir.path());
    let mut d = Daemon::start(dir.path());
    d.run_sleeping("loud", &ws);
    let attached = syscall_links(&d);
    assert!(attached >= 50);

    // Killed while a branch needs them: they stay attached, and its writes are traced
    // across the restart.
    d.kill9();
    assert_eq!(
        syscall_links(&d),
        attached,
        "pinned: still attached with no daemon"
    );
    let d2 = Daemon::start(dir.path());
    assert_eq!(syscall_links(&d2), attached);
    d2.sh("loud", "echo after > after.txt");
    assert!(
        trace(&d2, "loud").iter().any(|e| e["kind"] == "file_write"
            && e["path"].as_str().is_some_and(|p| p.ends_with("after.txt"))),
        "writes after the restart are traced"
    );

    // Killed right after the last such branch went (inside the grace period): the next
    // daemon finds them attached with nobody asking, and detaches them.
    d2.ok(&["abort", "loud"]);
    let mut d2 = d2;
    d2.kill9();
    assert_eq!(
        syscall_links(&d2),
        attached,
        "the grace period had not ended"
    );
    let d3 = Daemon::start(dir.path());
    let left = wait_links(&d3, |n| n == 0, Duration::from_secs(20));
    assert_eq!(left, 0, "a restarted daemon detaches what no branch needs");
    drop(d);
}

/// A loopback TCP listener that counts what each connection sends; the totals arrive on
/// the channel, one per connection.
fn counting_listener() -> (u16, std::sync::mpsc::Receiver<u64>) {
    use std::io::Read;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            let mut buf = vec![0u8; 1 << 16];
            let mut n = 0u64;
            while let Ok(k) = c.read(&mut buf) {
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
            if tx.send(n).is_err() {
                return;
            }
        }
    });
    (port, rx)
}

/// Bytes sent per "addr:port" in a branch's trace.
fn sent(events: &[Value]) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for e in events.iter().filter(|e| e["kind"] == "net_send") {
        let dest = format!("{}:{}", e["addr"].as_str().unwrap_or("?"), e["port"]);
        *out.entry(dest).or_insert(0) += e["bytes"].as_u64().unwrap_or(0);
    }
    out
}

#[test]
fn a_branch_without_per_write_detail_has_its_connections_and_bytes_sent_per_destination() {
    require_root();
    let dir = TempDir::new("write-detail-net");
    let ws = workspace(dir.path());
    let w = ws.to_str().unwrap();
    let d = Daemon::start(dir.path());
    let (tcp, got) = counting_listener();
    // A UDP port nobody listens on: the datagrams still leave the socket.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_port = udp.local_addr().unwrap().port();
    let script = format!(
        "import socket\n\
         s = socket.create_connection(('127.0.0.1', {tcp}))\n\
         for i in range(300): s.sendall(b'x' * (1000 + i))\n\
         s.close()\n\
         u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for i in range(20): u.sendto(b'y' * 333, ('127.0.0.1', {udp_port}))\n"
    );
    let want_tcp: u64 = (0..300).map(|i| 1000 + i).sum();
    for (name, detail) in [("quiet", "off"), ("loud", "on")] {
        d.ok(&[
            "run",
            "--name",
            name,
            "--write-detail",
            detail,
            "--workspace",
            w,
            "--",
            "sleep",
            "1000",
        ]);
        d.ok(&["exec", name, "--", "python3", "-c", &script]);
        assert_eq!(
            got.recv_timeout(Duration::from_secs(10)).unwrap(),
            want_tcp,
            "the listener got it all"
        );
        let events = trace(&d, name);
        let totals = sent(&events);
        assert_eq!(
            totals.get(&format!("127.0.0.1:{tcp}")).copied(),
            Some(want_tcp),
            "{name} (write detail {detail}): TCP bytes to the listener: {totals:?}"
        );
        assert_eq!(
            totals.get(&format!("127.0.0.1:{udp_port}")).copied(),
            Some(20 * 333),
            "{name} (write detail {detail}): UDP bytes: {totals:?}"
        );
        assert!(
            events
                .iter()
                .any(|e| e["kind"] == "net_connect" && e["port"] == tcp),
            "{name}: the connection is in the trace"
        );
    }
    let quiet = trace(&d, "quiet");
    let from_packets = quiet.iter().filter(|e| e["kind"] == "net_send");
    assert!(
        from_packets
            .clone()
            .all(|e| e["packets"].as_u64().is_some_and(|p| p > 0) && e["pid"] == 0),
        "the quiet branch's sends are counted from its packets"
    );
    // Sends of the host (outside any branch) to the same listener are not charged to it.
    let before = sent(&trace(&d, "quiet"));
    {
        use std::io::Write;
        let mut c = std::net::TcpStream::connect(("127.0.0.1", tcp)).unwrap();
        c.write_all(&[0u8; 5000]).unwrap();
    }
    assert_eq!(got.recv_timeout(Duration::from_secs(10)).unwrap(), 5000);
    assert_eq!(
        sent(&trace(&d, "quiet")),
        before,
        "the host's own sends are not in a branch's trace"
    );
    drop(udp);
}
