//! `forkscope __init SPEC`: the process that builds a branch's sandbox and then, as pid 1 of
//! the branch's pid namespace, starts and reaps everything that runs in the branch.
//!
//! Talks to [`super::start`] over stdin/stdout: prints `userns` once in the new user
//! namespace and waits for `mapped`, then prints `init <pid>` when the init listens (or
//! `error: ...`) and waits for `done` before it exits. A nested setup (see
//! [`SandboxSpec::nest_in`]) first joins the parent branch's user and pid namespaces and
//! forks: its child, in the parent's pid namespace, goes on from there.

use std::{
    collections::HashMap,
    io::{BufRead, Write},
    os::fd::{AsFd, AsRawFd, OwnedFd, RawFd},
    os::unix::process::CommandExt,
    path::Path,
    process::{Command, Stdio},
};

use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sched::{CloneFlags, setns, unshare},
    sys::{
        signal::{Signal, kill},
        socket::{
            AddressFamily, Backlog, SockFlag, SockType, UnixAddr, accept4, bind, listen, socket,
        },
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
    unistd::{ForkResult, Pid, fork},
};

use super::{
    SandboxSpec,
    control::{self, ExecReply, ExecRequest, TerminalRequest},
    mounts,
    terminal::Terminals,
};
use crate::error::{Error, Result};

/// Runs the setup process; never returns on success (it exits after forking the init).
pub fn main(spec_file: &Path) -> Result<()> {
    let text = std::fs::read_to_string(spec_file)
        .map_err(|e| Error::Sandbox(format!("{}: {e}", spec_file.display())))?;
    let spec: SandboxSpec = serde_json::from_str(&text).map_err(std::io::Error::from)?;
    let result = setup(&spec);
    if let Err(e) = &result {
        println!("error: {e}");
        let _ = std::io::stdout().flush();
    }
    result
}

fn setup(spec: &SandboxSpec) -> Result<()> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .map_err(|e| Error::Sandbox(format!("{}: {e}", spec.log.display())))?;
    let listener = control_socket(&spec.control)?;
    // Nested, the maps are written from here, after the mounts turn /proc read-only: keep
    // the host's /proc open from before.
    let host_proc = match spec.nest_in {
        Some(_) => Some(std::fs::File::open("/proc")?),
        None => None,
    };
    let deferred = mounts::setup(spec)?;
    // The cgroup the init is born in, opened through the sandbox's read-only view of the
    // host: a setup process below is visible to the parent branch's processes (its
    // /proc/PID/fd), and a descriptor of the host's writable mount would let them climb out
    // of it (`..` from a magic link). clone3 checks the cgroup's permissions, not its mount's.
    let cgroup = match &spec.cgroup {
        Some(p) => std::fs::File::open(p)
            .map_err(|e| Error::Sandbox(format!("the branch's cgroup {}: {e}", p.display())))?,
        None => {
            return Err(Error::Sandbox(
                "the sandbox spec names no cgroup for the init".into(),
            ));
        }
    };
    if let Some(deferred) = deferred {
        // This process stays in the host's user namespace to mount the overlays later (see
        // `mounter`); a child goes on to build the rest.
        let mounter_pid = Pid::this();
        // SAFETY: single-threaded (no runtime has started), so the child may run anything.
        match unsafe { fork() }.map_err(|e| Error::Sandbox(format!("fork: {e}")))? {
            ForkResult::Parent { child } => mounter(spec, &deferred, child),
            // The writable state directory must not stay open in the branch's processes.
            ForkResult::Child => {
                drop(deferred);
                die_with_parent(Some(mounter_pid))?;
            }
        }
    }
    match (spec.nest_in, host_proc) {
        (Some(parent_init), Some(proc_dir)) => join_parent(parent_init, proc_dir)?,
        _ => unshare(CloneFlags::CLONE_NEWUSER)
            .map_err(|e| Error::Sandbox(format!("unshare(CLONE_NEWUSER): {e}")))?,
    }
    println!("userns {}", std::process::id());
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if line.trim() != "mapped" {
        return Err(Error::Sandbox(
            "the daemon did not map the user namespace".into(),
        ));
    }
    // A new mount namespace owned by the new user namespace: the mounts copied into it are
    // locked, so the branch cannot unmount or remount them.
    let mut flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID;
    if spec.net_isolated {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    unshare(flags).map_err(|e| Error::Sandbox(format!("unshare({flags:?}): {e}")))?;
    // The init says when its /proc is mounted and its filter installed: only then may
    // processes be cloned into the branch (they find the init as pid 1 of that /proc).
    let (ready_r, ready_w) = std::io::pipe()?;
    // The init is born in the branch's cgroup.
    // SAFETY: this process is single-threaded (no runtime has started), so the child may run
    // arbitrary code after the fork.
    let born = unsafe { crate::cgroup::fork_into(&cgroup) }
        .map_err(|e| Error::Sandbox(format!("starting the init: {e}")))?;
    let born = match born {
        0 => ForkResult::Child,
        pid => ForkResult::Parent {
            child: Pid::from_raw(pid),
        },
    };
    drop(cgroup);
    match born {
        ForkResult::Parent { child } => {
            drop(ready_w);
            let mut ready = [0u8; 1];
            let mut r = ready_r;
            if std::io::Read::read_exact(&mut r, &mut ready).is_err() {
                return Err(Error::Sandbox(
                    "the init died while it set itself up (see the daemon's log)".into(),
                ));
            }
            println!("init {child}");
            std::io::stdout().flush()?;
            // The daemon reads the init's host pid from /proc while this process lives.
            line.clear();
            let _ = std::io::stdin().lock().read_line(&mut line);
            std::process::exit(0);
        }
        ForkResult::Child => {
            // Dumpable again (a nested setup was not): the branch's own processes, and the
            // clones a fork places here, open its /proc/1/ns files.
            if let Err(e) = set_dumpable(true) {
                crate::say!("forkscope init: {e}");
                std::process::exit(1);
            }
            // Let go of the pipes to the daemon: it reads until they close.
            if let Ok(null) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                let _ = nix::unistd::dup2_stdin(&null);
                let _ = nix::unistd::dup2_stdout(&null);
            }
            drop(ready_r);
            let code = match init(spec, listener, log, ready_w) {
                Ok(()) => 0,
                Err(e) => {
                    crate::say!("forkscope init: {e}");
                    1
                }
            };
            std::process::exit(code);
        }
    }
}

/// Makes the calling setup process die with its parent (`PR_SET_PDEATHSIG`): it lives in
/// the daemon's cgroup, where no `cgroup.kill` of the branch reaches it, so a setup cut
/// short above it (killed by the daemon, say) takes it along. With `parent` given, a parent
/// already gone is an error. (A child of fork() does not inherit the setting: the init
/// never has it.)
fn die_with_parent(parent: Option<Pid>) -> Result<()> {
    prctl(
        libc::PR_SET_PDEATHSIG,
        libc::SIGKILL as libc::c_ulong,
        "PR_SET_PDEATHSIG",
    )?;
    if parent.is_some_and(|p| nix::unistd::getppid() != p) {
        return Err(Error::Sandbox("the setup's parent is gone".into()));
    }
    Ok(())
}

/// Sets whether this process is dumpable (`PR_SET_DUMPABLE`): a process that is not has
/// its /proc files owned by root of the host, and open only to holders of CAP_SYS_PTRACE
/// in the user namespace it was started in.
fn set_dumpable(on: bool) -> Result<()> {
    prctl(
        libc::PR_SET_DUMPABLE,
        libc::c_ulong::from(on),
        "PR_SET_DUMPABLE",
    )
}

/// `prctl(option, value)` for an option that takes one number (`name` for the error).
fn prctl(option: libc::c_int, value: libc::c_ulong, name: &str) -> Result<()> {
    // SAFETY: the options this is called with take a number and no memory.
    if unsafe { libc::prctl(option, value) } != 0 {
        return Err(Error::Sandbox(format!(
            "prctl({name}): {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// The setup process of a pre-started sandbox once the rest is built: waits for the part
/// that built it to finish, says `waiting`, and mounts the overlays it is sent (`mount
/// {json}`), which propagate into the branch's mount namespace; then exits.
fn mounter(spec: &SandboxSpec, deferred: &mounts::Deferred, line_pid: Pid) -> ! {
    let built = matches!(waitpid(line_pid, None), Ok(WaitStatus::Exited(_, 0)));
    if !built {
        std::process::exit(1);
    }
    // The daemon may be gone (it was killed): nothing to say then.
    let mut out = std::io::stdout();
    let _ = writeln!(out, "waiting").and_then(|()| out.flush());
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line).unwrap_or(0) == 0 {
        std::process::exit(0); // the daemon let it go unused
    }
    // Fault injection for tests: a mount that never ends.
    if crate::fault::armed("mount-hang") {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
    let mounted = line
        .trim()
        .strip_prefix("mount ")
        .ok_or_else(|| Error::Sandbox(format!("unexpected request {:?}", line.trim())))
        .and_then(|json| {
            serde_json::from_str::<super::DeferredMounts>(json)
                .map_err(|e| Error::Sandbox(format!("bad mount request: {e}")))
        })
        .and_then(|m| {
            mounts::mount_deferred(deferred, &spec.workspace, &m.workspace_stack, &m.tmp_stack)
        });
    let _ = match mounted {
        Ok(()) => writeln!(out, "mounted"),
        Err(e) => writeln!(out, "error: {e}"),
    }
    .and_then(|()| out.flush());
    std::process::exit(0);
}

/// Joins the user and pid namespaces of the parent branch's init (`parent_init`, a host
/// pid) and forks. The child (a member of the parent branch's pid namespace) makes its own
/// user namespace and returns to build the sandbox; the parent maps its ids (only a process
/// in the parent user namespace may), then waits for it and exits with its status.
fn join_parent(parent_init: u32, host_proc: std::fs::File) -> Result<()> {
    let open = |ns: &str| {
        let p = format!("/proc/{parent_init}/ns/{ns}");
        std::fs::File::open(&p).map_err(|e| Error::Sandbox(format!("{p}: {e}")))
    };
    let (user, pid) = (open("user")?, open("pid")?);
    setns(&user, CloneFlags::CLONE_NEWUSER)
        .map_err(|e| Error::Sandbox(format!("joining the parent's user namespace: {e}")))?;
    setns(&pid, CloneFlags::CLONE_NEWPID)
        .map_err(|e| Error::Sandbox(format!("joining the parent's pid namespace: {e}")))?;
    let (ready_r, ready_w) = std::io::pipe()?;
    let (mapped_r, mapped_w) = std::io::pipe()?;
    // SAFETY: single-threaded (no runtime has started), so the child may run anything.
    match unsafe { fork() }.map_err(|e| Error::Sandbox(format!("fork: {e}")))? {
        ForkResult::Child => {
            // (Its parent is outside its pid namespace: no pid to check.)
            die_with_parent(None)?;
            // This process is visible to the parent branch's processes: not dumpable, its
            // /proc/PID/root, /fd and /mem are closed to them (they hold no capability in
            // the host's user namespace); the init it forks makes itself dumpable again.
            set_dumpable(false)?;
            // The host's /proc must not be reachable from here either.
            drop(host_proc);
            drop((ready_r, mapped_w));
            let made = unshare(CloneFlags::CLONE_NEWUSER)
                .map_err(|e| Error::Sandbox(format!("unshare(CLONE_NEWUSER): {e}")));
            let mut w = ready_w;
            w.write_all(if made.is_ok() { b"1" } else { b"0" })?;
            drop(w);
            made?;
            let mut ok = [0u8; 1];
            let mut r = mapped_r;
            std::io::Read::read_exact(&mut r, &mut ok)?;
            if ok != *b"1" {
                return Err(Error::Sandbox(
                    "mapping the nested user namespace failed".into(),
                ));
            }
            Ok(())
        }
        ForkResult::Parent { child } => {
            drop((ready_w, mapped_r));
            let mut ready = [0u8; 1];
            let mut r = ready_r;
            let mut w = mapped_w;
            if std::io::Read::read_exact(&mut r, &mut ready).is_ok() && ready == *b"1" {
                let proc_root = format!("/proc/self/fd/{}", host_proc.as_raw_fd());
                let mapped = super::write_id_maps(Path::new(&proc_root), child.as_raw() as u32);
                if let Err(e) = &mapped {
                    println!("error: {e}");
                    let _ = std::io::stdout().flush();
                }
                let _ = w.write_all(if mapped.is_ok() { b"1" } else { b"0" });
            }
            drop(w);
            let code = match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, c)) => c,
                _ => 1,
            };
            std::process::exit(code);
        }
    }
}

/// Brings up `lo` in the branch's own network namespace.
fn loopback_up() -> Result<()> {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| Error::Sandbox(format!("socket: {e}")))?;
    // SAFETY: an all-zero ifreq is valid; the name is NUL-terminated within IFNAMSIZ.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS and SIOCSIFFLAGS read and write the ifreq given, on a valid socket.
    unsafe {
        if libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(Error::Sandbox(format!(
                "reading lo's flags: {}",
                std::io::Error::last_os_error()
            )));
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(fd.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(Error::Sandbox(format!(
                "bringing lo up: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// Binds the control socket (before the mounts turn the state directory read-only).
fn control_socket(path: &Path) -> Result<OwnedFd> {
    let _ = std::fs::remove_file(path);
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| Error::Sandbox(format!("socket: {e}")))?;
    let addr =
        UnixAddr::new(path).map_err(|e| Error::Sandbox(format!("{}: {e}", path.display())))?;
    bind(fd.as_raw_fd(), &addr)
        .map_err(|e| Error::Sandbox(format!("bind {}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    listen(&fd, Backlog::new(64).expect("valid backlog"))
        .map_err(|e| Error::Sandbox(format!("listen: {e}")))?;
    Ok(fd)
}

/// The init: pid 1 of the branch.
fn init(
    spec: &SandboxSpec,
    listener: OwnedFd,
    log: std::fs::File,
    ready: std::io::PipeWriter,
) -> Result<()> {
    if let Err(e) = mounts::mount_proc() {
        crate::say!("forkscope init: {e} (the branch sees the host's /proc)");
    }
    if spec.net_isolated {
        loopback_up()?;
    }
    // Pre-started, the workspace is mounted later: exec requests name their directory.
    if spec.deferred.is_none() {
        std::env::set_current_dir(&spec.workspace)?;
    } else {
        std::env::set_current_dir("/")?;
    }
    super::seccomp::install()?;
    // Kept open for the init's life: the daemon takes copies of it (see sandbox::notify).
    let _listener = if spec.defer {
        Some(super::notify::install()?)
    } else {
        None
    };
    let mut ready = ready;
    ready.write_all(b"1")?;
    drop(ready);
    // Processes that exec'd requests started, with the connection waiting for their status.
    let mut running: HashMap<i32, Running> = HashMap::new();
    let mut terminals = Terminals::default();
    let mut terminal_log = log.try_clone()?;
    if !spec.command.is_empty() {
        let err = log.try_clone()?;
        // Each command in a process group of its own, as a shell runs each job: a
        // `kill 0` in it (`trap 'kill 0' EXIT`, say) stops that command's processes only.
        let started = Command::new(&spec.command[0])
            .args(&spec.command[1..])
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn();
        if let Err(e) = started {
            crate::say!("forkscope init: starting {:?}: {e}", spec.command);
        }
    }
    loop {
        let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        let conns: Vec<(i32, RawFd)> = running
            .iter()
            .map(|(p, r)| (*p, r.conn.as_raw_fd()))
            .collect();
        for (_, c) in &conns {
            // SAFETY: the descriptors are owned by `running` and outlive this poll.
            fds.push(PollFd::new(
                unsafe { std::os::fd::BorrowedFd::borrow_raw(*c) },
                PollFlags::POLLIN,
            ));
        }
        let wanted = terminals.wanted();
        let terminals_end = 1 + conns.len() + wanted.len();
        for (fd, events) in wanted {
            // SAFETY: the descriptors are owned by `terminals`, untouched until after the
            // poll.
            fds.push(PollFd::new(
                unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
                events,
            ));
        }
        // A started process's exit wakes the loop at once (its status is then sent); the
        // timeout only paces the reaping of the rest (orphans, clones without an exit
        // signal).
        let mut watched = Vec::new();
        for (pid, r) in &running {
            if let Some(exited) = &r.exited {
                fds.push(PollFd::new(exited.as_fd(), PollFlags::POLLIN));
                watched.push(*pid);
            }
        }
        let _ = poll(&mut fds, PollTimeout::from(100u16));
        let events: Vec<PollFlags> = fds
            .iter()
            .map(|f| f.revents().unwrap_or(PollFlags::empty()))
            .collect();
        let ready: Vec<bool> = events.iter().map(|r| !r.is_empty()).collect();
        drop(fds);
        terminals.serve(&events[1 + conns.len()..terminals_end], &mut terminal_log);
        // (Close-on-exec: a command started later must not hold the connection.)
        if ready[0]
            && let Ok(conn) = accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC)
        {
            {
                // SAFETY: accept returned a new descriptor that nothing else owns.
                let conn = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(conn) };
                if let Some(pid) = start_request(spec, &conn, &mut terminals) {
                    let exited = pidfd_open(pid);
                    running.insert(pid, Running { conn, exited });
                }
            }
        }
        // A client that went away (Ctrl-C) takes its command with it: the command's
        // process group (what it started in the background too), and the command itself
        // if it left the group.
        for (i, (pid, _)) in conns.iter().enumerate() {
            if ready[i + 1] {
                let _ = kill(Pid::from_raw(-*pid), Signal::SIGKILL);
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
        }
        reap(&mut running);
        // An exited process the reaping did not get (a zombie another process still
        // traces) keeps its pidfd readable: it is not polled again, or the loop would spin;
        // the timeout paces it as before.
        for (i, pid) in watched.iter().enumerate() {
            if !events[terminals_end + i].is_empty()
                && let Some(r) = running.get_mut(pid)
            {
                r.exited = None;
            }
        }
    }
}

/// Reads one request from `conn` and starts it; replies with the pid or an error. A
/// terminal request is served by `terminals`.
fn start_request(spec: &SandboxSpec, conn: &OwnedFd, terminals: &mut Terminals) -> Option<i32> {
    let reply = |r: &ExecReply| {
        let _ = control::send(
            conn.as_raw_fd(),
            &serde_json::to_vec(r).unwrap_or_default(),
            &[],
        );
    };
    // A client that connects and says nothing within a second must not hold up the init
    // (its loop serves the other clients, the terminals and the reaping). Waited for with
    // poll, retried when a freeze of the branch interrupts it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
        match poll(
            &mut fds,
            PollTimeout::try_from(left).unwrap_or(PollTimeout::ZERO),
        ) {
            Ok(0) => {
                reply(&ExecReply::Error("no request within a second".into()));
                return None;
            }
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                reply(&ExecReply::Error(format!("waiting for the request: {e}")));
                return None;
            }
        }
    }
    let (msg, mut stdio) = match control::recv(conn.as_raw_fd()) {
        Ok(m) => m,
        Err(e) => {
            reply(&ExecReply::Error(e.to_string()));
            return None;
        }
    };
    let req: ExecRequest = match serde_json::from_slice(&msg) {
        Ok(r) => r,
        Err(e) => {
            reply(&ExecReply::Error(format!("bad request: {e}")));
            return None;
        }
    };
    match req.terminal {
        Some(TerminalRequest::New { settings }) => {
            match terminals.create(settings.as_ref()) {
                Ok(path) => reply(&ExecReply::Terminal(path)),
                Err(e) => reply(&ExecReply::Error(e.to_string())),
            }
            return None;
        }
        Some(TerminalRequest::Attach { path }) => {
            match conn.try_clone() {
                Ok(c) => terminals.attach(path.as_deref(), c),
                Err(e) => reply(&ExecReply::Error(e.to_string())),
            }
            return None;
        }
        None => {}
    }
    if req.argv.is_empty() || stdio.len() != 3 {
        reply(&ExecReply::Error(
            "a request needs a command and three descriptors".into(),
        ));
        return None;
    }
    let stderr = stdio.pop().expect("three");
    let stdout = stdio.pop().expect("three");
    let stdin = stdio.pop().expect("three");
    let mut cmd = Command::new(&req.argv[0]);
    cmd.args(&req.argv[1..])
        .process_group(0)
        .current_dir(req.cwd.as_deref().unwrap_or(&spec.workspace))
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr));
    match cmd.spawn() {
        Ok(child) => {
            let pid = child.id() as i32;
            reply(&ExecReply::Pid(pid));
            Some(pid)
        }
        Err(e) => {
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            reply(&ExecReply::Error(format!("{}: {e}", req.argv[0])));
            reply(&ExecReply::ExitCode(code));
            None
        }
    }
}

/// Reaps every exited process (the init adopts orphans too) and reports the ones a client
/// waits for.
/// A process an exec request started.
struct Running {
    /// The client's connection, waiting for the exit status.
    conn: OwnedFd,
    /// Readable once the process has exited (a pidfd; none where the kernel has no
    /// pidfd_open: then the loop's timeout paces the answer).
    exited: Option<OwnedFd>,
}

/// A descriptor of process `pid` that becomes readable when it exits (`pidfd_open`).
fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; it returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a descriptor pidfd_open just returned, owned by nothing else.
    (fd >= 0).then(|| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as RawFd) })
}

fn reap(running: &mut HashMap<i32, Running>) {
    loop {
        // __WALL: clones forked into child branches (exit signal 0) are this init's
        // children too (see crate::procfork).
        let (pid, reply) = match waitpid(None, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Exited(p, c)) => (p.as_raw(), ExecReply::ExitCode(c)),
            Ok(WaitStatus::Signaled(p, s, _)) => (p.as_raw(), ExecReply::Signal(s as i32)),
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => continue,
        };
        if let Some(Running { conn, .. }) = running.remove(&pid) {
            let _ = control::send(
                conn.as_raw_fd(),
                &serde_json::to_vec(&reply).unwrap_or_default(),
                &[],
            );
        }
    }
}
