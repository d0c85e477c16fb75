//! What a process to be cloned holds, read from /proc while it is held, and what its clone
//! does with each piece: which descriptors are re-opened on the child's files, which are
//! replaced or closed, and what makes the process impossible to clone faithfully (a refusal
//! that names the process and the reason).

use std::{
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
};

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
    /// Another descriptor of the open file of the clone's descriptor `of`, planned before
    /// it (`dup`, a shell's `> log 2>&1`): dup'd from it, so that the two share one offset
    /// in the clone as they do in the original. `cloexec`: its own close-on-exec flag.
    Same { of: i32, cloexec: i32 },
    /// A terminal of the child's own (made by the child's init, see
    /// [`crate::sandbox::terminal`]) in place of the parent's terminal `id`, with the same
    /// status flags.
    Terminal { id: TerminalId, flags: i32 },
    /// A listening TCP socket made again in the clone, in the child's own network namespace
    /// (`run --net isolated`): same family, address and port, non-blocking if it was.
    Listen {
        v6: bool,
        addr: [u8; 16],
        port: u16,
        flags: i32,
    },
}

/// A terminal: the device of its devpts instance (or of the filesystem holding its device
/// node) and its device number. (Each devpts instance numbers its terminals from 0, so the
/// device number alone does not tell two terminals apart.)
pub type TerminalId = (u64, u64);

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
    /// Its controlling terminal, if it has one (its devpts instance 0 where none of its
    /// descriptors tells it): its clone then runs in a session of its own (never on the
    /// parent's terminal).
    pub ctty: Option<TerminalId>,
    /// It leads its session: its clone leads its own, on the terminal that replaces its
    /// controlling terminal.
    pub session_leader: bool,
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
            Error::Conflict(format!(
                "{path}: the process exited during the fork: nothing was forked; fork again"
            ))
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

/// Gives the descriptors on `/dev/tty` (planned with an unknown instance) the identity of
/// the process's other descriptors on the same terminal, if it has any.
fn same_terminals(fds: &mut [(i32, FdAction)]) {
    let known: Vec<TerminalId> = fds
        .iter()
        .filter_map(|(_, a)| match a {
            FdAction::Terminal { id, .. } if id.0 != 0 => Some(*id),
            _ => None,
        })
        .collect();
    for (_, a) in fds.iter_mut() {
        if let FdAction::Terminal { id, .. } = a
            && id.0 == 0
            && let Some(k) = known.iter().find(|k| k.1 == id.1)
        {
            *id = *k;
        }
    }
}

/// What a character device is to a clone, by its device number.
enum Tty {
    /// A terminal: pseudo-terminal slaves (majors 136 to 143), virtual consoles and serial
    /// lines (4), the console (5:1).
    Terminal,
    /// `/dev/tty` (5:0): the process's controlling terminal, whichever it is.
    Controlling,
    /// A pseudo-terminal master (`/dev/ptmx`, 5:2).
    Master,
}

fn tty_kind(rdev: u64) -> Option<Tty> {
    match (libc::major(rdev), libc::minor(rdev)) {
        (136..=143, _) | (4, _) | (5, 1) => Some(Tty::Terminal),
        (5, 0) => Some(Tty::Controlling),
        (5, 2) => Some(Tty::Master),
        _ => None,
    }
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
    let (ctty, session_leader) = controlling_terminal(pid)?;
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
        let fd = HeldFd {
            num,
            link: link.to_string_lossy().into_owned(),
            // The open file itself (stat follows the link), asked once.
            meta: std::fs::metadata(entry.path()).ok(),
        };
        if let Some(action) = plan_fd(pid, comm, &fd, ctx, ctty, &mut notes)? {
            if let FdAction::Reopen { path, flags, .. } = &action
                && let Some(ino) = written_file(&fd, path, *flags, ctx)
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
    same_terminals(&mut fds);
    shared_open_files(pid, &mut fds);
    if ctty.is_some() && !session_leader {
        notes.push(format!(
            "process {pid} ({comm}): it shares a controlling terminal with its session; its clone runs in a session of its own, without one"
        ));
    }
    let ctty = ctty.map(|rdev| which_terminal(rdev, &fds));
    let held = |want: TerminalId| {
        fds.iter()
            .any(|(_, a)| matches!(a, FdAction::Terminal { id, .. } if *id == want))
    };
    if let Some(id @ (0, _)) = ctty
        && session_leader
        && !held(id)
    {
        notes.push(format!(
            "process {pid} ({comm}): its controlling terminal is none of its descriptors; its clone runs in a session of its own, without one"
        ));
    }
    Ok(Target {
        pid,
        comm: comm.to_string(),
        cwd,
        fds,
        written,
        ctty,
        session_leader,
        notes,
    })
}

/// A descriptor of a held process, as `/proc/PID/fd` shows it.
struct HeldFd {
    num: i32,
    /// Where its link points (a path, or `socket:[...]`, `pipe:[...]`, ...).
    link: String,
    /// The open file's metadata, asked through the descriptor (the path means something
    /// else in the daemon's mount namespace); `None` if it was closed meanwhile.
    meta: Option<std::fs::Metadata>,
}

/// The inode number (as the process sees it) of descriptor `fd`, if it is a regular file
/// of the workspace or /tmp open for writing.
fn written_file(fd: &HeldFd, path: &Path, flags: i32, ctx: &Context) -> Option<u64> {
    let private = path.starts_with(ctx.workspace) || path.starts_with("/tmp");
    if !private || flags & libc::O_ACCMODE == libc::O_RDONLY {
        return None;
    }
    let meta = fd.meta.as_ref()?;
    meta.is_file().then(|| meta.ino())
}

/// Which of the terminals a process holds (`fds`) is its controlling terminal, device
/// number `rdev`: the only one with that number. Instance 0 if none is, or if it holds
/// several with that number (devpts instances each count from 0; only the process itself
/// could tell which is its own, `TIOCGSID` answering on a controlling terminal only): its
/// clone then gets no controlling terminal, and the fork says so.
fn which_terminal(rdev: u64, fds: &[(i32, FdAction)]) -> TerminalId {
    let mut held: Vec<TerminalId> = Vec::new();
    for (_, a) in fds {
        if let FdAction::Terminal { id, .. } = a
            && id.1 == rdev
            && id.0 != 0
            && !held.contains(id)
        {
            held.push(*id);
        }
    }
    match held[..] {
        [only] => only,
        _ => (0, rdev),
    }
}

/// Process `pid`'s controlling terminal (device number) if it has one, and whether it
/// leads its session: `session` and `tty_nr`, the 6th and 7th fields of /proc/PID/stat
/// (counted after the parenthesised name, which may hold spaces; the session as this
/// process's pid namespace numbers it).
fn controlling_terminal(pid: u32) -> Result<(Option<u64>, bool)> {
    let stat = read(format!("/proc/{pid}/stat"))?;
    let after_name = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<u64> = after_name
        .split_whitespace()
        .skip(1)
        .take(4)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let (session, tty_nr) = (fields.get(2).copied(), fields.get(3).copied().unwrap_or(0));
    // tty_nr: minor bits 0-7 and 20-31, major bits 8-19.
    let major = ((tty_nr >> 8) & 0xfff) as u32;
    let minor = ((tty_nr & 0xff) | ((tty_nr >> 12) & 0xfff00)) as u32;
    let ctty = (tty_nr != 0).then(|| libc::makedev(major, minor));
    Ok((ctty, session == Some(pid as u64)))
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
    fd: &HeldFd,
    ctx: &Context,
    ctty: Option<u64>,
    notes: &mut Vec<String>,
) -> Result<Option<FdAction>> {
    let (num, link) = (fd.num, fd.link.as_str());
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
    // Terminals are told by their device number (their paths may be those of a devpts
    // instance the daemon does not see).
    let dev = fd
        .meta
        .as_ref()
        .filter(|m| m.file_type().is_char_device())
        .map(|m| (m.dev(), m.rdev()));
    if let Some(((dev, rdev), kind)) = dev.and_then(|d| tty_kind(d.1).map(|k| (d, k))) {
        let id = match kind {
            Tty::Master => {
                return Err(refuse(
                    pid,
                    comm,
                    format!(
                        "fd {num} is the master side of a pseudo-terminal ({link}): the programs on its other side would be the parent's"
                    ),
                ));
            }
            // (Its instance is unknown here: see `same_terminals`.)
            Tty::Controlling => match ctty {
                Some(c) => (0, c),
                None => return Ok(Some(stdio_replacement("/dev/tty", notes))),
            },
            Tty::Terminal => (dev, rdev),
        };
        let note = format!(
            "process {pid} ({comm}): its terminal stays the parent's; its clone gets a terminal of its own (`forkscope attach` connects to it)"
        );
        if !notes.contains(&note) {
            notes.push(note);
        }
        let (flags, _, _) = fdinfo(pid, num)?;
        return Ok(Some(FdAction::Terminal { id, flags }));
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

/// Descriptors of process `pid` that share one open file (`dup`, `2>&1`) share one in the
/// clone too: each but the first becomes [`FdAction::Same`] as the first. Candidates are
/// reopens of the same path with the same status flags and offset; `kcmp` says whether
/// they are one open file.
fn shared_open_files(pid: u32, fds: &mut [(i32, FdAction)]) {
    for i in 1..fds.len() {
        let FdAction::Reopen { path, flags, pos } = fds[i].1.clone() else {
            continue;
        };
        let num = fds[i].0;
        let first = fds[..i].iter().find_map(|(n, a)| match a {
            FdAction::Reopen {
                path: p,
                flags: f,
                pos: q,
            } if *p == path
                && (f & !libc::O_CLOEXEC) == (flags & !libc::O_CLOEXEC)
                && *q == pos
                && same_open_file(pid, *n, num) =>
            {
                Some(*n)
            }
            _ => None,
        });
        if let Some(of) = first {
            fds[i].1 = FdAction::Same {
                of,
                cloexec: flags & libc::O_CLOEXEC,
            };
        }
    }
}

/// Whether descriptors `a` and `b` of process `pid` are one open file (kcmp(2)).
fn same_open_file(pid: u32, a: i32, b: i32) -> bool {
    /// kcmp's type for "same open file description".
    const KCMP_FILE: libc::c_int = 0;
    let pid = pid as libc::pid_t;
    // SAFETY: kcmp reads nothing from this process's memory: it compares two descriptors
    // of another process (which the daemon holds under ptrace) and returns 0 when equal.
    let order = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_FILE,
            a as libc::c_ulong,
            b as libc::c_ulong,
        )
    };
    order == 0
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
