//! Side-effect policies end to end: real daemon, real CLI, python clients in branches, real
//! servers on loopback addresses standing in for the outside world (a TCP echo server and a
//! UDP receiver, run by the test).

use std::{
    io::{Read, Write},
    net::{TcpListener, UdpSocket},
    path::PathBuf,
    time::Duration,
};

use forkscope_tests::{
    TempDir, daemon::Daemon, http::recording_http_server, parse_jsonl, require_root,
};

/// A python client: `tcp ADDR PORT MSG` connects, sends MSG and prints the echo;
/// `udp ADDR PORT MSG` sends one datagram. Prints `errno N` when the call fails.
const CLIENT: &str = r#"
import socket, sys
kind, addr, port, msg = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
try:
    if kind in ("tcp", "tcp6"):
        if kind == "tcp6":  # an IPv4 destination written as ::ffff:a.b.c.d
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(("::ffff:" + addr, port))
        else:
            s = socket.create_connection((addr, port), timeout=10)
        s.sendall(msg)
        s.shutdown(socket.SHUT_WR)
        print("echo", s.recv(1024).decode())
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(msg, (addr, port))
        print("sent")
except OSError as e:
    print("errno", e.errno)
"#;

struct Setup {
    d: Daemon,
    ws: PathBuf,
    dir: TempDir,
}

fn setup() -> Setup {
    setup_in(&std::env::temp_dir())
}

/// A daemon, workspace and client under `base` (/var/tmp for tests of paths outside the
/// branch's own /tmp).
fn setup_in(base: &std::path::Path) -> Setup {
    require_root();
    let dir = TempDir::new_in(base, "policy");
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::write(ws.join("client.py"), CLIENT).unwrap();
    let d = Daemon::start(dir.path());
    Setup { d, ws, dir }
}

impl Setup {
    /// Writes `text` as a policy file; returns its path.
    fn policy(&self, name: &str, text: &str) -> String {
        let f = self.dir.path().join(name);
        std::fs::write(&f, text).unwrap();
        f.to_str().unwrap().to_string()
    }

    fn run(&self, name: &str, policy: &str) {
        let ws = self.ws.to_str().unwrap();
        self.d.ok(&[
            "run",
            "--name",
            name,
            "--policy",
            policy,
            "--workspace",
            ws,
            "--",
            "sleep",
            "1000",
        ]);
    }

    /// Runs the client in `branch`; returns what it printed.
    fn client(&self, branch: &str, args: &[&str]) -> String {
        let mut cmd = vec!["exec", branch, "--", "python3", "client.py"];
        cmd.extend_from_slice(args);
        self.d.ok(&cmd).trim().to_string()
    }

    fn trace(&self, branch: &str) -> Vec<serde_json::Value> {
        parse_jsonl(&self.d.ok(&["trace", "--branch", branch]))
    }
}

/// A TCP echo server on `addr` (port chosen by the kernel), serving in a thread; the
/// returned receiver yields what each connection sent.
fn echo_server(addr: &str) -> (u16, std::sync::mpsc::Receiver<Vec<u8>>) {
    forkscope_tests::http::tcp_server(addr, |mut c| {
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got);
        let _ = c.write_all(&got);
        got
    })
}

fn nothing_arrives<T>(rx: &std::sync::mpsc::Receiver<T>) -> bool {
    rx.recv_timeout(Duration::from_millis(300)).is_err()
}

#[test]
fn deny_refuses_with_eperm_in_the_kernel_and_the_server_sees_nothing() {
    let s = setup();
    let (denied_port, denied_rx) = echo_server("127.0.0.2");
    let (open_port, open_rx) = echo_server("127.0.0.3");
    let udp = UdpSocket::bind("127.0.0.2:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let udp_port = udp.local_addr().unwrap().port().to_string();
    let policy = s.policy(
        "deny.toml",
        "default = \"allow\"\n[[rule]]\nclass = \"net\"\ndest = \"127.0.0.2/32\"\naction = \"deny\"\n[[rule]]\nclass = \"net\"\ndest = \"127.0.0.3\"\naction = \"allow\"\n",
    );
    s.run("b", &policy);
    let denied = denied_port.to_string();
    assert_eq!(
        s.client("b", &["tcp", "127.0.0.2", &denied, "hi"]),
        "errno 1"
    );
    assert!(
        nothing_arrives(&denied_rx),
        "the denied server saw a connection"
    );
    // The same address through an IPv6 socket, IPv4-mapped, is the same destination.
    assert_eq!(
        s.client("b", &["tcp6", "127.0.0.2", &denied, "hi"]),
        "errno 1"
    );
    assert!(
        nothing_arrives(&denied_rx),
        "reached through ::ffff:127.0.0.2"
    );
    assert_eq!(
        s.client("b", &["udp", "127.0.0.2", &udp_port, "hi"]),
        "errno 1"
    );
    let mut buf = [0u8; 16];
    assert!(
        udp.recv(&mut buf).is_err(),
        "the denied receiver got a datagram"
    );
    // An allow rule: the program behaves as without a policy.
    let open = open_port.to_string();
    assert_eq!(
        s.client("b", &["tcp", "127.0.0.3", &open, "hello"]),
        "echo hello"
    );
    assert_eq!(
        open_rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        b"hello"
    );
    // Denials are traced, with the destination asked for.
    let trace = s.trace("b");
    let denials: Vec<_> = trace.iter().filter(|e| e["kind"] == "net_denied").collect();
    assert!(
        denials
            .iter()
            .any(|e| e["addr"] == "127.0.0.2" && e["port"] == denied_port),
        "{denials:?}"
    );
    assert!(
        denials
            .iter()
            .any(|e| e["port"].as_u64() == udp_port.parse().ok())
    );
    // A fork inherits the policy (its cloned process, and what it execs).
    s.d.ok(&["fork", "b", "--name", "kid"]);
    assert_eq!(
        s.client("kid", &["tcp", "127.0.0.2", &denied, "hi"]),
        "errno 1"
    );
    assert!(nothing_arrives(&denied_rx));
    // The policy changes through the API: the branch's own, at once; its fork keeps its own.
    let allow = s.policy("allow.toml", "default = \"allow\"\n");
    s.d.ok(&["policy", "b", &allow]);
    assert_eq!(
        s.client("b", &["tcp", "127.0.0.2", &denied, "now"]),
        "echo now"
    );
    assert_eq!(
        denied_rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        b"now"
    );
    assert_eq!(
        s.client("kid", &["tcp", "127.0.0.2", &denied, "hi"]),
        "errno 1"
    );
}

#[test]
fn a_bad_policy_is_refused_with_its_line_and_no_branch_is_made() {
    let s = setup_in(std::path::Path::new("/var/tmp"));
    let ws = s.ws.to_str().unwrap().to_string();
    for (text, want) in [
        (
            "default = \"allow\"\n[[rule]]\nclass = \"net\"\ndest = \"10.0.0.0/8\"\naction = \"maybe\"\n",
            "line 5",
        ),
        (
            "[[rule]]\nclass = \"net\"\ndest = \"nowhere.invalid\"\naction = \"deny\"\n",
            "does not resolve",
        ),
        (
            "[[rule]]\nclass = \"file\"\npath = \"/no/such/dir\"\naction = \"share\"\n",
            "does not exist",
        ),
        ("default = \"allow\"\n[[rule]\n", "line 2"),
    ] {
        let f = s.policy("bad.toml", text);
        let out =
            s.d.cli(&["run", "--policy", &f, "--workspace", &ws, "--", "true"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}");
        assert!(
            err.contains(want) && err.contains("bad.toml"),
            "{want}: {err}"
        );
    }
    // A file rule reaching the daemon's own directories is refused by the daemon.
    let state = s.d.state.to_str().unwrap().to_string();
    let f = s.policy(
        "sneaky.toml",
        &format!("[[rule]]\nclass = \"file\"\npath = \"{state}\"\naction = \"share\"\n"),
    );
    let out =
        s.d.cli(&["run", "--policy", &f, "--workspace", &ws, "--", "true"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("forkscope's own directory"));
    // Also through a symlink to it: paths are judged as what they resolve to.
    let host = TempDir::new_in(std::path::Path::new("/var/tmp"), "policy-link");
    let link = host.path().join("innocent");
    std::os::unix::fs::symlink(&s.d.state, &link).unwrap();
    let f = s.policy(
        "linked.toml",
        &format!(
            "[[rule]]\nclass = \"file\"\npath = \"{}\"\naction = \"share\"\n",
            link.display()
        ),
    );
    let out =
        s.d.cli(&["run", "--policy", &f, "--workspace", &ws, "--", "true"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("forkscope's own directory"));
    assert_eq!(s.d.ok(&["ls", "--json"]).trim(), "[]");
}

#[test]
fn files_outside_the_workspace_are_read_only_unless_shared() {
    let s = setup_in(std::path::Path::new("/var/tmp"));
    // (Outside the test's directory, which holds the daemon's socket: branches never see
    // that.)
    let host = TempDir::new_in(std::path::Path::new("/var/tmp"), "policy-host");
    let shared = host.path().join("shared");
    let closed = shared.join("closed");
    let other = host.path().join("other");
    for d in [&shared, &closed, &other] {
        std::fs::create_dir_all(d).unwrap();
    }
    // First match wins: `closed` is denied although it lies in the shared directory.
    let policy = s.policy(
        "files.toml",
        &format!(
            "[[rule]]\nclass = \"file\"\npath = \"{}\"\naction = \"deny\"\n[[rule]]\nclass = \"file\"\npath = \"{}\"\naction = \"share\"\n",
            closed.display(),
            shared.display()
        ),
    );
    s.run("f", &policy);
    let write = |path: &std::path::Path| {
        let script = format!(
            "echo from-branch > {} 2>/dev/null && echo ok || echo refused",
            path.display()
        );
        s.d.ok(&["exec", "f", "--", "sh", "-c", &script])
            .trim()
            .to_string()
    };
    assert_eq!(write(&shared.join("note")), "ok");
    assert_eq!(
        std::fs::read_to_string(shared.join("note")).unwrap(),
        "from-branch\n"
    );
    assert_eq!(write(&closed.join("note")), "refused");
    assert_eq!(write(&other.join("note")), "refused");
    assert!(!closed.join("note").exists() && !other.join("note").exists());
    // The shared write is traced.
    let trace = s.trace("f");
    assert!(
        trace.iter().any(
            |e| e["kind"] == "file_write" && e["path"].as_str() == shared.join("note").to_str()
        ),
        "no traced write to the shared file"
    );
}

/// A python HTTP client: POSTs its body to the URL, prints the status it got. A body
/// `@N` is N bytes of a counting pattern.
const POST: &str = r#"
import sys, urllib.request
body = sys.argv[2].encode()
if body.startswith(b"@"):
    body = bytes(i % 251 for i in range(int(body[1:])))
req = urllib.request.Request(sys.argv[1], data=body, method="POST")
with urllib.request.urlopen(req, timeout=10) as r:
    print(r.status, r.headers.get("Forkscope-Effect") is not None)
"#;

#[test]
fn buffered_requests_are_answered_at_once_and_delivered_exactly_once_on_commit() {
    let mut s = setup();
    std::fs::write(s.ws.join("post.py"), POST).unwrap();
    let (port, rx) = recording_http_server("127.0.0.2");
    let (tcp_port, tcp_rx) = echo_server("127.0.0.2");
    let policy = s.policy(
        "buffer.toml",
        "[[rule]]\nclass = \"net\"\ndest = \"127.0.0.2/32\"\naction = \"buffer\"\n",
    );
    s.run("pay", &policy);
    s.run("dropped", &policy);
    let url = format!("http://127.0.0.2:{port}/charge");
    let post = |branch: &str, body: &str| {
        s.d.ok(&["exec", branch, "--", "python3", "post.py", &url, body])
            .trim()
            .to_string()
    };
    // The client gets the synthetic answer at once; the server sees nothing yet.
    assert_eq!(post("pay", "amount=5"), "202 True");
    assert_eq!(post("pay", "amount=7"), "202 True");
    // Large bodies are kept in a segment file next to the journal, one for both branches.
    assert_eq!(post("pay", "@300000"), "202 True");
    let payload_files = |s: &Setup| {
        std::fs::read_dir(s.d.state.join("effects"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    assert_eq!(payload_files(&s), 1);
    assert_eq!(post("dropped", "amount=100"), "202 True");
    assert_eq!(post("dropped", "@200000"), "202 True");
    assert_eq!(payload_files(&s), 1);
    // Raw TCP bytes are recorded too (the client gets no answer).
    let tcp = tcp_port.to_string();
    assert_eq!(
        s.client("pay", &["tcp", "127.0.0.2", &tcp, "raw-bytes"]),
        "echo"
    );
    assert!(nothing_arrives(&rx) && nothing_arrives(&tcp_rx));
    let held: serde_json::Value =
        serde_json::from_str(&s.d.ok(&["effects", "pay", "--json"])).unwrap();
    let held = held.as_array().unwrap();
    assert_eq!(held.len(), 4, "{held:?}");
    assert!(held.iter().all(|e| e["state"] == "held"));
    assert_eq!(held[0]["summary"], "POST /charge");
    assert!(held[2]["bytes"].as_u64().unwrap() > 300_000, "{held:?}");
    // The daemon dies between the answers and the commit; a new one delivers each request
    // once, in order, with an idempotency key and the branch's name.
    let dir = s.d.state.parent().unwrap().to_path_buf();
    let socket = s.d.socket.clone();
    s.d.kill9();
    // What a daemon killed between a payload file and its record leaves: swept at start.
    std::fs::write(s.d.state.join("effects/stray.bin"), "half").unwrap();
    std::mem::forget(std::mem::replace(&mut s.d, Daemon::start_on(&dir, &socket)));
    assert_eq!(
        payload_files(&s),
        1,
        "the stray file is gone, the recorded one kept"
    );
    let committed: serde_json::Value =
        serde_json::from_str(&s.d.ok(&["commit", "pay", "--json"])).unwrap();
    let delivered = committed["effects"].as_array().unwrap();
    assert_eq!(delivered.len(), 4, "{committed}");
    assert!(
        delivered.iter().all(|d| d["delivered"] == true),
        "{committed}"
    );
    let (head1, body1) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let (head2, body2) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        (body1.as_slice(), body2.as_slice()),
        (&b"amount=5"[..], &b"amount=7"[..])
    );
    assert!(head1.starts_with("POST /charge HTTP/1.1\r\n"), "{head1}");
    assert!(head1.contains("Forkscope-Branch: pay\r\n"), "{head1}");
    let key = |h: &str| {
        h.lines()
            .find(|l| l.starts_with("Idempotency-Key:"))
            .map(str::to_string)
    };
    assert!(key(&head1).is_some() && key(&head1) != key(&head2));
    let (_, big) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let pattern: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    assert!(
        big == pattern,
        "the large body, byte for byte ({} bytes)",
        big.len()
    );
    assert_eq!(
        tcp_rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        b"raw-bytes"
    );
    // Exactly once: a second commit delivers nothing again.
    let again: serde_json::Value =
        serde_json::from_str(&s.d.ok(&["commit", "pay", "--json"])).unwrap();
    assert_eq!(again["effects"].as_array().unwrap().len(), 0);
    assert!(nothing_arrives(&rx));
    // The aborted branch's requests are never delivered; the segment stays while a
    // payload of the other branch is in it.
    s.d.ok(&["abort", "dropped"]);
    assert!(nothing_arrives(&rx));
    assert_eq!(payload_files(&s), 1);
    // The delivered requests' records (and the large one's file) go with their branch.
    s.d.ok(&["abort", "pay"]);
    assert_eq!(payload_files(&s), 0);
}

/// A python client that connects to ADDR:PORT, sends MSG, and prints how long the connect
/// took and what came back (or the errno).
const SLOW_CLIENT: &str = r#"
import socket, sys, time
addr, port, msg = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
t = time.monotonic()
try:
    s = socket.create_connection((addr, port))
    held = time.monotonic() - t
    s.sendall(msg)
    s.shutdown(socket.SHUT_WR)
    print("echo", s.recv(1024).decode(), "held", round(held, 1))
except OSError as e:
    print("errno", e.errno)
"#;

#[test]
fn deferred_calls_wait_for_the_commit_and_fail_on_abort() {
    let mut s = setup();
    std::fs::write(s.ws.join("slow.py"), SLOW_CLIENT).unwrap();
    let (port, rx) = echo_server("127.0.0.2");
    let (open_port, open_rx) = echo_server("127.0.0.3");
    let policy = s.policy(
        "defer.toml",
        "default = \"allow\"\n[[rule]]\nclass = \"net\"\ndest = \"127.0.0.2/32\"\nports = \"1-65535\"\naction = \"defer\"\n",
    );
    s.run("d", &policy);
    s.run("gone", &policy);
    // An allowed destination goes on at once.
    let open = open_port.to_string();
    assert_eq!(
        s.client("d", &["tcp", "127.0.0.3", &open, "now"]),
        "echo now"
    );
    assert_eq!(
        open_rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        b"now"
    );
    // A deferred connect is held: the client waits, the server sees nothing.
    let port_s = port.to_string();
    let api = s.d.socket.clone();
    let spawn_client = |branch: &str, msg: &str| {
        std::process::Command::new(forkscope_tests::forkscope())
            .env("FORKSCOPE_SOCKET", &api)
            .args([
                "exec",
                branch,
                "--",
                "python3",
                "slow.py",
                "127.0.0.2",
                &port_s,
                msg,
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let waiting = spawn_client("d", "pay");
    let doomed = spawn_client("gone", "never");
    let start = std::time::Instant::now();
    let held = loop {
        let list: serde_json::Value =
            serde_json::from_str(&s.d.ok(&["effects", "d", "--json"])).unwrap();
        if let Some(e) = list
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["kind"] == "defer")
        {
            break e.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no held call listed"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        (held["state"].as_str(), held["summary"].as_str()),
        (Some("held"), Some("connect"))
    );
    assert_eq!(held["port"], port);
    std::thread::sleep(Duration::from_millis(500));
    assert!(nothing_arrives(&rx), "the server saw a held connection");
    // The daemon restarts: the call stays held (the init keeps the listener), and the new
    // daemon releases it at the commit.
    let dir = s.d.state.parent().unwrap().to_path_buf();
    let socket = s.d.socket.clone();
    s.d.kill9();
    std::mem::forget(std::mem::replace(&mut s.d, Daemon::start_on(&dir, &socket)));
    assert!(nothing_arrives(&rx));
    let committed: serde_json::Value =
        serde_json::from_str(&s.d.ok(&["commit", "d", "--json"])).unwrap();
    assert!(
        committed["effects"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "defer" && e["delivered"] == true),
        "{committed}"
    );
    let out = waiting.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.starts_with("echo pay held "), "{out}");
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), b"pay");
    // Abort: the other branch's held call fails, and never reaches the server.
    s.d.ok(&["abort", "gone"]);
    let _ = doomed.wait_with_output();
    assert!(nothing_arrives(&rx));
    // A fork inherits the policy: its calls are held too.
    s.d.ok(&["fork", "d", "--name", "kid"]);
    let kid = spawn_client("kid", "from-kid");
    std::thread::sleep(Duration::from_millis(500));
    assert!(nothing_arrives(&rx));
    s.d.ok(&["commit", "kid"]);
    let out = kid.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("echo from-kid"));
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        b"from-kid"
    );
}

#[test]
fn a_deferred_call_past_its_timeout_fails_and_a_killed_caller_leaves_nothing_held() {
    let s = setup();
    std::fs::write(s.ws.join("slow.py"), SLOW_CLIENT).unwrap();
    let (port, rx) = echo_server("127.0.0.2");
    let policy = s.policy(
        "timeout.toml",
        "defer_timeout = 1\n[[rule]]\nclass = \"net\"\ndest = \"127.0.0.2\"\naction = \"defer\"\n",
    );
    s.run("t", &policy);
    let port_s = port.to_string();
    // ETIMEDOUT (110) after the timeout; the server never hears of it.
    let out = s.d.ok(&[
        "exec",
        "t",
        "--",
        "python3",
        "slow.py",
        "127.0.0.2",
        &port_s,
        "late",
    ]);
    assert_eq!(out.trim(), "errno 110");
    assert!(nothing_arrives(&rx));
    let list: serde_json::Value =
        serde_json::from_str(&s.d.ok(&["effects", "t", "--json"])).unwrap();
    let e = &list.as_array().unwrap()[0];
    assert_eq!(e["state"], "failed");
    assert!(
        e["result"].as_str().unwrap().contains("defer_timeout"),
        "{e}"
    );
    // A caller killed while held: its call is recorded as never sent, and nothing reaches
    // the server at the commit.
    let longer = s.policy(
        "long.toml",
        "defer_timeout = 600\n[[rule]]\nclass = \"net\"\ndest = \"127.0.0.2\"\naction = \"defer\"\n",
    );
    s.d.ok(&["policy", "t", &longer]);
    s.d.ok(&[
        "exec",
        "t",
        "--",
        "sh",
        "-c",
        &format!("python3 slow.py 127.0.0.2 {port_s} killed & sleep 1; kill -9 $!"),
    ]);
    let start = std::time::Instant::now();
    loop {
        let list: serde_json::Value =
            serde_json::from_str(&s.d.ok(&["effects", "t", "--json"])).unwrap();
        let second = list.as_array().unwrap().get(1).cloned();
        if second.as_ref().is_some_and(|e| e["state"] == "failed") {
            assert!(
                second.unwrap()["result"]
                    .as_str()
                    .unwrap()
                    .contains("ended")
            );
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{list}");
        std::thread::sleep(Duration::from_millis(100));
    }
    s.d.ok(&["commit", "t"]);
    assert!(nothing_arrives(&rx));
}

#[test]
fn a_failed_delivery_is_reported_kept_and_delivered_at_the_next_commit() {
    let s = setup();
    std::fs::write(s.ws.join("post.py"), POST).unwrap();
    // A port nothing listens on yet (bound, then released).
    let port = TcpListener::bind("127.0.0.2:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let policy = s.policy(
        "buffer.toml",
        "buffer_status = 200\nbuffer_body = \"queued\"\n[[rule]]\nclass = \"net\"\ndest = \"127.0.0.2/32\"\naction = \"buffer\"\n",
    );
    s.run("r", &policy);
    let url = format!("http://127.0.0.2:{port}/order");
    // The policy's synthetic answer.
    let out =
        s.d.ok(&["exec", "r", "--", "python3", "post.py", &url, "one"]);
    assert_eq!(out.trim(), "200 True");
    // The destination is down at the commit: reported, kept.
    let first: serde_json::Value =
        serde_json::from_str(&s.d.ok(&["commit", "r", "--json"])).unwrap();
    let d = &first["effects"][0];
    assert_eq!(d["delivered"], false, "{first}");
    assert!(d["result"].as_str().unwrap().contains("failed"), "{first}");
    let list: serde_json::Value =
        serde_json::from_str(&s.d.ok(&["effects", "r", "--json"])).unwrap();
    assert_eq!(list[0]["state"], "failed");
    // It comes up: the next commit delivers the request, once.
    let l = TcpListener::bind(("127.0.0.2", port)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            let mut buf = [0u8; 4096];
            let n = c.read(&mut buf).unwrap_or(0);
            let _ = c.write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n");
            let _ = tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    });
    let second: serde_json::Value =
        serde_json::from_str(&s.d.ok(&["commit", "r", "--json"])).unwrap();
    assert_eq!(second["effects"][0]["delivered"], true, "{second}");
    assert!(
        second["effects"][0]["result"]
            .as_str()
            .unwrap()
            .contains("201")
    );
    let got = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(
        got.starts_with("POST /order ") && got.ends_with("one"),
        "{got}"
    );
    let third: serde_json::Value =
        serde_json::from_str(&s.d.ok(&["commit", "r", "--json"])).unwrap();
    assert_eq!(third["effects"].as_array().unwrap().len(), 0);
    assert!(nothing_arrives(&rx));
}
