//! A branch's sandbox: the namespaces, mounts and init process its programs run in.
//!
//! [`start`] launches `forkscope __init` (see [`init`]); its setup processes stay in the
//! daemon's cgroup and only the init is born in the branch's. As real root it
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
pub mod notify;
pub mod seccomp;
pub mod terminal;

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
    /// A pre-started sandbox: its overlays are mounted later ([`Warm::request_mount`]), when the
    /// fork that takes it knows its layers; the stacks above are then ignored. Holds the state
    /// directory, under which every layer lies.
    #[serde(default)]
    pub deferred: Option<PathBuf>,
    /// A network namespace of its own (loopback only), made with its pid namespace.
    #[serde(default)]
    pub net_isolated: bool,
    /// Host paths the policy shares (writable) or keeps read-only inside a shared path, in
    /// the order to mount them (see [`crate::policy::Policy::file_mounts`]).
    #[serde(default)]
    pub file_mounts: Vec<crate::policy::FileMount>,
    /// The policy defers some network calls: the init installs the seccomp listener
    /// ([`notify`]) that holds them for the daemon.
    #[serde(default)]
    pub defer: bool,
    /// The branch's cgroup directory: the init is born in it (`clone3` with
    /// `CLONE_INTO_CGROUP`); the setup processes before it stay in the daemon's cgroup, so
    /// no process is ever moved (a move waits for an RCU grace period: about 6 ms). Set by
    /// [`spawn`].
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
}

/// An overlay stack, serializable.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StackSpec {
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
}

impl SandboxSpec {
    /// The sandbox of a branch whose directory is `dir`: its command log and control socket
    /// there, overlays with empty lowers on `dir`'s upper and work directories, no command,
    /// not nested, not pre-started; what `policy` asks (file mounts, the defer listener).
    /// Callers set the rest with struct update syntax.
    pub fn for_branch(
        dir: &Path,
        workspace: PathBuf,
        hidden: Vec<PathBuf>,
        net_isolated: bool,
        policy: Option<&crate::policy::Policy>,
    ) -> SandboxSpec {
        SandboxSpec {
            workspace,
            workspace_stack: StackSpec::in_dir(dir, "ws"),
            tmp_stack: StackSpec::in_dir(dir, "tmp"),
            control: dir.join("control.sock"),
            command: Vec::new(),
            log: dir.join("command.log"),
            hidden,
            nest_in: None,
            deferred: None,
            net_isolated,
            file_mounts: policy
                .map(crate::policy::Policy::file_mounts)
                .unwrap_or_default(),
            defer: policy.is_some_and(crate::policy::Policy::defers),
            cgroup: None,
        }
    }
}

impl StackSpec {
    /// An overlay with no lowers on `dir/<name>/upper` and `dir/<name>/work`.
    pub fn in_dir(dir: &Path, name: &str) -> StackSpec {
        StackSpec {
            lowers: Vec::new(),
            upper: dir.join(name).join("upper"),
            work: dir.join(name).join("work"),
        }
    }

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

/// How long a pre-started sandbox's setup process may take to answer (that it waits, that
/// the overlays are mounted) before it is killed: [`SETUP_TIMEOUT`], or for tests
/// `FORKSCOPE_SETUP_ANSWER_MS` milliseconds.
fn answer_timeout() -> std::time::Duration {
    std::env::var("FORKSCOPE_SETUP_ANSWER_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map_or(SETUP_TIMEOUT, std::time::Duration::from_millis)
}

/// Starts a sandbox for `spec` in `cgroup`, running `forkscope_bin __init`. Returns once the
/// init listens for exec requests.
pub fn start(
    forkscope_bin: &Path,
    spec: &SandboxSpec,
    spec_file: &Path,
    cgroup: &Cgroup,
) -> Result<Sandbox> {
    let mut w = spawn(forkscope_bin, spec, spec_file, cgroup)?;
    let _ = w.to_setup.write_all(b"done\n");
    let status = w.setup.wait()?;
    if !status.success() {
        return Err(Error::Sandbox(format!("sandbox setup failed ({status})")));
    }
    Ok(w.sandbox.clone())
}

/// A pre-started sandbox waiting for its overlays (see [`SandboxSpec::deferred`]): its init
/// listens, nothing runs in it. Dropped unmounted, its setup process is killed; the caller
/// removes its cgroup.
pub struct Warm {
    pub sandbox: Sandbox,
    setup: std::process::Child,
    to_setup: std::io::PipeWriter,
    from_setup: BufReader<std::io::PipeReader>,
}

/// What [`Warm::request_mount`] sends the waiting setup process.
#[derive(Serialize, Deserialize)]
pub struct DeferredMounts {
    pub workspace_stack: StackSpec,
    pub tmp_stack: StackSpec,
}

/// Puts process `pid` (a sandbox's setup process) in the idle scheduling class, or back in
/// the daemon's own (which it had from its birth). Best effort: one that has exited has
/// nothing left to do.
fn set_idle(pid: u32, idle: bool) {
    let mut param = libc::sched_param { sched_priority: 0 };
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        // SAFETY: sched_getparam writes one sched_param into `param`; both ask about the
        // calling thread (0).
        unsafe {
            libc::sched_getparam(0, &mut param);
            libc::sched_getscheduler(0).max(libc::SCHED_OTHER)
        }
    };
    // SAFETY: sched_setscheduler reads one sched_param from the pointer given.
    let r = unsafe { libc::sched_setscheduler(pid as libc::pid_t, policy, &param) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            log::warn!("scheduling class of the sandbox setup process {pid}: {e}");
        }
    }
}

/// Pre-starts a sandbox for `spec` (which must be [`SandboxSpec::deferred`]).
pub fn start_warm(
    forkscope_bin: &Path,
    spec: &SandboxSpec,
    spec_file: &Path,
    cgroup: &Cgroup,
) -> Result<Warm> {
    // (The setup process, left waiting to mount the overlays, is in the daemon's cgroup,
    // not the sandbox's: a fork may freeze that cgroup while the overlays are being
    // mounted, around the birth of a clone of a process without glibc.)
    let mut w = spawn(forkscope_bin, spec, spec_file, cgroup)?;
    w.to_setup.write_all(b"done\n")?;
    w.wait_ready()?;
    Ok(w)
}

impl Warm {
    /// Asks the setup process (waiting since [`start_warm`]) to mount the overlays and
    /// returns at once: the mounts are made while the caller goes on, [`Mounting::mounted`]
    /// waits for them (they appear in the sandbox at once).
    pub fn request_mount(mut self, ws: &StackSpec, tmp: &StackSpec) -> Result<Mounting> {
        let msg = DeferredMounts {
            workspace_stack: ws.clone(),
            tmp_stack: tmp.clone(),
        };
        let text = serde_json::to_string(&msg).map_err(std::io::Error::from)?;
        // Mounting takes a CPU for about a millisecond, while a fork injects calls into
        // the processes it clones: on a machine with few CPUs, a process woken behind the
        // mounts waits for them. So it mounts only on time no one else wants, until it is
        // waited for ([`Mounting::mounted`]).
        set_idle(self.setup.id(), true);
        self.to_setup
            .write_all(format!("mount {text}\n").as_bytes())?;
        Ok(Mounting(self))
    }

    /// Waits until the part of the setup that built the sandbox has exited (the setup
    /// process then says `waiting`: it can no longer take a request before).
    fn wait_ready(&mut self) -> Result<()> {
        let line = self.answer("starting")?;
        if line.trim() != "waiting" {
            return Err(Error::Sandbox(format!(
                "a pre-started sandbox failed: {}",
                line.trim()
            )));
        }
        Ok(())
    }
}

/// A pre-started sandbox whose overlays are being mounted (see [`Warm::request_mount`]).
/// Dropped before [`Mounting::mounted`], its setup process is killed.
pub struct Mounting(Warm);

impl Mounting {
    /// Waits for the overlays; returns the sandbox.
    pub fn mounted(mut self) -> Result<Sandbox> {
        let w = &mut self.0;
        set_idle(w.setup.id(), false);
        let line = w.answer("mounting the overlays")?;
        if line.trim() != "mounted" {
            return Err(Error::Sandbox(format!(
                "mounting a pre-started sandbox's overlays: {}",
                line.trim()
            )));
        }
        let _ = w.setup.wait();
        Ok(w.sandbox.clone())
    }
}

impl Warm {
    /// The setup process's next line; one that says nothing within [`answer_timeout`] (a
    /// mount blocked on a dead filesystem, say) is killed, and `doing` names what it was
    /// doing in the error: a fork waiting for it never hangs, with the parent's processes
    /// held.
    fn answer(&mut self, doing: &str) -> Result<String> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        if self.from_setup.buffer().is_empty() {
            let timeout = answer_timeout();
            let ms = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
            let ready = loop {
                let mut fds = [PollFd::new(
                    self.from_setup.get_ref().as_fd(),
                    PollFlags::POLLIN,
                )];
                match poll(&mut fds, ms) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    r => break r,
                }
            };
            if matches!(ready, Ok(0)) {
                let _ = self.setup.kill();
                let _ = self.setup.wait();
                return Err(Error::Sandbox(format!(
                    "a pre-started sandbox's setup process ({doing}) did not answer within \
                     {timeout:?}: it was killed"
                )));
            }
        }
        let mut line = String::new();
        self.from_setup.read_line(&mut line)?;
        Ok(line)
    }
}

impl Drop for Warm {
    fn drop(&mut self) {
        // After `mount` the setup process has exited: this only reaps it.
        let _ = self.setup.kill();
        let _ = self.setup.wait();
    }
}

/// Spawns `forkscope __init SPEC`, whose init is born in `cgroup`, and takes it through the
/// user namespace handshake up to the init's pid; the setup process then waits for `done`.
fn spawn(
    forkscope_bin: &Path,
    spec: &SandboxSpec,
    spec_file: &Path,
    cgroup: &Cgroup,
) -> Result<Warm> {
    let spec = SandboxSpec {
        cgroup: Some(cgroup.path().to_path_buf()),
        ..spec.clone()
    };
    let text = serde_json::to_string(&spec).map_err(std::io::Error::from)?;
    std::fs::write(spec_file, text).at(spec_file)?;
    let (to_init_r, mut to_init_w) = std::io::pipe()?;
    let (from_init_r, from_init_w) = std::io::pipe()?;
    // (One expression: the Command, which holds the write end of the setup's stdout, is
    // dropped at once; kept, it would keep the reads below from ever seeing end of file.)
    let mut setup = Command::new(forkscope_bin)
        .arg("__init")
        .arg(spec_file)
        .stdin(Stdio::from(to_init_r))
        .stdout(Stdio::from(from_init_w))
        .stderr(Stdio::inherit())
        // A process group of its own, which the branch's processes inherit: never the
        // daemon's (a `kill 0` in the branch would signal the daemon and whoever shares its
        // group). (Set by posix_spawn: no pre_exec, which would make std fork the daemon.)
        .process_group(0)
        .spawn()
        .map_err(|e| Error::Sandbox(format!("starting {}: {e}", forkscope_bin.display())))?;
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
    let fail = |setup: &mut std::process::Child, e: Error| {
        let _ = setup.kill();
        let _ = setup.wait();
        e
    };
    let mut lines = BufReader::new(from_init_r);
    let mut line = String::new();
    // 1. A process of the setup entered its new user namespace: map ids 1:1 (nested, the
    //    setup did: only a process in the parent user namespace may) and let it go on.
    lines.read_line(&mut line)?;
    let Some(in_userns) = line.trim().strip_prefix("userns ") else {
        let e = Error::Sandbox(format!(
            "sandbox setup failed before the user namespace: {}",
            line.trim()
        ));
        return Err(fail(&mut setup, e));
    };
    if spec.nest_in.is_none() {
        let target: u32 = in_userns.parse().unwrap_or(0);
        if let Err(e) = write_id_maps(Path::new("/proc"), target) {
            return Err(fail(&mut setup, e));
        }
    }
    to_init_w.write_all(b"mapped\n")?;
    // 2. It reports the init's pid once the init is ready, then waits for `done`. The pid
    //    it knows may be that of a nested pid namespace: the host's is found from /proc.
    line.clear();
    lines.read_line(&mut line)?;
    let _ = done.send(());
    if !line.starts_with("init ") {
        let e = Error::Sandbox(format!("sandbox setup failed: {}", line.trim()));
        return Err(fail(&mut setup, e));
    }
    let init_pid = match find_init(pid) {
        Ok(p) => p,
        Err(e) => return Err(fail(&mut setup, e)),
    };
    Ok(Warm {
        sandbox: Sandbox {
            init_pid,
            control: spec.control.clone(),
        },
        setup,
        to_setup: to_init_w,
        from_setup: lines,
    })
}

/// Process `pid`'s pid in each pid namespace it belongs to, the host's first (`NSpid` in
/// /proc/PID/status).
pub fn ns_pids(pid: u32) -> Result<Vec<u32>> {
    let f = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&f).at(&f)?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect())
}

/// The host pid of the init below setup process `setup` (the first process down its tree
/// that is pid 1 of its pid namespace).
fn find_init(setup: u32) -> Result<u32> {
    let mut todo = vec![setup];
    while let Some(p) = todo.pop() {
        let nspid = ns_pids(p).unwrap_or_default();
        if nspid.len() > 1 && nspid.last() == Some(&1) {
            return Ok(p);
        }
        let f = format!("/proc/{p}/task/{p}/children");
        let kids = std::fs::read_to_string(&f).unwrap_or_default();
        todo.extend(
            kids.split_whitespace()
                .filter_map(|k| k.parse::<u32>().ok()),
        );
    }
    Err(Error::Sandbox(format!(
        "sandbox setup: no init found below process {setup}"
    )))
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
