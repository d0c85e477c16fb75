//! Native fork of a branch's processes: each process of the parent branch is cloned
//! copy-on-write into the child branch by a `clone3` injected into it with ptrace
//! ([`crate::inject`]), so a fork costs what the kernel's fork() costs (page tables), not a
//! dump of memory.
//!
//! The order, driven by [`crate::branch::Manager::fork`]: check the processes
//! ([`inspect::precheck`]), freeze the parent's cgroup, snapshot its files, seize every
//! process ([`hold`]: a frozen task can be seized but runs no injected code), thaw (ptrace
//! keeps them stopped), start the child's sandbox nested in the parent's namespaces, plan
//! and inject the clones ([`clone_into`]), and let everyone go. Any failure leaves the
//! originals exactly as they were (registers, signal mask, no stray descriptors) and the
//! child is removed by the caller.
//!
//! Scope: processes that are direct children of the branch's init, single-threaded, not
//! traced, without child processes, without shared memory; see [`inspect`] for what each
//! descriptor becomes.

mod clone;
pub mod inspect;

use std::{path::Path, time::Instant};

use nix::unistd::Pid;

use crate::{error::Result, inject::Tracee};

pub use clone::{ChildBranch, fd_of, pid_as_seen_by};
pub use inspect::Target;

/// A parent branch's processes, held by ptrace, with their plans.
pub struct Held {
    pub processes: Vec<(Tracee, Target)>,
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

/// Seizes the given processes (their cgroup frozen): they stay stopped until the returned
/// [`Held`] is dropped or detached. A process that appeared since the precheck is checked
/// too.
pub fn hold(
    cgroup: &Path,
    init_pid: u32,
    checked: &[(u32, String)],
) -> Result<Vec<(Tracee, String)>> {
    let now = inspect::targets(cgroup, init_pid)?;
    let mut held = Vec::new();
    for &pid in &now {
        let comm = match checked.iter().find(|(p, _)| *p == pid) {
            Some((_, c)) => c.clone(),
            None => inspect::precheck(pid, init_pid, &now, false)?,
        };
        held.push((Tracee::seize(Pid::from_raw(pid as i32))?, comm));
    }
    Ok(held)
}

/// Plans the clone of each held process (after the thaw: reading /proc is slow-ish), after
/// checking each again: held, they cannot change any more. On failure the processes stay
/// held: the caller decides when they go (a checkpoint's are frozen again first).
pub fn plan(
    held: &mut [(Tracee, String)],
    init_pid: u32,
    ctx: &inspect::Context,
) -> Result<Vec<Target>> {
    let procs: Vec<u32> = held.iter().map(|(t, _)| t.pid.as_raw() as u32).collect();
    let mut targets = Vec::new();
    for (t, comm) in held.iter_mut() {
        t.arm()?;
        clone::repair_pid_ns(t)?;
        let pid = t.pid.as_raw() as u32;
        inspect::precheck(pid, init_pid, &procs, true)?;
        targets.push(inspect::inspect(pid, comm, ctx)?);
    }
    Ok(targets)
}

/// What cloning into one child did.
#[derive(Clone, Debug, Default)]
pub struct Cloned {
    /// Host pids of the clones, in the order of the originals.
    pub pids: Vec<u32>,
    /// How long the injections took.
    pub us: u64,
}

/// Clones every held process into `child`. On failure the clones made so far are killed
/// (the caller removes the child) and the originals stay held, unchanged.
///
/// With `freeze`, that cgroup (the child's) is frozen before the clones are let go, so they
/// never run: a checkpoint.
pub fn clone_into(
    held: &mut Held,
    child: &ChildBranch,
    freeze: Option<&crate::cgroup::Cgroup>,
) -> Result<Cloned> {
    let t = Instant::now();
    let mut clones = Vec::new();
    for (original, target) in held.processes.iter_mut() {
        match clone::clone_one(original, target, child) {
            Ok(c) => clones.push(c),
            Err(e) => {
                for c in &clones {
                    clone::kill(c);
                }
                return Err(e);
            }
        }
    }
    let pids = clones.iter().map(|c| c.pid.as_raw() as u32).collect();
    if let Some(cg) = freeze
        && let Err(e) = cg.freeze(true, std::time::Duration::from_secs(5))
    {
        for c in &clones {
            clone::kill(c);
        }
        return Err(e);
    }
    for c in clones {
        c.detach()?;
    }
    Ok(Cloned {
        pids,
        us: t.elapsed().as_micros() as u64,
    })
}

impl Held {
    /// The held processes with their plans (from [`plan`]).
    pub fn new(held: Vec<(Tracee, String)>, targets: Vec<Target>) -> Held {
        Held {
            processes: held.into_iter().map(|(t, _)| t).zip(targets).collect(),
        }
    }

    /// Notes about what the clones do not faithfully own.
    pub fn notes(&self) -> Vec<String> {
        self.processes
            .iter()
            .flat_map(|(_, t)| t.notes.clone())
            .collect()
    }

    /// Lets the originals go on from where they were stopped.
    pub fn release(self) -> Result<()> {
        let mut first = Ok(());
        for (t, _) in self.processes {
            let r = t.detach();
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}
