//! Native fork of a branch's processes: each process of the parent branch is cloned
//! copy-on-write into the child branch by a `clone3` injected into it with ptrace
//! ([`crate::inject`]), so a fork costs what the kernel's fork() costs (page tables), not a
//! dump of memory.
//!
//! The order, driven by [`crate::branch::Manager::fork`]: check the processes
//! ([`inspect::precheck`]), freeze the parent's cgroup, snapshot its files, seize every
//! process ([`hold`]: a frozen task can be seized but runs no injected code), thaw (ptrace
//! keeps them stopped), start the child's sandbox nested in the parent's namespaces, plan
//! and inject the clones ([`clone_into`]), let the originals go once the clones are born,
//! set the clones up in the child, and let them go. Any failure leaves the
//! originals exactly as they were (registers, signal mask, no stray descriptors) and the
//! child is removed by the caller.
//!
//! Scope: processes that are direct children of the branch's init, not traced, without
//! child processes, without shared memory; see [`inspect`] for what each descriptor
//! becomes, [`open_copies`] for the files they hold open for writing, and [`threads`] for
//! how a multi-threaded process's threads are made again.

mod clone;
pub mod inspect;
mod mark;
pub mod open_copies;
mod threads;

use std::{path::Path, time::Instant};

use nix::unistd::Pid;

use crate::{error::Result, inject::Tracee};

pub use clone::{ChildBranch, fd_of, pid_as_seen_by};
pub use inspect::Target;

/// One process of the parent branch, held by ptrace: its leader and its other threads.
pub struct Seized {
    leader: Tracee,
    threads: Vec<Tracee>,
    comm: String,
}

/// The plan for the clone of one process.
pub struct Plan {
    target: Target,
    /// Its other threads, made again in the clone.
    threads: Vec<threads::ThreadState>,
    /// The leader's glibc words.
    words: threads::GlibcWords,
}

/// A parent branch's processes, held by ptrace, with their plans.
pub struct Held {
    processes: Vec<(Seized, Plan)>,
    /// When they were let go, if they were ([`Held::let_go`]).
    let_go_at: Option<Instant>,
}

/// Checks every process of a branch (`cgroup`, `init_pid`) before anything is frozen;
/// returns their pids and names.
pub fn precheck(cgroup: &Path, init_pid: u32) -> Result<Vec<(u32, String)>> {
    let procs = inspect::targets(cgroup, init_pid)?;
    procs
        .iter()
        .map(|&pid| inspect::precheck(pid, init_pid, &procs, false).map(|comm| (pid, comm)))
        .collect()
}

/// Seizes the given processes, every thread of each (their cgroup frozen): they stay
/// stopped until the returned processes are dropped or released. A process that appeared
/// since the precheck is checked too.
pub fn hold(cgroup: &Path, init_pid: u32, checked: &[(u32, String)]) -> Result<Vec<Seized>> {
    let now = inspect::targets(cgroup, init_pid)?;
    let mut held = Vec::new();
    for &pid in &now {
        let comm = match checked.iter().find(|(p, _)| *p == pid) {
            Some((_, c)) => c.clone(),
            None => inspect::precheck(pid, init_pid, &now, false)?,
        };
        let leader = Tracee::seize(Pid::from_raw(pid as i32))?;
        let threads = threads::other_threads(pid)?
            .into_iter()
            .map(|tid| Tracee::seize_thread(Pid::from_raw(tid as i32), &leader))
            .collect::<Result<Vec<_>>>()?;
        held.push(Seized {
            leader,
            threads,
            comm,
        });
    }
    Ok(held)
}

/// Plans the clone of each held process (after the thaw: reading /proc is slow-ish, and
/// reading a thread's signal stack takes an injected call), after checking each again:
/// held, they cannot change any more. On failure the processes stay held: the caller
/// decides when they go (a checkpoint's are frozen again first).
pub fn plan(held: &mut [Seized], init_pid: u32, ctx: &inspect::Context) -> Result<Vec<Plan>> {
    let procs: Vec<u32> = held.iter().map(|s| s.leader.pid.as_raw() as u32).collect();
    let mut plans = Vec::new();
    for s in held.iter_mut() {
        let t = &mut s.leader;
        t.arm()?;
        clone::repair(t, ctx.marks)?;
        let pid = t.pid.as_raw() as u32;
        inspect::precheck(pid, init_pid, &procs, true)?;
        let target = inspect::inspect(pid, &s.comm, ctx)?;
        let words = threads::glibc_words(t);
        let threads = s
            .threads
            .iter_mut()
            .map(|th| threads::read(th, pid))
            .collect::<Result<Vec<_>>>()?;
        plans.push(Plan {
            target,
            threads,
            words,
        });
    }
    Ok(plans)
}

/// Repairs the processes of a branch (`cgroup`, `init_pid`, its directory `dir`) that a
/// fork cut short by a daemon crash left marked (see [`mark`] and [`clone::repair`]); run
/// by a daemon that starts. A frozen branch keeps its marks for its next fork (a frozen
/// process runs no injected call). Returns the pids repaired; a process that cannot be
/// repaired is logged and the others go on.
pub fn repair_after_crash(cgroup: &Path, init_pid: u32, dir: &Path) -> Result<Vec<u32>> {
    let marks = mark::ForkMark::all(dir);
    if marks.is_empty() {
        return Ok(Vec::new());
    }
    let events = std::fs::read_to_string(cgroup.join("cgroup.events")).unwrap_or_default();
    if events.lines().any(|l| l == "frozen 1") {
        return Ok(Vec::new());
    }
    let procs = inspect::targets(cgroup, init_pid)?;
    let mut repaired = Vec::new();
    for (pid, file) in marks {
        if !procs.contains(&pid) {
            let _ = std::fs::remove_file(&file);
            continue;
        }
        let r = (|| {
            let mut t = Tracee::seize(Pid::from_raw(pid as i32))?;
            t.arm()?;
            clone::repair(&mut t, dir)?;
            t.detach()
        })();
        match r {
            Ok(()) => repaired.push(pid),
            Err(e) => log::warn!("process {pid}: undoing a fork cut short: {e}"),
        }
    }
    Ok(repaired)
}

/// The settings of the terminal process `pid` holds on descriptor `fd` (opened again
/// through /proc, without becoming the daemon's controlling terminal).
pub fn terminal_settings(pid: u32, fd: i32) -> Option<crate::sandbox::terminal::Settings> {
    use std::os::{fd::AsRawFd, unix::fs::OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(format!("/proc/{pid}/fd/{fd}"))
        .ok()?;
    crate::sandbox::terminal::Settings::of(f.as_raw_fd())
}

/// What cloning into one child did.
#[derive(Clone, Debug, Default)]
pub struct Cloned {
    /// Host pids of the clones, in the order of the originals.
    pub pids: Vec<u32>,
    /// How long the injections took.
    pub us: u64,
    /// What the clones do not faithfully own, found once they are made.
    pub notes: Vec<String>,
}

/// Clones every held process into `child`. On failure the clones made so far are killed
/// (the caller removes the child) and the originals are unchanged (still held, unless
/// `let_go` let them go).
///
/// The clones are born first (in the child's cgroup and pid namespace), then `born` is
/// called (nothing of the originals' runs before it returns), then, with `let_go`, the
/// originals are let go (everything the clones' set-up needs from them is in their plans:
/// the last child's clones are set up while the parent runs on), then `mounted` is called
/// (it waits for the child's overlays, mounted meanwhile), then each clone is set up in the
/// child's namespaces. With `freeze`, that cgroup (the child's) is frozen before the clones
/// are let go, so they never run: a checkpoint. On failure after the originals were let go,
/// they run on unchanged and the clones are killed all the same.
pub fn clone_into(
    held: &mut Held,
    child: &ChildBranch,
    freeze: Option<&crate::cgroup::Cgroup>,
    let_go: bool,
    born: impl FnOnce() -> Result<()>,
    mounted: impl FnOnce() -> Result<()>,
) -> Result<Cloned> {
    let t = Instant::now();
    let mut clones = Vec::new();
    let kill_all = |clones: &[clone::ProcessCopy]| {
        for c in clones {
            clone::kill(c);
        }
    };
    for (original, plan) in held.processes.iter_mut() {
        match clone::birth(&mut original.leader, plan, child) {
            Ok(c) => clones.push(c),
            Err(e) => {
                kill_all(&clones);
                return Err(e);
            }
        }
    }
    let after_births = born().and_then(|()| if let_go { held.let_go() } else { Ok(()) });
    if let Err(e) = after_births.and_then(|()| mounted()) {
        kill_all(&clones);
        return Err(e);
    }
    let mut notes = Vec::new();
    for i in 0..clones.len() {
        let (original, plan) = &held.processes[i];
        if let Err(e) = clone::set_up(&mut clones[i], plan, child) {
            kill_all(&clones);
            return Err(e);
        }
        let c = &clones[i];
        notes.extend(c.notes.iter().cloned());
        notes.extend(open_copies::check(
            c.leader.pid.as_raw() as u32,
            plan.target.pid,
            &original.comm,
            &plan.target.written,
        ));
    }
    // Each clone's other threads once every clone has its pid.
    for i in 0..clones.len() {
        if let Err(e) = clone::recreate_threads(&mut clones[i], &held.processes[i].1) {
            kill_all(&clones);
            return Err(e);
        }
    }
    let pids = clones
        .iter()
        .map(|c| c.leader.pid.as_raw() as u32)
        .collect();
    if let Some(cg) = freeze
        && let Err(e) = cg.freeze(true, std::time::Duration::from_secs(5))
    {
        kill_all(&clones);
        return Err(e);
    }
    for c in clones {
        c.detach()?;
    }
    Ok(Cloned {
        pids,
        us: t.elapsed().as_micros() as u64,
        notes,
    })
}

impl Held {
    /// The held processes with their plans (from [`plan`]).
    pub fn new(held: Vec<Seized>, plans: Vec<Plan>) -> Held {
        Held {
            processes: held.into_iter().zip(plans).collect(),
            let_go_at: None,
        }
    }

    /// Makes the child's copies of the workspace and /tmp files the held processes have open
    /// for writing, in its upper directories, from its lower layers (see [`open_copies`]):
    /// before the child's overlays are mounted.
    pub fn copy_open_files(&self, stacks: &open_copies::Stacks) -> Result<()> {
        let files = self
            .processes
            .iter()
            .flat_map(|(_, p)| p.target.written.iter());
        open_copies::copy_into(files, stacks)
    }

    /// The parent's terminals the held processes have, each with a process and descriptor
    /// holding it: each clone gets a terminal of the child's own in place of each (see
    /// [`inspect::FdAction::Terminal`]).
    pub fn terminals(&self) -> Vec<(inspect::TerminalId, u32, i32)> {
        let mut all: Vec<(inspect::TerminalId, u32, i32)> = Vec::new();
        for (_, plan) in &self.processes {
            for (fd, action) in &plan.target.fds {
                if let inspect::FdAction::Terminal { id, .. } = action
                    && !all.iter().any(|(known, _, _)| known == id)
                {
                    all.push((*id, plan.target.pid, *fd));
                }
            }
        }
        all
    }

    /// Notes about what the clones do not faithfully own.
    pub fn notes(&self) -> Vec<String> {
        self.processes
            .iter()
            .flat_map(|(_, p)| p.target.notes.clone())
            .collect()
    }

    /// Lets the originals go on from where they were stopped (those [`Held::let_go`] let
    /// go already stay so).
    pub fn release(mut self) -> Result<()> {
        self.let_go()
    }

    /// Lets the originals go on from where they were stopped, keeping their plans (the
    /// notes, and what the clones' set-up reads from them) and what it was given.
    pub fn let_go(&mut self) -> Result<()> {
        let mut first = Ok(());
        for (s, _) in self.processes.iter_mut() {
            for t in std::iter::once(&mut s.leader).chain(s.threads.iter_mut()) {
                let r = t.let_go();
                if first.is_ok() {
                    first = r;
                }
            }
        }
        self.let_go_at.get_or_insert_with(Instant::now);
        first
    }

    /// When the originals were let go, if they were.
    pub fn let_go_at(&self) -> Option<Instant> {
        self.let_go_at
    }
}
