//! `Manager::fork`: freeze the parent, snapshot what its upper directories changed into new
//! layers, seize its processes, thaw it, start the children on those layers and clone the
//! processes into them; checkpoints (`--frozen`), and flattening a deep chain of layers.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{
    BranchRecord, Flattened, ForkOptions, ForkPhases, Forked, Manager, Start, trace_notes,
    validate_name,
};
use crate::{
    cgroup::Cgroup,
    error::{Error, IoContext, Result},
    layers::{
        flatten::flatten,
        overlay::MAX_LOWERS,
        snapshot::{Manifest, snapshot, snapshot_clock_ns},
    },
    procfork,
    state::branch_dir,
};

/// One upper directory of a branch about to be snapshotted: where its new layer goes (made
/// ready before the freeze) and what its previous snapshot saw.
struct SnapshotPart {
    /// "ws" or "tmp".
    what: &'static str,
    upper: PathBuf,
    layer: PathBuf,
    previous: Manifest,
}

/// The file of generation `generation` (see `BranchRecord::manifests`) of a branch's
/// manifest `what` ("ws" or "tmp") in its directory `dir`: two slots used in turn, so a
/// snapshot writes its manifests over the generation before the one its record names,
/// never over that one (a daemon dying meanwhile leaves the record's manifests whole).
pub(super) fn manifest_path(dir: &Path, what: &str, generation: u64) -> PathBuf {
    if generation == 0 {
        dir.join(format!("{what}-manifest.json"))
    } else {
        dir.join(format!("{what}-manifest-{}.json", generation % 2))
    }
}

/// Creates the empty layer directories of `p`'s next snapshot (workspace, then /tmp), or
/// takes `spare` ones a previous fork left unused, and reads its previous manifests.
fn prepare_snapshot(p: &BranchRecord, spare: Option<Vec<PathBuf>>) -> Result<Vec<SnapshotPart>> {
    let spare = match spare {
        Some(s) if s.len() == 2 && s.iter().all(|d| is_empty_dir(d)) => Some(s),
        Some(s) => {
            // Touched since (nothing should): not a layer anyone stands on, so it goes.
            log::warn!("unused layer directories {s:?} were not empty: removed");
            for d in s {
                let _ = std::fs::remove_dir_all(d);
            }
            None
        }
        None => None,
    };
    let n = if spare.is_some() {
        0
    } else {
        next_layer_number(&p.dir)?
    };
    let mut parts = Vec::new();
    for (i, what) in ["ws", "tmp"].into_iter().enumerate() {
        let previous: Manifest = std::fs::read_to_string(manifest_path(&p.dir, what, p.manifests))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        if let Some(s) = &spare {
            parts.push(SnapshotPart {
                what,
                upper: p.dir.join(format!("{what}/upper")),
                layer: s[i].clone(),
                previous,
            });
            continue;
        }
        let layer = p.dir.join(format!("{what}-layer-{n}"));
        if let Err(e) = std::fs::create_dir(&layer) {
            for part in &parts {
                let part: &SnapshotPart = part;
                let _ = std::fs::remove_dir(&part.layer);
            }
            return Err(e).at(&layer);
        }
        parts.push(SnapshotPart {
            what,
            upper: p.dir.join(format!("{what}/upper")),
            layer,
            previous,
        });
    }
    Ok(parts)
}

fn is_empty_dir(d: &Path) -> bool {
    std::fs::read_dir(d).is_ok_and(|mut e| e.next().is_none())
}

/// A fork whose parent stands on more layers than this merges them first (see
/// [`crate::layers::flatten`]); well below [`MAX_LOWERS`], as each layer costs every lookup.
pub const FLATTEN_AT: usize = MAX_LOWERS / 2;

/// The number for a branch's next layer directory (`ws-layer-N`, `ws-flat-N`, ...): one more
/// than any it has, so a layer name is never reused while an overlay may use it.
fn next_layer_number(dir: &Path) -> Result<u64> {
    let mut max = 0;
    for e in std::fs::read_dir(dir).at(dir)? {
        let name = e.at(dir)?.file_name();
        if let Some(n) = name
            .to_str()
            .and_then(|n| n.rsplit_once('-'))
            .and_then(|(_, n)| n.parse::<u64>().ok())
        {
            max = max.max(n);
        }
    }
    Ok(max + 1)
}

impl Manager {
    /// Forks `parent` into `count` new branches (one snapshot for all of them). A name can be
    /// given for a single child.
    pub fn fork(&mut self, parent: &str, opts: &ForkOptions) -> Result<Forked> {
        let (name, count) = (opts.name.clone(), opts.count.unwrap_or(1));
        if count == 0 || count > 64 || (count > 1 && name.is_some()) {
            return Err(Error::Invalid(
                "fork: count must be 1 to 64, and a name can only be given for a single child"
                    .into(),
            ));
        }
        let started = trace_notes::now_ns();
        let t_total = Instant::now();
        let mut p = self.get(parent)?;
        self.no_commit_pending("forking")?;
        if let Some(n) = &name {
            validate_name(n)?;
            if self.registry.get(n)?.is_some() {
                return Err(Error::Conflict(format!(
                    "a live branch is already named {n:?}: pick another name or abort that branch"
                )));
            }
        }
        // A running branch, or a checkpoint holding stopped clones, has processes to clone.
        let has_processes = p.init_pid != 0 && !p.cgroup.as_os_str().is_empty();
        let cloning = has_processes && !opts.fresh;
        // A branch someone else froze (its cgroup's own freeze, not a checkpoint of ours)
        // stays frozen: its processes run only while held, as a checkpoint's, and it is
        // frozen again before they are let go (its children run, as a checkpoint's do). One a
        // cgroup above it keeps frozen cannot be thawed from here: refused.
        let parent_cg = if has_processes && !p.frozen {
            Some(Cgroup::open(&p.cgroup)?)
        } else {
            None
        };
        let by_ancestor = parent_cg.as_ref().is_some_and(|c| c.frozen_by_ancestor());
        if by_ancestor {
            // (Children's sandboxes would be born under it too, and wait there.)
            return Err(Error::Conflict(format!(
                "{} is frozen by a cgroup above its own ({}): nothing can be cloned or \
                 started under it until that one is thawed",
                p.name,
                p.cgroup.display()
            )));
        }
        let frozen_by_someone = parent_cg.as_ref().is_some_and(|c| c.is_frozen());
        let mut phases = ForkPhases::default();
        // Every child's sandbox is started before the parent's processes are held (the one
        // pre-started after the previous fork, more side by side when there are several
        // children or a fork came before it was ready). One that fails to start here is
        // started again below, where its error is reported.
        if cloning {
            let t = Instant::now();
            if let Err(e) = self.ensure_warm(&p, count as usize) {
                log::warn!("pre-starting the sandboxes of {}'s children: {e}", p.name);
            }
            phases.start_us += t.elapsed().as_micros() as u64;
        }
        let t = Instant::now();
        let checked = if cloning {
            procfork::precheck(&p.cgroup, p.init_pid)?
        } else {
            Vec::new()
        };
        phases.check_us = t.elapsed().as_micros() as u64;
        let t_held = Instant::now();
        let held = if p.frozen {
            if checked.is_empty() {
                None
            } else {
                // A checkpoint's clones are seized frozen, then thawed: they stay held by
                // ptrace, and are frozen again before they are let go.
                let t = Instant::now();
                let h = procfork::hold(&p.cgroup, p.init_pid, &checked)?;
                phases.seize_us = t.elapsed().as_micros() as u64;
                Cgroup::open(&p.cgroup)?.freeze(false, Duration::from_secs(5))?;
                Some(h)
            }
        } else {
            let (cg, init) = (p.cgroup.clone(), p.init_pid);
            self.snapshot_running(
                &mut p,
                &mut phases,
                frozen_by_someone,
                || {
                    if checked.is_empty() {
                        Ok(None)
                    } else {
                        procfork::hold(&cg, init, &checked).map(Some)
                    }
                },
                |held| held.is_some(),
            )?
        };
        // From here on the parent's snapshot is taken: a failure records it all the same
        // (its manifest already describes the new layer) and puts a checkpoint's processes
        // back to frozen before letting them go.
        let mut held = held;
        let log = p.dir.join("command.log");
        let ctx = procfork::inspect::Context {
            workspace: &p.workspace,
            parent_log: &log,
            net_isolated: p.net_isolated,
            marks: &p.dir,
        };
        let t = Instant::now();
        let planned = match held.as_mut() {
            Some(h) => procfork::plan(h, p.init_pid, &ctx).map(Some),
            None => Ok(None),
        };
        phases.plan_us = t.elapsed().as_micros() as u64;
        let planned = planned.and_then(|t| {
            if p.children_ws().len() > FLATTEN_AT || p.children_tmp().len() > FLATTEN_AT {
                self.flatten_layers(&mut p)?;
            }
            Ok(t)
        });
        let targets = match planned {
            Ok(t) => t,
            Err(e) => {
                if (p.frozen || frozen_by_someone) && held.is_some() {
                    let _ =
                        Cgroup::open(&p.cgroup).and_then(|c| c.refreeze(Duration::from_secs(5)));
                }
                drop(held);
                let _ = self.registry.put(&p);
                return Err(e);
            }
        };
        let mut held = match (held, targets) {
            (Some(h), Some(t)) => Some(procfork::Held::new(h, t)),
            _ => None,
        };
        let ws_lowers = p.children_ws();
        let tmp_lowers = p.children_tmp();
        // What the parent's upper directory held at the fork (a checkpoint passes on what its
        // own parent's held): a commit of the child needs it to see what the parent changed
        // since.
        let fork_manifest = if p.frozen {
            p.dir.join("fork-manifest.json")
        } else {
            manifest_path(&p.dir, "ws", p.manifests)
        };
        let fork_ns = if p.frozen {
            p.fork_ns
        } else {
            p.last_snapshot_ns
        };
        let parent_cgroup_id = if cloning {
            Cgroup::open(&p.cgroup).map(|c| c.id()).unwrap_or(0)
        } else {
            0
        };
        let mut made = Vec::new();
        let mut cloned = Vec::new();
        let mut clone_notes = Vec::new();
        // The parent's processes go on as soon as the last child's clones are born, while
        // those are set up; those of a branch that is frozen (a checkpoint, or someone
        // else's freeze) are frozen again first, after every clone is made.
        let let_go_early = !p.frozen && !frozen_by_someone;
        let outcome = (|| -> Result<()> {
            for i in 0..count {
                // Each child takes one of the sandboxes started above.
                let warm = if cloning {
                    self.take_warm(&p.name, p.init_pid)
                } else {
                    None
                };
                let id = match &warm {
                    Some(w) => w.id,
                    None => self.registry.next_id()?,
                };
                let dir = branch_dir(&self.state, id);
                let named = (|| {
                    let child = self.unused_name(name.clone(), id)?;
                    std::fs::create_dir_all(&dir).at(&dir)?;
                    if fork_manifest.exists() {
                        let to = dir.join("fork-manifest.json");
                        std::fs::copy(&fork_manifest, &to).at(&to)?;
                    }
                    Ok(child)
                })();
                let child = match named {
                    Ok(c) => c,
                    Err(e) => {
                        match warm {
                            Some(w) => self.discard(w),
                            None => {
                                let _ = std::fs::remove_dir_all(&dir);
                            }
                        }
                        return Err(e);
                    }
                };
                let (ws, tmp) = (ws_lowers.clone(), tmp_lowers.clone());
                if opts.frozen && !cloning {
                    made.push(self.checkpoint(id, child, &p, ws, tmp, fork_ns)?);
                    continue;
                }
                // Files the processes hold open for writing keep their inode number.
                let stacks = procfork::open_copies::Stacks {
                    workspace: &p.workspace,
                    parent: &p.dir,
                    child: &dir,
                    ws_lowers: &ws,
                    tmp_lowers: &tmp,
                };
                if let Some(h) = held.as_ref()
                    && let Err(e) = h.copy_open_files(&stacks)
                {
                    match warm {
                        Some(w) => self.discard(w),
                        None => {
                            let _ = std::fs::remove_dir_all(&dir);
                        }
                    }
                    return Err(e);
                }
                let how = Start {
                    command: if cloning {
                        Vec::new()
                    } else {
                        p.command.clone()
                    },
                    nest_in: cloning.then_some(p.init_pid),
                    warm,
                    net_isolated: p.net_isolated,
                    write_detail: p.write_detail,
                    checkpoint: opts.frozen,
                    policy: p.policy.clone(),
                };
                let t_start = Instant::now();
                let starting = self.begin_start(
                    id,
                    child,
                    Some(p.name.clone()),
                    p.workspace.clone(),
                    p.command.clone(),
                    ws,
                    tmp,
                    fork_ns,
                    how,
                )?;
                phases.start_us += t_start.elapsed().as_micros() as u64;
                let Some(h) = held.as_mut() else {
                    let t = Instant::now();
                    let mut rec = self.finish_start(starting)?;
                    phases.start_us += t.elapsed().as_micros() as u64;
                    made.push(rec.clone());
                    if opts.frozen {
                        // A checkpoint's cgroup is frozen: nothing in it ever runs.
                        Cgroup::open(&rec.cgroup)?.freeze(true, Duration::from_secs(5))?;
                        rec.frozen = true;
                        *made.last_mut().expect("just pushed") = rec;
                    }
                    cloned.push(Vec::new());
                    continue;
                };
                // The clones are born while the child's overlays are being mounted, and set
                // up in the child once they are.
                let rec = starting.record().clone();
                let prepared = (|| {
                    // A terminal of the child's own for each of the parent's, set up as
                    // that one is.
                    let terminals = h
                        .terminals()
                        .into_iter()
                        .map(|(id, pid, fd)| {
                            let settings = procfork::terminal_settings(pid, fd);
                            let made =
                                crate::sandbox::control::new_terminal(&rec.control, settings)?;
                            Ok((id, made))
                        })
                        .collect::<Result<Vec<_>>>()?;
                    let into = procfork::ChildBranch {
                        terminals,
                        cgroup: rec.cgroup.clone(),
                        init_in_parent_ns: procfork::pid_as_seen_by(rec.init_pid, p.init_pid)?,
                        log_fd: procfork::fd_of(rec.init_pid, &rec.dir.join("command.log"))?,
                        net_isolated: p.net_isolated,
                        marks: p.dir.clone(),
                    };
                    Ok((into, Cgroup::open(&rec.cgroup)?))
                })();
                let (into, child_cg) = match prepared {
                    Ok(p) => p,
                    Err(e) => {
                        self.abandon_start(starting);
                        return Err(e);
                    }
                };
                // A checkpoint's cgroup is frozen before its clones are let go: they never run.
                let freeze = opts.frozen.then_some(&child_cg);
                let mut starting = Some(starting);
                let mut started = None;
                let mut waited_us = 0;
                let tracker = self.tracker.clone();
                let born = || {
                    // The clones are born: their births write-protected the parent's pages
                    // again, and each page either side writes from now on is its own. A
                    // new dirty-page epoch for both, before any of them runs again.
                    if let Some(t) = &tracker {
                        t.new_epoch(&[parent_cgroup_id, child_cg.id()]);
                    }
                    Ok(())
                };
                let last = i + 1 == count;
                let c = procfork::clone_into(h, &into, freeze, last && let_go_early, born, || {
                    let t = Instant::now();
                    let s = starting.take().expect("called once");
                    let r = self.finish_start(s);
                    waited_us = t.elapsed().as_micros() as u64;
                    started = Some(r?);
                    Ok(())
                });
                phases.start_us += waited_us;
                if let Some(s) = starting {
                    self.abandon_start(s);
                }
                if let Some(mut rec) = started {
                    if opts.frozen {
                        rec.frozen = true;
                    }
                    made.push(rec);
                }
                let c = c?;
                phases.processes_us += c.us.saturating_sub(waited_us);
                clone_notes.extend(c.notes);
                cloned.push(c.pids);
            }
            Ok(())
        })();
        let mut notes = held.as_ref().map(|h| h.notes()).unwrap_or_default();
        for n in clone_notes {
            if !notes.contains(&n) {
                notes.push(n);
            }
        }
        let refrozen = if (p.frozen || frozen_by_someone) && held.is_some() {
            Cgroup::open(&p.cgroup).and_then(|c| c.refreeze(Duration::from_secs(5)))
        } else {
            Ok(())
        };
        let let_go_at = held.as_ref().and_then(|h| h.let_go_at());
        let released = held.map(|h| h.release()).unwrap_or(Ok(()));
        phases.held_us = let_go_at
            .unwrap_or_else(Instant::now)
            .saturating_duration_since(t_held)
            .as_micros() as u64;
        // The records are written once the parent's processes are let go: the parent's new
        // layers, then each child whose processes were cloned (recorded only now that they
        // are, so a crash before leaves no half-forked branch).
        let recorded = || -> Result<()> {
            let mut all = vec![&p];
            if cloning {
                all.extend(made.iter());
            }
            self.registry.put_all(&all)
        };
        let outcome = outcome.and(refrozen).and(released);
        let t = Instant::now();
        let outcome = match outcome {
            Ok(()) => recorded(),
            Err(e) => {
                let _ = self.registry.put(&p);
                Err(e)
            }
        };
        if let Err(e) = outcome {
            // Never a half-forked branch: the children made so far go.
            for b in made.iter().rev() {
                if matches!(self.registry.get(&b.name), Ok(Some(_))) {
                    let _ = self.abort(&b.name);
                } else {
                    self.discard_unrecorded(b);
                }
            }
            return Err(e);
        }
        phases.record_us = t.elapsed().as_micros() as u64;
        phases.total_us = t_total.elapsed().as_micros() as u64;
        self.note_fork(&p, &made, started, &phases);
        Ok(Forked {
            branches: made,
            phases,
            cloned,
            processes: if cloning {
                "cloned"
            } else if opts.frozen {
                "none"
            } else {
                "fresh"
            }
            .into(),
            notes,
        })
    }

    /// Records a checkpoint of `p` standing on the given layers.
    fn checkpoint(
        &mut self,
        id: u64,
        name: String,
        p: &BranchRecord,
        ws_lowers: Vec<PathBuf>,
        tmp_lowers: Vec<PathBuf>,
        fork_ns: Option<i128>,
    ) -> Result<BranchRecord> {
        let dir = branch_dir(&self.state, id);
        std::fs::create_dir_all(&dir).at(&dir)?;
        let record = BranchRecord {
            id,
            name,
            parent: Some(p.name.clone()),
            workspace: p.workspace.clone(),
            command: p.command.clone(),
            cgroup: PathBuf::new(),
            init_pid: 0,
            control: PathBuf::new(),
            dir,
            ws_lowers,
            tmp_lowers,
            ws_deltas: Vec::new(),
            tmp_deltas: Vec::new(),
            last_snapshot_ns: None,
            manifests: 0,
            frozen: true,
            fork_ns,
            flattened: None,
            net_isolated: p.net_isolated,
            write_detail: p.write_detail,
            policy: p.policy.clone(),
            retired: false,
        };
        self.registry.put(&record)?;
        Ok(record)
    }

    /// Removes the empty layer directories no record stands on (see `spare_layers`: the
    /// pair kept for a branch's next fork is only known to the daemon that kept it); run
    /// when the registry is opened. A layer any record names is kept, empty or not (a
    /// snapshot of /tmp changes only leaves an empty workspace layer that children use).
    pub(super) fn sweep_unused_layers(&self) -> Result<()> {
        let all = self.registry.all()?;
        let used: std::collections::HashSet<&Path> = all
            .iter()
            .flat_map(|b| {
                let flat = b.flattened.iter().flat_map(|f| f.ws.iter().chain(&f.tmp));
                b.ws_lowers
                    .iter()
                    .chain(&b.tmp_lowers)
                    .chain(&b.ws_deltas)
                    .chain(&b.tmp_deltas)
                    .chain(flat)
            })
            .map(PathBuf::as_path)
            .collect();
        for b in &all {
            let Ok(entries) = std::fs::read_dir(&b.dir) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                let layer = ["ws-layer-", "tmp-layer-"]
                    .iter()
                    .any(|p| name.starts_with(p));
                let path = e.path();
                if layer && !used.contains(path.as_path()) && is_empty_dir(&path) {
                    let _ = std::fs::remove_dir(&path);
                }
            }
        }
        Ok(())
    }

    /// Merges the layers `p`'s children would stand on (all but the bottom one: the
    /// workspace's base, or the empty /tmp base) into one layer in `p`'s directory, so they
    /// get a short stack. `p`'s own record (its mounted stack) is unchanged; the merged
    /// chain is kept apart in [`BranchRecord::flattened`].
    fn flatten_layers(&mut self, p: &mut BranchRecord) -> Result<()> {
        let n = next_layer_number(&p.dir)?;
        let mut merged = Vec::new();
        for (what, chain) in [("ws", p.children_ws()), ("tmp", p.children_tmp())] {
            let mut chain = chain;
            let bottom = chain.pop().expect("a branch stands on at least one layer");
            if chain.len() < 2 {
                merged.push([chain, vec![bottom]].concat());
                continue;
            }
            let flat = p.dir.join(format!("{what}-flat-{n}"));
            if let Err(e) = flatten(&chain, &flat) {
                let _ = std::fs::remove_dir_all(&flat);
                return Err(e);
            }
            merged.push(vec![flat, bottom]);
        }
        let tmp = merged.pop().expect("two chains");
        let ws = merged.pop().expect("two chains");
        p.flattened = Some(Flattened {
            ws,
            tmp,
            ws_deltas: p.ws_deltas.len(),
            tmp_deltas: p.tmp_deltas.len(),
        });
        self.registry.put(p)
    }

    /// Freezes a running branch, snapshots what it changed since its previous fork into new
    /// layers (recorded as its newest deltas) and thaws it. What can be done before the
    /// freeze is (creating the layer directories costs up to milliseconds on ext4), and the
    /// manifests are written after the thaw: the branch is paused for the copy only.
    ///
    /// `while_frozen` runs while the branch is frozen, after the snapshot: what it returns is
    /// returned (on a failure after it ran, its result is dropped). With `keep_frozen` (a
    /// branch someone else froze), the branch is thawed only if `needs_thaw` says so of what
    /// `while_frozen` returned (processes it holds by ptrace, which must run injected
    /// calls), and frozen again before a failure lets them go.
    fn snapshot_running<T>(
        &mut self,
        p: &mut BranchRecord,
        phases: &mut ForkPhases,
        keep_frozen: bool,
        while_frozen: impl FnOnce() -> Result<T>,
        needs_thaw: impl FnOnce(&T) -> bool,
    ) -> Result<T> {
        let cg = Cgroup::open(&p.cgroup)?;
        let prep = prepare_snapshot(p, self.spare_layers.remove(&p.id))?;
        let discard = |prep: &[SnapshotPart]| {
            for part in prep {
                let _ = std::fs::remove_dir_all(&part.layer);
            }
        };
        let t = Instant::now();
        let frozen = if keep_frozen {
            // (Frozen already: this waits until every task is, and never undoes it. A branch
            // a cgroup above it keeps frozen was refused before.)
            cg.refreeze(Duration::from_secs(5))
        } else {
            cg.freeze(true, Duration::from_secs(5))
        };
        if let Err(e) = frozen {
            discard(&prep);
            return Err(e);
        }
        phases.freeze_us = t.elapsed().as_micros() as u64;
        let t = Instant::now();
        let at = snapshot_clock_ns();
        let taken: Result<Vec<(Manifest, u64)>> = prep
            .iter()
            .map(|part| {
                snapshot(&part.upper, p.last_snapshot_ns, &part.previous, &part.layer)
                    .map(|(m, stats)| (m, stats.entries))
            })
            .collect();
        phases.files_us = t.elapsed().as_micros() as u64;
        let t = Instant::now();
        let during = match &taken {
            Ok(_) => while_frozen(),
            Err(_) => Err(Error::Sandbox("not reached".into())),
        };
        phases.seize_us = t.elapsed().as_micros() as u64;
        let t = Instant::now();
        let thaw = match &during {
            Ok(d) => !keep_frozen || needs_thaw(d),
            Err(_) => !keep_frozen,
        };
        let thawed = match (thaw, keep_frozen) {
            (false, _) => Ok(()),
            // Someone else's freeze, lent to the fork while it clones the processes.
            (true, true) => cg.thaw_for_a_while(Duration::from_secs(5)),
            (true, false) => cg.freeze(false, Duration::from_secs(5)),
        };
        phases.thaw_us = t.elapsed().as_micros() as u64;
        let taken = match taken {
            Ok(t) => t,
            Err(e) => {
                discard(&prep);
                return Err(e);
            }
        };
        if let Err(e) = thawed {
            discard(&prep);
            if keep_frozen {
                // Someone else's freeze is theirs again (the held processes go with `during`).
                let _ = cg.refreeze(Duration::from_secs(5));
            }
            return Err(e);
        }
        let during = match during {
            Ok(d) => d,
            Err(e) => {
                discard(&prep);
                return Err(e);
            }
        };
        let copied: u64 = taken.iter().map(|(_, n)| n).sum();
        // Unchanged, the manifests are not written again; else the next generation is
        // (the caller records `p` naming it).
        let unchanged = prep.iter().zip(&taken).all(|(part, (manifest, _))| {
            *manifest == part.previous && manifest_path(&p.dir, part.what, p.manifests).exists()
        });
        if !unchanged {
            let next = p.manifests + 1;
            for (part, (manifest, _)) in prep.iter().zip(&taken) {
                if let Err(e) = manifest.save(&manifest_path(&p.dir, part.what, next)) {
                    discard(&prep);
                    if keep_frozen && thaw {
                        // Before `during` goes: its held processes must not run.
                        let _ = cg.refreeze(Duration::from_secs(5));
                    }
                    return Err(e);
                }
            }
            p.manifests = next;
        }
        if copied == 0 {
            // Nothing changed since the previous fork: the children share its layers, and
            // the empty directories wait for the next fork.
            self.spare_layers
                .insert(p.id, prep.into_iter().map(|part| part.layer).collect());
        } else {
            p.ws_deltas.insert(0, prep[0].layer.clone());
            p.tmp_deltas.insert(0, prep[1].layer.clone());
        }
        p.last_snapshot_ns = Some(at);
        // (The caller records `p`.)
        Ok(during)
    }
}
