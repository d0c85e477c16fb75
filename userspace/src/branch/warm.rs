//! Pre-started child sandboxes: after a branch is started or forked, the daemon starts the
//! sandbox of its next child ahead of time (nested in its namespaces, its overlays still to
//! come, see [`crate::sandbox::SandboxSpec::deferred`]), so the next fork only mounts the
//! overlays and clones the processes instead of waiting tens of milliseconds for a sandbox.
//!
//! One per branch at most, kept in memory only: a pre-started sandbox is not a branch (no
//! record); it is discarded when its branch is aborted or the daemon stops, and a daemon
//! that starts removes whatever a crash left (cgroups and directories without a record).

use super::{Manager, mkdirs};
use crate::{
    cgroup::{Cgroup, cgroup2_root},
    error::Result,
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

impl Manager {
    /// Pre-starts the sandbox of `name`'s next child, unless there is one already or `name`
    /// has no processes to clone.
    pub fn prewarm(&mut self, name: &str) -> Result<()> {
        let p = self.get(name)?;
        if p.init_pid == 0 || p.cgroup.as_os_str().is_empty() {
            return Ok(());
        }
        if let Some(w) = self.warm.get(name)
            && w.parent_init == p.init_pid
        {
            return Ok(());
        }
        if let Some(old) = self.warm.remove(name) {
            self.discard(old);
        }
        let id = self.registry.next_id()?;
        let dir = branch_dir(&self.state, id);
        mkdirs(&dir, &["ws/upper", "ws/work", "tmp/upper", "tmp/work"])?;
        // Its overlays are mounted when a fork takes it (`deferred`).
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
        let cgroup = Cgroup::create(&format!("branch-{}-{id}", self.instance))?;
        match sandbox::start_warm(&self.bin, &spec, &dir.join("spec.json"), &cgroup) {
            Ok(warm) => {
                self.warm.insert(
                    name.to_string(),
                    WarmChild {
                        id,
                        cgroup,
                        warm,
                        parent_init: p.init_pid,
                    },
                );
                Ok(())
            }
            Err(e) => {
                drop(cgroup);
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// Takes `name`'s pre-started child sandbox, if it still fits (nested in `init_pid`).
    pub(super) fn take_warm(&mut self, name: &str, init_pid: u32) -> Option<WarmChild> {
        match self.warm.remove(name) {
            Some(w) if w.parent_init == init_pid => Some(w),
            Some(stale) => {
                self.discard(stale);
                None
            }
            None => None,
        }
    }

    /// Discards `name`'s pre-started child sandbox (the branch goes away).
    pub(super) fn drop_warm(&mut self, name: &str) {
        if let Some(w) = self.warm.remove(name) {
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
