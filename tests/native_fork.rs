//! Native fork end to end: real daemon, real CLI, real programs (python3, bash, sqlite3).
//! A fork clones the branch's processes copy-on-write into the child; each branch then goes
//! its own way. What cannot be cloned is refused and leaves both branches as they were.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use forkscope_tests::{TempDir, daemon::Daemon, require_root};
use serde_json::Value;

/// A python program that holds `mib` MiB of state and a counter, and obeys command files
/// dropped in its workspace: `add` (a number: add it to the counter and to every page of the
/// state, then write `out`), `grow` (a number of fresh pages to write), `sql` (a statement for
/// its open SQLite database).
const AGENT: &str = r#"
import os, sys, time, hashlib, sqlite3
mib = int(sys.argv[1])
state = bytearray(mib << 20)
for i in range(0, len(state), 4096):
    state[i] = 1
counter = 0
db = sqlite3.connect("db.sqlite", isolation_level=None) if os.path.exists("db.sqlite") else None
if db is not None:
    db.execute("select count(*) from t").fetchone()
grown = []
def report(what):
    with open("out.tmp", "w") as f:
        f.write(what)
    os.rename("out.tmp", "out")
report(f"ready {os.getpid()}\n")
while True:
    for name in ("add", "grow", "sql"):
        if not os.path.exists(name):
            continue
        arg = open(name).read().strip()
        os.remove(name)
        if name == "add":
            counter += int(arg)
            for i in range(0, len(state), 4096):
                state[i] = (state[i] + int(arg)) % 256
            digest = hashlib.sha256(state).hexdigest()[:16]
            report(f"counter {counter} state {digest}\n")
        elif name == "grow":
            fresh = bytearray(int(arg) * 4096)
            for i in range(0, len(fresh), 4096):
                fresh[i] = 1
            grown.append(fresh)
            report(f"grown {arg}\n")
        else:
            try:
                db.execute(arg)
                report("sql ok\n")
            except Exception as e:
                report(f"sql error {e}\n")
    time.sleep(0.02)
"#;

/// Fields drop in order: the daemon (aborting every branch) before the directory.
struct Setup {
    d: Daemon,
    ws: PathBuf,
    _dir: TempDir,
}

fn setup(files: &[(&str, &str)]) -> Setup {
    setup_with(files, &[])
}

/// [`setup`] with a daemon given environment variables `env`.
fn setup_with(files: &[(&str, &str)], env: &[(&str, &str)]) -> Setup {
    require_root();
    let dir = TempDir::new("native-fork");
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::write(ws.join("agent.py"), AGENT).unwrap();
    for (name, text) in files {
        std::fs::write(ws.join(name), text).unwrap();
    }
    let d = Daemon::start_with(dir.path(), &dir.path().join("api.sock"), env);
    Setup { d, ws, _dir: dir }
}

impl Setup {
    fn run(&self, name: &str, cmd: &[&str]) {
        let mut args = vec![
            "run",
            "--name",
            name,
            "--workspace",
            self.ws.to_str().unwrap(),
        ];
        args.push("--");
        args.extend_from_slice(cmd);
        self.d.ok(&args);
    }

    /// Starts root branch `name` running the agent with `mib` MiB of state; waits until it
    /// is ready.
    fn run_agent(&self, name: &str, mib: u32) {
        let mib = mib.to_string();
        self.run(name, &["python3", "agent.py", &mib]);
        self.wait_out(name, "ready");
    }

    /// Runs `sh -c script` in `branch`; returns its stdout.
    fn sh(&self, branch: &str, script: &str) -> String {
        self.d.ok(&["exec", branch, "--", "sh", "-c", script])
    }

    /// Waits until `out` in `branch`'s workspace starts with `prefix`; returns it.
    fn wait_out(&self, branch: &str, prefix: &str) -> String {
        let start = Instant::now();
        loop {
            let out = self.sh(branch, "cat out 2>/dev/null; true");
            if out.starts_with(prefix) {
                return out;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{branch}: waited for {prefix:?}, out is {out:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Tells the agent in `branch` to do `what` with `arg`, and waits for its answer.
    fn tell(&self, branch: &str, what: &str, arg: &str, answer: &str) -> String {
        self.sh(branch, "rm -f out");
        let script = format!("printf '%s' \"$1\" > {what}.tmp && mv {what}.tmp {what}");
        self.d
            .ok(&["exec", branch, "--", "sh", "-c", &script, "sh", arg]);
        self.wait_out(branch, answer)
    }

    fn info(&self, branch: &str) -> Value {
        let list: Value = serde_json::from_str(&self.d.ok(&["ls", "--json"])).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == branch)
            .unwrap_or_else(|| panic!("{branch} is not listed"))
            .clone()
    }

    /// Forks `parent` into `child`; returns the CLI's stderr (phases and notes).
    fn fork(&self, parent: &str, child: &str) -> String {
        let out = self.d.cli(&["fork", parent, "--name", child]);
        assert!(
            out.status.success(),
            "fork {parent}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn pids(&self, branch: &str) -> Vec<u64> {
        self.info(branch)["processes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_u64().unwrap())
            .collect()
    }
}

#[test]
fn a_python_process_with_200_mib_is_cloned_and_each_branch_goes_its_own_way() {
    let s = setup(&[]);
    s.run_agent("root", 200);
    let before = s.tell("root", "add", "3", "counter 3");
    let stderr = s.fork("root", "kid");
    assert!(
        stderr.contains("cloned copy-on-write (1 per child)"),
        "{stderr}"
    );
    // The clone is a new process in the child, not the parent's.
    let (root_pids, kid_pids) = (s.pids("root"), s.pids("kid"));
    assert_eq!(root_pids.len(), 1, "{root_pids:?}");
    assert_eq!(kid_pids.len(), 1, "{kid_pids:?}");
    assert_ne!(root_pids, kid_pids);
    // Inside its branch, the clone has the pid the original has inside its own.
    assert_eq!(pid_in_branch(kid_pids[0]), pid_in_branch(root_pids[0]));
    // Same state at the fork point: adding 0 reports the same counter and digest.
    assert_eq!(s.tell("kid", "add", "0", "counter"), before);
    assert_eq!(s.tell("root", "add", "0", "counter"), before);
    // Then each changes it differently and sees only its own change.
    let kid = s.tell("kid", "add", "10", "counter 13");
    let root = s.tell("root", "add", "100", "counter 103");
    assert_ne!(
        kid.split(' ').nth(3),
        root.split(' ').nth(3),
        "states differ"
    );
    assert_eq!(s.tell("kid", "add", "0", "counter"), kid);
    assert_eq!(s.tell("root", "add", "0", "counter"), root);
    // Aborting the child leaves the parent's process alone.
    s.d.ok(&["abort", "kid"]);
    assert_eq!(s.pids("root"), root_pids);
    assert_eq!(s.tell("root", "add", "1", "counter 104").len(), root.len());
}

#[test]
fn aborting_the_parent_leaves_its_forks_running_and_goes_with_the_last_of_them() {
    let mut s = setup(&[]);
    s.run_agent("root", 8);
    let before = s.tell("root", "add", "5", "counter 5");
    s.fork("root", "kid");
    let kid = s.pids("kid");
    let root = s.info("root");
    let (cgroup, id) = (
        root["cgroup"].as_str().unwrap().to_string(),
        root["id"].as_u64().unwrap(),
    );
    // The parent goes: its process is killed, its name is free at once...
    s.d.ok(&["abort", "root"]);
    let retired = format!("root~{id}");
    assert_eq!(s.info(&retired)["status"], "retired");
    assert_eq!(s.info(&retired)["processes"], serde_json::json!([]));
    // What it did stays readable with its fork's until it goes.
    let exported = s.ws.with_file_name("tree.json");
    s.d.ok(&[
        "export",
        &retired,
        "--tree",
        "-o",
        exported.to_str().unwrap(),
    ]);
    let tree = std::fs::read_to_string(&exported).unwrap();
    assert!(
        tree.contains(&retired) && tree.contains("\"kid\""),
        "{}",
        &tree[..tree.len().min(400)]
    );
    s.run_agent("root", 1);
    // ...and the fork's clone goes on, untouched, with the state of the fork point, across
    // a daemon restart too.
    assert_eq!(s.pids("kid"), kid);
    assert_eq!(s.tell("kid", "add", "0", "counter"), before);
    s.d.kill9();
    // (The killed daemon's handle is forgotten: dropping it would abort every branch.)
    std::mem::forget(std::mem::replace(&mut s.d, Daemon::start(s._dir.path())));
    assert_eq!(s.info(&retired)["status"], "retired");
    assert_eq!(s.tell("kid", "add", "1", "counter 6").len(), before.len());
    // Its last fork's abort takes it along: record, cgroup, processes.
    s.d.ok(&["abort", "kid"]);
    let names: Vec<String> = serde_json::from_str::<Value>(&s.d.ok(&["ls", "--json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["root"]);
    assert!(!Path::new(&cgroup).exists(), "{cgroup} removed");
}

#[test]
fn an_interactive_bash_keeps_variables_cwd_and_history_in_the_clone() {
    let s = setup(&[]);
    std::fs::create_dir(s.ws.join("sub")).unwrap();
    nix_mkfifo(&s.ws.join("ctl.fifo"));
    // An interactive bash reading commands from a FIFO in the workspace (opened read-write,
    // so it never sees end-of-file), blocked in read() at the fork.
    let script = format!("exec bash --norc -i <> {}/ctl.fifo", s.ws.to_str().unwrap());
    s.run("sh", &["sh", "-c", &script]);
    s.sh(
        "sh",
        "echo 'greeting=hello; cd sub; echo marker-1 > /dev/null' > ctl.fifo",
    );
    std::thread::sleep(Duration::from_millis(300));
    s.fork("sh", "sh2");
    let report = "echo \"$greeting $PWD\" > report; history > hist";
    s.sh("sh2", &format!("echo '{report}' > ctl.fifo"));
    let start = Instant::now();
    let got = loop {
        let got = s.sh("sh2", "cat sub/report 2>/dev/null; true");
        if !got.is_empty() || start.elapsed() > Duration::from_secs(20) {
            break got;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(got, format!("hello {}/sub\n", s.ws.display()));
    let hist = s.sh("sh2", "cat sub/hist");
    assert!(hist.contains("marker-1"), "history survived: {hist}");
    // The parent's shell is unaffected and still answers on its own FIFO.
    assert_eq!(s.sh("sh", "ls sub"), "");
    s.sh("sh", "echo 'echo parent > mine' > ctl.fifo");
    let start = Instant::now();
    while s.sh("sh", "cat sub/mine 2>/dev/null; true").is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "parent shell answers"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(s.sh("sh2", "ls sub"), "hist\nreport\n");
}

fn nix_mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn an_open_sqlite_database_is_the_childs_own_after_the_fork() {
    let s = setup(&[]);
    let db = s.ws.join("db.sqlite");
    let made = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg("create table t(v text); insert into t values ('base');")
        .status()
        .unwrap();
    assert!(made.success());
    s.run_agent("db", 1);
    let stderr = s.fork("db", "db2");
    // The clone holds the child's copy of the database, under the inode number SQLite
    // remembers (else its writes fail with SQLITE_READONLY_DBMOVED and the fork says so).
    assert!(!stderr.contains("another inode number"), "{stderr}");
    let clone = s.pids("db2")[0];
    let fd_target = std::fs::read_dir(format!("/proc/{clone}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .find(|l| l.ends_with("db.sqlite"));
    assert_eq!(
        fd_target,
        Some(db.clone()),
        "the clone holds the database open"
    );
    let q = "sqlite3 db.sqlite 'select group_concat(v) from t'";
    // Each process goes on writing through the connection it had: the parent's into the
    // parent's copy, the clone's into the child's.
    let insert = |branch: &str, v: &str| {
        s.tell(
            branch,
            "sql",
            &format!("insert into t values ('{v}')"),
            "sql",
        )
    };
    assert_eq!(insert("db", "parent"), "sql ok\n");
    assert_eq!(insert("db2", "child"), "sql ok\n");
    assert_eq!(s.sh("db2", q), "base,child\n");
    assert_eq!(s.sh("db", q), "base,parent\n");
    // A new connection in the child (sqlite3) works on the same copy, and the clone's own
    // connection sees what it wrote.
    s.sh("db2", "sqlite3 db.sqlite \"insert into t values ('cli')\"");
    assert_eq!(insert("db2", "child-again"), "sql ok\n");
    assert_eq!(s.sh("db2", q), "base,child,cli,child-again\n");
    // A fork of the fork: the grandchild's clone writes its own copy too.
    let stderr = s.fork("db2", "db3");
    assert!(!stderr.contains("another inode number"), "{stderr}");
    assert_eq!(insert("db3", "grandchild"), "sql ok\n");
    assert_eq!(s.sh("db3", q), "base,child,cli,child-again,grandchild\n");
    assert_eq!(s.sh("db2", q), "base,child,cli,child-again\n");
    assert_eq!(s.sh("db", q), "base,parent\n");
    // The host's database is untouched until a commit.
    let host = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg("select group_concat(v) from t")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&host.stdout), "base\n");
}

/// The pid of host process `pid` in its own (innermost) pid namespace.
fn pid_in_branch(pid: u64) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let nspid = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .unwrap();
    nspid.split_whitespace().last().unwrap().parse().unwrap()
}

/// The controlling terminal (device number) and session of host process `pid`, from
/// /proc/PID/stat (session as the host numbers it).
fn tty_and_session(pid: u64) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<u64> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .skip(1)
        .take(4)
        .map(|x| x.parse().unwrap())
        .collect();
    (f[3], f[2])
}

/// A pseudo-terminal of the test's own: its master side, and its slave's path.
fn pty() -> (std::fs::File, PathBuf) {
    use std::os::fd::FromRawFd;
    // SAFETY: posix_openpt returns a new descriptor (checked), owned by the File below.
    let m = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    assert!(m >= 0, "posix_openpt");
    // SAFETY: `m` is an open pty master.
    let master = unsafe { std::fs::File::from_raw_fd(m) };
    let mut name = [0 as libc::c_char; 64];
    // SAFETY: `m` is a pty master; `name` has room for the path and its length is passed.
    unsafe {
        assert_eq!(libc::grantpt(m), 0);
        assert_eq!(libc::unlockpt(m), 0);
        assert_eq!(libc::ptsname_r(m, name.as_mut_ptr(), name.len()), 0);
    }
    // SAFETY: ptsname_r wrote a NUL-terminated path into `name`.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    (master, PathBuf::from(path.to_str().unwrap()))
}

/// Everything read from `f` so far, collected by a thread.
fn collect(mut f: impl std::io::Read + Send + 'static) -> std::sync::Arc<std::sync::Mutex<String>> {
    let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let o = out.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            o.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    out
}

impl Setup {
    /// Waits until file `path` of `branch` has some text, and returns it.
    fn wait_text(&self, branch: &str, path: &str) -> String {
        let start = Instant::now();
        loop {
            let t = self.sh(branch, &format!("cat {path} 2>/dev/null; true"));
            if !t.is_empty() {
                return t;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{branch}: waited for {path}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn a_shell_on_a_terminal_gets_a_terminal_of_its_own_in_the_clone() {
    use std::{
        io::Write,
        os::{fd::AsRawFd, unix::fs::MetadataExt, unix::fs::OpenOptionsExt},
    };
    let s = setup(&[]);
    std::fs::create_dir(s.ws.join("sub")).unwrap();
    s.run("term", &["sleep", "1000000"]);
    // An interactive bash on a terminal of the test's (40 rows, 100 columns), as `forkscope
    // exec` run from a user's terminal starts one; `setsid -c` makes it the shell's
    // controlling terminal, so the shell runs commands with job control.
    let (mut master, slave) = pty();
    let size = libc::winsize {
        ws_row: 40,
        ws_col: 100,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer; the descriptor is open.
    assert_eq!(
        unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) },
        0
    );
    let tty = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&slave)
            .unwrap()
    };
    let mut shell =
        s.d.command(&["exec", "term", "--", "setsid", "-c", "bash", "--norc", "-i"])
            .stdin(tty())
            .stdout(tty())
            .stderr(tty())
            .spawn()
            .unwrap();
    let screen = collect(master.try_clone().unwrap());
    // A background job left behind (its parent gone, the init adopts it): it shares the
    // shell's session and terminal without leading it.
    master
        .write_all(b"greeting=hello; cd sub; (sleep 100000 &); echo ready-$((40+2))\n")
        .unwrap();
    let start = Instant::now();
    while !screen.lock().unwrap().contains("ready-42") {
        assert!(start.elapsed() < Duration::from_secs(20), "bash answers");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    let originals = s.pids("term");
    assert_eq!(
        originals.len(),
        3,
        "sleep, bash and the orphan: {originals:?}"
    );
    let notes = s.fork("term", "term2");
    assert!(notes.contains("gets a terminal of its own"), "{notes}");
    assert!(!notes.contains("could not"), "{notes}");
    // Every clone has, inside its branch, the pid its original has inside its own.
    let clones = s.pids("term2");
    let in_branch = |pids: &[u64]| {
        let mut v: Vec<u32> = pids.iter().map(|p| pid_in_branch(*p)).collect();
        v.sort();
        v
    };
    assert_eq!(in_branch(&clones), in_branch(&originals));
    let named = |pids: &[u64], name: &str| {
        pids.iter()
            .copied()
            .find(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap() == name)
            .unwrap_or_else(|| panic!("{name:?} in {pids:?}"))
    };
    let (clone, original) = (named(&clones, "bash\n"), named(&originals, "bash\n"));
    // The clone's stdin, stdout and stderr are one terminal, not the parent's: its
    // controlling terminal, in a session it leads.
    // (A terminal is its devpts instance and its number: each instance counts from 0.)
    let term = |pid: u64, n: u32| {
        let m = std::fs::metadata(format!("/proc/{pid}/fd/{n}")).unwrap();
        (m.dev(), m.rdev())
    };
    let theirs = term(clone, 0);
    let m = std::fs::metadata(&slave).unwrap();
    let ours = (m.dev(), m.rdev());
    assert_eq!(
        libc::major(theirs.1),
        libc::major(ours.1),
        "a pseudo-terminal"
    );
    assert_ne!(theirs, ours);
    assert_eq!((term(clone, 1), term(clone, 2)), (theirs, theirs));
    assert_eq!(tty_and_session(clone), (theirs.1, clone));
    assert_eq!(
        tty_and_session(original).0,
        ours.1,
        "the parent's shell keeps the test's terminal"
    );
    // The orphan's clone writes to the same new terminal (its stdin is /dev/null, as for
    // any background job of a shell without job control), in a session of its own without
    // a controlling terminal.
    let orphan = clones
        .iter()
        .copied()
        .find(|p| *p != clone && term(*p, 1) == theirs)
        .expect("the orphan's clone");
    assert_eq!(tty_and_session(orphan), (0, orphan));
    // Typed through `forkscope attach`, the clone's shell answers with its state, on a
    // terminal set up as the original's (the size, and readline's settings: each typed
    // line is echoed once).
    let mut attach =
        s.d.command(&["attach", "term2"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
    let seen = collect(attach.stdout.take().unwrap());
    let mut keys = attach.stdin.take().unwrap();
    keys.write_all(b"echo \"$greeting $PWD\" > report; stty size > size; tty > tty-name\n")
        .unwrap();
    let report = s.wait_text("term2", "sub/report");
    assert_eq!(report, format!("hello {}/sub\n", s.ws.display()));
    assert_eq!(s.wait_text("term2", "sub/size"), "40 100\n");
    let tty_name = s.wait_text("term2", "sub/tty-name");
    assert!(tty_name.starts_with("/dev/pts/"), "{tty_name}");
    // A command run in the foreground (`tty`, with job control) gave the terminal back.
    keys.write_all(b"echo still-here > after\n").unwrap();
    assert_eq!(s.wait_text("term2", "sub/after"), "still-here\n");
    // 300 KB pasted while the program that is to read them is not reading yet (it sleeps
    // first): they wait in the terminal and the relay, and all arrive, in order, once it
    // reads; the shell answers after.
    let mut paste = b"sleep 1; cat > pasted\n".to_vec();
    for i in 0..3000 {
        paste.extend_from_slice(format!("{i:05} {}\n", "x".repeat(93)).as_bytes());
    }
    paste.push(4); // Ctrl-D: the end of cat's input
    keys.write_all(&paste).unwrap();
    keys.write_all(b"wc -c < pasted > pasted-size; sort -c pasted && echo sorted > pasted-order\n")
        .unwrap();
    assert_eq!(s.wait_text("term2", "sub/pasted-size"), "300000\n");
    assert_eq!(s.wait_text("term2", "sub/pasted-order"), "sorted\n");
    keys.write_all(&[0x1d]).unwrap(); // Ctrl-]
    let status = attach.wait().unwrap();
    assert!(status.success(), "attach ends on Ctrl-]");
    let shown = seen.lock().unwrap().clone();
    assert_eq!(shown.matches("stty size > size").count(), 1, "{shown}");
    // The files were written in the child only...
    let listing = "after\npasted\npasted-order\npasted-size\nreport\nsize\ntty-name\n";
    assert_eq!(s.sh("term2", "ls sub"), listing);
    assert_eq!(s.sh("term", "ls sub"), "");
    // ...whose log holds what its terminal showed.
    let control = s.info("term2")["control"].as_str().unwrap().to_string();
    let log = Path::new(&control).with_file_name("command.log");
    assert!(std::fs::read_to_string(&log).unwrap().contains("tty-name"));
    // The parent's shell still answers on the test's terminal.
    master.write_all(b"echo parent > mine\n").unwrap();
    assert_eq!(s.wait_text("term", "sub/mine"), "parent\n");
    assert_eq!(s.sh("term2", "ls sub"), listing);
    // Another branch cannot reach the child's terminal: its /dev/pts is its own.
    let pts = s.sh("term", "ls /dev/pts");
    assert_eq!(pts, "ptmx\n", "{pts}");
    // A branch without a terminal of forkscope's says so.
    let out = s.d.cli(&["attach", "term"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has no terminal"), "{err}");
    let _ = shell.kill();
    let _ = shell.wait();
}

#[test]
fn fresh_pages_written_after_a_fork_are_charged_to_the_branch_that_wrote_them() {
    let s = setup(&[]);
    s.run_agent("mem", 8);
    s.fork("mem", "writer");
    s.fork("mem", "idle");
    const K: u64 = 2000;
    // The same work in both children (a command file, an answer), but only one writes K
    // fresh pages.
    s.tell("writer", "grow", &K.to_string(), "grown");
    s.tell("idle", "grow", "0", "grown");
    let pages = |b: &str| s.info(b)["private_pages"].as_u64().expect("traced");
    let (writer, idle) = (pages("writer"), pages("idle"));
    // About K more: python's own allocations around the work move either count by a few
    // dozen pages.
    let extra = writer as i64 - idle as i64;
    assert!(
        (extra - K as i64).abs() <= K as i64 / 20,
        "writer {writer} pages, idle {idle}: expected about {K} more"
    );
    assert_eq!(
        s.info("writer")["private_bytes"].as_u64().unwrap(),
        writer * 4096
    );
}

#[test]
fn processes_that_cannot_be_cloned_are_refused_and_both_branches_stay_as_they_were() {
    let s = setup(&[]);
    let cases: [(&str, &[&str], &str); 3] = [
        (
            "memfd",
            &[
                "python3",
                "-c",
                "import os, time\nfd = os.memfd_create('state')\ntime.sleep(1000)",
            ],
            "memfd",
        ),
        ("tree", &["sh", "-c", "sleep 1000; true"], "process trees"),
        (
            "shm",
            &[
                "python3",
                "-c",
                "import mmap, time\nm = mmap.mmap(-1, 4096)\nm[0] = 1\ntime.sleep(1000)",
            ],
            "shared mapping",
        ),
    ];
    for (name, cmd, why) in cases {
        s.run(name, cmd);
        std::thread::sleep(Duration::from_millis(500));
        std::fs::write(s.ws.join("f"), "x").ok();
        let before = s.pids(name);
        let out = s.d.cli(&["fork", name, "--name", &format!("{name}-kid")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: fork refused");
        assert!(
            err.contains(why) && err.contains("cannot be cloned"),
            "{name}: {err}"
        );
        // Nothing forked, the parent's processes run on, untraced and unstopped.
        let list: Value = serde_json::from_str(&s.d.ok(&["ls", "--json"])).unwrap();
        assert!(!list.as_array().unwrap().iter().any(|b| b["parent"] == name));
        assert_eq!(s.pids(name), before);
        for pid in before {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            assert!(status.contains("TracerPid:\t0"), "{name}: {status}");
            let st = status.lines().find(|l| l.starts_with("State:")).unwrap();
            assert!(
                !st.contains("stopped") && !st.contains("tracing"),
                "{name}: {st}"
            );
        }
        // --fresh still forks it (the command starts afresh).
        let out =
            s.d.cli(&["fork", name, "--fresh", "--name", &format!("{name}-fresh")]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("afresh"));
        s.d.ok(&["abort", "--recursive", name]);
    }
}

/// A python program with three worker threads counting under a lock and one thread blocked
/// (no timeout) on an event. When `stop` appears in its workspace it samples the counts
/// twice, 0.3 s apart, checks with `pthread_kill(thread, 0)` that glibc knows each thread
/// by its current id, wakes and joins every thread, and reports.
const THREADED: &str = r#"
import os, signal, threading, time
# A descriptor of its own pid namespace, the kind a fork opens too: forks never take it.
own_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
counts = [0, 0, 0]
stop, gate, lock = threading.Event(), threading.Event(), threading.Lock()
pinned = threading.Event()
def work(i):
    # The first worker keeps to a CPU of its own choosing: its copy must too.
    cpus = os.sched_getaffinity(0)
    if i == 0:
        if len(cpus) > 1:
            os.sched_setaffinity(0, {max(cpus)})
        pinned.set()
    while not stop.is_set():
        with lock:
            counts[i] += 1
        time.sleep(0.005)
workers = [threading.Thread(target=work, args=(i,)) for i in range(3)]
waiter = threading.Thread(target=gate.wait)
for t in workers + [waiter]:
    t.start()
pinned.wait()
def report(what):
    with open("out.tmp", "w") as f:
        f.write(what)
    os.rename("out.tmp", "out")
report("ready\n")
while not os.path.exists("stop"):
    time.sleep(0.02)
c1 = list(counts)
time.sleep(0.3)
c2 = list(counts)
known = []
for t in workers + [waiter]:
    try:
        signal.pthread_kill(t.ident, 0)
        known.append(1)
    except OSError:
        known.append(0)
gate.set()
stop.set()
for t in workers + [waiter]:
    t.join()
report(f"done {int(all(b > a for a, b in zip(c1, c2)))} {min(known)} {threading.active_count()} {sum(c2)}\n")
"#;

/// Thread count and sorted thread names of process `pid`.
fn threads_of(pid: u64) -> (usize, Vec<String>) {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|t| std::fs::read_to_string(t.path().join("comm")).unwrap())
        .collect();
    names.sort();
    (names.len(), names)
}

/// The CPUs thread `tid` of process `pid` may run on (`Cpus_allowed_list`).
fn cpus_of(pid: u64, tid: u64) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string()
}

/// The CPUs each thread of process `pid` may run on, sorted.
fn thread_cpus(pid: u64) -> Vec<String> {
    let mut all: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| t.file_name().to_str()?.parse().ok())
        .map(|tid| cpus_of(pid, tid))
        .collect();
    all.sort();
    all
}

#[test]
fn a_multi_threaded_process_is_cloned_with_every_thread_running_in_both_branches() {
    let s = setup(&[("threaded.py", THREADED)]);
    s.run("root", &["python3", "threaded.py"]);
    s.wait_out("root", "ready");
    let cpus_before = thread_cpus(s.pids("root")[0]);
    let stderr = s.fork("root", "kid");
    assert!(
        stderr.contains("cloned copy-on-write (1 per child)"),
        "{stderr}"
    );
    let (root, kid) = (s.pids("root")[0], s.pids("kid")[0]);
    assert_ne!(root, kid);
    // The clone has every thread of the original, with the same names.
    assert_eq!(threads_of(kid), threads_of(root));
    assert_eq!(threads_of(kid).0, 5);
    // Each thread's copy may run on the CPUs its original may (a thread made again in the
    // clone inherits the leader's), and the originals' are untouched.
    assert_eq!(thread_cpus(root), cpus_before);
    assert_eq!(thread_cpus(kid), cpus_before);
    // In the child: the workers count on, glibc knows each thread by its new id, the
    // blocked thread wakes, every thread is joined.
    s.sh("kid", "touch stop");
    let kid_out = s.wait_out("kid", "done");
    assert!(kid_out.starts_with("done 1 1 1 "), "kid: {kid_out}");
    // The parent's threads were not disturbed: still all there, still counting.
    assert_eq!(s.sh("root", "cat out"), "ready\n");
    assert_eq!(threads_of(root).0, 5);
    // A checkpoint holds the threads stopped; a fork of it brings them all back to life.
    let out = s.d.cli(&["fork", "root", "--frozen", "--name", "cp"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(threads_of(s.pids("cp")[0]).0, 5);
    s.fork("cp", "again");
    assert_eq!(threads_of(s.pids("again")[0]), threads_of(root));
    s.sh("again", "touch stop");
    let again = s.wait_out("again", "done");
    assert!(
        again.starts_with("done 1 1 1 "),
        "from the checkpoint: {again}"
    );
    s.sh("root", "touch stop");
    let root_out = s.wait_out("root", "done");
    assert!(root_out.starts_with("done 1 1 1 "), "root: {root_out}");
}

#[test]
fn a_checkpoint_with_processes_forked_three_times_gives_three_live_clones_with_the_same_state() {
    let s = setup(&[]);
    s.run_agent("live", 16);
    let at_checkpoint = s.tell("live", "add", "7", "counter 7");
    let out = s.d.cli(&["fork", "live", "--frozen", "--name", "cp"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(s.info("cp")["status"], "frozen");
    // The checkpoint's clone never runs: the parent moves on, the checkpoint does not.
    s.tell("live", "add", "1", "counter 8");
    let frozen_pid = s.pids("cp")[0];
    let events = std::fs::read_to_string(format!(
        "{}/cgroup.events",
        s.info("cp")["cgroup"].as_str().unwrap()
    ))
    .unwrap();
    assert!(events.contains("frozen 1"), "{events}");
    for k in ["k1", "k2", "k3"] {
        s.fork("cp", k);
        assert_eq!(s.info(k)["status"], "running");
    }
    // Three live starts from the same state: each reports the checkpoint's counter and digest.
    for k in ["k1", "k2", "k3"] {
        assert_eq!(s.tell(k, "add", "0", "counter"), at_checkpoint, "{k}");
    }
    // They are independent of each other.
    s.tell("k1", "add", "1", "counter 8");
    assert_eq!(s.tell("k2", "add", "0", "counter"), at_checkpoint);
    // The checkpoint's own clone is still there, still frozen.
    assert_eq!(s.pids("cp"), vec![frozen_pid]);
    assert_eq!(s.info("cp")["status"], "frozen");
}

#[test]
fn a_running_branch_forked_into_three_at_once_gives_three_live_clones_of_one_state() {
    // The children's sandboxes start side by side before the parent is held (one was
    // pre-started after `run`, two more are started by the fork).
    let s = setup(&[]);
    s.run_agent("live", 16);
    let at_fork = s.tell("live", "add", "5", "counter 5");
    let out = s.d.cli(&["fork", "live", "-n", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(kids.len(), 3, "{kids:?}");
    let parent_pids = s.pids("live");
    let mut clones = Vec::new();
    for k in &kids {
        assert_eq!(s.info(k)["status"], "running", "{k}");
        let pids = s.pids(k);
        assert_eq!(pids.len(), 1, "{k}: {pids:?}");
        assert!(!parent_pids.contains(&pids[0]), "{k} has its own clone");
        clones.push(pids[0]);
        assert_eq!(s.tell(k, "add", "0", "counter"), at_fork, "{k}");
    }
    clones.sort();
    clones.dedup();
    assert_eq!(clones.len(), 3, "three distinct clones");
    // Each goes its own way; the parent keeps its own.
    for (i, k) in kids.iter().enumerate() {
        s.tell(
            k,
            "add",
            &(i + 1).to_string(),
            &format!("counter {}", 6 + i),
        );
    }
    for (i, k) in kids.iter().enumerate() {
        assert!(
            s.tell(k, "add", "0", "counter")
                .starts_with(&format!("counter {} ", 6 + i))
        );
    }
    assert_eq!(s.tell("live", "add", "0", "counter"), at_fork);
    // A second fork right away takes the sandbox pre-started after the first.
    s.fork("live", "again");
    assert_eq!(s.tell("again", "add", "0", "counter"), at_fork);
}

#[test]
fn a_process_traced_by_a_debugger_is_refused_and_left_as_it_was() {
    let s = setup(&[]);
    s.run("dbg", &["sleep", "1000"]);
    let pid = s.pids("dbg")[0];
    let mut strace = std::process::Command::new("strace")
        .args(["-o", "/dev/null", "-p", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("strace runs");
    let start = Instant::now();
    while std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .contains("TracerPid:\t0")
    {
        assert!(start.elapsed() < Duration::from_secs(10), "strace attaches");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = s.d.cli(&["fork", "dbg", "--name", "dbg2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("traced by process"), "{err}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status.contains(&format!("TracerPid:\t{}", strace.id())),
        "still strace's: {status}"
    );
    let _ = strace.kill();
    let _ = strace.wait();
    assert_eq!(s.pids("dbg"), vec![pid]);
}

/// Processes whose command line mentions `script` (originals and clones alike).
fn running(script: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).contains(script)
        })
        .collect()
}

/// The live processes running what process `pid` runs (command line), where it runs it
/// (working directory): `pid` and its clones that were not set up.
fn copies_of(pid: u32) -> Vec<u32> {
    let cmdline = |p: u32| std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
    let cwd = |p: u32| std::fs::read_link(format!("/proc/{p}/cwd")).ok();
    let (cmd, dir) = (cmdline(pid), cwd(pid));
    let mut all: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| !cmd.is_empty() && cmdline(*p) == cmd && cwd(*p) == dir)
        .collect();
    all.sort();
    all
}

/// Processes running `agent.py` in workspace `ws`.
fn agents_in(ws: &Path) -> Vec<u32> {
    running("agent.py")
        .into_iter()
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == ws))
        .collect()
}

/// A fault point: before the `n`th injected call of system call `nr` (see the daemon's
/// `FORKSCOPE_FAULT`), named for messages.
struct Fault {
    what: &'static str,
    nr: i64,
    n: u32,
}

const fn at(what: &'static str, nr: i64, n: u32) -> Fault {
    Fault { what, nr, n }
}

/// The descriptors of process `pid`: number -> what it points at.
fn fds_of(pid: u32) -> std::collections::BTreeMap<String, String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .map(|fd| {
            let link = std::fs::read_link(fd.path()).unwrap_or_default();
            (
                fd.file_name().to_string_lossy().into_owned(),
                link.to_string_lossy().into_owned(),
            )
        })
        .collect()
}

/// Forks `root` with a daemon that aborts at `fault`, and starts the daemon again; checks
/// that no half-forked child is left, and that nothing of it is left in the `original`
/// process either (no descriptor of the child's cgroup, no pid namespace but the ones in
/// `own_ns`, its pid namespace for children its own). Returns the fault's name and the new
/// daemon.
fn crash_in_fork(
    dir: &Path,
    socket: &Path,
    fault: &Fault,
    original: u32,
    own_ns: &[&str],
) -> (String, Daemon) {
    let env = format!("inject-abort:{}@{}", fault.nr, fault.n);
    let name = format!("{} ({env})", fault.what);
    let mut crashing = Daemon::start_with(dir, socket, &[("FORKSCOPE_FAULT", &env)]);
    let out = crashing.cli(&["fork", "root", "--name", "kid"]);
    assert!(
        !out.status.success() && !crashing.cli(&["status"]).status.success(),
        "{name}: the daemon died mid-fork: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = crashing.child.wait();
    std::mem::forget(crashing); // dead; the next daemon takes over its branches
    // A clone the dead daemon let go of before it was set up ends itself at once: it never
    // runs on as a copy of the original (before any daemon could sweep it away).
    let start = Instant::now();
    while copies_of(original) != [original] {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{name}: copies of the original run: {:?}",
            copies_of(original)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let d = Daemon::start_on(dir, socket);
    // No half-forked child: no record.
    let list: Value = serde_json::from_str(&d.ok(&["ls", "--json"])).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["root"], "{name}");
    let ns = |kind: &str| std::fs::read_link(format!("/proc/{original}/ns/{kind}")).unwrap();
    assert_eq!(ns("pid_for_children"), ns("pid"), "{name}");
    // The fork's marks went with what they marked.
    let marks: Vec<_> = std::fs::read_dir(d.state.join("branches"))
        .unwrap()
        .flatten()
        .flat_map(|b| std::fs::read_dir(b.path()).unwrap().flatten())
        .filter(|f| f.file_name().to_string_lossy().starts_with("forking-"))
        .map(|f| f.path())
        .collect();
    assert!(marks.is_empty(), "{name}: {marks:?}");
    for (fd, link) in fds_of(original) {
        assert!(
            (!link.starts_with("pid:[") || own_ns.contains(&fd.as_str()))
                && !link.contains("/forkscope/branch-"),
            "{name}: the original still holds fd {fd} -> {link}"
        );
    }
    (name, d)
}

#[test]
fn a_daemon_killed_at_any_instant_of_a_fork_leaves_the_original_process_intact() {
    let mut s = setup(&[]);
    s.run_agent("root", 4);
    let original: Vec<u32> = s.pids("root").iter().map(|p| *p as u32).collect();
    let dir = s.d.state.parent().unwrap().to_path_buf();
    let socket = s.d.socket.clone();
    s.d.stop();
    let mut counter = 0;
    // The first injected calls run in the original (its safety net, the clone3, the way
    // back, closing what it opened), the later ones in the clone.
    let faults = [
        at("asking for its signal stack", libc::SYS_sigaltstack, 1),
        at("opening the child's cgroup", libc::SYS_openat, 1),
        at("entering the child's pid namespace", libc::SYS_setns, 1),
        at("the clone3", libc::SYS_clone3, 1),
        at("leaving the child's pid namespace", libc::SYS_setns, 2),
        at("closing what the original opened", libc::SYS_close_range, 1),
        at("the clone's batch of calls", libc::SYS_close, 1),
        at("the clone's page of injected code", libc::SYS_mmap, 1),
        at("the clone running its batch", -1, 1),
        at(
            "the clone set up, its code page not unmapped",
            libc::SYS_munmap,
            1,
        ),
    ];
    for fault in &faults {
        let (fault, mut d) = crash_in_fork(&dir, &socket, fault, original[0], &[]);
        let start = Instant::now();
        while agents_in(&s.ws) != original {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{fault}: agents {:?}, the original was {original:?}",
                agents_in(&s.ws)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = std::fs::read_to_string(format!("/proc/{}/status", original[0])).unwrap();
        assert!(
            status.contains("TracerPid:\t0") && !status.contains("SigBlk:\tffffffff"),
            "{fault}: {status}"
        );
        // The original goes on from where it was, with its state.
        counter += 1;
        d.ok(&["exec", "root", "--", "sh", "-c", "rm -f out"]);
        d.ok(&[
            "exec",
            "root",
            "--",
            "sh",
            "-c",
            "printf 1 > add.tmp && mv add.tmp add",
        ]);
        let start = Instant::now();
        loop {
            let out = d.ok(&[
                "exec",
                "root",
                "--",
                "sh",
                "-c",
                "cat out 2>/dev/null; true",
            ]);
            if out.starts_with(&format!("counter {counter} ")) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{fault}: the original answers ({out:?})"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d.stop();
        std::mem::forget(d); // stopped; its branches stay for the next round
    }
    // After all that, a fork works, and the test's daemon cleans up.
    // (The first daemon, stopped, must not abort the branches on its way out.)
    std::mem::forget(std::mem::replace(&mut s.d, Daemon::start_on(&dir, &socket)));
    s.fork("root", "kid");
    assert_eq!(s.pids("kid").len(), 1);
}

#[test]
fn a_daemon_killed_mid_fork_of_a_multi_threaded_process_leaves_every_thread_intact() {
    let mut s = setup(&[("threaded.py", THREADED)]);
    s.run("root", &["python3", "threaded.py"]);
    s.wait_out("root", "ready");
    let pid = s.pids("root")[0];
    let threads = threads_of(pid);
    let fds_before = fds_of(pid as u32);
    let own_ns: Vec<&str> = fds_before
        .iter()
        .filter(|(_, l)| l.starts_with("pid:["))
        .map(|(fd, _)| fd.as_str())
        .collect();
    assert_eq!(
        own_ns.len(),
        1,
        "the script's own namespace: {fds_before:?}"
    );
    let dir = s.d.state.parent().unwrap().to_path_buf();
    let socket = s.d.socket.clone();
    s.d.stop();
    // The original's other threads are asked for their signal stacks; the clone makes the
    // four threads again (clone, robust list, rseq, name, registers each).
    let faults = [
        at(
            "asking a thread for its signal stack",
            libc::SYS_sigaltstack,
            2,
        ),
        at("asking the last thread", libc::SYS_sigaltstack, 5),
        at("entering the child's pid namespace", libc::SYS_setns, 1),
        at("the clone3", libc::SYS_clone3, 1),
        at("the clone's descriptors", libc::SYS_dup3, 1),
        at("making the first thread again", libc::SYS_clone, 1),
        at(
            "the first thread's robust list",
            libc::SYS_set_robust_list,
            2,
        ),
        at("making the last thread again", libc::SYS_clone, 4),
        at("naming the last thread", libc::SYS_prctl, 4),
    ];
    for fault in &faults {
        let (fault, mut d) = crash_in_fork(&dir, &socket, fault, pid as u32, &own_ns);
        // Its descriptors are exactly the ones it had, its own namespace's among them.
        assert_eq!(fds_of(pid as u32), fds_before, "{fault}");
        // Only the original is left, with all its threads, untraced, signals unblocked.
        let start = Instant::now();
        let clones = || {
            running("threaded.py")
                .into_iter()
                .filter(|p| *p as u64 != pid)
                .count()
        };
        while clones() != 0 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{fault}: a clone is left"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(threads_of(pid), threads, "{fault}");
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
        {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap();
            assert!(
                status.contains("TracerPid:\t0") && !status.contains("SigBlk:\tffffffff"),
                "{fault}: {status}"
            );
        }
        d.stop();
        std::mem::forget(d); // stopped; its branches stay for the next round
    }
    std::mem::forget(std::mem::replace(&mut s.d, Daemon::start_on(&dir, &socket)));
    // The original's threads all work on: they count, wake, and are joined.
    s.sh("root", "touch stop");
    let out = s.wait_out("root", "done");
    assert!(out.starts_with("done 1 1 1 "), "root: {out}");
}

#[test]
fn a_server_in_an_isolated_network_keeps_listening_in_both_branches() {
    let s = setup(&[("who.txt", "parent\n"), ("two-ports.py", TWO_PORTS)]);
    let ws = s.ws.to_str().unwrap().to_string();
    // The branch has a network namespace of its own: loopback only, unreachable from the host.
    // Its server listens on two ports (python's sockets are close-on-exec, which the
    // clone's copies keep).
    s.d.ok(&[
        "run",
        "--name",
        "web",
        "--net",
        "isolated",
        "--workspace",
        &ws,
        "--",
        "python3",
        "two-ports.py",
    ]);
    let get_on = |b: &str, port: u16| {
        s.sh(
            b,
            &format!(
                "curl -s -m 5 --retry 20 --retry-connrefused --retry-delay 0 127.0.0.1:{port}/who.txt"
            ),
        )
    };
    let get = |b: &str| {
        let on_8000 = get_on(b, 8000);
        assert_eq!(get_on(b, 8001), on_8000, "{b}: both ports");
        on_8000
    };
    assert_eq!(get("web"), "parent\n");
    let host = std::process::Command::new("curl")
        .args(["-s", "-m", "2", "127.0.0.1:8000/who.txt"])
        .output()
        .unwrap();
    assert_ne!(
        String::from_utf8_lossy(&host.stdout),
        "parent\n",
        "not the host's network"
    );
    // The clone gets a listening socket of its own, on the same port, in the child's network.
    let stderr = s.fork("web", "web2");
    assert!(!stderr.contains("listens on port"), "{stderr}");
    s.sh("web2", "echo child > who.txt");
    assert_eq!(get("web2"), "child\n");
    assert_eq!(get("web"), "parent\n");
    // On the host's network, a listening socket cannot be duplicated: closed and reported.
    s.d.ok(&[
        "run",
        "--name",
        "hostweb",
        "--workspace",
        &ws,
        "--",
        "python3",
        "-m",
        "http.server",
        "0",
        "--bind",
        "127.0.0.1",
    ]);
    let start = Instant::now();
    let stderr = loop {
        let out = s.d.cli(&["fork", "hostweb", "--name", "hostweb2"]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() && err.contains("listens on port") {
            break err;
        }
        if out.status.success() {
            s.d.ok(&["abort", "hostweb2"]);
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{err}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(stderr.contains("--net isolated"), "{stderr}");
}

#[test]
fn a_daemon_killed_after_a_snapshot_and_before_its_record_loses_no_deletion() {
    let mut s = setup(&[]);
    s.run_agent("root", 4);
    let original = s.pids("root")[0] as u32;
    // x exists at a first fork, then is deleted.
    s.sh("root", "echo x > x");
    s.fork("root", "first");
    assert_eq!(s.sh("first", "cat x"), "x\n");
    s.d.ok(&["abort", "first"]);
    s.sh("root", "rm x");
    let dir = s.d.state.parent().unwrap().to_path_buf();
    let socket = s.d.socket.clone();
    s.d.stop();
    // A fork dies in the clone: its snapshot (a whiteout for x) and the manifests saying x
    // is gone were written, the parent's record naming them was not.
    let (_, mut d) = crash_in_fork(
        &dir,
        &socket,
        &at("the clone3", libc::SYS_clone3, 1),
        original,
        &[],
    );
    d.stop();
    std::mem::forget(d);
    std::mem::forget(std::mem::replace(&mut s.d, Daemon::start_on(&dir, &socket)));
    // The next fork must still whiteout x: its child sees the parent's files, not x again.
    s.fork("root", "second");
    let has_x = |b: &str| s.sh(b, "ls").lines().any(|l| l == "x");
    assert!(!has_x("root"));
    assert!(
        !has_x("second"),
        "the child sees x, which its parent deleted"
    );
}

/// A python program that writes an ever-growing count into `count` every 20 ms, with every
/// signal it can block blocked and the usual ones ignored.
/// A server on 127.0.0.1, ports 8000 and 8001, one thread: answers any request with who.txt.
const TWO_PORTS: &str = r#"
import select, socket
listeners = []
for port in (8000, 8001):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen()
    listeners.append(s)
while True:
    ready, _, _ = select.select(listeners, [], [])
    for s in ready:
        c, _ = s.accept()
        c.recv(4096)
        body = open("who.txt").read()
        c.sendall(f"HTTP/1.0 200 OK\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        c.close()
"#;

const COUNTER: &str = r#"
import os, signal, time
signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP})
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
    signal.signal(s, signal.SIG_IGN)
n = 0
while True:
    n += 1
    with open("count.tmp", "w") as f:
        f.write(str(n))
    os.rename("count.tmp", "count")
    time.sleep(0.02)
"#;

/// The count process `pid` last wrote into its working directory (see [`COUNTER`]).
fn count_of(pid: u64) -> u64 {
    let start = Instant::now();
    loop {
        if let Ok(n) = std::fs::read_to_string(format!("/proc/{pid}/cwd/count"))
            && let Ok(n) = n.trim().parse()
        {
            return n;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{pid} counts");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether process `pid`'s count grows within 5 s.
fn counts_on(pid: u64) -> bool {
    let before = count_of(pid);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if count_of(pid) > before {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Lines of `/proc/PID/status` of `pid` that start with `key`.
fn status_line(pid: u64, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_branch_frozen_by_someone_else_stays_frozen_through_a_fork_a_commit_and_a_restart() {
    let mut s = setup(&[("counter.py", COUNTER)]);
    s.run("root", &["python3", "counter.py"]);
    let pid = s.pids("root")[0];
    assert!(counts_on(pid));
    // Someone (an orchestrator, an operator) freezes the branch through its cgroup.
    let cg = PathBuf::from(s.info("root")["cgroup"].as_str().unwrap());
    std::fs::write(cg.join("cgroup.freeze"), "1").unwrap();
    let frozen = || {
        std::fs::read_to_string(cg.join("cgroup.events"))
            .unwrap()
            .contains("frozen 1")
    };
    let start = Instant::now();
    while !frozen() {
        assert!(start.elapsed() < Duration::from_secs(5), "frozen");
        std::thread::sleep(Duration::from_millis(10));
    }
    let at_freeze = count_of(pid);
    // A fork clones its process; the child runs on from the frozen state, the parent stays
    // frozen as it was left.
    let out = s.fork("root", "kid");
    assert!(out.contains("cloned copy-on-write"), "{out}");
    let kid = s.pids("kid")[0];
    assert!(counts_on(kid), "the child runs");
    assert!(count_of(kid) > at_freeze);
    assert!(frozen(), "the parent is still frozen after the fork");
    assert_eq!(
        std::fs::read_to_string(cg.join("cgroup.freeze"))
            .unwrap()
            .trim(),
        "1"
    );
    assert_eq!(count_of(pid), at_freeze, "the parent did not run");
    // A commit of the frozen branch leaves it frozen too.
    let out = s.d.cli(&["commit", "root"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(s.ws.join("count")).unwrap().trim(),
        at_freeze.to_string(),
        "the commit carried the frozen branch's count"
    );
    assert!(frozen(), "the parent is still frozen after the commit");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(count_of(pid), at_freeze, "the parent did not run");
    // A daemon that crashes and starts again thaws what it froze itself, not this one.
    let (dir, socket) = (s._dir.path().to_path_buf(), s.d.socket.clone());
    s.d.kill9();
    std::mem::forget(std::mem::replace(&mut s.d, Daemon::start_on(&dir, &socket)));
    assert!(s.d.ok(&["ls"]).contains("root"));
    std::thread::sleep(Duration::from_millis(200));
    assert!(frozen(), "the parent is still frozen after a restart");
    assert_eq!(count_of(pid), at_freeze, "the parent did not run");
    // A daemon killed in the middle of a fork, while the branch is thawed for the clone:
    // the next daemon freezes it again for whoever froze it.
    s.d.stop();
    let mut crashing = Daemon::start_with(
        &dir,
        &socket,
        &[(
            "FORKSCOPE_FAULT",
            &format!("inject-abort:{}@1", libc::SYS_clone3),
        )],
    );
    let out = crashing.cli(&["fork", "root", "--name", "kid2"]);
    assert!(!out.status.success(), "the daemon died mid-fork");
    let _ = crashing.child.wait();
    std::mem::forget(crashing);
    assert!(counts_on(pid), "no daemon: the thawed branch runs");
    std::mem::forget(std::mem::replace(&mut s.d, Daemon::start_on(&dir, &socket)));
    assert!(s.d.ok(&["ls"]).contains("root"));
    assert!(frozen(), "frozen again after the restart");
    assert_eq!(
        std::fs::read_to_string(cg.join("cgroup.freeze"))
            .unwrap()
            .trim(),
        "1"
    );
    let stopped_at = count_of(pid);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(count_of(pid), stopped_at, "the parent does not run");
    assert!(!s.d.ok(&["ls"]).contains("kid2"), "no half-forked child");
    // The fork the crash cut short was undone in the original before it was frozen again:
    // its children would be born in its own pid namespace, and it holds nothing of the
    // child's.
    let ns = |kind: &str| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap();
    assert_eq!(ns("pid_for_children"), ns("pid"));
    for (fd, link) in fds_of(pid as u32) {
        assert!(
            !link.contains("/forkscope/branch-") && !link.starts_with("pid:["),
            "the original still holds fd {fd} -> {link}"
        );
    }
    // Thawed by whoever froze it, it goes on.
    std::fs::write(cg.join("cgroup.freeze"), "0").unwrap();
    assert!(counts_on(pid), "the parent runs once thawed");
}

#[test]
fn a_process_blocking_every_signal_is_forked_twice_at_once() {
    let s = setup(&[("counter.py", COUNTER)]);
    s.run("root", &["python3", "counter.py"]);
    let pid = s.pids("root")[0];
    assert!(counts_on(pid));
    // Two forks asked at the same moment: both are made, one after the other.
    let forks: Vec<_> = ["k1", "k2"]
        .iter()
        .map(|name| {
            std::process::Command::new(forkscope_tests::forkscope())
                .args(["fork", "root", "--name", name])
                .env("FORKSCOPE_SOCKET", &s.d.socket)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for f in forks {
        let out = f.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Each clone keeps what its original blocked and ignored, and counts on; so does the
    // original.
    for kid in ["k1", "k2"] {
        let k = s.pids(kid)[0];
        assert_ne!(k, pid);
        for key in ["SigBlk:", "SigIgn:"] {
            assert_eq!(status_line(k, key), status_line(pid, key), "{kid}: {key}");
        }
        assert!(counts_on(k), "{kid} runs");
    }
    assert!(
        status_line(pid, "SigBlk:").contains("7ffbfeff"),
        "every signal blocked"
    );
    assert!(counts_on(pid), "the original runs");
}

/// Runs the counter in root branch `root` of a daemon that kills the process its first
/// injected call of system call `nr` is for; forks `root`, which must fail as a fork whose
/// process died (HTTP 409, nothing forked). Returns the setup, the original's pid as it was
/// before the fork, its descriptors then, and what the fork said.
fn fork_killed_at(
    nr: i64,
) -> (
    Setup,
    u64,
    std::collections::BTreeMap<String, String>,
    String,
) {
    let s = setup_with(
        &[("counter-killed.py", COUNTER)],
        &[("FORKSCOPE_FAULT", &format!("inject-kill:{nr}@1"))],
    );
    s.run("root", &["python3", "counter-killed.py"]);
    let pid = s.pids("root")[0];
    assert!(counts_on(pid));
    let fds = fds_of(pid as u32);
    let out = s.d.cli(&["fork", "root", "--name", "kid"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("during the fork")
            && err.contains("nothing was forked")
            && err.contains("HTTP 409"),
        "{err}"
    );
    (s, pid, fds, err)
}

#[test]
fn a_process_killed_mid_fork_fails_the_fork_cleanly() {
    // The original killed before its clone is made: the branch's command is gone, no child.
    let (s, pid, _, err) = fork_killed_at(libc::SYS_clone3);
    assert!(err.contains(&format!("process {pid}")), "{err}");
    let names: Vec<String> = serde_json::from_str::<Value>(&s.d.ok(&["ls", "--json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["root"], "no half-forked child");
    assert!(
        running("counter-killed.py").is_empty(),
        "no clone of it runs"
    );
    // The daemon goes on: the branch still forks afresh.
    s.d.ok(&["fork", "root", "--fresh", "--name", "afresh"]);
    drop(s);

    // The clone killed while it is set up: the original runs on untouched, no child.
    let (s, pid, fds, _) = fork_killed_at(libc::SYS_chdir);
    assert_eq!(s.pids("root"), vec![pid]);
    assert_eq!(copies_of(pid as u32), vec![pid as u32], "no clone is left");
    assert_eq!(
        fds_of(pid as u32),
        fds,
        "the original's descriptors are as they were"
    );
    assert!(status_line(pid, "TracerPid:").ends_with("\t0"));
    assert!(counts_on(pid), "the original runs on");
    // The next fork works.
    s.fork("root", "kid");
    assert!(counts_on(s.pids("kid")[0]));
}

/// The gate a daemon given `FORKSCOPE_FAULT_WAIT=PATH` waits at (its fault points
/// `inject-wait:` and `warm-wait`): opened (PATH created) when dropped, so a failed
/// assertion does not leave the daemon waiting.
struct Gate<'a>(&'a Path);

impl Drop for Gate<'_> {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0, b"");
    }
}

#[test]
fn the_parent_runs_on_while_its_clone_is_set_up() {
    // The daemon is held just before the clone's first call of its set-up (the mmap of the
    // page its batch of calls runs from): the original, let go as soon as its clone was
    // born, runs on meanwhile, no longer traced. Then the fork completes and both run.
    let gate = TempDir::new("fault-gate");
    let go = gate.path().join("go");
    let reached = gate.path().join("go.reached");
    let s = setup_with(
        &[("counter-gated.py", COUNTER)],
        &[
            (
                "FORKSCOPE_FAULT",
                &format!("inject-wait:{}@1", libc::SYS_mmap),
            ),
            ("FORKSCOPE_FAULT_WAIT", go.to_str().unwrap()),
        ],
    );
    s.run("root", &["python3", "counter-gated.py"]);
    let pid = s.pids("root")[0];
    assert!(counts_on(pid));
    std::thread::scope(|scope| {
        let gate = Gate(&go);
        let fork = scope.spawn(|| s.d.cli(&["fork", "root", "--name", "kid"]));
        let start = Instant::now();
        while !reached.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(30) && !fork.is_finished(),
                "the fork never reached the clone's set-up"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let clone = copies_of(pid as u32)
            .into_iter()
            .find(|&p| p != pid as u32)
            .expect("the clone is born");
        assert!(
            status_line(clone as u64, "TracerPid:") != "TracerPid:\t0",
            "the clone is held while it is set up"
        );
        assert_eq!(
            status_line(pid, "TracerPid:"),
            "TracerPid:\t0",
            "the original is let go once its clone is born"
        );
        assert!(counts_on(pid), "the original runs on meanwhile");
        drop(gate);
        let out = fork.join().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    let kid = s.pids("kid")[0];
    assert_ne!(kid, pid);
    assert!(counts_on(kid), "the clone runs");
    assert!(counts_on(pid), "the original runs");
}

#[test]
fn requests_do_not_wait_for_the_next_childs_sandbox_to_start() {
    // The sandbox of the next child is pre-started after `run` (and after each fork); its
    // start is held at a gate here: meanwhile the daemon answers other requests, and a fork
    // waits for it and uses it once the gate opens.
    let gate = TempDir::new("warm-gate");
    let open = gate.path().join("open");
    let s = setup_with(
        &[("counter-warm.py", COUNTER)],
        &[
            ("FORKSCOPE_FAULT", "warm-wait"),
            ("FORKSCOPE_FAULT_WAIT", open.to_str().unwrap()),
        ],
    );
    let gate_open = Gate(&open);
    s.run("root", &["python3", "counter-warm.py"]);
    let reached = gate.path().join("open.reached");
    let start = Instant::now();
    while !reached.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the next child's sandbox is pre-started after run"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Held at the gate: requests are answered (each in its own thread, given 20 s).
    std::thread::scope(|scope| {
        let asks = [
            scope.spawn(|| s.d.cli(&["ls"])),
            scope.spawn(|| s.d.cli(&["exec", "root", "--", "true"])),
        ];
        let start = Instant::now();
        while !asks.iter().all(|a| a.is_finished()) {
            if start.elapsed() > Duration::from_secs(20) {
                // (The gate opened first: the scope waits for the requests.)
                let _ = std::fs::write(&open, b"");
                panic!("requests wait for the sandbox being pre-started");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for a in asks {
            let out = a.join().unwrap();
            assert!(out.status.success(), "{out:?}");
        }
    });
    drop(gate_open);
    let pid = s.pids("root")[0];
    assert!(counts_on(pid));
    s.fork("root", "kid");
    let kid = s.pids("kid")[0];
    assert!(counts_on(kid), "the clone runs");
    assert!(counts_on(pid), "the original runs");
}

#[test]
fn a_childs_mounts_that_never_end_fail_the_fork_and_leave_the_parent_running() {
    // The child's overlays are mounted by its pre-started sandbox's setup process while the
    // clones are born; one that never answers (a mount blocked on a dead filesystem, say)
    // is killed after a while: the fork fails cleanly, nothing is left held.
    let mut s = setup_with(
        &[("counter-mount.py", COUNTER)],
        &[
            ("FORKSCOPE_FAULT", "mount-hang"),
            ("FORKSCOPE_SETUP_ANSWER_MS", "2000"),
        ],
    );
    s.run("root", &["python3", "counter-mount.py"]);
    let pid = s.pids("root")[0];
    assert!(counts_on(pid));
    let out = s.d.cli(&["fork", "root", "--name", "kid"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("mounting the overlays") && err.contains("did not answer"),
        "{err}"
    );
    assert_eq!(s.pids("root"), vec![pid]);
    assert!(!s.d.ok(&["ls"]).contains("kid"), "no half-forked child");
    assert_eq!(copies_of(pid as u32), vec![pid as u32], "no clone is left");
    assert!(status_line(pid, "TracerPid:").ends_with("\t0"));
    assert!(counts_on(pid), "the parent runs on");
    // A daemon without the fault forks the branch.
    let (dir, socket) = (s._dir.path().to_path_buf(), s.d.socket.clone());
    s.d.stop();
    std::mem::forget(std::mem::replace(&mut s.d, Daemon::start_on(&dir, &socket)));
    s.fork("root", "kid");
    assert!(counts_on(s.pids("kid")[0]), "the clone runs");
}

/// A counter that, once a file `killgroup` appears in its workspace, signals its whole
/// process group (`kill 0`, ignoring the signal itself) and says so in `killed`.
const GROUP_KILLER: &str = r#"
import os, signal, time
n = 0
while True:
    n += 1
    with open("count.tmp", "w") as f:
        f.write(str(n))
    os.rename("count.tmp", "count")
    if os.path.exists("killgroup"):
        os.remove("killgroup")
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.kill(0, signal.SIGTERM)
        with open("killed", "w") as f:
            f.write("yes")
    time.sleep(0.02)
"#;

#[test]
fn a_kill_of_its_process_group_in_a_branch_or_a_clone_reaches_no_one_outside() {
    // `kill 0` (or `trap 'kill 0' EXIT`) signals the caller's process group, whatever the
    // pid namespace: branches must have groups of their own, not the daemon's, and a
    // clone must not share its original's.
    let s = setup(&[("group.py", GROUP_KILLER)]);
    s.run("root", &["python3", "group.py"]);
    let root = s.pids("root")[0];
    assert!(counts_on(root));
    let daemon = s.d.child.id();
    let out = s.d.cli(&["exec", "root", "--", "sh", "-c", "kill -TERM 0"]);
    assert_eq!(
        out.status.code(),
        Some(143),
        "sh got its own SIGTERM: {out:?}"
    );
    assert!(s.d.cli(&["status"]).status.success(), "the daemon answers");
    assert!(counts_on(root), "the branch's command lives on");

    s.fork("root", "kid");
    let kid = s.pids("kid")[0];
    assert!(counts_on(kid));
    s.sh("kid", "touch killgroup");
    let start = Instant::now();
    while s.sh("kid", "cat killed 2>/dev/null; true") != "yes" {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the clone signals its group"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(counts_on(root), "the original lives on");
    assert!(counts_on(kid), "the clone lives on (it ignores the signal)");
    assert!(
        forkscope_tests::daemon::nix_kill(daemon, 0) == 0 && s.d.cli(&["status"]).status.success(),
        "the daemon lives on"
    );
    assert_eq!(s.sh("kid", "echo ok"), "ok\n", "the child branch works");
    assert_eq!(s.sh("root", "echo ok"), "ok\n", "the parent branch works");
}

/// Writes `out N` to stdout and `err N` to stderr, N counting up.
const TWO_STREAMS: &str = r#"
import sys, time
n = 0
while True:
    n += 1
    sys.stdout.write(f"out {n}\n")
    sys.stdout.flush()
    sys.stderr.write(f"err {n}\n")
    sys.stderr.flush()
    time.sleep(0.01)
"#;

/// The counters N of the last `span` whole rounds in `log` for which `out N` or `err N`
/// is missing.
fn rounds_missing(log: &str, span: u64) -> Vec<u64> {
    let lines: std::collections::BTreeSet<&str> = log.lines().collect();
    let last = log
        .lines()
        .filter_map(|l| l.split_once(' ').and_then(|(_, n)| n.parse::<u64>().ok()))
        .max()
        .unwrap_or(0);
    assert!(last > span + 2, "the log has rounds: {log:?}");
    (last - span..last)
        .filter(|n| {
            !lines.contains(format!("out {n}").as_str())
                || !lines.contains(format!("err {n}").as_str())
        })
        .collect()
}

#[test]
fn descriptors_sharing_one_open_file_share_it_in_the_clone() {
    // `> o.log 2>&1`: stdout and stderr are one open file with one offset. Opened twice in
    // the clone, each would write at its own offset over the other's lines.
    let s = setup(&[("two.py", TWO_STREAMS)]);
    s.run("root", &["sh", "-c", "exec python3 -u two.py > o.log 2>&1"]);
    let start = Instant::now();
    while s
        .sh("root", "wc -l < o.log 2>/dev/null || echo 0")
        .trim()
        .parse::<u64>()
        .unwrap_or(0)
        < 20
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the writer starts"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    s.fork("root", "kid");
    std::thread::sleep(Duration::from_millis(1500));
    for branch in ["kid", "root"] {
        let log = s.sh(branch, "cat o.log");
        let missing = rounds_missing(&log, 50);
        assert!(
            missing.is_empty(),
            "{branch}: rounds without both lines: {missing:?}\n{}",
            log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
        );
    }
}

/// Opens `held.txt` for appending, writes a line, and then only waits.
const HOLDER: &str = r#"
import time
f = open("held.txt", "a")
f.write("start\n")
f.flush()
with open("out", "w") as o:
    o.write("ready")
time.sleep(1000000)
"#;

#[test]
fn a_file_copied_for_a_clone_is_no_change_of_the_child_until_written() {
    // The fork copies the files its processes hold open for writing into the child, for
    // the clones' descriptors. Untouched, such a copy is the file as it was: committing
    // the child must not put it back over what the parent wrote since.
    let s = setup(&[("holder.py", HOLDER)]);
    s.run("root", &["python3", "holder.py"]);
    s.wait_out("root", "ready");
    s.fork("root", "kid");
    let diff = s.d.ok(&["diff", "kid"]);
    assert!(
        !diff.contains("held.txt"),
        "an untouched copy is no change: {diff}"
    );
    s.sh("root", "echo parent >> held.txt");
    s.d.ok(&["commit", "kid"]);
    assert_eq!(s.sh("root", "cat held.txt"), "start\nparent\n");
    // Written by the child, it is a change like any other.
    s.sh("kid", "echo kid >> held.txt");
    let diff = s.d.ok(&["diff", "kid"]);
    assert!(diff.contains("held.txt"), "{diff}");
}
