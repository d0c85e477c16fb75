//! Starting a branch's sandbox: a new one (`forkscope __init`), or a pre-started one
//! ([`super::warm`]) whose overlays only need mounting. A fork starts the mounts and clones
//! the processes meanwhile ([`Manager::begin_start`], then [`Manager::finish_start`]); `run`
//! calls one after the other.

use std::path::PathBuf;

use super::{BranchRecord, Manager, Start, mkdirs};
use crate::{
    cgroup::Cgroup,
    error::Result,
    sandbox::{self, SandboxSpec, StackSpec},
    state::branch_dir,
};

/// A branch whose sandbox is up but whose overlays may still be being mounted (a
/// pre-started sandbox's). Its record says where its init and control socket are.
pub(super) struct Starting {
    record: BranchRecord,
    cgroup: Cgroup,
    mounting: Option<sandbox::Mounting>,
    /// The branch is recorded once started (not a fork's child, recorded once its processes
    /// are cloned).
    record_it: bool,
}

impl Starting {
    /// The branch's record (its sandbox's init and control socket are known).
    pub fn record(&self) -> &BranchRecord {
        &self.record
    }
}

impl Manager {
    /// Starts a branch's sandbox; with a pre-started one, only asks for its overlays and
    /// returns while they are mounted. Then [`Manager::finish_start`] or
    /// [`Manager::abandon_start`].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn begin_start(
        &mut self,
        id: u64,
        name: String,
        parent: Option<String>,
        workspace: PathBuf,
        command: Vec<String>,
        ws_lowers: Vec<PathBuf>,
        tmp_lowers: Vec<PathBuf>,
        fork_ns: Option<i128>,
        how: Start,
    ) -> Result<Starting> {
        let dir = branch_dir(&self.state, id);
        mkdirs(&dir, &["ws/upper", "ws/work", "tmp/upper", "tmp/work"])?;
        let spec = SandboxSpec {
            workspace_stack: StackSpec {
                lowers: ws_lowers.clone(),
                ..StackSpec::in_dir(&dir, "ws")
            },
            tmp_stack: StackSpec {
                lowers: tmp_lowers.clone(),
                ..StackSpec::in_dir(&dir, "tmp")
            },
            command: how.command,
            nest_in: how.nest_in,
            ..SandboxSpec::for_branch(
                &dir,
                workspace.clone(),
                self.hidden.clone(),
                how.net_isolated,
                how.policy.as_ref(),
            )
        };
        let (cgroup, warm) = match how.warm {
            Some(w) => (w.cgroup, Some(w.warm)),
            None => (
                Cgroup::create(&format!("branch-{}-{id}", self.instance))?,
                None,
            ),
        };
        let started = match &self.tracker {
            Some(t) => t
                .track(
                    cgroup.id(),
                    &dir.join("trace.jsonl"),
                    crate::tracker::Watch {
                        write_detail: how.write_detail && !how.checkpoint,
                        dirty_pages: !how.checkpoint,
                    },
                )
                .and_then(|()| t.set_net_policy(cgroup.id(), how.policy.as_ref())),
            None => Ok(()),
        };
        let started = started.and_then(|()| match warm {
            Some(w) => {
                let sb = w.sandbox.clone();
                w.request_mount(&spec.workspace_stack, &spec.tmp_stack)
                    .map(|m| (sb, Some(m)))
            }
            None => sandbox::start(&self.bin, &spec, &dir.join("spec.json"), &cgroup)
                .map(|sb| (sb, None)),
        });
        let (sb, mounting) = match started {
            Ok(s) => s,
            Err(e) => {
                self.remove_started(cgroup, &dir);
                return Err(e);
            }
        };
        let record = BranchRecord {
            id,
            name,
            parent,
            workspace,
            command,
            cgroup: cgroup.path().to_path_buf(),
            init_pid: sb.init_pid,
            control: sb.control,
            dir,
            ws_lowers,
            tmp_lowers,
            ws_deltas: Vec::new(),
            tmp_deltas: Vec::new(),
            last_snapshot_ns: None,
            manifests: 0,
            frozen: false,
            fork_ns,
            flattened: None,
            net_isolated: how.net_isolated,
            write_detail: how.write_detail,
            policy: how.policy,
            retired: false,
        };
        Ok(Starting {
            record,
            cgroup,
            mounting,
            record_it: how.nest_in.is_none(),
        })
    }

    /// Waits for a started branch's overlays, serves its deferring listener, and records
    /// it: a child whose processes are cloned into it is recorded once they are (by the
    /// fork), so a crash before leaves no half-forked branch (a daemon that starts removes
    /// the rest). On failure nothing of it is left.
    pub(super) fn finish_start(&mut self, s: Starting) -> Result<BranchRecord> {
        let Starting {
            record,
            cgroup,
            mounting,
            record_it,
        } = s;
        let mounted = match mounting {
            Some(m) => m.mounted().map(|_| ()),
            None => Ok(()),
        };
        // A deferring branch's listener is served before anything in it can call out.
        // (Whether its init holds a listener, rather than what the policy says now: a
        // pre-started sandbox was made under the policy of its time.)
        let served = mounted.and_then(|()| match &self.deferrals {
            Some(d) if sandbox::notify::listener_fd(record.init_pid).is_some() => {
                d.adopt(record.init_pid)
            }
            _ => Ok(()),
        });
        let recorded = served.and_then(|()| match record_it {
            true => self.registry.put(&record),
            false => Ok(()),
        });
        if let Err(e) = recorded {
            self.remove_started(cgroup, &record.dir);
            return Err(e);
        }
        cgroup.keep();
        Ok(record)
    }

    /// Gives up a started branch that is not recorded: its processes, cgroup and directory
    /// go (mounts still being made go with the processes holding their namespaces).
    pub(super) fn abandon_start(&self, s: Starting) {
        let Starting {
            record,
            cgroup,
            mounting,
            ..
        } = s;
        drop(mounting);
        self.remove_started(cgroup, &record.dir);
    }

    fn remove_started(&self, cgroup: Cgroup, dir: &std::path::Path) {
        if let Some(t) = &self.tracker {
            t.untrack(cgroup.id());
        }
        drop(cgroup);
        let _ = std::fs::remove_dir_all(dir);
    }
}
