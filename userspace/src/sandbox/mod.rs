//! A branch's sandbox: the namespaces, mounts and init process its programs run in.
//!
//! [`start`] launches `forkscope __init` (see [`init`]) in the branch's cgroup. As real root it
//! makes a private mount namespace, mounts the branch's workspace and `/tmp` overlays, a
//! private `/dev/shm`, and makes every other mount read-only. It then enters a new user
//! namespace (uid and gid 0..2^32-1 mapped to themselves, written by [`start`]) and from there
//! a new mount and pid namespace: the mounts it inherits are locked, so nothing inside can
//! make them writable or unmount them to see what is beneath. Its child is pid 1 of the new
//! pid namespace: the branch's init, a subreaper that starts the branch's command and every
//! later `exec` ([`control`]), so everything in the branch inherits its namespaces and cgroup.
//! Processes in the branch see only the branch's processes, so they cannot signal the daemon
//! or anything else on the host. The init installs a seccomp filter ([`seccomp`]) before it
//! starts anything.
//!
//! A child whose processes are cloned from its parent ([`crate::procfork`]) is nested: its
//! setup first joins the parent's user namespace and pid namespace, so the namespaces it then
//! makes are children of the parent's. The kernel only lets a process place a clone in its
//! own pid namespace or a descendant, and only enter a mount namespace whose user namespace
//! it holds capabilities in.

pub mod control;
pub mod init;
mod mounts;
pub mod seccomp;

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde::{Deserialize, Serialize};

use crate::{
    cgroup::Cgroup,
    error::{Error, IoContext, Result},
    layers::overlay::Stack,
};

/// Everything the init process needs to build a branch's sandbox.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// The workspace path: the branch sees its overlay there.
    pub workspace: PathBuf,
    /// The workspace overlay.
    pub workspace_stack: StackSpec,
    /// The /tmp overlay.
    pub tmp_stack: StackSpec,
    /// Where init listens for exec requests (a SOCK_SEQPACKET Unix socket).
    pub control: PathBuf,
    /// The branch's command, started at once (empty: none).
    pub command: Vec<String>,
    /// Where the command's output goes.
    pub log: PathBuf,
    /// Host directories the branch must not see at all (the daemon's socket directory and
    /// state directory): covered with an empty read-only tmpfs.
    #[serde(default)]
    pub hidden: Vec<PathBuf>,
    /// The host pid of the parent branch's init, for a child whose processes are cloned from
    /// its parent's: its user and pid namespaces are then made inside the parent's (see
    /// [`init`]), so a process of the parent can place a clone of itself in them.
    #[serde(default)]
    pub nest_in: Option<u32>,
}

/// An overlay stack, serializable.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StackSpec {
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
}

impl StackSpec {
    pub fn stack(&self) -> Stack {
        Stack {
            lowers: self.lowers.clone(),
            upper: self.upper.clone(),
            work: self.work.clone(),
        }
    }
}

/// A running sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sandbox {
    /// The init's pid as the host sees it.
    pub init_pid: u32,
    /// Its control socket.
    pub control: PathBuf,
}

/// How long building a sandbox may take before its setup process is killed.
pub const SETUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Starts a sandbox for `spec` in `cgroup`, running `forkscope_bin __init`. Returns once the
/// init listens for exec requests.
pub fn start(
    forkscope_bin: &Path,
    spec: &SandboxSpec,
    spec_file: &Path,
    cgroup: &Cgroup,
) -> Result<Sandbox> {
    let text = serde_json::to_string(spec).map_err(std::io::Error::from)?;
    std::fs::write(spec_file, text).at(spec_file)?;
    let (to_init_r, mut to_init_w) = std::io::pipe()?;
    let (from_init_r, from_init_w) = std::io::pipe()?;
    let procs = cgroup.open_procs()?;
    let mut cmd = Command::new(forkscope_bin);
    cmd.arg("__init")
        .arg(spec_file)
        .stdin(Stdio::from(to_init_r))
        .stdout(Stdio::from(from_init_w))
        .stderr(Stdio::inherit());
    // SAFETY: the hook only calls write(2), async-signal-safe as pre_exec requires, on a
    // descriptor that stays open until spawn returns.
    unsafe {
        cmd.pre_exec(Cgroup::enter_hook(&procs));
    }
    let mut setup = cmd
        .spawn()
        .map_err(|e| Error::Sandbox(format!("starting {}: {e}", forkscope_bin.display())))?;
    drop(procs);
    let pid = setup.id();
    // A setup that hangs (a mount blocked on a dead filesystem, say) must not hang the
    // daemon: past SETUP_TIMEOUT it is killed, its pipe closes and the reads below fail.
    let (done, watchdog) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            watchdog.recv_timeout(SETUP_TIMEOUT)
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    });
    let mut lines = BufReader::new(from_init_r);
    let mut line = String::new();
    // 1. The setup process (or, nested, its child in the parent's pid namespace) entered
    //    its user namespace: map ids 1:1 and let it go on.
    lines.read_line(&mut line)?;
    if line.trim() != "userns" {
        let _ = setup.wait();
        return Err(Error::Sandbox(format!(
            "sandbox setup failed before the user namespace: {}",
            line.trim()
        )));
    }
    // (Nested, the setup process mapped them: only a process in the parent user namespace
    // may, and it is the parent branch's.)
    let mapped = if spec.nest_in.is_some() {
        only_child(pid)
    } else {
        write_id_maps(Path::new("/proc"), pid).map(|()| pid)
    };
    let mapped = match mapped {
        Ok(m) => m,
        Err(e) => {
            let _ = setup.kill();
            let _ = setup.wait();
            return Err(e);
        }
    };
    to_init_w.write_all(b"mapped\n")?;
    // 2. It reports the init's pid once the init listens (nested: as the parent's pid
    //    namespace numbers it, so the host pid is read from /proc), then waits for `done`.
    line.clear();
    lines.read_line(&mut line)?;
    let reported: Option<u32> = line
        .trim()
        .strip_prefix("init ")
        .and_then(|p| p.parse().ok());
    let init_pid = match reported {
        Some(_) if spec.nest_in.is_some() => only_child(mapped).ok(),
        other => other,
    };
    let _ = to_init_w.write_all(b"done\n");
    let status = setup.wait()?;
    let _ = done.send(());
    let init_pid = init_pid.ok_or_else(|| {
        Error::Sandbox(format!("sandbox setup failed ({status}): {}", line.trim()))
    })?;
    Ok(Sandbox {
        init_pid,
        control: spec.control.clone(),
    })
}

/// The host pid of `pid`'s one child.
fn only_child(pid: u32) -> Result<u32> {
    let f = format!("/proc/{pid}/task/{pid}/children");
    let text = std::fs::read_to_string(&f).at(&f)?;
    let kids: Vec<u32> = text
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    match kids.as_slice() {
        [one] => Ok(*one),
        _ => Err(Error::Sandbox(format!(
            "sandbox setup: expected one child of process {pid}, found {kids:?}"
        ))),
    }
}

/// Maps uids and gids 0..2^32-1 of `pid`'s new user namespace to themselves (`proc`: where
/// a writable /proc is).
pub(crate) fn write_id_maps(proc: &Path, pid: u32) -> Result<()> {
    for (file, text) in [
        ("uid_map", "0 0 4294967295\n"),
        ("setgroups", "allow\n"),
        ("gid_map", "0 0 4294967295\n"),
    ] {
        let p = proc.join(format!("{pid}/{file}"));
        std::fs::write(&p, text).at(&p)?;
    }
    Ok(())
}
