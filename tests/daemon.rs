//! The daemon and the CLI end to end: real daemon, real CLI, real branches. Isolation, a
//! daemon killed with SIGKILL and restarted, abort leaving nothing, containment of the API,
//! 100 branches at once, and bad input.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use std::os::unix::fs::PermissionsExt;

use forkscope_tests::{KillOnDrop, TempDir, cgroup2_root, daemon::Daemon, forkscope, require_root};

fn workspace(dir: &Path) -> PathBuf {
    let ws = dir.join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::write(ws.join("shared.txt"), "original\n").unwrap();
    ws
}

#[test]
fn forks_are_isolated_from_parent_siblings_and_host() {
    require_root();
    let dir = TempDir::new("daemon-iso");
    let ws = workspace(dir.path());
    let d = Daemon::start(dir.path());
    d.run_sleeping("main", &ws);
    d.ok(&["exec", "main", "--", "sh", "-c", "echo main > shared.txt"]);
    let kids = d.ok(&["fork", "main", "-n", "2"]);
    let kids: Vec<&str> = kids.lines().collect();
    assert_eq!(kids.len(), 2);
    d.ok(&[
        "exec",
        kids[0],
        "--",
        "sh",
        "-c",
        "echo kid0 > shared.txt; echo x > only0.txt",
    ]);
    assert_eq!(
        d.ok(&["exec", kids[1], "--", "cat", "shared.txt"]),
        "main\n",
        "a sibling's write is invisible"
    );
    assert_eq!(
        d.ok(&["exec", "main", "--", "cat", "shared.txt"]),
        "main\n",
        "a child's write is invisible to its parent"
    );
    assert_eq!(
        std::fs::read_to_string(ws.join("shared.txt")).unwrap(),
        "original\n",
        "the host is untouched"
    );
    assert!(!ws.join("only0.txt").exists());
    let code = d
        .cli(&["exec", kids[1], "--", "test", "-e", "only0.txt"])
        .status
        .code();
    assert_eq!(code, Some(1), "exit codes pass through");
    assert_eq!(d.ok(&["diff", kids[0]]), "A only0.txt\nM shared.txt\n");
}

#[test]
fn a_daemon_killed_with_sigkill_comes_back_with_every_branch() {
    require_root();
    let dir = TempDir::new("daemon-restart");
    let ws = workspace(dir.path());
    let mut d = Daemon::start(dir.path());
    d.run_sleeping("survivor", &ws);
    d.ok(&[
        "exec",
        "survivor",
        "--",
        "sh",
        "-c",
        "echo kept > state.txt",
    ]);
    d.ok(&["fork", "survivor", "--name", "kid"]);
    d.kill9();
    // The branch goes on while no daemon runs, and the pinned eBPF programs keep tracing it.
    // The survivor is the first branch (id 1); later ids are its fork and the sandbox the
    // daemon pre-started for its next fork.
    let control = d.state.join("branches/1/control.sock");
    assert!(control.exists());
    let (code, _) = forkscope_tests::exec_sh(&control, "echo meanwhile > meanwhile.txt");
    assert_eq!(code, 0);
    assert_eq!(d.pins().len(), 1, "the programs stay pinned");
    let d2 = Daemon::start(dir.path());
    let ls = d2.ok(&["ls"]);
    assert!(
        ls.contains("survivor") && ls.contains("kid") && !ls.contains("dead"),
        "{ls}"
    );
    assert_eq!(d2.ok(&["exec", "kid", "--", "cat", "state.txt"]), "kept\n");
    std::thread::sleep(Duration::from_millis(200));
    let traced: usize = ["survivor", "kid"]
        .iter()
        .map(|b| {
            d2.ok(&["trace", "--branch", b])
                .matches("meanwhile.txt")
                .count()
        })
        .sum();
    assert!(
        traced >= 2,
        "what a branch did while no daemon ran is in its trace"
    );
    std::mem::forget(d); // its child is already reaped; d2 cleans up
    let mut d2 = d2;
    let pins = d2.pins();
    assert_eq!(pins.len(), 1);
    for b in ["kid", "survivor"] {
        d2.ok(&["abort", b]);
    }
    d2.stop();
    assert!(
        !pins[0].exists(),
        "a daemon stopped with no branch removes its pins"
    );
}

/// A connection to the Unix socket `path` made without waiting (a blocking connect waits for
/// room in a full queue forever), if one is made.
fn connect_now(path: &Path) -> nix::Result<std::os::unix::net::UnixStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    let s = std::os::unix::net::UnixStream::from(fd);
    s.set_nonblocking(false).unwrap();
    Ok(s)
}

/// Connects to the Unix socket `path` until its queue of connections is full.
fn fill_queue(path: &Path) {
    for _ in 0..100_000 {
        match connect_now(path) {
            Ok(_) => continue,
            Err(nix::errno::Errno::EAGAIN) => return,
            Err(e) => panic!("{}: {e}", path.display()),
        }
    }
    panic!("{}: the queue never filled", path.display());
}

/// Runs `forkscope status` on `socket`, which must fail within 10 s; returns what it said.
fn status_fails(socket: &Path) -> String {
    let mut call = Command::new(forkscope())
        .args(["status", "--socket"])
        .arg(socket)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let asked = Instant::now();
    while call.try_wait().unwrap().is_none() && asked.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let hung = call.try_wait().unwrap().is_none();
    if hung {
        let _ = call.kill();
    }
    let called = call.wait_with_output().unwrap();
    assert!(!hung, "the CLI waited on a socket nobody answers");
    assert!(!called.status.success());
    String::from_utf8_lossy(&called.stderr).into_owned()
}

/// Whether a daemon answers `GET /v1/status` on `socket` within a second.
fn answers(socket: &Path) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = connect_now(socket) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let _ = s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.starts_with("HTTP/1.1 200")
}

#[test]
fn sockets_a_dead_daemons_child_still_holds_do_not_stop_a_restart() {
    require_root();
    // What a daemon killed while it spawned a process leaves until that child's exec: its
    // API socket, listening but never answering, and its metrics port, taken a moment more.
    let dir = TempDir::new("daemon-stale-sockets");
    let socket = dir.path().join("api.sock");
    // A socket a live process listens on is not taken, answer or not.
    let live = dir.path().join("live.sock");
    let _listening = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let refused = Command::new(forkscope())
        .args(["daemon", "--metrics-addr", "off", "--state-dir"])
        .arg(dir.path().join("state-live"))
        .arg("--socket")
        .arg(&live)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("another daemon is listening"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // The API socket: made to listen by a process that is gone, held by its child.
    let mut maker = Command::new("python3")
        .args([
            "-c",
            "import os, socket, sys, time\n\
             s = socket.socket(socket.AF_UNIX)\n\
             s.bind(sys.argv[1])\n\
             s.listen()\n\
             child = os.fork()\n\
             if child == 0:\n    time.sleep(60)\n    os._exit(0)\n\
             print(child, flush=True)\n",
        ])
        .arg(&socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(maker.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(maker.wait().unwrap().success());
    let holder: i32 = line.trim().parse().expect("the socket's holder");
    assert!(holder > 0);
    let silent = KillOnDrop(holder);
    // A CLI call there says the daemon is gone, rather than wait forever for an answer.
    let said = status_fails(&socket);
    assert!(
        said.contains("is gone") && said.contains("forkscope daemon"),
        "{said}"
    );
    // Each call leaves its connection queued there. Once the queue is full, a call is told
    // so at once, and a daemon starting there (below) does not wait for room either.
    fill_queue(&socket);
    let said = status_fails(&socket);
    assert!(
        said.contains("queue of connections is full") && said.contains("forkscope daemon"),
        "{said}"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics = port.local_addr().unwrap().to_string();
    let freed = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        drop(port);
    });
    let child = Command::new(forkscope())
        .args(["daemon", "--metrics-addr", &metrics, "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(&socket)
        .stderr(Stdio::from(
            std::fs::File::create(dir.path().join("daemon.log")).unwrap(),
        ))
        .spawn()
        .unwrap();
    let mut d = Daemon {
        child,
        socket: socket.clone(),
        state: dir.path().join("state"),
    };
    let start = Instant::now();
    let came_up = loop {
        if answers(&socket) {
            break true;
        }
        if d.child.try_wait().unwrap().is_some() || start.elapsed() > Duration::from_secs(30) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if !came_up {
        // (Killed first: a CLI would wait forever on a socket that never answers.)
        drop(silent);
        let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();
        panic!("the daemon did not start: {log}");
    }
    freed.join().unwrap();
    assert!(
        std::net::TcpStream::connect(&metrics).is_ok(),
        "the daemon serves metrics on the port once it was free"
    );
    // The silent socket is gone from the path; the daemon's own answers there.
    d.ok(&["ls"]);
    drop(silent);
    d.stop();
}

/// Waits for a daemon that crashed on purpose to be gone.
fn wait_crashed(d: &mut Daemon) {
    let start = Instant::now();
    while d.child.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "daemon did not crash"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_commit_cut_by_a_crash_is_all_or_nothing() {
    require_root();
    let dir = TempDir::new("daemon-commit-crash");
    let ws = workspace(dir.path());
    for f in ["a", "b", "c"] {
        std::fs::write(ws.join(f), "old\n").unwrap();
    }
    let socket = dir.path().join("api.sock");
    let change = "echo new > a && echo new > b && rm c && mkdir d && echo new > d/e && chmod 700 d";

    // Killed after the staging, before the journal: the host stays as it was.
    let mut d = Daemon::start_with(
        dir.path(),
        &socket,
        &[("FORKSCOPE_FAULT", "commit-before-journal")],
    );
    d.run_sleeping("main", &ws);
    d.ok(&["exec", "main", "--", "sh", "-c", change]);
    let before = forkscope_tests::tree(&ws);
    assert!(!d.cli(&["commit", "main"]).status.success());
    wait_crashed(&mut d);
    std::mem::forget(d);
    let mut d = Daemon::start_with(
        dir.path(),
        &socket,
        &[("FORKSCOPE_FAULT", "commit-after-op:2")],
    );
    assert_eq!(forkscope_tests::tree(&ws), before, "nothing applied");
    let branch_dir = d.state.join("branches/1");
    assert!(!branch_dir.join("staging").exists(), "staging removed");
    assert!(!branch_dir.join("commit-staging").exists());

    // Killed half-way through applying: the restarted daemon finishes it.
    assert!(!d.cli(&["commit", "main"]).status.success());
    wait_crashed(&mut d);
    std::mem::forget(d);
    let partial = forkscope_tests::tree(&ws);
    assert_ne!(partial, before, "the crash came after some operations");
    let d = Daemon::start(dir.path());
    let view = d.ok(&[
        "exec",
        "main",
        "--",
        "sh",
        "-c",
        "cat a b d/e; ls c 2>/dev/null | wc -l; stat -c %a d",
    ]);
    assert_eq!(
        view, "new\nnew\nnew\n0\n700\n",
        "the branch runs again (thawed)"
    );
    assert_eq!(std::fs::read_to_string(ws.join("a")).unwrap(), "new\n");
    assert_eq!(std::fs::read_to_string(ws.join("d/e")).unwrap(), "new\n");
    assert!(!ws.join("c").exists());
    assert_eq!(
        std::fs::metadata(ws.join("d"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    assert!(!branch_dir.join("commit-journal.json").exists());
    // Committed once, not twice: nothing is left to commit.
    let again = d.ok(&["commit", "main", "--json"]);
    let again: serde_json::Value = serde_json::from_str(&again).unwrap();
    assert_eq!(again["changes"].as_array().unwrap().len(), 0, "{again}");

    // A commit that replaces files: its staging directory (which keeps the replaced files
    // until it goes) leaves the branch directory at once, and the state directory soon.
    d.sh("main", "echo newer > a && echo newer > b");
    d.ok(&["commit", "main"]);
    assert_eq!(std::fs::read_to_string(ws.join("a")).unwrap(), "newer\n");
    assert_eq!(std::fs::read_to_string(ws.join("b")).unwrap(), "newer\n");
    assert!(!branch_dir.join("staging").exists());
    assert!(!branch_dir.join("commit-journal.json").exists());
    let garbage = d.state.join("garbage");
    let start = Instant::now();
    while std::fs::read_dir(&garbage).unwrap().count() > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} still holds a commit's staging directory",
            garbage.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn abort_leaves_no_trace() {
    require_root();
    let dir = TempDir::new("daemon-abort");
    let ws = workspace(dir.path());
    let d = Daemon::start(dir.path());
    d.run_sleeping("gone", &ws);
    d.ok(&["fork", "gone", "--name", "gone-kid"]);
    d.ok(&["fork", "gone-kid", "--name", "gone-grandkid"]);
    d.ok(&["fork", "gone", "--frozen", "--name", "gone-checkpoint"]);
    d.ok(&["fork", "gone-checkpoint", "--name", "from-checkpoint"]);
    let before = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    // A branch aborted while a fork of it runs is retired: listed as such, its name free.
    // A retired checkpoint is skipped by a commit as a live one is.
    d.ok(&["abort", "gone-checkpoint"]);
    d.ok(&["commit", "from-checkpoint"]);
    d.ok(&["abort", "gone-kid"]);
    d.ok(&["abort", "gone"]);
    let listed = d.ok(&["ls"]);
    assert_eq!(listed.matches("retired").count(), 3, "{listed}");
    let refused = d.cli(&["exec", "gone", "--", "true"]);
    assert!(!refused.status.success());
    // A retired branch goes with its last fork; `abort --recursive` of a retired one takes
    // its subtree, retired branches included.
    d.ok(&["abort", "from-checkpoint"]);
    assert_eq!(d.ok(&["ls"]).matches("retired").count(), 2);
    let list: serde_json::Value = serde_json::from_str(&d.ok(&["ls", "--json"])).unwrap();
    let root = list
        .as_array()
        .unwrap()
        .iter()
        .find_map(|b| b["name"].as_str().filter(|n| n.starts_with("gone~")))
        .unwrap()
        .to_string();
    d.ok(&["abort", "--recursive", &root]);
    assert_eq!(d.ok(&["ls", "--json"]).trim(), "[]");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert_eq!(
        before.lines().count(),
        mounts.lines().count(),
        "no mount added or left on the host"
    );
    assert!(!mounts.contains(&*dir.path().to_string_lossy()));
    let branches = d.state.join("branches");
    assert_eq!(
        std::fs::read_dir(&branches).map(|r| r.count()).unwrap_or(0),
        0,
        "no branch files left"
    );
    let cgroups: Vec<_> = std::fs::read_dir(cgroup2_root().join("forkscope"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("branch-"))
        .collect();
    let out = d.ok(&["ls", "--json"]);
    assert_eq!(out.trim(), "[]");
    // Other tests may have branches running; none of ours is left.
    for c in cgroups {
        let procs = std::fs::read_to_string(
            cgroup2_root()
                .join("forkscope")
                .join(&c)
                .join("cgroup.procs"),
        )
        .unwrap_or_default();
        for pid in procs.lines() {
            let cmdline =
                std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            assert!(
                !cmdline.contains(&*dir.path().to_string_lossy()),
                "a process of an aborted branch lives on"
            );
        }
    }
    // The name is free again.
    d.ok(&["run", "--name", "gone", "--workspace", ws.to_str().unwrap()]);
}

#[test]
fn code_in_a_branch_cannot_reach_the_daemon() {
    require_root();
    let dir = TempDir::new("daemon-contain");
    let ws = workspace(dir.path());
    // Everything at paths the branch could see: the socket under /run, the CLI in the
    // workspace (the branch has a /tmp of its own, where the test's directory is not).
    struct RunDir(PathBuf);
    impl Drop for RunDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let run_dir = RunDir(PathBuf::from(format!(
        "/run/forkscope-test-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&run_dir.0).unwrap();
    let socket = run_dir.0.join("api.sock");
    std::fs::copy(forkscope(), ws.join("forkscope")).unwrap();
    let d = Daemon::start_on(dir.path(), &socket);
    d.run_sleeping("jail", &ws);
    let sock = socket.to_str().unwrap().to_string();

    // 1. The socket's directory is hidden inside the branch.
    let script = format!("test -e {sock} || echo hidden");
    assert_eq!(
        d.ok(&["exec", "jail", "--", "sh", "-c", &script]),
        "hidden\n"
    );
    let out = d.cli(&[
        "exec",
        "jail",
        "--",
        "./forkscope",
        "--socket",
        &sock,
        "status",
    ]);
    assert_ne!(
        out.status.code(),
        Some(0),
        "the daemon answered a process inside a branch"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the forkscope daemon"));

    // 2. A process in a branch's cgroup that reaches the socket anyway is refused.
    let list: serde_json::Value = serde_json::from_str(&d.ok(&["ls", "--json"])).unwrap();
    let cgroup = list[0]["cgroup"].as_str().unwrap().to_string();
    let inside = format!(
        "echo $$ > {cgroup}/cgroup.procs && exec {} --socket {sock} status",
        forkscope().display()
    );
    let out = Command::new("sh").args(["-c", &inside]).output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("requests from inside a branch are refused (HTTP 403)"),
        "{err}"
    );
    drop(d);
}

#[test]
fn a_hundred_branches_at_once() {
    require_root();
    let dir = TempDir::new("daemon-100");
    let ws = workspace(dir.path());
    let d = Daemon::start(dir.path());
    d.run_sleeping("base", &ws);
    for _ in 0..3 {
        d.ok(&["fork", "base", "-n", "33"]);
    }
    let list: serde_json::Value = serde_json::from_str(&d.ok(&["ls", "--json"])).unwrap();
    let running = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["status"] == "running")
        .count();
    assert_eq!(running, 100);
    let last = list.as_array().unwrap().last().unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        d.ok(&["exec", &last, "--", "cat", "shared.txt"]),
        "original\n"
    );
}

#[test]
fn bad_input_gets_clear_errors_and_changes_nothing() {
    require_root();
    let dir = TempDir::new("daemon-bad");
    let ws = workspace(dir.path());
    let d = Daemon::start(dir.path());
    let err = |args: &[&str]| {
        let out = d.cli(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(err(&["exec", "nope", "--", "true"]).contains("no live branch named \"nope\""));
    assert!(err(&["fork", "nope"]).contains("no live branch"));
    assert!(
        err(&["run", "--name", "a/b", "--workspace", ws.to_str().unwrap()])
            .contains("invalid branch name")
    );
    assert!(err(&["run", "--workspace", "/nonexistent-ws"]).contains("/nonexistent-ws"));
    d.ok(&["run", "--name", "one", "--workspace", ws.to_str().unwrap()]);
    assert!(
        err(&["run", "--name", "one", "--workspace", ws.to_str().unwrap()])
            .contains("already named")
    );
    assert!(err(&["abort", "nope"]).contains("no live branch"));
    assert!(err(&["commit", "nope"]).contains("no live branch"));
    assert!(err(&["commit", "one", "--prefer", "mine"]).contains("expected `branch` or `target`"));
    // A conflicting commit through the CLI: refused, every path named, nothing applied.
    d.ok(&[
        "exec",
        "one",
        "--",
        "sh",
        "-c",
        "echo branch > shared.txt; echo b > new.txt",
    ]);
    std::fs::write(ws.join("shared.txt"), "host\n").unwrap();
    let msg = err(&["commit", "one"]);
    assert!(
        msg.contains("shared.txt") && msg.contains("--prefer") && msg.contains("409"),
        "{msg}"
    );
    assert!(!ws.join("new.txt").exists());
    // A workspace the branch's private /dev/shm would hide.
    let shm = format!("/dev/shm/forkscope-test-ws-{}", std::process::id());
    std::fs::create_dir_all(&shm).unwrap();
    let msg = err(&["run", "--workspace", &shm]);
    std::fs::remove_dir_all(&shm).unwrap();
    assert!(msg.contains("private /dev/shm"), "{msg}");
    // A workspace that holds the state directory.
    assert!(
        err(&["run", "--workspace", dir.path().to_str().unwrap()])
            .contains("must not contain each other")
    );
    assert_eq!(
        d.ok(&["ls", "--json"]).matches("\"name\"").count(),
        1,
        "nothing else was created"
    );
    // A second daemon on the same state directory.
    let out = Command::new(forkscope())
        .args(["daemon", "--state-dir"])
        .arg(&d.state)
        .arg("--socket")
        .arg(dir.path().join("other.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another forkscope daemon"));
    // Bad API requests get an HTTP error with a JSON message: a malformed body, a relative
    // workspace (the daemon's working directory is not the caller's), a path or a method
    // the API does not have.
    let ask = |method: &str, path: &str, body: &str| {
        use std::io::{Read, Write};
        let mut conn = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
        write!(
            conn,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).unwrap();
        answer
    };
    let answer = ask("POST", "/v1/branches", "{not json");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"error\":\"bad request body"), "{answer}");
    let answer = ask(
        "POST",
        "/v1/branches",
        r#"{"workspace": "ws", "command": ["true"]}"#,
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("give an absolute path"), "{answer}");
    let answer = ask("GET", "/v1/nothing-here", "");
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(answer.contains("\"error\":\"no such API path"), "{answer}");
    let answer = ask("DELETE", "/v1/status", "");
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert!(
        answer.contains("\"error\":\"this path does not take that method")
            && answer.to_lowercase().contains("allow: get"),
        "{answer}"
    );
    // Names are names, never part of the request's path or query: `x?recursive=true` is
    // not `x` aborted recursively.
    d.ok(&["fork", "one", "--name", "one-kid"]);
    let msg = err(&["abort", "one?recursive=true"]);
    assert!(
        msg.contains("invalid branch name") || msg.contains("no live branch"),
        "{msg}"
    );
    assert!(err(&["diff", "my branch"]).contains("\"my branch\""));
    let ls = d.ok(&["ls"]);
    assert!(ls.contains("one-kid"), "{ls}");
    d.ok(&["abort", "one-kid"]);
    let unreachable = Command::new(forkscope())
        .args(["--socket", "/nonexistent.sock", "ls"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&unreachable.stderr).contains("start it with `forkscope daemon`")
    );
}

#[test]
fn a_checkpoint_forked_three_times_gives_three_identical_starts() {
    require_root();
    let dir = TempDir::new("daemon-ckpt");
    let ws = workspace(dir.path());
    let d = Daemon::start(dir.path());
    d.run_sleeping("main", &ws);
    d.ok(&[
        "exec",
        "main",
        "--",
        "sh",
        "-c",
        "echo at-checkpoint > state.txt; echo tmp > /tmp/t",
    ]);
    assert_eq!(d.ok(&["fork", "main", "--frozen", "--name", "cp"]), "cp\n");
    d.ok(&["exec", "main", "--", "sh", "-c", "echo later > state.txt"]);
    let kids = d.ok(&["fork", "cp", "-n", "3"]);
    let kids: Vec<&str> = kids.lines().collect();
    assert_eq!(kids.len(), 3);
    for (i, k) in kids.iter().enumerate() {
        assert_eq!(
            d.ok(&["exec", k, "--", "cat", "state.txt", "/tmp/t"]),
            "at-checkpoint\ntmp\n",
            "{k}"
        );
        d.ok(&[
            "exec",
            k,
            "--",
            "sh",
            "-c",
            &format!("echo kid{i} > state.txt"),
        ]);
    }
    for (i, k) in kids.iter().enumerate() {
        assert_eq!(
            d.ok(&["exec", k, "--", "cat", "state.txt"]),
            format!("kid{i}\n"),
            "each start is its own"
        );
    }
    let out = d.cli(&["exec", "cp", "--", "true"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("frozen checkpoint"));
    assert!(
        d.ok(&["ls"])
            .lines()
            .any(|l| l.starts_with("cp ") && l.contains("frozen"))
    );
    assert_eq!(d.ok(&["diff", "cp"]), "", "a checkpoint never changes");
}

#[test]
fn each_branch_keeps_its_own_trace_and_follow_streams_it() {
    require_root();
    let dir = TempDir::new("daemon-trace");
    let ws = workspace(dir.path());
    let d = Daemon::start(dir.path());
    // A real server on loopback for the branch to send to.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let accept = std::thread::spawn(move || {
        use std::io::Read;
        let (mut conn, _) = server.accept().unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got).unwrap();
        got
    });
    d.run_sleeping("root", &ws);
    d.ok(&[
        "exec",
        "root",
        "--",
        "bash",
        "-c",
        &format!("echo parent > a.txt; exec 3<>/dev/tcp/127.0.0.1/{port}; printf hello >&3"),
    ]);
    assert_eq!(accept.join().unwrap(), b"hello");
    d.ok(&["fork", "root", "--name", "kid"]);
    d.ok(&[
        "exec",
        "kid",
        "--",
        "sh",
        "-c",
        "echo child > only-child.txt",
    ]);
    let events = |name: &str| -> Vec<serde_json::Value> {
        // The daemon drains the ring buffer every 20 ms.
        std::thread::sleep(Duration::from_millis(200));
        forkscope_tests::parse_jsonl(&d.ok(&["trace", "--branch", name]))
    };
    let ws_s = ws.to_str().unwrap().to_string();
    let writes_to = |evs: &[serde_json::Value], file: &str| {
        evs.iter()
            .filter(|e| e["kind"] == "file_write" && e["path"] == format!("{ws_s}/{file}"))
            .count()
    };
    let root = events("root");
    let kid = events("kid");
    assert_eq!(
        writes_to(&root, "a.txt"),
        1,
        "the root's write is in its trace"
    );
    assert_eq!(writes_to(&root, "only-child.txt"), 0, "not the child's");
    assert_eq!(
        writes_to(&kid, "only-child.txt"),
        1,
        "the child's write is in its trace"
    );
    assert_eq!(writes_to(&kid, "a.txt"), 0);
    assert!(
        root.iter()
            .any(|e| e["kind"] == "net_connect" && e["port"] == port),
        "the connect is traced"
    );
    let sent: i64 = root
        .iter()
        .filter(|e| e["kind"] == "net_send" && e["port"] == port)
        .map(|e| e["bytes"].as_i64().unwrap())
        .sum();
    assert_eq!(sent, 5, "bytes sent to the server");

    // --follow: new events arrive, and the stream ends when the branch is aborted.
    let mut follow = Command::new(forkscope())
        .env("FORKSCOPE_SOCKET", &d.socket)
        .args(["trace", "--branch", "kid", "--follow"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    d.ok(&["exec", "kid", "--", "sh", "-c", "echo late > late.txt"]);
    let start = Instant::now();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("late event followed");
        if line.contains("late.txt") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10));
    }
    d.ok(&["abort", "kid"]);
    let start = Instant::now();
    while follow.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "--follow ends with the branch"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(follow.wait().unwrap().success());
    let status = d.ok(&["status"]);
    assert!(
        status.contains("tracing branches") && status.contains(" 0 lost"),
        "{status}"
    );
}

/// Connects to a Unix socket from a child process running as `uid`:`gid` (no
/// supplementary groups); returns 0 or the errno of connect(2).
fn connect_as(socket: &Path, uid: u32, gid: u32) -> i32 {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(socket.as_os_str().as_bytes()) {
        *d = *s as libc::c_char;
    }
    // SAFETY: between fork and _exit the child makes only raw syscalls (async-signal-safe),
    // on memory prepared before the fork.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            let ok = libc::setgroups(0, std::ptr::null()) == 0
                && libc::setgid(gid) == 0
                && libc::setuid(uid) == 0;
            if !ok {
                libc::_exit(100);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let r = libc::connect(
                fd,
                (&addr as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            );
            libc::_exit(if r == 0 { 0 } else { *libc::__errno_location() });
        }
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        libc::WEXITSTATUS(status)
    }
}

#[test]
fn a_socket_group_lets_its_members_in_and_no_one_else() {
    use std::os::unix::fs::MetadataExt;
    require_root();
    let dir = TempDir::new("daemon-group");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // `users` (gid 100 on Debian) as the allowed group; 65534 is nobody / nogroup.
    let users = std::fs::read_to_string("/etc/group")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("users:"))
        .and_then(|l| l.split(':').nth(2)?.parse::<u32>().ok())
        .expect("a `users` group in /etc/group");
    let socket = dir.path().join("api.sock");
    let d = Daemon::start_full(dir.path(), &socket, &[], &["--socket-group", "users"]);
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), users);
    assert_eq!(connect_as(&socket, 65534, users), 0, "a member gets in");
    assert_eq!(
        connect_as(&socket, 65534, 65534),
        libc::EACCES,
        "anyone else is refused"
    );
    drop(d);
    // Without the option, root only.
    let dir2 = TempDir::new("daemon-nogroup");
    std::fs::set_permissions(dir2.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d2 = Daemon::start(dir2.path());
    assert_eq!(std::fs::metadata(&d2.socket).unwrap().mode() & 0o777, 0o600);
    assert_eq!(connect_as(&d2.socket, 65534, users), libc::EACCES);
    // A group that does not exist: a clear error, no daemon.
    let out = Command::new(forkscope())
        .args([
            "daemon",
            "--socket-group",
            "no-such-group-here",
            "--state-dir",
        ])
        .arg(dir2.path().join("state2"))
        .arg("--socket")
        .arg(dir2.path().join("other.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no such group"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_replayed_commit_never_removes_what_it_created() {
    require_root();
    let dir = TempDir::new("daemon-replay");
    let ws = workspace(dir.path());
    let socket = dir.path().join("api.sock");
    let mut d = Daemon::start(dir.path());
    d.run_sleeping("main", &ws);
    d.ok(&["exec", "main", "--", "sh", "-c", "echo file > out"]);
    d.ok(&["commit", "main"]);
    // The file becomes a directory: the commit removes `out`, creates it again (ext4 may give
    // the new directory the old inode number, which a replay must not take for the file it
    // removed) and installs out/a. The daemon dies right after the directory is created.
    d.ok(&[
        "exec",
        "main",
        "--",
        "sh",
        "-c",
        "rm out; mkdir out; echo inside > out/a",
    ]);
    d.stop();
    std::mem::forget(d);
    let mut d = Daemon::start_with(
        dir.path(),
        &socket,
        &[("FORKSCOPE_FAULT", "commit-after-op:2")],
    );
    assert!(!d.cli(&["commit", "main"]).status.success());
    wait_crashed(&mut d);
    std::mem::forget(d);
    let d = Daemon::start(dir.path());
    assert_eq!(
        std::fs::read_to_string(ws.join("out/a")).unwrap(),
        "inside\n",
        "the replay kept the directory it had created and finished the install"
    );
    assert_eq!(d.ok(&["exec", "main", "--", "cat", "out/a"]), "inside\n");
}

#[test]
fn a_command_that_exits_while_another_process_traces_it_leaves_the_init_idle() {
    // The init wakes when an exec'd command exits (its pidfd); one it cannot reap yet (a
    // zombie another process of the branch still traces) must not wake it again and again.
    require_root();
    let dir = TempDir::new("daemon-traced-zombie");
    let ws = workspace(dir.path());
    std::fs::write(
        ws.join("tracer.py"),
        "import ctypes, time\n\
         pid = int(open('victim.pid').read())\n\
         assert ctypes.CDLL(None).ptrace(0x4206, pid, 0, 0) == 0  # PTRACE_SEIZE\n\
         open('seized', 'w').close()\n\
         time.sleep(5)\n",
    )
    .unwrap();
    let d = Daemon::start(dir.path());
    d.run_sleeping("main", &ws);
    let list: serde_json::Value = serde_json::from_str(&d.ok(&["ls", "--json"])).unwrap();
    let init = list[0]["init_pid"].as_u64().unwrap();
    let victim = d
        .command(&[
            "exec",
            "main",
            "--",
            "sh",
            "-c",
            "echo $$ > victim.pid; exec sleep 1",
        ])
        .spawn()
        .unwrap();
    let view = |f: &str| {
        d.cli(&["exec", "main", "--", "test", "-e", f])
            .status
            .success()
    };
    let start = Instant::now();
    while !view("victim.pid") {
        assert!(start.elapsed() < Duration::from_secs(10), "no victim");
        std::thread::sleep(Duration::from_millis(20));
    }
    let tracer = d
        .command(&["exec", "main", "--", "python3", "tracer.py"])
        .spawn()
        .unwrap();
    while !view("seized") {
        assert!(start.elapsed() < Duration::from_secs(10), "not seized");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The victim exits (about a second after it started) and stays a traced zombie.
    std::thread::sleep(Duration::from_millis(1500));
    let cpu_ticks = || {
        let stat = std::fs::read_to_string(format!("/proc/{init}/stat")).unwrap();
        let f: Vec<u64> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        f[11] + f[12] // utime + stime
    };
    let before = cpu_ticks();
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks() - before;
    // (A spinning init uses every tick: about 200 in 2 s.)
    assert!(used < 40, "the init used {used} clock ticks in 2 s");
    for mut c in [victim, tracer] {
        let _ = c.wait();
    }
}

#[test]
fn a_branch_that_writes_and_then_blocks_has_every_byte_in_its_trace() {
    require_root();
    let dir = TempDir::new("daemon-runs");
    let ws = workspace(dir.path());
    let d = Daemon::start(dir.path());
    // The kernel merges the 300 writes into one run (the pause in the middle lets the daemon
    // take part of it); the writing thread then blocks with no other traced call (which
    // would end the run): what the run holds must reach the trace all the same. Another
    // thread says when the writes are done.
    let script = r#"
import os, threading, time
written = threading.Event()
def mark():
    written.wait()
    os.close(os.open("done", os.O_CREAT | os.O_WRONLY, 0o644))
threading.Thread(target=mark).start()
f = open("log.bin", "wb", buffering=0)
for i in range(300):
    f.write(b"x" * 4096)
    if i == 150:
        time.sleep(0.3)
written.set()
time.sleep(1000)
"#;
    d.ok(&[
        "run",
        "--name",
        "w",
        "--workspace",
        ws.to_str().unwrap(),
        "--",
        "python3",
        "-c",
        script,
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.sh("w", "test -e done && echo yes || true").trim() != "yes" {
        assert!(Instant::now() < deadline, "the writer never finished");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = format!("{}/log.bin", ws.display());
    let events = forkscope_tests::parse_jsonl(&d.ok(&["trace", "--branch", "w"]));
    let writes: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["kind"] == "file_write" && e["path"] == log.as_str())
        .collect();
    let bytes: u64 = writes.iter().map(|e| e["bytes"].as_u64().unwrap()).sum();
    let calls: u64 = writes
        .iter()
        .map(|e| e["calls"].as_u64().unwrap_or(1))
        .sum();
    assert_eq!((bytes, calls), (300 * 4096, 300), "{writes:?}");
    assert!(writes.len() < 300, "the writes were merged: {writes:?}");
    assert_eq!(
        d.sh("w", "pgrep -f time.sleep >/dev/null && echo alive")
            .trim(),
        "alive",
        "the writer is still blocked"
    );
    d.ok(&["abort", "w"]);
}
