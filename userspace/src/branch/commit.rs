//! `commit`: applying a branch's changes since its fork point (or its previous commit) to its
//! parent's view: the host workspace for a root branch, else the nearest running ancestor
//! (a checkpoint is skipped: it never changes). See [`crate::commit`] for how.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{BranchRecord, Manager};
use crate::{
    cgroup::Cgroup,
    commit::{
        CommitPhases, CommitState, Fingerprint, Prefer,
        journal::{self, Journal},
        plan::plan,
        target::Target,
    },
    error::{Error, Result},
    layers::{diff::Change, scan::EntryKind},
};

/// What `commit` does about conflicts.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct CommitOptions {
    #[serde(default)]
    pub prefer: Prefer,
}

/// The result of a commit.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Committed {
    pub branch: String,
    /// `host` or the parent branch's name.
    pub target: String,
    /// What changed in the target.
    pub changes: Vec<Change>,
    /// Paths changed on both sides, settled by `prefer`.
    pub conflicts: Vec<PathBuf>,
    pub phases: CommitPhases,
    /// The branch's held side effects, delivered now, in the order they were made.
    #[serde(default)]
    pub effects: Vec<crate::effects::replay::Delivery>,
}

/// Freezes a cgroup until dropped; one frozen already by someone else (or by a cgroup above
/// it) stays frozen.
struct Frozen(Option<Cgroup>);

impl Frozen {
    /// `ours`: a freeze found in place is forkscope's own (one an incomplete commit kept).
    fn new(path: &Path, ours: bool) -> Result<Self> {
        let cg = Cgroup::open(path)?;
        let ours = ours && cg.frozen_by_forkscope() != Some(false);
        if (cg.is_frozen() && !ours) || cg.frozen_by_ancestor() {
            return Ok(Self(None));
        }
        cg.freeze(true, Duration::from_secs(5))?;
        Ok(Self(Some(cg)))
    }

    /// Leaves the cgroup frozen (a commit that must be finished before anything runs).
    fn keep(mut self) {
        self.0.take();
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Some(cg) = self.0.take() {
            let _ = cg.freeze(false, Duration::from_secs(5));
        }
    }
}

impl Manager {
    /// Commits branch `name` into its parent's view (the host workspace for a root branch).
    pub fn commit(&mut self, name: &str, opts: &CommitOptions) -> Result<Committed> {
        let b = self.get(name)?;
        if b.frozen {
            return Err(Error::Invalid(format!(
                "{name} is a checkpoint: it has no changes of its own to commit (fork it and commit the fork)"
            )));
        }
        let started = super::trace_notes::now_ns();
        let (target, target_branch) = self.target_of(&b)?;
        let mut phases = CommitPhases::default();

        let t = Instant::now();
        // An incomplete commit of it kept both sides frozen: those freezes are ours (where
        // they carry forkscope's mark: not one someone else had made before).
        let ours = journal::pending(&b.dir);
        let frozen_branch = Frozen::new(&b.cgroup, ours)?;
        let frozen_target = match &target_branch {
            Some(p) => Some(Frozen::new(&p.cgroup, ours)?),
            None => None,
        };
        phases.freeze_us = t.elapsed().as_micros() as u64;
        let keep_frozen = |e: Error, fb: Frozen, ft: Option<Frozen>| {
            if matches!(e, Error::CommitIncomplete(_)) {
                fb.keep();
                if let Some(ft) = ft {
                    ft.keep();
                }
            }
            e
        };
        // A commit of it that stopped half-way is finished first, both sides frozen.
        if let Err(e) = journal::recover(&b.dir) {
            return Err(keep_frozen(e, frozen_branch, frozen_target));
        }
        let mut state = CommitState::load(&b.dir)?;

        let t = Instant::now();
        let plan = plan(
            &b.dir.join("ws/upper"),
            &b.ws_lowers,
            &state,
            &target,
            opts.prefer,
        )?;
        phases.plan_us = t.elapsed().as_micros() as u64;

        if !plan.ops.is_empty() {
            let staging = self.staging_dir(&b, &target)?;
            // The host is not frozen: what the plan saw there is checked again once the
            // files are staged, just before the commit point.
            let seen: Vec<(PathBuf, Option<Fingerprint>)> = plan
                .ops
                .iter()
                .map(|op| {
                    let p = op.path().to_path_buf();
                    let fp = Fingerprint::of(&target.root().join(&p));
                    (p, fp)
                })
                .collect();
            let t = Instant::now();
            if let Err(e) = journal::stage(&b.dir, &plan, &staging) {
                journal::discard(&b.dir, &staging);
                return Err(e);
            }
            phases.stage_us = t.elapsed().as_micros() as u64;
            let moved: Vec<String> = seen
                .iter()
                .filter(|(p, fp)| {
                    !Fingerprint::matches(fp, &Fingerprint::of(&target.root().join(p)))
                })
                .map(|(p, _)| p.display().to_string())
                .collect();
            if !moved.is_empty() {
                journal::discard(&b.dir, &staging);
                return Err(Error::Conflict(format!(
                    "{} changed while the commit was being prepared ({}): nothing was applied; commit again",
                    target.describe(),
                    moved.join(", ")
                )));
            }
            let target_process = match &target_branch {
                Some(p) => match journal::process_start(p.init_pid) {
                    Some(start) => Some((p.init_pid, start)),
                    None => {
                        journal::discard(&b.dir, &staging);
                        return Err(Error::Conflict(format!(
                            "{} stopped during the commit",
                            p.name
                        )));
                    }
                },
                None => None,
            };
            let t = Instant::now();
            state.manifest = plan.manifest.clone();
            state.scan_ns = plan.scan_ns;
            state.commits += 1;
            let keep_replaced = matches!(target, Target::Host { .. });
            let applied = journal::apply(
                &b.dir,
                &Journal {
                    root: target.root().to_path_buf(),
                    baseline: target.baseline().to_path_buf(),
                    staging: staging.clone(),
                    ops: plan.ops.clone(),
                    state,
                    target_process,
                    keep_replaced,
                },
            );
            match applied {
                Ok(done) => self.garbage.dispose(&done.staging),
                Err(e) => {
                    // Before the commit point nothing happened (the journal is gone too);
                    // after it, the staging directory is what the replay installs from.
                    if !matches!(e, Error::CommitIncomplete(_)) {
                        journal::discard(&b.dir, &staging);
                    }
                    return Err(keep_frozen(e, frozen_branch, frozen_target));
                }
            }
            phases.apply_us = t.elapsed().as_micros() as u64;
        } else if state.manifest != plan.manifest {
            // Nothing to write (changes that cancel out): the base still moves forward.
            state.manifest = plan.manifest.clone();
            state.scan_ns = plan.scan_ns;
            state.save(&b.dir)?;
        }

        let t = Instant::now();
        drop(frozen_target);
        drop(frozen_branch);
        phases.thaw_us = t.elapsed().as_micros() as u64;
        // The commit is the decision that the branch's effects happen: now, in order. The
        // files are committed whatever happens here: a journal error is reported with them.
        let effects = self.release_effects(&b).unwrap_or_else(|e| {
            vec![crate::effects::replay::Delivery {
                id: 0,
                kind: "journal".into(),
                dest: String::new(),
                summary: String::new(),
                delivered: false,
                result: format!("the held effects could not be released: {e}"),
            }]
        });
        let target_name = target_branch.map_or_else(|| "host".to_string(), |p| p.name);
        self.note_commit(&b, &target_name, started, &phases);
        Ok(Committed {
            branch: b.name.clone(),
            target: target_name,
            changes: plan.changes,
            conflicts: plan.conflicts,
            phases,
            effects,
        })
    }

    /// What `b` commits into, and the branch record when that is a branch.
    fn target_of(&self, b: &BranchRecord) -> Result<(Target, Option<BranchRecord>)> {
        let Some(mut parent) = b.parent.clone() else {
            let base = b.ws_lowers.last().cloned().unwrap_or_default();
            let base_ns = b
                .fork_ns
                .ok_or_else(|| Error::State(format!("{} has no recorded fork point", b.name)))?;
            let manifest = b.dir.join("base-manifest.json");
            let copied_from = match std::fs::read_to_string(&manifest) {
                Ok(t) => serde_json::from_str(&t)
                    .map_err(|e| Error::State(format!("{}: {e}", manifest.display())))?,
                Err(_) => Default::default(),
            };
            return Ok((
                Target::Host {
                    dir: b.workspace.clone(),
                    base,
                    base_ns,
                    copied_from,
                },
                None,
            ));
        };
        let p = loop {
            let p = self.registry.get(&parent)?.ok_or_else(|| {
                Error::State(format!("{}'s parent {parent} has no record", b.name))
            })?;
            if p.retired && !p.frozen {
                return Err(Error::Conflict(format!(
                    "{} was forked from a branch that was aborted since ({}): there is nothing to commit it into (export what you need, then abort it)",
                    b.name, p.name
                )));
            }
            if !p.frozen {
                break p;
            }
            parent = p
                .parent
                .clone()
                .ok_or_else(|| Error::State(format!("checkpoint {} has no parent", p.name)))?;
        };
        let alive = Cgroup::open(&p.cgroup)
            .and_then(|c| c.populated())
            .unwrap_or(false)
            && Path::new(&format!("/proc/{}", p.init_pid)).exists();
        if !alive {
            return Err(Error::Conflict(format!(
                "{} commits into {}, which is not running: its files cannot be changed (abort it, or commit {} elsewhere)",
                b.name, p.name, b.name
            )));
        }
        let manifest_file = b.dir.join("fork-manifest.json");
        let fork_manifest: BTreeMap<PathBuf, (EntryKind, Option<i128>)> =
            std::fs::read_to_string(&manifest_file)
                .ok()
                .and_then(|t| serde_json::from_str::<crate::layers::snapshot::Manifest>(&t).ok())
                .map(|m| {
                    m.entries
                        .into_iter()
                        .map(|(p, k)| {
                            let c = m.ctimes.get(&p).copied();
                            (p, (k, c))
                        })
                        .collect()
                })
                .unwrap_or_default();
        let fork_ns = b
            .fork_ns
            .ok_or_else(|| Error::State(format!("{} has no recorded fork point", b.name)))?;
        let rel = p.workspace.strip_prefix("/").unwrap_or(&p.workspace);
        Ok((
            Target::Branch {
                name: p.name.clone(),
                view: PathBuf::from(format!("/proc/{}/root", p.init_pid)).join(rel),
                upper: p.dir.join("ws/upper"),
                fork_ns,
                fork_manifest,
            },
            Some(p),
        ))
    }

    /// Where a commit of `b` stages its files: on the target's filesystem, so installing is a
    /// rename. The state directory when it shares the host workspace's filesystem; else a
    /// hidden directory at the top of the target.
    fn staging_dir(&self, b: &BranchRecord, target: &Target) -> Result<PathBuf> {
        if let Target::Host { dir, .. } = target {
            let dev = crate::commit::device_of(dir);
            if dev.is_some() && dev == crate::commit::device_of(&b.dir) {
                return Ok(b.dir.join("staging"));
            }
        }
        Ok(target.root().join(format!(".forkscope-staging-{}", b.id)))
    }

    /// Finishes the commits a crash interrupted and thaws branches a crash left frozen
    /// (those forkscope's mark says it froze); run when the registry is opened.
    pub(super) fn recover(&self) -> Result<()> {
        let all = self.registry.all()?;
        let mut stuck: Vec<&BranchRecord> = Vec::new();
        for b in &all {
            if b.frozen {
                continue;
            }
            match journal::recover(&b.dir) {
                Ok(true) => log::info!("finished the commit of {} a crash interrupted", b.name),
                Ok(false) => {}
                Err(e) => {
                    // Not fatal to the daemon: the other branches are served; this one and
                    // the branch it commits into stay frozen until the commit is finished.
                    log::error!("{}: {e}", b.name);
                    stuck.push(b);
                }
            }
        }
        // A stuck commit keeps its branch and the branch it writes into frozen (through a
        // checkpoint, that is the nearest running ancestor).
        let blocked: Vec<u64> = stuck
            .iter()
            .flat_map(|s| {
                let mut ids = vec![s.id];
                match self.target_of(s) {
                    Ok((_, Some(t))) => ids.push(t.id),
                    Ok((_, None)) => {}
                    Err(_) => ids.extend(
                        all.iter()
                            .filter(|p| s.parent.as_deref() == Some(p.name.as_str()))
                            .map(|p| p.id),
                    ),
                }
                ids
            })
            .collect();
        let mut marks_kept = None;
        for b in &all {
            if blocked.contains(&b.id) {
                continue;
            }
            let Ok(cg) = Cgroup::open(&b.cgroup) else {
                continue;
            };
            if b.frozen {
                // A checkpoint a crash left thawed (mid-fork) is frozen again.
                if !cg.is_frozen() {
                    log::warn!("{}: a checkpoint found thawed, frozen again", b.name);
                    let _ = cg.refreeze(Duration::from_secs(5));
                }
                continue;
            }
            // Someone else's freeze a fork thawed for a while, cut short by a crash: left
            // running until the fork's marks are repaired (which takes running processes),
            // then frozen again (`refreeze_lent`).
            if cg.lent_by_someone() {
                continue;
            }
            // Only what forkscope froze (its mark): a branch someone else froze stays so.
            // Where cgroups keep no marks, every branch is thawed.
            let kept = *marks_kept.get_or_insert_with(|| cg.keeps_marks());
            match kept.then(|| cg.frozen_by_forkscope()).flatten() {
                Some(false) if cg.is_frozen() => {
                    log::info!("{} stays frozen: someone else froze it", b.name);
                }
                Some(false) => {}
                Some(true) | None => {
                    let _ = cg.freeze(false, Duration::from_secs(5));
                }
            }
        }
        Ok(())
    }

    /// Freezes again, for whoever froze them, the branches a fork thawed for a while and a
    /// crash left thawed (their mark, see [`Cgroup::thaw_for_a_while`]); run when the
    /// registry is opened, once the processes a crashed fork left marked are repaired.
    pub(super) fn refreeze_lent(&self) -> Result<()> {
        for b in self.registry.all()? {
            if b.frozen || b.retired {
                continue;
            }
            let Ok(cg) = Cgroup::open(&b.cgroup) else {
                continue;
            };
            if cg.lent_by_someone() {
                log::warn!(
                    "{}: frozen again for whoever froze it (a fork thawed it and did not finish)",
                    b.name
                );
                if let Err(e) = cg.refreeze(Duration::from_secs(5)) {
                    log::warn!("{}: freezing it again: {e}", b.name);
                }
            }
        }
        Ok(())
    }

    /// Refuses `what` while a commit of any branch is incomplete (its target may be half
    /// written and is kept frozen).
    pub(super) fn no_commit_pending(&self, what: &str) -> Result<()> {
        for b in self.registry.all()? {
            if journal::pending(&b.dir) {
                return Err(Error::Conflict(format!(
                    "the commit of {} is incomplete: finish it (`forkscope commit {}`, or restart the daemon) before {what}",
                    b.name, b.name
                )));
            }
        }
        Ok(())
    }
}
