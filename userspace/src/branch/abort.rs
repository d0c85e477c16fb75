//! `Manager::abort` and `abort_tree`: a branch's processes, cgroup, held effects, trace and
//! layers go, files before the record (an abort cut short can be run again); and removing
//! what a failed start or fork left without a record.
//!
//! A branch aborted while branches forked from it run is **retired** rather than removed:
//! its processes, held effects and trace go and its name is free, but its init stays (its
//! forks' pid and user namespaces are nested in its own, and its init reaps their clones)
//! and so do its layers (they stand on them); it goes with the last of them.

use std::{path::Path, time::Duration};

use super::{BranchRecord, Manager, trace_file};
use crate::{
    cgroup::Cgroup,
    error::{Error, Result},
};

impl Manager {
    /// Aborts `name` and every branch forked from it, directly or not (children first).
    /// Returns the names aborted. A retired branch in the tree goes with its last fork.
    pub fn abort_tree(&mut self, name: &str) -> Result<Vec<String>> {
        self.get_any(name)?;
        let all = self.registry.all()?;
        // Descendants, each after its parent: aborted in reverse, children first.
        let mut order = vec![name.to_string()];
        let mut i = 0;
        while i < order.len() {
            let parent = order[i].clone();
            order.extend(
                all.iter()
                    .filter(|b| b.parent.as_deref() == Some(parent.as_str()))
                    .map(|b| b.name.clone()),
            );
            i += 1;
        }
        for n in order.iter().rev() {
            match self.registry.get(n)? {
                // Gone already, with its last fork.
                None => continue,
                Some(b) if b.retired => self.remove_retired_ancestors(Some(n))?,
                Some(_) => self.abort(n)?,
            }
        }
        Ok(order)
    }

    /// Removes a child a failed fork started but never recorded: its processes, cgroup and
    /// directory.
    pub(super) fn discard_unrecorded(&mut self, b: &BranchRecord) {
        self.remove_unrecorded(&b.cgroup, &b.dir);
    }

    /// Kills what runs in `cgroup`, stops tracing it, and removes it and `dir` (a branch, or
    /// a pre-started sandbox, that no record owns).
    pub(super) fn remove_unrecorded(&self, cgroup: &Path, dir: &Path) {
        if let Ok(cg) = Cgroup::open(cgroup) {
            let _ = cg.kill_all(Duration::from_secs(5));
            if let Some(t) = &self.tracker {
                t.untrack(cg.id());
            }
            let _ = cg.remove();
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The branches forked from branch `name` that are recorded.
    fn children_of(&self, name: &str) -> Result<Vec<BranchRecord>> {
        Ok(self
            .registry
            .all()?
            .into_iter()
            .filter(|c| c.parent.as_deref() == Some(name))
            .collect())
    }

    /// Kills a branch's processes and removes its cgroup, files and record; a branch with
    /// live children is retired instead (see the module's documentation), and a retired
    /// parent left without children goes too. A retired branch without children left (a
    /// removal cut short) can be aborted by its `NAME~ID`.
    pub fn abort(&mut self, name: &str) -> Result<()> {
        let b = self.get_any(name)?;
        if b.retired {
            let children = self.children_of(name)?;
            if !children.is_empty() {
                return Err(Error::Conflict(format!(
                    "{name} was aborted already; it goes with the last of {} (or with `forkscope abort --recursive {name}`)",
                    children
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            return self.remove_retired_ancestors(Some(name));
        }
        self.drop_warm(name);
        if crate::commit::journal::pending(&b.dir) {
            return Err(Error::Conflict(format!(
                "the commit of {name} is incomplete: finish it (`forkscope commit {name}`, or restart the daemon) before aborting, or its target stays half written"
            )));
        }
        // (Its kept layer directories go with its directory, now or when it is retired.)
        self.spare_layers.remove(&b.id);
        let children = self.children_of(name)?;
        if !children.is_empty() {
            return self.retire(b, children);
        }
        self.remove_branch(&b)?;
        // The branch is gone whatever happens to a retired parent now: a parent left
        // behind is removed by a later abort of its name or when the daemon starts.
        if let Err(e) = self.remove_retired_ancestors(b.parent.as_deref()) {
            log::warn!("{name} aborted, but removing the branch it was forked from: {e}");
        }
        Ok(())
    }

    /// Removes the retired branches no fork is left of (a removal a crash cut short); run
    /// when the daemon starts.
    pub(super) fn sweep_retired(&mut self) -> Result<()> {
        for b in self.registry.all()? {
            if b.retired
                && self.registry.get(&b.name)?.is_some()
                && let Err(e) = self.remove_retired_ancestors(Some(&b.name))
            {
                log::warn!("{}: {e}", b.name);
            }
        }
        Ok(())
    }

    /// What it held back never happens, its processes (all of them, or all but its init)
    /// are killed, and its trace is closed (the file goes with its directory).
    fn end_processes(&self, b: &BranchRecord, keep_init: bool) -> Result<()> {
        if !b.cgroup.as_os_str().is_empty() && b.cgroup.exists() {
            let cg = Cgroup::open(&b.cgroup)?;
            if let Some(d) = &self.deferrals {
                d.cancel(cg.id());
            }
            if let Some(j) = &self.effects {
                let dropped = j.drop_branch(cg.id())?;
                if dropped > 0 {
                    log::info!("{}: {dropped} held side effects dropped with it", b.name);
                }
            }
            if keep_init {
                kill_all_but(&cg, b.init_pid)?;
            } else {
                // (Before the trace closes: their last events are written.)
                cg.kill_all(Duration::from_secs(5))?;
            }
            if let Some(t) = &self.tracker {
                t.untrack(cg.id());
            }
        }
        if let Some(t) = &self.tracker {
            t.forget_file(&trace_file(b));
        }
        Ok(())
    }

    /// Retires `b`, whose `children` run: see the module's documentation. It is recorded
    /// as `NAME~ID` and its children's records name it so.
    fn retire(&mut self, b: BranchRecord, children: Vec<BranchRecord>) -> Result<()> {
        self.end_processes(&b, true)?;
        let mut retired = b;
        retired.name = format!("{}~{}", retired.name, retired.id);
        retired.retired = true;
        let children: Vec<BranchRecord> = children
            .into_iter()
            .map(|mut c| {
                c.parent = Some(retired.name.clone());
                c
            })
            .collect();
        let mut all = vec![&retired];
        all.extend(children.iter());
        self.registry.put_all(&all)?;
        log::info!(
            "{} aborted; kept as {} while {} run",
            retired.name.split('~').next().unwrap_or_default(),
            retired.name,
            children
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(())
    }

    /// Removes the retired branch `name` (and its retired ancestors in turn) once no branch
    /// forked from it is left.
    fn remove_retired_ancestors(&mut self, name: Option<&str>) -> Result<()> {
        let mut name = name.map(str::to_string);
        while let Some(n) = name {
            let Some(p) = self.registry.get(&n)? else {
                return Ok(());
            };
            if !p.retired || !self.children_of(&n)?.is_empty() {
                return Ok(());
            }
            self.remove_branch(&p)?;
            name = p.parent;
        }
        Ok(())
    }

    /// Ends everything of `b` (which has no children left) and removes it.
    fn remove_branch(&mut self, b: &BranchRecord) -> Result<()> {
        self.end_processes(b, false)?;
        if !b.cgroup.as_os_str().is_empty() && b.cgroup.exists() {
            Cgroup::open(&b.cgroup)?.remove()?;
        }
        // Its layers belong to its own forks, which are gone. Files first,
        // then the record: an abort cut short can be run again.
        match std::fs::remove_dir_all(&b.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::Io {
                    path: b.dir.clone(),
                    cause: e,
                });
            }
            _ => {}
        }
        self.registry.remove(b.id)
    }
}

/// Kills every process of `cg` but `keep` (a branch's init), and waits until they are gone:
/// frozen meanwhile, so that none forks a new one between the list and the kill.
fn kill_all_but(cg: &Cgroup, keep: u32) -> Result<()> {
    use nix::sys::signal::{Signal, kill};
    // (A cgroup gone meanwhile has none left.)
    let list = || crate::procfork::inspect::targets(cg.path(), keep).unwrap_or_default();
    cg.freeze(true, Duration::from_secs(5))?;
    for pid in list() {
        let _ = kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    cg.freeze(false, Duration::from_secs(5))?;
    let start = std::time::Instant::now();
    while !list().is_empty() {
        if start.elapsed() > Duration::from_secs(5) {
            return Err(Error::Sandbox(format!(
                "processes of {} outlived SIGKILL for 5 s",
                cg.path().display()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}
