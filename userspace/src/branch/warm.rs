//! Pre-started child sandboxes: after a branch is started or forked, the daemon starts the
//! sandbox of its next child ahead of time (nested in its namespaces, its overlays still to
//! come, see [`crate::sandbox::SandboxSpec::deferred`]), so the next fork only mounts the
//! overlays and clones the processes instead of waiting tens of milliseconds for a sandbox.
//!
//! One per branch after a fork, started after the reply and off the manager's lock
//! ([`Warming`]: an `exec` or `ls` right after a fork does not wait for it; a fork that
//! comes before it is ready waits for it), as many as a fork of several children asks for
//! (started before it holds the parent's processes, side by side); kept in memory only: a
//! pre-started sandbox is not a branch (no record); it is discarded when its branch is
//! aborted or the daemon stops, and a daemon that starts removes whatever a crash left
//! (cgroups and directories without a record).

use std::sync::{Arc, Condvar, Mutex};

use super::{BranchRecord, Manager, mkdirs};
use crate::{
    cgroup::{Cgroup, cgroup2_root},
    error::{Error, Result},
    sandbox::{self, SandboxSpec},
    state::branch_dir,
};

/// A pre-started child sandbox of one branch.
pub(super) struct WarmChild {
    /// The id reserved for the child (its directory and cgroup are named by it).
    pub id: u64,
    pub cgroup: Cgroup,
    pub warm: sandbox::Warm,
    /// The parent's init it is nested in (a parent restarted since is another).
    pub parent_init: u32,
}

/// A child sandbox about to be pre-started (see [`Manager::ensure_warm`]).
struct Preparing {
    id: u64,
    spec: SandboxSpec,
    spec_file: std::path::PathBuf,
    cgroup: Cgroup,
}

impl Preparing {
    /// Starts the sandbox (tens of milliseconds: a process, its namespaces, its mounts).
    /// `FORKSCOPE_FAULT=warm-wait` holds each start at the test's gate first
    /// ([`crate::fault::hold_at_gate`]).
    fn start(self, bin: &std::path::Path) -> Started {
        if crate::fault::armed("warm-wait") {
            crate::fault::hold_at_gate();
        }
        let made = match sandbox::start_warm(bin, &self.spec, &self.spec_file, &self.cgroup) {
            Ok(warm) => Ok((self.cgroup, warm)),
            Err(e) => Err((Some(self.cgroup), e)),
        };
        (self.id, made)
    }
}

/// A sandbox start's outcome: the reserved id, and the cgroup with the sandbox, or what is
/// left to remove with the error.
type Started = (
    u64,
    std::result::Result<(Cgroup, sandbox::Warm), (Option<Cgroup>, Error)>,
);

/// Where a child sandbox started off the manager's lock is left for whoever takes it: the
/// thread that started it ([`Manager::prewarm_end`]), or a fork of the same parent that
/// came meanwhile and waits for it ([`Manager::ensure_warm`]).
pub struct WarmSlot {
    /// The parent's init the sandbox is nested in.
    nested_in: u32,
    started: Mutex<Option<Started>>,
    ready: Condvar,
}

/// A child sandbox of one branch being pre-started off the manager's lock: made by
/// [`Manager::prewarm_begin`] (under the lock), started by [`Warming::start`] (without it),
/// kept by [`Manager::prewarm_end`] (under it again).
pub struct Warming {
    id: u64,
    /// Taken by [`Warming::start`].
    preparing: Option<Preparing>,
    bin: std::path::PathBuf,
    slot: Arc<WarmSlot>,
}

impl Warming {
    /// Starts the sandbox and leaves it in its slot; returns the slot for
    /// [`Manager::prewarm_end`].
    pub fn start(mut self) -> Arc<WarmSlot> {
        if let Some(p) = self.preparing.take() {
            let bin = self.bin.clone();
            // A panic becomes a failed start (its cgroup goes as it unwinds): a fork waiting
            // on the slot must not wait forever.
            let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.start(&bin)))
                .unwrap_or_else(|_| {
                    let e = Error::Sandbox("a child sandbox's start panicked".into());
                    (self.id, Err((None, e)))
                });
            self.fill(started);
        }
        self.slot.clone()
    }

    /// Leaves `started` in the slot (unless something is there already) and wakes a fork
    /// waiting for it.
    fn fill(&self, started: Started) {
        let mut slot = self.slot.started.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(started);
        }
        self.slot.ready.notify_all();
    }
}

impl Drop for Warming {
    /// One dropped unstarted leaves a failed start in its slot (its cgroup goes with it; the
    /// directory goes when the slot is emptied): nobody waits for it forever.
    fn drop(&mut self) {
        if self.preparing.take().is_some() {
            let e = Error::Sandbox("a child sandbox was prepared and not started".into());
            self.fill((self.id, Err((None, e))));
        }
    }
}

impl Manager {
    /// The first step of pre-starting the sandbox of `name`'s next child (the reply to a
    /// `run` or a fork has gone): its id, directory and cgroup, unless `name` has one
    /// already, or one being started, or has no processes to clone.
    pub fn prewarm_begin(&mut self, name: &str) -> Result<Option<Warming>> {
        let p = self.get(name)?;
        if p.init_pid == 0 || p.cgroup.as_os_str().is_empty() || self.warming.contains_key(name) {
            return Ok(None);
        }
        let ready = self
            .warm
            .get(name)
            .is_some_and(|pool| pool.iter().any(|w| w.parent_init == p.init_pid));
        if ready {
            return Ok(None);
        }
        let preparing = self.prepare_warm(&p)?;
        let slot = Arc::new(WarmSlot {
            nested_in: p.init_pid,
            started: Mutex::new(None),
            ready: Condvar::new(),
        });
        self.warming.insert(name.to_string(), slot.clone());
        Ok(Some(Warming {
            id: preparing.id,
            preparing: Some(preparing),
            bin: self.bin.clone(),
            slot,
        }))
    }

    /// The last step: keeps the sandbox [`Warming::start`] left in `slot` for `name`'s
    /// next fork, unless a fork took it already; discards it if `name` is gone or was
    /// restarted meanwhile.
    pub fn prewarm_end(&mut self, name: &str, slot: &Arc<WarmSlot>) -> Result<()> {
        // Not in the map any more: a fork took it (the slot is empty) or `name` was
        // aborted (it is discarded, whatever branch has the name now).
        let current = self.warming.get(name).is_some_and(|s| Arc::ptr_eq(s, slot));
        if current {
            self.warming.remove(name);
        }
        let started = slot
            .started
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(started) = started else {
            return Ok(());
        };
        let init = if current {
            self.get(name).map(|p| p.init_pid).unwrap_or(0)
        } else {
            0
        };
        self.keep_started(name, init, slot.nested_in, started)
    }

    /// Waits for the sandbox being started off the lock for `name`, if any, and keeps it
    /// (a fork that came before it was ready).
    fn collect_warming(&mut self, name: &str, init_pid: u32) -> Result<()> {
        let Some(slot) = self.warming.remove(name) else {
            return Ok(());
        };
        let started = {
            let mut started = slot.started.lock().unwrap_or_else(|p| p.into_inner());
            while started.is_none() {
                started = slot.ready.wait(started).unwrap_or_else(|p| p.into_inner());
            }
            started.take()
        };
        match started {
            Some(s) => self.keep_started(name, init_pid, slot.nested_in, s),
            None => Ok(()),
        }
    }

    /// Puts a started sandbox, nested in `nested_in`, in `name`'s pool if that is still the
    /// parent's init (`init_pid`), or removes it (and what a failed start left).
    fn keep_started(
        &mut self,
        name: &str,
        init_pid: u32,
        nested_in: u32,
        (id, made): Started,
    ) -> Result<()> {
        match made {
            Ok((cgroup, warm)) => {
                let w = WarmChild {
                    id,
                    cgroup,
                    warm,
                    parent_init: nested_in,
                };
                if init_pid != 0 && nested_in == init_pid {
                    self.warm.entry(name.to_string()).or_default().push(w);
                } else {
                    self.discard(w);
                }
                Ok(())
            }
            Err((cgroup, e)) => {
                drop(cgroup);
                let _ = std::fs::remove_dir_all(branch_dir(&self.state, id));
                Err(e)
            }
        }
    }

    /// Makes sure `p` has `count` pre-started child sandboxes (a fork of `count` children
    /// calls it before it holds `p`'s processes): the missing ones are started side by
    /// side, one thread each, as many at a time as there are CPUs. Those that started are
    /// kept even when another fails.
    pub(super) fn ensure_warm(&mut self, p: &BranchRecord, count: usize) -> Result<()> {
        if p.init_pid == 0 || p.cgroup.as_os_str().is_empty() {
            return Ok(());
        }
        if let Err(e) = self.collect_warming(&p.name, p.init_pid) {
            log::warn!("pre-starting a child sandbox of {}: {e}", p.name);
        }
        let pool = self.warm.remove(&p.name).unwrap_or_default();
        let (fresh, stale): (Vec<_>, Vec<_>) =
            pool.into_iter().partition(|w| w.parent_init == p.init_pid);
        for w in stale {
            self.discard(w);
        }
        let ready = fresh.len();
        if !fresh.is_empty() {
            self.warm.insert(p.name.clone(), fresh);
        }
        let mut outcome = Ok(());
        let mut prepared = Vec::new();
        while ready + prepared.len() < count {
            match self.prepare_warm(p) {
                Ok(w) => prepared.push(w),
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
        // As many at once as there are CPUs (a fork of 33 children does not start 33
        // sandboxes on two CPUs at the same time); asked only when some must start (it
        // reads the cgroup's CPU quota files).
        let at_once = if prepared.is_empty() {
            1
        } else {
            std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8))
        };
        let bin = &self.bin;
        let mut started = Vec::new();
        while !prepared.is_empty() {
            let batch: Vec<Preparing> = prepared.drain(..at_once.min(prepared.len())).collect();
            std::thread::scope(|scope| {
                let mut runs = Vec::new();
                for w in batch {
                    let id = w.id;
                    let run = std::thread::Builder::new()
                        .name("forkscope-warm".into())
                        .spawn_scoped(scope, move || w.start(bin));
                    match run {
                        Ok(run) => runs.push((id, run)),
                        // (The closure, with the cgroup, is dropped.)
                        Err(e) => started.push((id, Err((None, Error::from(e))))),
                    }
                }
                for (id, run) in runs {
                    // (A thread that panicked took its cgroup with it.)
                    let panicked = || Error::Sandbox("a child sandbox's start panicked".into());
                    started.push(run.join().unwrap_or_else(|_| (id, Err((None, panicked())))));
                }
            });
        }
        // After those that were ready (the oldest are taken first).
        for s in started {
            let kept = self.keep_started(&p.name, p.init_pid, p.init_pid, s);
            if outcome.is_ok() {
                outcome = kept;
            }
        }
        outcome
    }

    /// One more pre-started child sandbox of `p`, ready to start: its id, directory and
    /// cgroup made (its overlays are mounted when a fork takes it: `deferred`).
    fn prepare_warm(&mut self, p: &BranchRecord) -> Result<Preparing> {
        let id = self.registry.next_id()?;
        let dir = branch_dir(&self.state, id);
        mkdirs(&dir, &["ws/upper", "ws/work", "tmp/upper", "tmp/work"])?;
        let spec = SandboxSpec {
            nest_in: Some(p.init_pid),
            deferred: Some(self.state.clone()),
            ..SandboxSpec::for_branch(
                &dir,
                p.workspace.clone(),
                self.hidden.clone(),
                p.net_isolated,
                p.policy.as_ref(),
            )
        };
        match Cgroup::create(&format!("branch-{}-{id}", self.instance)) {
            Ok(cgroup) => Ok(Preparing {
                id,
                spec,
                spec_file: dir.join("spec.json"),
                cgroup,
            }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// Takes one of `name`'s pre-started child sandboxes, if one still fits (nested in
    /// `init_pid`).
    pub(super) fn take_warm(&mut self, name: &str, init_pid: u32) -> Option<WarmChild> {
        // The oldest first: children are numbered in the order they are made.
        let pool = self.warm.get_mut(name)?;
        let w = (!pool.is_empty()).then(|| pool.remove(0));
        if pool.is_empty() {
            self.warm.remove(name);
        }
        match w {
            Some(w) if w.parent_init == init_pid => Some(w),
            Some(stale) => {
                self.discard(stale);
                None
            }
            None => None,
        }
    }

    /// Discards `name`'s pre-started child sandboxes (the branch goes away); one being
    /// started is discarded when its start ends ([`Manager::prewarm_end`]).
    pub(super) fn drop_warm(&mut self, name: &str) {
        self.warming.remove(name);
        for w in self.warm.remove(name).unwrap_or_default() {
            self.discard(w);
        }
    }

    /// Removes what no record owns: branch directories and cgroups of this state directory
    /// (pre-started sandboxes of a daemon that stopped, or a fork a crash cut short), and
    /// closes what such a fork left in the parent branch's processes.
    pub(super) fn sweep_unowned(&self) -> Result<()> {
        let owned: Vec<u64> = self.registry.all()?.iter().map(|b| b.id).collect();
        let prefix = format!("branch-{}-", self.instance);
        if let Ok(root) = cgroup2_root() {
            let dir = root.join("forkscope");
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(id) = name
                    .strip_prefix(&prefix)
                    .and_then(|i| i.parse::<u64>().ok())
                else {
                    continue;
                };
                if !owned.contains(&id)
                    && let Ok(cg) = Cgroup::open(&entry.path())
                {
                    log::info!("removing cgroup {name}: no branch owns it");
                    let _ = cg.remove();
                }
            }
        }
        // The processes a fork cut short left something of the child in.
        for b in self.registry.all()? {
            if b.frozen {
                continue;
            }
            match crate::procfork::repair_after_crash(&b.cgroup, b.init_pid, &b.dir) {
                Ok(pids) if !pids.is_empty() => log::info!(
                    "{}: closed what a fork cut short left in processes {pids:?}",
                    b.name
                ),
                Ok(_) => {}
                Err(e) => log::warn!("{}: repairing after a fork cut short: {e}", b.name),
            }
        }
        let branches = self.state.join("branches");
        for entry in std::fs::read_dir(&branches).into_iter().flatten().flatten() {
            let id = entry.file_name().to_string_lossy().parse::<u64>().ok();
            if let Some(id) = id
                && !owned.contains(&id)
            {
                log::info!("removing {}: no branch owns it", entry.path().display());
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(())
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        let names: Vec<String> = self.warm.keys().cloned().collect();
        for n in names {
            self.drop_warm(&n);
        }
    }
}

impl Manager {
    /// Stops a pre-started sandbox's setup process and removes its cgroup and directory.
    pub(super) fn discard(&self, w: WarmChild) {
        drop(w.warm);
        let cgroup = w.cgroup.keep();
        self.remove_unrecorded(&cgroup, &branch_dir(&self.state, w.id));
    }
}
