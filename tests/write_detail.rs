//! Per-write detail on request: the daemon attaches its syscall programs only while some
//! branch asks for per-write detail (`run --write-detail on`, the default), so a host whose
//! branches run with `--write-detail off` pays nothing for them. The attachments are read
//! from the kernel (`bpftool link list`), not from the daemon's own report.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use forkscope_tests::{TempDir, daemon::Daemon, lossy::LossyListener, parse_jsonl, require_root};
use serde_json::Value;

fn workspace(dir: &Path) -> PathBuf {
    let ws = dir.join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    ws
}

/// `bpftool -j ARGS`, parsed. A listing races with the links other tests' daemons release
/// meanwhile (bpftool gives up on a link that goes away between two of its calls): a
/// failed run is tried again, a few times, before the test fails with bpftool's error
/// (which `-j` writes to stdout).
fn bpftool(args: &[&str]) -> Value {
    let mut tries = 0;
    loop {
        let out = std::process::Command::new("bpftool")
            .arg("-j")
            .args(args)
            .output()
            .expect("bpftool (installed by scripts/setup)");
        if out.status.success() {
            return serde_json::from_slice(&out.stdout).unwrap();
        }
        tries += 1;
        assert!(
            tries < 5,
            "bpftool {args:?} failed {tries} times: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kernel links of this daemon's syscall dispatcher (pinned under its pin directory; the
/// family programs it tail-calls are never attached themselves).
fn syscall_links(d: &Daemon) -> usize {
    links_of(d, &["syscall_exit"])
}

/// Kernel links of this daemon's page-fault program.
fn fault_links(d: &Daemon) -> usize {
    links_of(d, &["page_fault"])
}

/// Kernel links of the daemon's programs `names` (pinned under its pin directory).
fn links_of(d: &Daemon, names: &[&str]) -> usize {
    let pins = d.pins();
    assert_eq!(pins.len(), 1, "one pin set per daemon: {pins:?}");
    let progs: Vec<u64> = names
        .iter()
        .map(|n| {
            let pin = pins[0].join("progs").join(n);
            bpftool(&["prog", "show", "pinned", pin.to_str().unwrap()])["id"]
                .as_u64()
                .unwrap()
        })
        .collect();
    bpftool(&["link", "list"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["prog_id"].as_u64().is_some_and(|p| progs.contains(&p)))
        .count()
}

/// Waits up to `within` until the kernel holds none of the daemon's syscall links and the
/// daemon says so too (the kernel drops a link's id before it has released it); returns
/// the links left and whether the daemon still says they are attached.
fn wait_detached(d: &Daemon, within: Duration) -> (usize, bool) {
    let start = Instant::now();
    loop {
        let (n, said) = (syscall_links(d), attached_in_status(d));
        if (n == 0 && !said) || start.elapsed() > within {
            return (n, said);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts a root branch `name` on `ws` whose command sleeps, with `--write-detail detail`.
fn run_sleeping_with(d: &Daemon, name: &str, ws: &Path, detail: &str) {
    d.ok(&[
        "run",
        "--name",
        name,
        "--write-detail",
        detail,
        "--workspace",
        ws.to_str().unwrap(),
        "--",
        "sleep",
        "1000",
    ]);
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

/// The daemon's threads named `comm` (as the kernel keeps it, 15 bytes at most).
fn threads_named(d: &Daemon, comm: &str) -> usize {
    std::fs::read_dir(format!("/proc/{}/task", d.child.id()))
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == comm)
        })
        .count()
}

#[test]
fn branches_that_come_and_go_within_the_grace_period_share_one_detach_timer() {
    require_root();
    let dir = TempDir::new("write-detail-timer");
    let ws = workspace(dir.path());
    let d = Daemon::start_full(
        dir.path(),
        &dir.path().join("api.sock"),
        &[],
        &["--detach-grace", "10"],
    );
    for i in 0..5 {
        let name = format!("short{i}");
        d.run_sleeping(&name, &ws);
        d.ok(&["abort", &name]);
    }
    let timers = threads_named(&d, "forkscope-detac");
    assert_eq!(
        timers, 2,
        "five releases within the grace period wait on one timer thread per on-demand set \
         (the syscall programs, the page-fault programs)"
    );
    assert_eq!(
        syscall_links(&d),
        1,
        "still attached within the grace period"
    );
    let left = wait_detached(&d, Duration::from_secs(30));
    assert_eq!(
        left,
        (0, false),
        "detached once the grace period has passed"
    );
    let start = Instant::now();
    while threads_named(&d, "forkscope-detac") != 0 && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        threads_named(&d, "forkscope-detac"),
        0,
        "and the timer is gone"
    );

    // Branches that never asked for the syscall programs (per-write detail off) and end
    // meanwhile do not push the detach back.
    d.run_sleeping("loud", &ws);
    d.ok(&["abort", "loud"]);
    let start = Instant::now();
    let mut quiet = 0;
    while syscall_links(&d) != 0 && start.elapsed() < Duration::from_secs(40) {
        let name = format!("quiet{quiet}");
        run_sleeping_with(&d, &name, &ws, "off");
        d.ok(&["abort", &name]);
        quiet += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        syscall_links(&d),
        0,
        "detached after the grace period though {quiet} quiet branches ended meanwhile"
    );
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
    assert_eq!(fault_links(&d), 0, "nor a page-fault program");
    assert!(!attached_in_status(&d));

    // A branch without per-write detail: still none.
    run_sleeping_with(&d, "quiet", &ws, "off");
    d.sh("quiet", "echo quiet > quiet.txt");
    assert_eq!(
        syscall_links(&d),
        0,
        "a branch with --write-detail off attaches no syscall program"
    );
    assert_eq!(
        fault_links(&d),
        2,
        "but the page-fault programs (user and kernel faults), for its dirtied pages"
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

    // A branch asking for it: the syscall dispatcher attached, before its command runs.
    d.ok(&[
        "run",
        "--name",
        "loud",
        "--workspace",
        w,
        "--",
        "sh",
        "-c",
        "echo early > early.txt; exec sleep 1000",
    ]);
    let attached = syscall_links(&d);
    assert_eq!(
        attached, 1,
        "the syscall dispatcher is attached to sys_exit ({attached} links)"
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
    d.sh(&kid, "echo kid > kid.txt");
    let kid_trace = trace(&d, &kid);
    assert!(
        !kinds(&kid_trace).iter().any(|k| k.starts_with("file_")),
        "the quiet fork has no per-write events while the programs are attached: {:?}",
        kinds(&kid_trace)
    );

    // A checkpoint of the loud branch holds processes that never run: it does not keep
    // the programs attached.
    d.ok(&["fork", "loud", "--frozen", "--name", "cp"]);

    // The last running branch that asked goes: detached a few seconds later.
    d.ok(&["abort", "loud"]);
    let left = wait_detached(&d, Duration::from_secs(20));
    assert_eq!(
        left,
        (0, false),
        "detached after the last branch asking for detail was aborted (a checkpoint of it left)"
    );
    // And attached again when another asks.
    d.run_sleeping("loud2", &ws);
    assert_eq!(
        syscall_links(&d),
        attached,
        "attached again for a new branch"
    );

    // Only the checkpoint left: its processes never run, nothing stays attached for it.
    for b in ["loud2", kid.as_str()] {
        d.ok(&["abort", b]);
    }
    d.ok(&["abort", "--recursive", "quiet"]);
    let start = Instant::now();
    while (fault_links(&d) != 0 || syscall_links(&d) != 0)
        && start.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        (fault_links(&d), syscall_links(&d)),
        (0, 0),
        "with only a checkpoint left, nothing that costs the host stays attached"
    );
    assert!(
        d.ok(&["ls"]).contains("cp"),
        "the checkpoint is still there: {}",
        d.ok(&["ls"])
    );
}

#[test]
fn a_restarted_daemon_keeps_or_drops_the_syscall_programs_as_its_branches_need() {
    require_root();
    let dir = TempDir::new("write-detail-restart");
    let ws = workspace(dir.path());
    let socket = dir.path().join("api.sock");
    let mut d = Daemon::start(dir.path());
    d.run_sleeping("loud", &ws);
    let attached = syscall_links(&d);
    assert_eq!(attached, 1);

    // Killed while a branch needs them: they stay attached, and its writes are traced
    // across the restart.
    d.kill9();
    assert_eq!(
        syscall_links(&d),
        attached,
        "pinned: still attached with no daemon"
    );
    // (A long grace period: the next kill surely lands inside it.)
    let mut d2 = Daemon::start_full(dir.path(), &socket, &[], &["--detach-grace", "600"]);
    assert_eq!(syscall_links(&d2), attached);
    d2.sh("loud", "echo after > after.txt");
    assert!(
        trace(&d2, "loud").iter().any(|e| e["kind"] == "file_write"
            && e["path"].as_str().is_some_and(|p| p.ends_with("after.txt"))),
        "writes after the restart are traced"
    );

    // Killed inside the grace period after the last such branch went: the next daemon
    // finds them attached with nobody asking, and detaches them (after its own grace).
    d2.ok(&["abort", "loud"]);
    d2.kill9();
    assert_eq!(
        syscall_links(&d2),
        attached,
        "the grace period had not ended"
    );
    let mut d3 = Daemon::start_on(dir.path(), &socket);
    let left = wait_detached(&d3, Duration::from_secs(20));
    assert_eq!(
        left,
        (0, false),
        "a restarted daemon detaches what no branch needs"
    );
    d3.stop();

    // Stopped (SIGTERM, a branch without detail still running, so its pins stay) inside
    // the grace period: no process is left to detach them later, so the stop does.
    let mut d4 = Daemon::start_full(dir.path(), &socket, &[], &["--detach-grace", "600"]);
    run_sleeping_with(&d4, "quiet", &ws, "off");
    d4.run_sleeping("loud2", &ws);
    assert_eq!(syscall_links(&d4), attached);
    d4.ok(&["abort", "loud2"]);
    d4.stop();
    assert_eq!(
        syscall_links(&d4),
        0,
        "a daemon stopped inside the grace period detaches them"
    );
    let d5 = Daemon::start_on(dir.path(), &socket);
    assert_eq!(
        d5.ok(&["ls"]).lines().count(),
        2,
        "the quiet branch lives on"
    );
    assert_eq!(syscall_links(&d5), 0);
    assert_eq!(
        fault_links(&d5),
        2,
        "its dirtied pages are still watched after the restart"
    );
    drop(d);
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
    let d = Daemon::start(dir.path());
    // The listener drops some packets on arrival: the branches' TCP segments leave again,
    // and a retransmission must not count as bytes sent twice. (TCP_NODELAY: each send is
    // its own segment, about 300 of them, so that some are dropped is all but certain.)
    let (listener, got) = LossyListener::start();
    let tcp = listener.port;
    // A UDP port nobody listens on: the datagrams still leave the socket.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_port = udp.local_addr().unwrap().port();
    let script = format!(
        "import socket, struct\n\
         s = socket.create_connection(('127.0.0.1', {tcp}))\n\
         s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)\n\
         for i in range(300): s.sendall(b'x' * (1000 + i))\n\
         s.shutdown(socket.SHUT_WR)\n\
         s.recv(1)\n\
         print(struct.unpack_from('I', s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 100)[0])\n\
         s.close()\n\
         u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for i in range(20): u.sendto(b'y' * 333, ('127.0.0.1', {udp_port}))\n"
    );
    let want_tcp: u64 = (0..300).map(|i| 1000 + i).sum();
    for (name, detail) in [("quiet", "off"), ("loud", "on")] {
        run_sleeping_with(&d, name, &ws, detail);
        // (tcpi_total_retrans, once the listener has read everything and closed.)
        let retransmitted: u64 = d
            .ok(&["exec", name, "--", "python3", "-c", &script])
            .trim()
            .parse()
            .expect("the client prints its retransmission count");
        assert!(
            retransmitted > 0,
            "{name}: the lossy listener made the client retransmit (total_retrans {retransmitted})"
        );
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
    // Another quiet branch sending to the same listener: each trace has its own bytes.
    let before = sent(&trace(&d, "quiet"));
    run_sleeping_with(&d, "quiet2", &ws, "off");
    let other = format!(
        "import socket\ns = socket.create_connection(('127.0.0.1', {tcp}))\ns.sendall(b'z' * 7000)\ns.close()\n"
    );
    d.ok(&["exec", "quiet2", "--", "python3", "-c", &other]);
    assert_eq!(got.recv_timeout(Duration::from_secs(10)).unwrap(), 7000);
    assert_eq!(
        sent(&trace(&d, "quiet2"))
            .get(&format!("127.0.0.1:{tcp}"))
            .copied(),
        Some(7000),
        "the second branch's bytes are its own"
    );
    assert_eq!(
        sent(&trace(&d, "quiet")),
        before,
        "and not charged to the first"
    );

    // A restarted daemon writes only what was sent since (the counters are pinned and
    // outlive it).
    let mut d = d;
    d.kill9();
    let d = Daemon::start(dir.path());
    d.ok(&["exec", "quiet", "--", "python3", "-c", &other]);
    assert_eq!(got.recv_timeout(Duration::from_secs(10)).unwrap(), 7000);
    let mut want = before.clone();
    *want.get_mut(&format!("127.0.0.1:{tcp}")).unwrap() += 7000;
    assert_eq!(
        sent(&trace(&d, "quiet")),
        want,
        "nothing written twice across a restart"
    );
    drop(udp);
    drop(listener);
}

#[test]
fn a_socket_connected_again_counts_its_second_connection_in_a_branch_without_detail() {
    require_root();
    let dir = TempDir::new("write-detail-reconnect");
    let ws = workspace(dir.path());
    let d = Daemon::start(dir.path());
    let (listener, got) = LossyListener::start();
    let port = listener.port;
    // One socket, two connections: connect(AF_UNSPEC) dissolves the first. Linux numbers
    // the second's bytes on past the first's (tcp_disconnect moves write_seq ahead by more
    // than a window), so the egress program, which compares sequence numbers per socket,
    // counts them as new.
    let script = format!(
        "import ctypes, socket, struct\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         s = socket.create_connection(('127.0.0.1', {port}))\n\
         s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)\n\
         s.sendall(b'a' * 2_000_000)\n\
         s.shutdown(socket.SHUT_WR)\n\
         s.recv(1)\n\
         unspec = struct.pack('H14x', socket.AF_UNSPEC)\n\
         assert libc.connect(s.fileno(), unspec, len(unspec)) == 0, ctypes.get_errno()\n\
         s.connect(('127.0.0.1', {port}))\n\
         s.sendall(b'b' * 7000)\n\
         s.shutdown(socket.SHUT_WR)\n\
         s.recv(1)\n\
         s.close()\n"
    );
    run_sleeping_with(&d, "again", &ws, "off");
    d.ok(&["exec", "again", "--", "python3", "-c", &script]);
    let wait = Duration::from_secs(10);
    assert_eq!(
        got.recv_timeout(wait).unwrap(),
        2_000_000,
        "the first connection"
    );
    assert_eq!(
        got.recv_timeout(wait).unwrap(),
        7000,
        "the second connection"
    );
    assert_eq!(
        sent(&trace(&d, "again"))
            .get(&format!("127.0.0.1:{port}"))
            .copied(),
        Some(2_007_000),
        "both connections' bytes, each once"
    );
    drop(listener);
}
