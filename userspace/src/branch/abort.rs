//! `Manager::abort` and `abort_tree`: a branch's processes, cgroup, held effects, trace and
//! layers go, files before the record (an abort cut short can be run again); and removing
//! what a failed start or fork left without a record.

use std::{path::Path, time::Duration};

use super::{BranchRecord, Manager, trace_file};
use crate::{
    cgroup::Cgroup,
    error::{Error, Result},
};

impl Manager {
    /// Aborts `name` and every branch forked from it, directly or not (children first).
    /// Returns the names aborted.
    pub fn abort_tree(&mut self, name: &str) -> Result<Vec<String>> {
        self.get(name)?;
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
            self.abort(n)?;
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

    /// Kills a branch's processes and removes its cgroup, files and record. A branch with
    /// live children is refused (see [`Manager::abort_tree`]).
    pub fn abort(&mut self, name: &str) -> Result<()> {
        let b = self.get(name)?;
        self.drop_warm(name);
        let children: Vec<String> = self
            .registry
            .all()?
            .into_iter()
            .filter(|c| c.parent.as_deref() == Some(name))
            .map(|c| c.name)
            .collect();
        if !children.is_empty() {
            return Err(Error::Conflict(format!(
                "{name} has live children ({}) standing on its layers: abort them first, or all at once with `forkscope abort --recursive {name}`",
                children.join(", ")
            )));
        }
        if crate::commit::journal::pending(&b.dir) {
            return Err(Error::Conflict(format!(
                "the commit of {name} is incomplete: finish it (`forkscope commit {name}`, or restart the daemon) before aborting, or its target stays half written"
            )));
        }
        if !b.cgroup.as_os_str().is_empty() && b.cgroup.exists() {
            let cg = Cgroup::open(&b.cgroup)?;
            // What it held back never happens.
            if let Some(d) = &self.deferrals {
                d.cancel(cg.id());
            }
            if let Some(j) = &self.effects {
                let dropped = j.drop_branch(cg.id())?;
                if dropped > 0 {
                    log::info!("{name}: {dropped} held side effects dropped with the branch");
                }
            }
            if let Some(t) = &self.tracker {
                // Its processes' last events first, then the trace file is closed.
                cg.kill_all(Duration::from_secs(5))?;
                t.untrack(cg.id());
            }
            cg.remove()?;
        }
        if let Some(t) = &self.tracker {
            t.forget_file(&trace_file(&b));
        }
        // Its layers belong to its own forks, which are gone (checked above). Files first,
        // then the record: an abort cut short can be run again.
        match std::fs::remove_dir_all(&b.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::Io {
                    path: b.dir,
                    cause: e,
                });
            }
            _ => {}
        }
        self.registry.remove(b.id)
    }
}
