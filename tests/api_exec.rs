//! `POST /v1/branches/{name}/exec` (what the Python client and agent frameworks use) with
//! commands that outlive their answer: a background process left holding the output
//! pipes, a client that goes away, a daemon asked to stop meanwhile.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use forkscope_tests::{TempDir, daemon::Daemon, forkscope, require_root};
use serde_json::{Value, json};

fn workspace(dir: &Path) -> PathBuf {
    let ws = dir.join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    ws
}

/// Sends an exec request for `argv` in `branch` and returns the open connection.
fn send_exec(socket: &Path, branch: &str, argv: &[&str]) -> UnixStream {
    let body = json!({ "argv": argv }).to_string();
    let mut conn = UnixStream::connect(socket).unwrap();
    write!(
        conn,
        "POST /v1/branches/{branch}/exec HTTP/1.1\r\nHost: forkscope\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    conn
}

/// Reads the answer on `conn` (given `limit`): status code and JSON body.
fn answer(mut conn: UnixStream, limit: Duration) -> (u16, Value) {
    conn.set_read_timeout(Some(limit)).unwrap();
    let mut raw = Vec::new();
    if let Err(e) = conn.read_to_end(&mut raw) {
        panic!(
            "no whole answer within {limit:?} ({e}); so far: {}",
            String::from_utf8_lossy(&raw)
        );
    }
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text}"));
    // (`Connection: close`: the body is what follows the headers, maybe chunked.)
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let json_text = match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) => &body[a..=b],
        _ => "null",
    };
    (
        status,
        serde_json::from_str(json_text).unwrap_or(Value::Null),
    )
}

/// Whether process `pid` (as the branch's pid namespace numbers it) is alive in `branch`.
fn alive_in(d: &Daemon, branch: &str, pid: &str) -> bool {
    d.cli(&["exec", branch, "--", "kill", "-0", pid])
        .status
        .success()
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `sleep 300` in `branch` through the API; returns the open connection and the
/// command's pid in the branch, once it runs.
fn start_sleeper(d: &Daemon, branch: &str) -> (UnixStream, String) {
    let conn = send_exec(
        &d.socket,
        branch,
        &["sh", "-c", "echo $$ > exec.pid; exec sleep 300"],
    );
    let mut pid = String::new();
    wait_for("the command starts", Duration::from_secs(20), || {
        pid = d
            .sh(branch, "cat exec.pid 2>/dev/null || true")
            .trim()
            .to_string();
        !pid.is_empty()
    });
    (conn, pid)
}

#[test]
fn an_exec_that_leaves_a_background_process_is_answered_when_its_command_exits() {
    require_root();
    let dir = TempDir::new("api-exec-bg");
    let ws = workspace(dir.path());
    let d = Daemon::start(dir.path());
    d.run_sleeping("root", &ws);
    // The background process keeps the command's stdout and stderr, and writes to them
    // after the answer: it must neither hold the answer nor die of SIGPIPE.
    let conn = send_exec(
        &d.socket,
        "root",
        &[
            "sh",
            "-c",
            "(sleep 1; echo late; echo late >&2; echo alive > bg.txt; exec sleep 300) & echo up",
        ],
    );
    let (status, out) = answer(conn, Duration::from_secs(20));
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["exit_code"], 0, "{out}");
    assert_eq!(out["stdout"], "up\n", "{out}");
    wait_for(
        "the background process goes on",
        Duration::from_secs(20),
        || d.cli(&["exec", "root", "--", "cat", "bg.txt"]).stdout == b"alive\n",
    );
    // Other requests are served meanwhile, and the command's output is its own.
    let (status, out) = answer(
        send_exec(&d.socket, "root", &["sh", "-c", "echo second; exit 3"]),
        Duration::from_secs(20),
    );
    assert_eq!((status, out["exit_code"].as_i64()), (200, Some(3)), "{out}");
    assert_eq!(out["stdout"], "second\n", "{out}");
}

#[test]
fn an_exec_whose_client_goes_away_is_killed() {
    require_root();
    let dir = TempDir::new("api-exec-gone");
    let ws = workspace(dir.path());
    let d = Daemon::start(dir.path());
    d.run_sleeping("root", &ws);
    let (conn, pid) = start_sleeper(&d, "root");
    assert!(alive_in(&d, "root", &pid), "the command runs");
    drop(conn);
    wait_for(
        "the command of a client that went away is killed",
        Duration::from_secs(20),
        || !alive_in(&d, "root", &pid),
    );
    // The branch itself goes on.
    assert_eq!(d.sh("root", "echo still"), "still\n");
}

#[test]
fn a_daemon_asked_to_stop_ends_followed_traces_and_running_execs() {
    require_root();
    let dir = TempDir::new("api-exec-stop");
    let ws = workspace(dir.path());
    let mut d = Daemon::start(dir.path());
    d.run_sleeping("root", &ws);
    let mut follow = Command::new(forkscope())
        .env("FORKSCOPE_SOCKET", &d.socket)
        .args(["trace", "--branch", "root", "--follow"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (conn, pid) = start_sleeper(&d, "root");
    let reader = std::thread::spawn(move || answer(conn, Duration::from_secs(30)));
    let asked = Instant::now();
    forkscope_tests::daemon::nix_kill(d.child.id(), libc::SIGTERM);
    wait_for("the daemon stops", Duration::from_secs(30), || {
        d.child.try_wait().ok().flatten().is_some()
    });
    let took = asked.elapsed();
    let (status, out) = reader.join().unwrap();
    assert_eq!(status, 503, "{out}");
    assert!(
        out["error"].as_str().unwrap_or("").contains("stopping"),
        "{out}"
    );
    let ended = Instant::now();
    while follow.try_wait().ok().flatten().is_none() && ended.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let follow_ended = follow.try_wait().ok().flatten().is_some();
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(follow_ended, "the followed trace ends with the daemon");
    eprintln!("the daemon stopped {took:?} after SIGTERM");
    // Back again: the branch is adopted, and the command that was stopped is gone.
    let d2 = Daemon::start(dir.path());
    assert!(!alive_in(&d2, "root", &pid), "the stopped command is gone");
    assert_eq!(d2.sh("root", "echo back"), "back\n");
    std::mem::forget(d); // its child is already reaped; d2 cleans up
}
