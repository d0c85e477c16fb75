//! A real daemon for tests: started on a private state directory and socket, driven with
//! the real CLI, and on drop every branch it still has is aborted and it is stopped.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::forkscope;

/// A running `forkscope daemon`.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub state: PathBuf,
}

impl Daemon {
    pub fn start(dir: &Path) -> Self {
        Self::start_on(dir, &dir.join("api.sock"))
    }

    pub fn start_on(dir: &Path, socket: &Path) -> Self {
        Self::start_with(dir, socket, &[])
    }

    /// Starts a daemon with extra environment variables (fault injection).
    pub fn start_with(dir: &Path, socket: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_full(dir, socket, env, &[])
    }

    pub fn start_full(dir: &Path, socket: &Path, env: &[(&str, &str)], args: &[&str]) -> Self {
        let socket = socket.to_path_buf();
        let state = dir.join("state");
        let child = daemon_command(&state, &socket)
            .envs(env.iter().copied())
            // Many test daemons run at once: each its own metrics port unless told.
            .args(if args.contains(&"--metrics-addr") {
                &[][..]
            } else {
                &["--metrics-addr", "127.0.0.1:0"][..]
            })
            .args(args)
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("daemon.log"))
                    .unwrap(),
            ))
            .spawn()
            .unwrap();
        let mut d = Daemon {
            child,
            socket,
            state,
        };
        let start = Instant::now();
        while !d.cli(&["status"]).status.success() {
            let exited = d.child.try_wait().ok().flatten();
            if exited.is_some() || start.elapsed() > Duration::from_secs(30) {
                let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
                panic!("daemon did not come up ({exited:?}); its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// Where this daemon serves `/metrics` (from `forkscope status --json`).
    pub fn metrics_addr(&self) -> Option<String> {
        let out = self.cli(&["status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["metrics_addr"].as_str().map(str::to_string)
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// The CLI with `args`, on this daemon's socket, to be started by the caller.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(forkscope());
        c.env("FORKSCOPE_SOCKET", &self.socket).args(args);
        c
    }

    /// Runs the CLI and returns its stdout, failing the test on a non-zero exit.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "forkscope {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `sh -c script` in `branch` through `forkscope exec`; returns its stdout, failing
    /// the test on a non-zero exit.
    pub fn sh(&self, branch: &str, script: &str) -> String {
        self.ok(&["exec", branch, "--", "sh", "-c", script])
    }

    /// Starts a root branch `name` on `ws` whose command sleeps.
    pub fn run_sleeping(&self, name: &str, ws: &Path) {
        self.ok(&[
            "run",
            "--name",
            name,
            "--workspace",
            ws.to_str().unwrap(),
            "--",
            "sleep",
            "1000",
        ]);
    }

    /// SIGTERM, as systemd stops it; with no branch left it removes its eBPF pins.
    pub fn stop(&mut self) {
        let _ = nix_kill(self.child.id(), libc::SIGTERM);
        let start = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() {
            if start.elapsed() > Duration::from_secs(20) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
    }

    /// The daemon's pin directories under /sys/fs/bpf (one per state directory).
    pub fn pins(&self) -> Vec<PathBuf> {
        use std::os::unix::fs::MetadataExt;
        let tag = format!("{:x}-", std::fs::metadata(&self.state).unwrap().ino());
        std::fs::read_dir("/sys/fs/bpf/forkscope")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&tag))
            .map(|e| e.path())
            .collect()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Abort whatever is left, then stop.
        let ls = || {
            Command::new(forkscope())
                .env("FORKSCOPE_SOCKET", &self.socket)
                .args(["ls", "--json"])
                .output()
                .ok()
                .filter(|o| o.status.success())
        };
        // (Retried once: a daemon just restarted by the test may still be settling.)
        let mut listed = ls().or_else(|| {
            std::thread::sleep(std::time::Duration::from_millis(500));
            ls()
        });
        // No daemon serves the state directory (this one was killed and the test failed
        // before starting the next): one is started to clean up, so a failed test leaves
        // no branch, and no pinned program attached, behind.
        let mut cleaner = None;
        if listed.is_none() && self.child.try_wait().ok().flatten().is_some() {
            let spawned = daemon_command(&self.state, &self.socket)
                .args(["--metrics-addr", "off", "--detach-grace", "0"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            if let Ok(c) = spawned {
                let start = Instant::now();
                while listed.is_none() && start.elapsed() < Duration::from_secs(30) {
                    std::thread::sleep(Duration::from_millis(100));
                    listed = ls();
                }
                cleaner = Some(c);
            }
        }
        if listed.is_none() {
            eprintln!(
                "cleanup: the daemon at {} did not list its branches",
                self.socket.display()
            );
        }
        if let Some(out) = listed {
            let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            // (A retired branch goes with its last fork.)
            let mut names: Vec<(u64, String)> = list
                .as_array()
                .into_iter()
                .flatten()
                .filter(|b| b["status"] != "retired")
                .map(|b| {
                    (
                        b["id"].as_u64().unwrap_or(0),
                        b["name"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect();
            names.sort();
            for (_, n) in names.iter().rev() {
                let out = Command::new(forkscope())
                    .env("FORKSCOPE_SOCKET", &self.socket)
                    .args(["abort", "--recursive", n])
                    .output();
                if let Ok(o) = out
                    && !o.status.success()
                    && !String::from_utf8_lossy(&o.stderr).contains("no live branch")
                {
                    eprintln!(
                        "cleanup: abort {n}: {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    );
                }
            }
        }
        if let Some(c) = cleaner {
            self.child = c;
        }
        self.stop();
    }
}

/// `forkscope daemon` on `state` and `socket`, to be given more arguments and started.
fn daemon_command(state: &Path, socket: &Path) -> Command {
    let mut c = Command::new(forkscope());
    // A process group of its own, as under systemd: a signal to a branch's process group
    // that reached the daemon's (a containment failure) does not take the tests with it.
    std::os::unix::process::CommandExt::process_group(&mut c, 0);
    c.args(["daemon", "--state-dir"])
        .arg(state)
        .arg("--socket")
        .arg(socket);
    c
}

/// Sends `sig` to `pid`.
pub fn nix_kill(pid: u32, sig: i32) -> i32 {
    // SAFETY: kill(2) takes plain integers.
    unsafe { libc::kill(pid as i32, sig) }
}
