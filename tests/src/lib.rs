//! Helpers for the integration tests: finding the built `forkscope` binary, running
//! `forkscope trace`, reading its JSON lines, and totalling strace output (the reference).
//!
//! The tests run the real binary, which loads the real eBPF programs into this kernel: they
//! need root (CI runs as root) and `cargo build --release` first (scripts/test does both).

pub mod branches;
pub mod daemon;
pub mod http;
pub mod lossy;
pub mod strace;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;

/// The phases a fork reports (in its `phases`, as `NAME_us`, and in the metrics' `phase`
/// label), without `held` (which overlaps them) and `total`.
pub const FORK_PHASES: [&str; 9] = [
    "check",
    "freeze",
    "files",
    "seize",
    "thaw",
    "plan",
    "start",
    "processes",
    "record",
];

/// Directory holding the built binaries (target/<profile>), found from the test executable
/// (target/<profile>/deps/<test>).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

/// The `forkscope` binary under test.
pub fn forkscope() -> PathBuf {
    let p = target_dir().join("forkscope");
    assert!(
        p.exists(),
        "{} not built: run `cargo build --release` (scripts/test does)",
        p.display()
    );
    p
}

/// A workload binary of this package (src/bin).
pub fn workload(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --release --workspace`",
        p.display()
    );
    p
}

/// Fails the test unless it runs as root: these tests load eBPF programs.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "integration tests load eBPF programs and must run as root"
    );
}

/// A process a test made (its pid, positive), SIGKILLed when the test ends, passed or
/// failed.
pub struct KillOnDrop(pub i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Never 0 or a negative pid: kill(2) would signal a group, or everything.
        if self.0 > 0 {
            // SAFETY: kill(2) of a single positive pid: the process the test made.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
}

/// A fresh directory (under /tmp unless told), removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        Self::new_in(&std::env::temp_dir(), tag)
    }

    /// A fresh directory under `base` (for paths a branch must see outside its own /tmp).
    pub fn new_in(base: &Path, tag: &str) -> Self {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = base.join(format!("forkscope-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p.canonicalize().expect("canonical temp dir"))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The result of one `forkscope trace` run.
pub struct TraceRun {
    pub output: Output,
    pub events: Vec<Value>,
    /// The forkscope process's pid (its cgroups are named after it).
    pub pid: u32,
}

impl TraceRun {
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    pub fn output_pid(&self) -> u32 {
        self.pid
    }

    pub fn code(&self) -> Option<i32> {
        self.output.status.code()
    }

    /// Events of one kind.
    pub fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.events.iter().filter(move |e| e["kind"] == kind)
    }

    /// Bytes written per file (file_write events), for paths under `under`.
    pub fn file_totals(&self, under: &Path) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for e in self.of_kind("file_write") {
            let path = e["path"].as_str().unwrap_or("?");
            if Path::new(path).starts_with(under) {
                *m.entry(path.to_string()).or_default() += e["bytes"].as_u64().unwrap_or(0);
            }
        }
        m
    }

    /// Bytes sent per destination `addr:port` (net_send events on IPv4/IPv6).
    pub fn destination_totals(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for e in self.of_kind("net_send") {
            let (Some(addr), Some(port)) = (e["addr"].as_str(), e["port"].as_u64()) else {
                continue;
            };
            let key = if addr.contains(':') {
                format!("[{addr}]:{port}")
            } else {
                format!("{addr}:{port}")
            };
            *m.entry(key).or_default() += e["bytes"].as_u64().unwrap_or(0);
        }
        m
    }
}

/// Runs `forkscope trace -o <dir>/events.jsonl [extra] -- cmd...` in `cwd`.
pub fn trace(cwd: &Path, extra: &[&str], cmd: &[&str]) -> TraceRun {
    let out_file = cwd.join(".forkscope-events.jsonl");
    let child = Command::new(forkscope())
        .current_dir(cwd)
        .arg("trace")
        .arg("-o")
        .arg(&out_file)
        .args(extra)
        .arg("--")
        .args(cmd)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run forkscope");
    let pid = child.id();
    let output = child.wait_with_output().expect("wait for forkscope");
    let text = std::fs::read_to_string(&out_file).unwrap_or_default();
    let _ = std::fs::remove_file(&out_file);
    let events = parse_jsonl(&text);
    TraceRun {
        output,
        events,
        pid,
    }
}

/// Parses JSON lines, failing on any line that is not a JSON object.
pub fn parse_jsonl(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}"));
            assert!(v.is_object(), "not an object: {l}");
            v
        })
        .collect()
}

/// The cgroup v2 mount point.
pub fn cgroup2_root() -> PathBuf {
    forkscope::cgroup::cgroup2_root().expect("a cgroup2 mount")
}

/// forkscope's trace cgroups left by process `pid` (there must be none once it exits).
pub fn leftover_cgroups(pid: u32) -> Vec<PathBuf> {
    let dir = cgroup2_root().join("forkscope");
    let prefix = format!("trace-{pid}-");
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `sh -c script` in the branch whose init listens on `control`, with stdout and stderr
/// captured; returns the exit code and the output.
pub fn exec_sh(control: &Path, script: &str) -> (i32, String) {
    use forkscope::sandbox::control::{ExecReply, ExecRequest, exec};
    use std::os::fd::AsRawFd;
    let dir = TempDir::new("exec-out");
    let out = std::fs::File::create(dir.path().join("out")).unwrap();
    let null = std::fs::File::open("/dev/null").unwrap();
    let req = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    };
    let code = match exec(
        control,
        &req,
        [null.as_raw_fd(), out.as_raw_fd(), out.as_raw_fd()],
        |_| {},
    )
    .unwrap()
    {
        ExecReply::ExitCode(c) => c,
        other => panic!("unexpected reply {other:?}"),
    };
    (
        code,
        std::fs::read_to_string(dir.path().join("out")).unwrap(),
    )
}

/// (path, kind) of each change, for comparing a diff with what a test expects.
pub fn change_list(
    changes: &[forkscope::layers::diff::Change],
) -> Vec<(String, forkscope::layers::diff::ChangeKind)> {
    changes
        .iter()
        .map(|c| (c.path.to_string_lossy().into_owned(), c.kind))
        .collect()
}

/// Every entry under `root` (relative path → type, mode, owner and content or link target),
/// for comparing two trees exactly.
pub fn tree(root: &Path) -> BTreeMap<String, String> {
    use std::os::unix::fs::MetadataExt;
    fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<String, String>) {
        let mut names: Vec<_> = std::fs::read_dir(root.join(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let r = rel.join(&n);
            let p = root.join(&r);
            let m = std::fs::symlink_metadata(&p).unwrap();
            let what = if m.is_dir() {
                walk(root, &r, out);
                "dir".to_string()
            } else if m.is_symlink() {
                format!("link -> {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_file() {
                format!(
                    "file {:?} mtime {}",
                    String::from_utf8_lossy(&std::fs::read(&p).unwrap()),
                    m.mtime()
                )
            } else {
                format!("other {:o}", m.mode() & libc::S_IFMT)
            };
            let mode = if m.is_symlink() { 0 } else { m.mode() & 0o7777 };
            out.insert(
                r.to_string_lossy().into_owned(),
                format!("{what} mode {mode:o} owner {}:{}", m.uid(), m.gid()),
            );
        }
    }
    let mut out = BTreeMap::new();
    walk(root, Path::new(""), &mut out);
    out
}
