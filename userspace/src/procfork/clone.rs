//! The injected system calls that clone one held process into a child branch.
//!
//! In the original: open the child's cgroup, point its pid namespace for children at the
//! child branch's, `clone3(CLONE_INTO_CGROUP | CLONE_PARENT, exit_signal 0)`, and put its
//! namespace back. The clone is born in the child's cgroup and pid namespace, as a child of
//! the original's parent (the parent branch's init, which reaps it), held by ptrace before
//! its first instruction, its stack pointer on a frame that ends it should the daemon let
//! go of it now ([`birth`]). Once the child's overlays are mounted, in the clone: join the
//! child's user and mount namespaces, change to the same working directory there, and redo
//! each descriptor as planned ([`super::inspect::FdAction`], [`set_up`]). It then resumes
//! from the original's registers, so a system call the original was blocked in restarts in
//! both.
//!
//! A daemon that dies between those calls leaves the original with the descriptors opened
//! so far (and maybe its pid namespace for children moved), and the fork's mark
//! ([`ForkMark`]) saying which; the next daemon removes the half-forked child and then
//! closes exactly those ([`repair`], from [`super::repair_after_crash`]).

use std::{
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use nix::unistd::Pid;

use super::{
    Plan,
    inspect::{FdAction, Target},
    mark::ForkMark,
    threads,
};
use crate::{
    cgroup::CLONE_INTO_CGROUP,
    error::{Error, Result},
    inject::{Arg, Batch, Tracee},
};

const AT_FDCWD: u64 = libc::AT_FDCWD as i64 as u64;

/// Where the clones go.
pub struct ChildBranch {
    /// The child's cgroup directory (a host path, also visible in the parent's sandbox).
    pub cgroup: PathBuf,
    /// The child's init pid as the parent branch's pid namespace numbers it.
    pub init_in_parent_ns: u32,
    /// The descriptor of the child's command log in the child's init (pid 1 there).
    pub log_fd: i32,
    /// The child has a network namespace of its own, which the clone joins.
    pub net_isolated: bool,
    /// Where the fork marks the processes it injects into (the parent branch's directory).
    pub marks: PathBuf,
    /// The child's terminals (paths in the child's view) in place of the parent's.
    pub terminals: Vec<(super::inspect::TerminalId, String)>,
}

fn nr(n: libc::c_long) -> i64 {
    n
}

/// Undoes what a fork cut short by a daemon crash left in `original`, as the fork's mark in
/// `dir` says ([`ForkMark`]): closes the descriptors the fork opened there that still are
/// what it opened (a `branch-*` cgroup directory, pid namespaces), puts its pid namespace for
/// children back, and removes the mark. Without a mark, nothing.
pub fn repair(original: &mut Tracee, dir: &Path) -> Result<()> {
    let pid = original.pid.as_raw() as u32;
    let Some((mark, file)) = ForkMark::read(dir, pid) else {
        return Ok(());
    };
    let link = |fd: i32| {
        std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let is_branch_cgroup = |l: &str| {
        let p = Path::new(l.strip_suffix(" (deleted)").unwrap_or(l));
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("branch-"))
            && p.parent()
                .is_some_and(|parent| parent.join("cgroup.procs").exists())
    };
    let [cg, own, theirs] = mark.opened();
    let left: Vec<i32> = [(theirs, false), (own, false), (cg, true)]
        .into_iter()
        .filter(|(fd, cgroup)| {
            let l = link(*fd);
            if *cgroup {
                is_branch_cgroup(&l)
            } else {
                l.starts_with("pid:[")
            }
        })
        .map(|(fd, _)| fd)
        .collect();
    for fd in left {
        original.call(
            &format!("closing fd {fd}, left by a fork cut short"),
            nr(libc::SYS_close),
            &[fd as u64],
        )?;
    }
    if pid_ns_for_children_moved(pid) {
        let at = original.scratch_strings(&[b"/proc/self/ns/pid"])?;
        let fd = original.call(
            "opening its pid namespace",
            nr(libc::SYS_openat),
            &[
                AT_FDCWD,
                at[0],
                (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
                0,
            ],
        )?;
        let r = original.call(
            "putting its pid namespace for children back",
            nr(libc::SYS_setns),
            &[fd as u64, libc::CLONE_NEWPID as u64],
        );
        let _ = original.syscall(nr(libc::SYS_close), &[fd as u64]);
        r?;
    }
    let _ = std::fs::remove_file(file);
    Ok(())
}

/// Whether `pid`'s pid namespace for children is not its own.
fn pid_ns_for_children_moved(pid: u32) -> bool {
    let link = |ns: &str| std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).ok();
    link("pid_for_children") != link("pid")
}

/// A held clone of one process: its first thread, and its other threads made again.
pub struct ProcessCopy {
    pub leader: Tracee,
    threads: Vec<Tracee>,
    /// What the clone does not faithfully own (found while it was made).
    pub notes: Vec<String>,
    /// The descriptors the original had open for its clone's birth, which the clone
    /// inherited: closed when it is set up.
    inherited: Vec<i64>,
    /// The original's registers and signal mask, which the clone resumes from once it is
    /// let go (until then it stands on a way out: see [`birth`]).
    resume: (libc::user_regs_struct, u64),
}

impl ProcessCopy {
    /// Lets every thread of the clone go, the leader from the original's state.
    pub fn detach(mut self) -> Result<()> {
        let (regs, mask) = self.resume;
        self.leader.resume_from(regs, mask);
        let mut first = Ok(());
        for t in self.threads.into_iter().chain(std::iter::once(self.leader)) {
            let r = t.detach();
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

/// Makes the clone of the held `original` in `child`'s cgroup and pid namespace; returns
/// it, held and not set up yet (see [`set_up`]): it needs nothing of the child's mounts.
pub fn birth(original: &mut Tracee, plan: &Plan, child: &ChildBranch) -> Result<ProcessCopy> {
    let target = &plan.target;
    // The pid the original has in its branch: the clone gets the same in the child's.
    let own_pid = crate::sandbox::ns_pids(target.pid)
        .ok()
        .and_then(|p| p.last().copied());
    let mut pid_kept = false;
    let ns = |kind: &str| format!("/proc/{}/ns/{kind}", child.init_in_parent_ns);
    let strings = [
        child.cgroup.as_os_str().as_bytes().to_vec(),
        b"/proc/self/ns/pid_for_children".to_vec(),
        ns("pid").into_bytes(),
    ];
    let refs: Vec<&[u8]> = strings.iter().map(|s| s.as_slice()).collect();
    let at = original.scratch_strings(&refs)?;
    let ro = (libc::O_RDONLY | libc::O_CLOEXEC) as u64;
    let open = |t: &mut Tracee, what: &str, path: u64, flags: u64| {
        t.call(what, nr(libc::SYS_openat), &[AT_FDCWD, path, flags, 0])
    };
    // A clone cut off by a daemon crash must not run as a copy of the original: it is born
    // with its stack pointer on the original's exit frame (see `crate::inject`), which ends
    // it. Without one (no glibc), the child's cgroup is frozen around the clone's birth
    // instead (before anything else, so that nothing fails between the two setns below).
    // The original is marked before anything is opened in it (see `ForkMark`).
    let exit_frame = original.exit_frame();
    let child_cg = crate::cgroup::Cgroup::open(&child.cgroup)?;
    let frozen = exit_frame.is_none();
    if frozen {
        child_cg.freeze(true, std::time::Duration::from_secs(5))?;
    }
    let mark = match ForkMark::write(&child.marks, original.pid.as_raw() as u32) {
        Ok(m) => m,
        Err(e) => {
            if frozen {
                let _ = child_cg.freeze(false, std::time::Duration::from_secs(5));
            }
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    let result = (|| {
        let cg = open(
            original,
            "opening the child's cgroup",
            at[0],
            ro | libc::O_DIRECTORY as u64,
        )?;
        fds.push(cg);
        let own = open(original, "opening its pid namespace", at[1], ro)?;
        fds.push(own);
        let theirs = open(original, "opening the child's pid namespace", at[2], ro)?;
        fds.push(theirs);
        original.call(
            "entering the child's pid namespace",
            nr(libc::SYS_setns),
            &[theirs as u64, libc::CLONE_NEWPID as u64],
        )?;
        let mut args = [0u64; 11];
        args[0] = libc::CLONE_PARENT as u64 | CLONE_INTO_CGROUP;
        // glibc's thread-id word gets the clone's id, as after a fork().
        if let Some(word) = plan.words.tid_word {
            args[0] |= (libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID) as u64;
            args[2] = word;
        }
        args[10] = cg as u64;
        if let Some(at) = exit_frame {
            // clone3 sets the stack pointer to stack + stack_size.
            (args[5], args[6]) = (at - 16, 16);
        }
        let pid_at = original.scratch_bytes(
            &(own_pid.unwrap_or(0) as i32).to_ne_bytes(),
            *at.iter().min().expect("three"),
        )?;
        let mut born = None;
        let mut r = Ok(0);
        // With set_tid, the pid the original has in its branch; where the kernel refuses
        // (taken there, or not allowed), any pid.
        for with_pid in [own_pid.is_some(), false] {
            args[8] = if with_pid { pid_at } else { 0 };
            args[9] = with_pid as u64;
            let bytes: Vec<u8> = args.iter().flat_map(|a| a.to_ne_bytes()).collect();
            let args_at = original.scratch_bytes(&bytes, pid_at)?;
            r = original.syscall_with(nr(libc::SYS_clone3), &[args_at, 88], |p| born = Some(p));
            pid_kept = with_pid;
            let refused = [libc::EEXIST, libc::EPERM, libc::EINVAL, libc::ENOSPC]
                .iter()
                .any(|e| matches!(r, Ok(v) if v == -(*e as i64)));
            if born.is_some() || !with_pid || !refused {
                break;
            }
        }
        // Its own pid namespace back, whatever happened.
        let back = original.call(
            "leaving the child's pid namespace",
            nr(libc::SYS_setns),
            &[own as u64, libc::CLONE_NEWPID as u64],
        );
        let adopted = born.map(|p| (p, Tracee::adopt_clone(p, original)));
        let r = r?;
        let clone = match adopted {
            // Without an exit frame, it waits on an exit_group before its cgroup is thawed.
            Some((p, Ok(mut c))) if frozen => match c.park_on_exit() {
                Ok(()) => c,
                Err(e) => {
                    reap_killed(p);
                    return Err(e);
                }
            },
            Some((_, Ok(c))) => c,
            Some((p, Err(e))) => {
                reap_killed(p);
                return Err(e);
            }
            None => {
                return Err(Error::Sandbox(format!(
                    "clone3 in process {}: {}",
                    original.pid,
                    nix::errno::Errno::from_raw(-r as i32).desc()
                )));
            }
        };
        if let Err(e) = back {
            reap_killed(clone.pid);
            return Err(e);
        }
        Ok(clone)
    })();
    // Thawed whatever happened: a clone that failed was killed and reaped above.
    let thawed = if frozen {
        child_cg.freeze(false, std::time::Duration::from_secs(5))
    } else {
        Ok(())
    };
    let result = match (result, thawed) {
        (Ok(c), Err(e)) => {
            reap_killed(c.pid);
            Err(e)
        }
        (r, _) => r,
    };
    for (first, last) in runs(&fds) {
        let r = original.syscall(nr(libc::SYS_close_range), &[first, last, 0]);
        if matches!(r, Ok(r) if r < 0) {
            // Before Linux 5.9: one at a time.
            for fd in first..=last {
                let _ = original.syscall(nr(libc::SYS_close), &[fd]);
            }
        }
    }
    let _ = std::fs::remove_file(&mark);
    let clone = result?;
    let mut copy = ProcessCopy {
        leader: clone,
        threads: Vec::new(),
        notes: Vec::new(),
        inherited: fds,
        resume: (original.saved_regs(), original.saved_mask()),
    };
    if let (Some(own), false) = (own_pid, pid_kept) {
        copy.notes.push(format!(
            "process {} ({}): its clone could not keep pid {own} in the child branch and has another",
            target.pid, target.comm
        ));
    }
    Ok(copy)
}

/// Sets up a clone made by [`birth`], once the child's overlays are mounted: joins the
/// child's namespaces, changes directory, redoes its descriptors, registers its robust
/// futex list again; all in one batch of injected calls ([`crate::inject::Batch`]). On
/// failure the caller kills the clone ([`kill`]).
pub fn set_up(copy: &mut ProcessCopy, plan: &Plan, child: &ChildBranch) -> Result<()> {
    let inherited = std::mem::take(&mut copy.inherited);
    set_up_clone(
        &mut copy.leader,
        &plan.target,
        child,
        &inherited,
        plan.words.robust,
        &mut copy.notes,
    )
}

/// Makes the other threads of the original again in its clone `copy` (after every
/// process's clone is made: a thread's new id must not take the pid a later clone asks
/// for). On failure the caller kills the clone (with the threads made so far).
pub fn recreate_threads(copy: &mut ProcessCopy, plan: &Plan) -> Result<()> {
    for state in &plan.threads {
        let t = threads::recreate(&mut copy.leader, state)?;
        copy.threads.push(t);
    }
    Ok(())
}

/// Kills a clone that could not be set up (it never ran an instruction of its own) and
/// reaps its exits as its tracer, so it is neither left running nor left a zombie: the
/// other threads first (the kernel reports the leader's exit after theirs).
pub fn kill(copy: &ProcessCopy) {
    let _ = nix::sys::signal::kill(copy.leader.pid, nix::sys::signal::Signal::SIGKILL);
    threads::reap(&copy.threads);
    reap_killed(copy.leader.pid);
}

/// SIGKILLs traced process `pid` and waits for its exit (the tracer sees it first).
fn reap_killed(pid: Pid) {
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    reap_exit(pid);
}

/// Waits, as its tracer, for traced task `pid` to exit (or to be gone already).
pub(super) fn reap_exit(pid: Pid) {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    loop {
        match waitpid(pid, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) | Err(_) => return,
            Ok(_) => continue,
        }
    }
}

fn set_up_clone(
    clone: &mut Tracee,
    target: &Target,
    child: &ChildBranch,
    inherited: &[i64],
    robust: Option<(u64, u64)>,
    notes: &mut Vec<String>,
) -> Result<()> {
    let pid = target.pid;
    let reopened: Vec<&std::path::Path> = target
        .fds
        .iter()
        .filter_map(|(_, a)| match a {
            FdAction::Reopen { path, .. } => Some(path.as_path()),
            _ => None,
        })
        .collect();
    let mut strings: Vec<Vec<u8>> = vec![
        format!("/proc/{}/ns/user", child.init_in_parent_ns).into_bytes(),
        format!("/proc/{}/ns/mnt", child.init_in_parent_ns).into_bytes(),
        target.cwd.as_os_str().as_bytes().to_vec(),
        format!("/proc/1/fd/{}", child.log_fd).into_bytes(),
        b"/dev/null".to_vec(),
        format!("/proc/{}/ns/net", child.init_in_parent_ns).into_bytes(),
    ];
    strings.extend(reopened.iter().map(|p| p.as_os_str().as_bytes().to_vec()));
    let terminals_at = strings.len();
    for (_, new) in &child.terminals {
        strings.push(new.as_bytes().to_vec());
    }
    let refs: Vec<&[u8]> = strings.iter().map(|s| s.as_slice()).collect();
    let at = clone.scratch_strings(&refs)?;
    let mut below = *at.iter().min().expect("strings");
    let v = Arg::Value;
    let ro = (libc::O_RDONLY | libc::O_CLOEXEC) as u64;
    let mut b = Batch::new();
    let open = |b: &mut Batch, what: &str, path: u64, flags: u64| {
        b.must(
            what,
            nr(libc::SYS_openat),
            &[v(AT_FDCWD), v(path), v(flags)],
        )
    };
    for fd in inherited {
        b.call(nr(libc::SYS_close), &[v(*fd as u64)]);
    }
    let mut namespaces = vec![
        (at[0], libc::CLONE_NEWUSER, "user"),
        (at[1], libc::CLONE_NEWNS, "mount"),
    ];
    if child.net_isolated {
        namespaces.push((at[5], libc::CLONE_NEWNET, "network"));
    }
    let ns_fds: Vec<usize> = namespaces
        .iter()
        .map(|(path, _, kind)| {
            let what = format!("opening the child's {kind} namespace");
            open(&mut b, &what, *path, ro)
        })
        .collect();
    for ((_, flag, kind), fd) in namespaces.iter().zip(&ns_fds) {
        let what = format!("entering the child's {kind} namespace");
        b.must(
            &what,
            nr(libc::SYS_setns),
            &[Arg::ResultOf(*fd), v(*flag as u64)],
        );
    }
    for fd in &ns_fds {
        b.call(nr(libc::SYS_close), &[Arg::ResultOf(*fd)]);
    }
    let comm = target.comm.clone();
    b.must_or(
        &format!("changing to {}", target.cwd.display()),
        nr(libc::SYS_chdir),
        &[v(at[2])],
        move |e| Error::CannotClone(format!("process {pid} ({comm}): {e}")),
    );
    let mut next_path = 6;
    for (num, action) in &target.fds {
        let num = *num as u64;
        let fail = |p: String| {
            move |e: Error| {
                Error::CannotClone(format!(
                    "process {pid}: fd {num} ({p}) could not be given to the clone: {e}"
                ))
            }
        };
        let (new, cloexec) = match action {
            FdAction::Same { of, cloexec } => {
                // (Its first descriptor was given to the clone already: planned before it.)
                b.must(
                    "dup3",
                    nr(libc::SYS_dup3),
                    &[v(*of as u64), v(num), v(*cloexec as u64)],
                );
                continue;
            }
            FdAction::Close => {
                b.call(nr(libc::SYS_close), &[v(num)]);
                continue;
            }
            FdAction::Listen {
                v6,
                addr,
                port,
                flags,
            } => {
                let (sockaddr, family) = sockaddr(*v6, addr, *port);
                let addr_at = clone.scratch_bytes(&sockaddr, below)?;
                let one_at = clone.scratch_bytes(&1i32.to_ne_bytes(), addr_at)?;
                below = one_at;
                let what = format!("listening on port {port}");
                let nonblock = if flags & libc::O_NONBLOCK != 0 {
                    libc::SOCK_NONBLOCK
                } else {
                    0
                };
                let s = b.must_or(
                    "socket",
                    nr(libc::SYS_socket),
                    &[v(family as u64), v((libc::SOCK_STREAM | nonblock) as u64)],
                    fail(what.clone()),
                );
                let s_fd = Arg::ResultOf(s);
                b.must_or(
                    "setsockopt(SO_REUSEADDR)",
                    nr(libc::SYS_setsockopt),
                    &[
                        s_fd,
                        v(libc::SOL_SOCKET as u64),
                        v(libc::SO_REUSEADDR as u64),
                        v(one_at),
                        v(4),
                    ],
                    fail(what.clone()),
                );
                b.must_or(
                    "bind",
                    nr(libc::SYS_bind),
                    &[s_fd, v(addr_at), v(sockaddr.len() as u64)],
                    fail(what.clone()),
                );
                b.must_or("listen", nr(libc::SYS_listen), &[s_fd, v(4096)], fail(what));
                (s, (flags & libc::O_CLOEXEC) as u64)
            }
            FdAction::DevNull => (
                open(&mut b, "opening /dev/null", at[4], libc::O_RDWR as u64),
                0,
            ),
            FdAction::ChildLog => (
                open(
                    &mut b,
                    "opening the child's log",
                    at[3],
                    (libc::O_WRONLY | libc::O_APPEND) as u64,
                ),
                0,
            ),
            FdAction::Terminal { id, flags } => {
                let i = child
                    .terminals
                    .iter()
                    .position(|(t, _)| t == id)
                    .ok_or_else(|| {
                        fail("a terminal".into())(Error::Sandbox(
                            "no terminal was made for it".into(),
                        ))
                    })?;
                let keep = flags & (libc::O_ACCMODE | libc::O_NONBLOCK | libc::O_APPEND);
                let new = b.must_or(
                    "opening the child's terminal",
                    nr(libc::SYS_openat),
                    &[
                        v(AT_FDCWD),
                        v(at[terminals_at + i]),
                        v((keep | libc::O_NOCTTY) as u64),
                    ],
                    fail("a terminal".into()),
                );
                (new, (flags & libc::O_CLOEXEC) as u64)
            }
            FdAction::Reopen { path, flags, pos } => {
                let path_at = at[next_path];
                next_path += 1;
                let p = path.display().to_string();
                let o_path = flags & libc::O_PATH != 0;
                let open_flags = (flags & !(libc::O_CLOEXEC | libc::O_CREAT | libc::O_TRUNC))
                    | if o_path {
                        0
                    } else {
                        libc::O_NONBLOCK | libc::O_NOCTTY
                    };
                let new = b.must_or(
                    "open",
                    nr(libc::SYS_openat),
                    &[v(AT_FDCWD), v(path_at), v(open_flags as u64)],
                    fail(p.clone()),
                );
                if !o_path {
                    if *pos > 0 && flags & libc::O_APPEND == 0 {
                        // Pipes and FIFOs have no position: an error is fine there.
                        b.call(nr(libc::SYS_lseek), &[Arg::ResultOf(new), v(*pos), v(0)]);
                    }
                    if flags & libc::O_NONBLOCK == 0 {
                        b.must_or(
                            "fcntl(F_SETFL)",
                            nr(libc::SYS_fcntl),
                            &[
                                Arg::ResultOf(new),
                                v(libc::F_SETFL as u64),
                                v(*flags as u64),
                            ],
                            fail(p),
                        );
                    }
                }
                (new, (flags & libc::O_CLOEXEC) as u64)
            }
        };
        b.must(
            "dup3",
            nr(libc::SYS_dup3),
            &[Arg::ResultOf(new), v(num), v(cloexec)],
        );
        b.call(nr(libc::SYS_close), &[Arg::ResultOf(new)]);
    }
    // Off the parent's session and process group: /dev/tty is never the parent's terminal,
    // and a `kill 0` in the child never reaches the parent branch. A session leader leads
    // its own on the terminal that replaces its controlling terminal.
    b.must("setsid", nr(libc::SYS_setsid), &[]);
    let mut ctty = None;
    if let Some(id) = target.ctty {
        let replaced = child.terminals.iter().position(|(t, _)| *t == id);
        if let (true, Some(i)) = (target.session_leader, replaced) {
            let fd = b.call(
                nr(libc::SYS_openat),
                &[
                    v(AT_FDCWD),
                    v(at[terminals_at + i]),
                    v((libc::O_RDWR | libc::O_NOCTTY) as u64),
                ],
            );
            let ioctl = b.call(
                nr(libc::SYS_ioctl),
                &[Arg::ResultOf(fd), v(libc::TIOCSCTTY), v(0)],
            );
            b.call(nr(libc::SYS_close), &[Arg::ResultOf(fd)]);
            ctty = Some(ioctl);
        }
    }
    if let Some((head, len)) = robust {
        b.must(
            "set_robust_list",
            libc::SYS_set_robust_list,
            &[v(head), v(len)],
        );
    }
    let results = clone.run_batch(b, below)?;
    // (Where the terminal could not be opened, the ioctl failed on a bad descriptor.)
    if let Some(i) = ctty
        && results[i] != 0
    {
        notes.push(format!(
            "process {pid} ({}): its clone's terminal could not become its controlling terminal",
            target.comm
        ));
    }
    Ok(())
}

/// Descriptors `fds` as runs of consecutive numbers (first, last), for `close_range`: the
/// few an original opens are closed with one injected call, not one each.
fn runs(fds: &[i64]) -> Vec<(u64, u64)> {
    let mut sorted: Vec<u64> = fds.iter().map(|&fd| fd as u64).collect();
    sorted.sort_unstable();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for fd in sorted {
        match runs.last_mut() {
            Some((_, last)) if *last + 1 == fd => *last = fd,
            _ => runs.push((fd, fd)),
        }
    }
    runs
}

/// A `sockaddr_in` or `sockaddr_in6` for `addr` (network order bytes) and `port`, and its
/// address family.
fn sockaddr(v6: bool, addr: &[u8; 16], port: u16) -> (Vec<u8>, i32) {
    let mut b = Vec::new();
    if v6 {
        b.extend_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        b.extend_from_slice(&port.to_be_bytes());
        b.extend_from_slice(&[0u8; 4]); // flow info
        b.extend_from_slice(addr);
        b.extend_from_slice(&[0u8; 4]); // scope id
        (b, libc::AF_INET6)
    } else {
        b.extend_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        b.extend_from_slice(&port.to_be_bytes());
        b.extend_from_slice(&addr[..4]);
        b.extend_from_slice(&[0u8; 8]);
        (b, libc::AF_INET)
    }
}

/// The pid that the pid namespace of `viewer` gives to `pid` (both host pids).
pub fn pid_as_seen_by(pid: u32, viewer: u32) -> Result<u32> {
    let level = crate::sandbox::ns_pids(viewer)?.len();
    crate::sandbox::ns_pids(pid)?
        .get(level.saturating_sub(1))
        .copied()
        .ok_or_else(|| {
            Error::Sandbox(format!(
                "process {pid} is not in the pid namespace of process {viewer}"
            ))
        })
}

/// Which descriptor of process `pid` is open on `path`.
pub fn fd_of(pid: u32, path: &std::path::Path) -> Result<i32> {
    let dir = format!("/proc/{pid}/fd");
    for entry in std::fs::read_dir(&dir).map_err(|e| Error::Sandbox(format!("{dir}: {e}")))? {
        let Ok(entry) = entry else { continue };
        if std::fs::read_link(entry.path()).ok().as_deref() == Some(path)
            && let Some(n) = entry.file_name().to_str().and_then(|n| n.parse().ok())
        {
            return Ok(n);
        }
    }
    Err(Error::Sandbox(format!(
        "process {pid} has no descriptor on {}",
        path.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    fn descriptors_are_closed_in_runs_of_consecutive_numbers() {
        assert_eq!(runs(&[5, 3, 4]), [(3, 5)]);
        assert_eq!(runs(&[3, 6, 7]), [(3, 3), (6, 7)]);
        assert_eq!(runs(&[]), []);
    }
}
