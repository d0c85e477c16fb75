//! What a process to be cloned holds, read from /proc while it is held, and what its clone
//! does with each piece: which descriptors are re-opened on the child's files, which are
//! replaced or closed, and what makes the process impossible to clone faithfully (a refusal
//! that names the process and the reason).

use std::path::{Path, PathBuf};

use super::open_copies::OpenForWriting;
use crate::error::{Error, Result};

/// What the clone does with one of its descriptors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FdAction {
    /// Open the same path in the child's mount namespace (the child's copy for workspace and
    /// /tmp files, the same read-only file elsewhere), same flags and offset.
    Reopen { path: PathBuf, flags: i32, pos: u64 },
    /// The child branch's own command log (the parent's log, or a pipe on 1 or 2).
    ChildLog,
    /// /dev/null (a pipe on 0).
    DevNull,
    /// Closed in the clone (sockets, pipes beyond stdio): the parent keeps it.
    Close,
    /// A terminal of the child's own (made by the child's init, see
    /// [`crate::sandbox::terminal`]) in place of the parent's terminal `original`, with the
    /// same status flags.
    Terminal { original: PathBuf, flags: i32 },
    /// A listening TCP socket made again in the clone, in the child's own network namespace
    /// (`run --net isolated`): same family, address and port, non-blocking if it was.
    Listen {
        v6: bool,
        addr: [u8; 16],
        port: u16,
        flags: i32,
    },
}

/// A process to clone and the plan for its clone.
#[derive(Clone, Debug)]
pub struct Target {
    pub pid: u32,
    pub comm: String,
    /// Its working directory.
    pub cwd: PathBuf,
    pub fds: Vec<(i32, FdAction)>,
    /// Its workspace and /tmp files open for writing: the child's copies are made before
    /// its overlays are mounted ([`super::open_copies`]).
    pub written: Vec<OpenForWriting>,
    /// It has a controlling terminal: its clone leads a session of its own, whose
    /// controlling terminal is the clone's terminal if it has one.
    pub ctty: bool,
    /// What the clone does not faithfully own, reported to the caller.
    pub notes: Vec<String>,
}

/// What the inspection needs to know about the branch.
pub struct Context<'a> {
    pub workspace: &'a Path,
    /// The parent branch's command log (its processes' stdout and stderr).
    pub parent_log: &'a Path,
    /// The branches have network namespaces of their own.
    pub net_isolated: bool,
    /// The parent branch's directory, where forks mark the processes they inject into.
    pub marks: &'a Path,
}

/// The processes of a branch to clone: every process in its cgroup but its init.
pub fn targets(cgroup: &Path, init_pid: u32) -> Result<Vec<u32>> {
    let f = cgroup.join("cgroup.procs");
    let text = std::fs::read_to_string(&f).map_err(|e| Error::Io {
        path: f.clone(),
        cause: e,
    })?;
    Ok(text
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|p| *p != init_pid)
        .collect())
}

fn refuse(pid: u32, comm: &str, why: impl std::fmt::Display) -> Error {
    Error::CannotClone(format!(
        "process {pid} ({comm}) cannot be cloned: {why}; nothing was forked"
    ))
}

fn read(path: String) -> Result<String> {
    std::fs::read_to_string(&path).map_err(|e| {
        if e.raw_os_error() == Some(libc::ESRCH) || e.kind() == std::io::ErrorKind::NotFound {
            Error::Sandbox(format!("{path}: the process exited during the fork"))
        } else {
            Error::Io {
                path: path.into(),
                cause: e,
            }
        }
    })
}

/// The value of `key:` in /proc/PID/status.
fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

/// Checks what must hold before a process is seized: no children, not traced by
/// someone else (`held`: by us), a top-level process of the branch (its parent is the
/// branch's init, or outside the branch: a clone's parent is the init of the branch its
/// line of clones started in). `procs` are the branch's processes. Returns its name.
pub fn precheck(pid: u32, init_pid: u32, procs: &[u32], held: bool) -> Result<String> {
    let status = read(format!("/proc/{pid}/status"))?;
    let comm = status_field(&status, "Name").unwrap_or("?").to_string();
    let field = |k: &str| status_field(&status, k).unwrap_or("0").to_string();
    let ppid: u32 = field("PPid").parse().unwrap_or(0);
    if ppid != init_pid && procs.contains(&ppid) {
        return Err(refuse(
            pid,
            &comm,
            format!(
                "it is a child of process {ppid} of the branch (process trees are not cloned yet)"
            ),
        ));
    }
    let threads: u32 = field("Threads").parse().unwrap_or(1);
    if threads > 1 && field("State").starts_with('Z') {
        return Err(refuse(
            pid,
            &comm,
            "its main thread has exited while its other threads run",
        ));
    }
    let tracer = field("TracerPid");
    if tracer != "0" && !held {
        return Err(refuse(
            pid,
            &comm,
            format!("it is traced by process {tracer} (a debugger?)"),
        ));
    }
    let mut children = String::new();
    for tid in std::iter::once(pid).chain(super::threads::other_threads(pid)?) {
        // A thread that ended meanwhile has no children left.
        if let Ok(c) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/children")) {
            children.push_str(&c);
        }
    }
    if !children.trim().is_empty() {
        return Err(refuse(
            pid,
            &comm,
            format!(
                "it has child processes ({}): process trees are not cloned yet (fork with --fresh to start the command afresh)",
                children.trim()
            ),
        ));
    }
    Ok(comm)
}

/// Devices a clone may open again: they hold no state.
const STATELESS_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

fn is_terminal(link: &str) -> bool {
    link.starts_with("/dev/pts/") || link.starts_with("/dev/tty") || link == "/dev/console"
}

/// Plans the clone of a held process.
pub fn inspect(pid: u32, comm: &str, ctx: &Context) -> Result<Target> {
    let mut notes = Vec::new();
    let cwd_link = std::fs::read_link(format!("/proc/{pid}/cwd"))
        .map_err(|e| Error::Sandbox(format!("the working directory of process {pid}: {e}")))?;
    let cwd = match cwd_link.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(_) => {
            notes.push(format!(
                "process {pid} ({comm}): its working directory was deleted; the clone starts in the workspace"
            ));
            ctx.workspace.to_path_buf()
        }
        None => cwd_link,
    };
    check_maps(pid, comm, ctx)?;
    let mut fds = Vec::new();
    let mut written = Vec::new();
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|e| Error::Sandbox(format!("{dir}: {e}")))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::Sandbox(format!("{dir}: {e}")))?;
        let Some(num) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(link) = std::fs::read_link(entry.path()) else {
            continue; // closed meanwhile
        };
        let link = link.to_string_lossy().into_owned();
        if let Some(action) = plan_fd(pid, comm, num, &link, ctx, &mut notes)? {
            if let FdAction::Reopen { path, flags, .. } = &action
                && let Some(ino) = written_file(pid, num, path, *flags, ctx)
            {
                written.push(OpenForWriting {
                    fd: num,
                    path: path.clone(),
                    ino,
                });
            }
            fds.push((num, action));
        }
    }
    fds.sort_by_key(|(n, _)| *n);
    let ctty = has_controlling_terminal(pid)?;
    if ctty {
        notes.push(format!(
            "process {pid} ({comm}): it has a controlling terminal; its clone leads a session of its own"
        ));
    }
    Ok(Target {
        pid,
        comm: comm.to_string(),
        cwd,
        fds,
        written,
        ctty,
        notes,
    })
}

/// The inode number (as the process sees it) of descriptor `num`, if it is a regular file
/// of the workspace or /tmp open for writing. (Asked through the descriptor: the path means
/// something else in the daemon's mount namespace.)
fn written_file(pid: u32, num: i32, path: &Path, flags: i32, ctx: &Context) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let private = path.starts_with(ctx.workspace) || path.starts_with("/tmp");
    if !private || flags & libc::O_ACCMODE == libc::O_RDONLY {
        return None;
    }
    let meta = std::fs::metadata(format!("/proc/{pid}/fd/{num}")).ok()?;
    meta.is_file().then(|| meta.ino())
}

/// Whether process `pid` has a controlling terminal (`tty_nr`, the 7th field of
/// /proc/PID/stat, counted after the parenthesised name, which may hold spaces).
fn has_controlling_terminal(pid: u32) -> Result<bool> {
    let stat = read(format!("/proc/{pid}/stat"))?;
    let after_name = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    Ok(after_name
        .split_whitespace()
        .nth(4)
        .is_some_and(|tty| tty != "0"))
}

/// Flags and offset of descriptor `num`, from /proc/PID/fdinfo, and whether the process
/// holds fcntl (POSIX) locks on its file.
fn fdinfo(pid: u32, num: i32) -> Result<(i32, u64, bool)> {
    let text = read(format!("/proc/{pid}/fdinfo/{num}"))?;
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(str::trim)
            .unwrap_or("0")
            .to_string()
    };
    let flags = i32::from_str_radix(&get("flags:"), 8).unwrap_or(0);
    let pos = get("pos:").parse().unwrap_or(0);
    let locked = text
        .lines()
        .any(|l| l.starts_with("lock:") && l.contains("POSIX"));
    Ok((flags, pos, locked))
}

fn plan_fd(
    pid: u32,
    comm: &str,
    num: i32,
    link: &str,
    ctx: &Context,
    notes: &mut Vec<String>,
) -> Result<Option<FdAction>> {
    let stdio_replacement = |what: &str, notes: &mut Vec<String>| {
        let action = match num {
            0 => FdAction::DevNull,
            1 | 2 => FdAction::ChildLog,
            _ => FdAction::Close,
        };
        let given = match action {
            FdAction::DevNull => "/dev/null",
            FdAction::ChildLog => "the child's own log",
            _ => "nothing (closed)",
        };
        notes.push(format!(
            "process {pid} ({comm}): fd {num} ({what}) is shared with the parent; the clone gets {given}"
        ));
        action
    };
    if let Some(ino) = link
        .strip_prefix("socket:[")
        .and_then(|r| r.strip_suffix(']'))
    {
        if let Some((v6, addr, port)) = listening(pid, ino) {
            if ctx.net_isolated {
                let (flags, _, _) = fdinfo(pid, num)?;
                return Ok(Some(FdAction::Listen {
                    v6,
                    addr,
                    port,
                    flags,
                }));
            }
            notes.push(format!(
                "process {pid} ({comm}): fd {num} listens on port {port}, closed in the clone: the branches share the host's network (`run --net isolated` gives each its own, and the clone its own listening socket)"
            ));
        } else {
            notes.push(format!(
                "process {pid} ({comm}): fd {num} is a socket, closed in the clone (the parent keeps it)"
            ));
        }
        return Ok(Some(FdAction::Close));
    }
    if link.starts_with("pipe:") {
        if num <= 2 {
            return Ok(Some(stdio_replacement("a pipe", notes)));
        }
        notes.push(format!(
            "process {pid} ({comm}): fd {num} is a pipe, closed in the clone (the parent keeps it)"
        ));
        return Ok(Some(FdAction::Close));
    }
    // A namespace (`mnt:[...]`, `pid:[...]`, ...): the clone has no use for the parent's.
    if let Some((kind, rest)) = link.split_once(":[")
        && rest.ends_with(']')
        && ["mnt", "pid", "user", "net", "uts", "ipc", "cgroup", "time"].contains(&kind)
    {
        notes.push(format!(
            "process {pid} ({comm}): fd {num} is a namespace ({link}), closed in the clone"
        ));
        return Ok(Some(FdAction::Close));
    }
    if is_terminal(link) {
        let note = format!(
            "process {pid} ({comm}): its terminal {link} stays the parent's; the clone gets a terminal of its own (`forkscope attach` connects to it)"
        );
        if !notes.contains(&note) {
            notes.push(note);
        }
        let (flags, _, _) = fdinfo(pid, num)?;
        return Ok(Some(FdAction::Terminal {
            original: PathBuf::from(link),
            flags,
        }));
    }
    if link.starts_with("anon_inode:") || link.starts_with("/memfd:") {
        return Err(refuse(
            pid,
            comm,
            format!(
                "fd {num} is {link}, kernel state the clone would share with the parent branch"
            ),
        ));
    }
    let path = Path::new(link);
    if path == ctx.parent_log {
        return Ok(Some(FdAction::ChildLog));
    }
    if link.ends_with(" (deleted)") {
        notes.push(format!(
            "process {pid} ({comm}): fd {num} is an unlinked file ({link}), shared with the parent"
        ));
        return Ok(None);
    }
    if path.starts_with("/dev/shm") {
        return Err(refuse(
            pid,
            comm,
            format!("fd {num} is shared memory ({link})"),
        ));
    }
    if path.starts_with("/dev") && !STATELESS_DEVICES.contains(&link) {
        return Err(refuse(pid, comm, format!("fd {num} is a device ({link})")));
    }
    if !path.is_absolute() {
        return Err(refuse(
            pid,
            comm,
            format!("fd {num} is {link}, which the clone cannot open again"),
        ));
    }
    let (flags, pos, locked) = fdinfo(pid, num)?;
    if locked {
        notes.push(format!(
            "process {pid} ({comm}): its fcntl locks on {link} are not held by the clone"
        ));
    }
    Ok(Some(FdAction::Reopen {
        path: path.to_path_buf(),
        flags,
        pos,
    }))
}

/// The family, address and port of socket `ino` of process `pid` if it is a listening TCP
/// socket (from /proc/PID/net/tcp and tcp6: addresses are printed as 32-bit words in host
/// order, ports in hex).
fn listening(pid: u32, ino: &str) -> Option<(bool, [u8; 16], u16)> {
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")).ok()?;
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[9] != ino || f[3] != "0A" {
                continue;
            }
            let (addr_hex, port_hex) = f[1].split_once(':')?;
            let mut addr = [0u8; 16];
            for (i, word) in addr_hex.as_bytes().chunks(8).enumerate().take(4) {
                let w = u32::from_str_radix(std::str::from_utf8(word).ok()?, 16).ok()?;
                addr[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            let port = u16::from_str_radix(port_hex, 16).ok()?;
            return Some((v6, addr, port));
        }
    }
    None
}

/// Refuses shared mappings the clone would share with the parent: anonymous shared memory,
/// SysV segments, memfds, /dev/shm, and files of the workspace or /tmp.
fn check_maps(pid: u32, comm: &str, ctx: &Context) -> Result<()> {
    let maps = read(format!("/proc/{pid}/maps"))?;
    for line in maps.lines() {
        let f: Vec<&str> = line.splitn(6, ' ').collect();
        if f.len() < 5 || f[1].as_bytes().get(3) != Some(&b's') {
            continue;
        }
        let what = f.get(5).map(|s| s.trim()).unwrap_or("");
        let shared_state = what.is_empty()
            || what.starts_with("/dev/zero")
            || what.starts_with("/SYSV")
            || what.starts_with("/memfd:")
            || what.starts_with("/dev/shm")
            || Path::new(what).starts_with(ctx.workspace)
            || Path::new(what).starts_with("/tmp");
        if shared_state {
            let name = if what.is_empty() {
                "anonymous shared memory"
            } else {
                what
            };
            return Err(refuse(
                pid,
                comm,
                format!(
                    "it has a shared mapping of {name} that its clone would share with the parent (re-pointing shared mappings is not built yet)"
                ),
            ));
        }
    }
    Ok(())
}
