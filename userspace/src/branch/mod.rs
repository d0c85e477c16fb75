//! Branches: starting one on a workspace (`run`), forking it, listing, diffing and aborting,
//! with every change recorded in the [`Registry`] before it is acknowledged.
//!
//! A branch is a cgroup, a sandbox ([`crate::sandbox`]) and overlay stacks for its workspace
//! and /tmp ([`crate::layers`]). Forking freezes the parent, copies what its upper directories
//! changed since its previous fork into new immutable layers, thaws it, and starts the child
//! on those layers above the parent's: the child sees the parent's files as they were at the
//! fork point. The parent's processes are cloned into the child copy-on-write
//! ([`crate::procfork`]), seized while the parent is frozen, so files and processes are taken
//! at the same instant; `--fresh` starts the parent's command afresh instead.
//! Committing ([`commit`]) applies a branch's changes to its parent's view.
//!
//! Here: the records and types, `run`, listing, policies; [`start`] starts a branch's
//! sandbox, [`fork`] has the fork, [`abort`] the abort, [`warm`] the pre-started sandboxes
//! and what no record owns, [`trace_notes`] the operations written into traces, [`run_in`]
//! the API's exec.

mod abort;
mod commit;
mod fork;
mod garbage;
pub mod run_in;
mod start;
mod trace_notes;
mod warm;

pub use commit::{CommitOptions, Committed};
pub use fork::FLATTEN_AT;
pub use warm::{WarmSlot, Warming};

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{
    cgroup::Cgroup,
    error::{Error, IoContext, Result},
    layers::{
        base::build_base,
        diff::{Change, ChangeKind, changes},
    },
    policy::Policy,
    procfork,
    state::{Registry, branch_dir},
    tracker::Tracker,
};

/// A live branch, as recorded in the registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchRecord {
    pub id: u64,
    pub name: String,
    /// The branch it was forked from (none for a root branch).
    pub parent: Option<String>,
    /// The workspace path (the host directory of the root branch it descends from).
    pub workspace: PathBuf,
    /// The command its init started.
    pub command: Vec<String>,
    pub cgroup: PathBuf,
    pub init_pid: u32,
    pub control: PathBuf,
    /// Its directory under the state directory.
    pub dir: PathBuf,
    /// Lower layers of its workspace and /tmp mounts, topmost first.
    pub ws_lowers: Vec<PathBuf>,
    pub tmp_lowers: Vec<PathBuf>,
    /// Snapshots of its upper directories taken at its forks, newest first.
    pub ws_deltas: Vec<PathBuf>,
    pub tmp_deltas: Vec<PathBuf>,
    /// When its last snapshot was taken (file change-time clock).
    pub last_snapshot_ns: Option<i128>,
    /// The generation of the manifests of its last snapshot: in its directory, generation N
    /// is in the slot `ws-manifest-{N % 2}.json` (and `tmp-...`), 0 in `ws-manifest.json`
    /// (records made before numbered them; see `fork::manifest_path`). A snapshot writes the
    /// next generation and this record names it, so the manifests read are always those of
    /// the snapshot the record describes, even when a daemon died between the two.
    #[serde(default)]
    pub manifests: u64,
    /// A checkpoint (`fork --frozen`): layers only, no processes; forks of it all start from
    /// the same state.
    #[serde(default)]
    pub frozen: bool,
    /// The fork point in the file change-time clock: for a root branch, the latest change
    /// time in its base layer (see [`crate::layers::base`]); for a child, when its parent was snapshotted for it (a child of a
    /// checkpoint inherits the checkpoint's).
    #[serde(default)]
    pub fork_ns: Option<i128>,
    /// The layers its children stand on, merged at a fork when they grew deep (see
    /// [`crate::layers::flatten`]).
    #[serde(default)]
    pub flattened: Option<Flattened>,
    /// A network namespace of its own, loopback only (`run --net isolated`; forks inherit).
    #[serde(default)]
    pub net_isolated: bool,
    /// Every write, send, open and path change is an event in its trace (`run
    /// --write-detail on`, the default; forks inherit). While any branch asks for it, the
    /// syscall programs are attached and every process on the host pays for them; without
    /// it, the branch's files are known from its layers (`diff`) and no syscall program
    /// runs on its behalf.
    #[serde(default = "yes")]
    pub write_detail: bool,
    /// Its side-effect policy (`run --policy`; forks inherit): none allows everything.
    #[serde(default)]
    pub policy: Option<Policy>,
    /// Aborted while branches forked from it ran: its processes are gone and its name is
    /// free (it is listed as `NAME~ID`), but its init (whose namespaces its forks' are
    /// nested in) and its layers (which they stand on) stay until the last of them is
    /// aborted (see [`Manager::abort`]).
    #[serde(default)]
    pub retired: bool,
}

/// The default of [`BranchRecord::write_detail`] (records made before it existed had it).
fn yes() -> bool {
    true
}

/// A branch's layer chain as merged for its children: `ws` and `tmp` replace its deltas
/// taken up to then (`ws_deltas`, `tmp_deltas` of them) and its lowers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flattened {
    pub ws: Vec<PathBuf>,
    pub tmp: Vec<PathBuf>,
    pub ws_deltas: usize,
    pub tmp_deltas: usize,
}

impl BranchRecord {
    /// The workspace layers a child forked now stands on, topmost first.
    pub fn children_ws(&self) -> Vec<PathBuf> {
        let merged = self.flattened.as_ref().map(|f| (&f.ws, f.ws_deltas));
        children_chain(&self.ws_deltas, &self.ws_lowers, merged)
    }

    /// The /tmp layers a child forked now stands on, topmost first.
    pub fn children_tmp(&self) -> Vec<PathBuf> {
        let merged = self.flattened.as_ref().map(|f| (&f.tmp, f.tmp_deltas));
        children_chain(&self.tmp_deltas, &self.tmp_lowers, merged)
    }
}

/// A branch's deltas over its lowers, or, once flattened, the deltas taken since over the
/// merged chain (which replaced the first `covered` deltas taken and the lowers).
fn children_chain(
    deltas: &[PathBuf],
    lowers: &[PathBuf],
    merged: Option<(&Vec<PathBuf>, usize)>,
) -> Vec<PathBuf> {
    match merged {
        Some((chain, covered)) => deltas[..deltas.len() - covered]
            .iter()
            .chain(chain)
            .cloned()
            .collect(),
        None => deltas.iter().chain(lowers).cloned().collect(),
    }
}

/// How a branch's sandbox starts: the command its init runs (none when the processes are
/// cloned into it), and the parent init whose namespaces it nests in.
struct Start {
    command: Vec<String>,
    nest_in: Option<u32>,
    /// A pre-started sandbox to use (its overlays are mounted on the branch's stacks).
    warm: Option<warm::WarmChild>,
    net_isolated: bool,
    write_detail: bool,
    /// A checkpoint: its processes never run, so its cgroup is traced without per-write
    /// detail whatever `write_detail` (which its forks inherit) says.
    checkpoint: bool,
    policy: Option<Policy>,
}

/// How a root branch runs (see [`Manager::run_with`]); its forks inherit all of it.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// A network namespace of its own, loopback only.
    pub net_isolated: bool,
    /// Per-write detail in its trace (see [`BranchRecord::write_detail`]).
    pub write_detail: bool,
    /// Its side-effect policy (none allows everything).
    pub policy: Option<Policy>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            net_isolated: false,
            write_detail: true,
            policy: None,
        }
    }
}

/// What `fork` makes.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ForkOptions {
    /// The child's name (a single child only).
    #[serde(default)]
    pub name: Option<String>,
    /// How many children (default 1).
    #[serde(default)]
    pub count: Option<u32>,
    /// Make checkpoints instead of running branches.
    #[serde(default)]
    pub frozen: bool,
    /// Start the parent's command afresh in the children instead of cloning its processes.
    #[serde(default)]
    pub fresh: bool,
}

/// Where the time of a fork went, in microseconds: checking the parent's processes
/// (`check_us`), freezing the parent, snapshotting its files (the parent is frozen
/// meanwhile), seizing its processes with ptrace (`seize_us`, still frozen), thawing it,
/// planning each clone from /proc (`plan_us`), starting the children's sandboxes
/// (`start_us`: what the clones' births, made while a pre-started sandbox mounts its
/// overlays, did not hide, and the sandboxes started before the freeze when too few were
/// pre-started), cloning the processes into them (`processes_us`, the wait for
/// the mounts left out), and writing the records (`record_us`). The parent's
/// processes being cloned stay stopped (by ptrace) from the freeze until they are cloned
/// into every child (`held_us`); its other processes (its init) run again at the thaw.
/// `total_us` is the whole fork as the daemon sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkPhases {
    #[serde(default)]
    pub check_us: u64,
    pub freeze_us: u64,
    pub files_us: u64,
    #[serde(default)]
    pub seize_us: u64,
    pub thaw_us: u64,
    #[serde(default)]
    pub plan_us: u64,
    pub start_us: u64,
    #[serde(default)]
    pub processes_us: u64,
    #[serde(default)]
    pub record_us: u64,
    #[serde(default)]
    pub held_us: u64,
    #[serde(default)]
    pub total_us: u64,
}

/// The result of a fork.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Forked {
    pub branches: Vec<BranchRecord>,
    pub phases: ForkPhases,
    /// Host pids of each child's clones (one list per child, in `branches` order); empty
    /// lists when processes were not cloned.
    #[serde(default)]
    pub cloned: Vec<Vec<u32>>,
    /// How processes were handled: `cloned`, `fresh` (the command started afresh) or `none`
    /// (a checkpoint).
    #[serde(default)]
    pub processes: String,
    /// What the clones do not faithfully own (closed sockets, replaced stdio, ...).
    #[serde(default)]
    pub notes: Vec<String>,
}

/// A branch and whether its init is alive.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BranchInfo {
    #[serde(flatten)]
    pub record: BranchRecord,
    /// `running` while its init lives, `dead` otherwise.
    pub status: String,
    /// Host pids of its processes (not its init).
    #[serde(default)]
    pub processes: Vec<u32>,
    /// Memory pages its processes made their own (first written, by a user or kernel write
    /// fault) since its last fork or its creation; none when the daemon does not trace.
    /// Blind spot: writes through pinned pages (O_DIRECT, process_vm_writev, io_uring).
    #[serde(default)]
    pub private_pages: Option<u64>,
    #[serde(default)]
    pub private_bytes: Option<u64>,
}

/// A branch's record with what is live about it: whether its init runs, its processes,
/// its private pages.
fn branch_info(record: BranchRecord, tracker: Option<&Tracker>) -> BranchInfo {
    let alive = Path::new(&format!("/proc/{}", record.init_pid)).exists()
        && Cgroup::open(&record.cgroup)
            .and_then(|c| c.populated())
            .unwrap_or(false);
    let status = if record.retired {
        "retired"
    } else if record.frozen {
        "frozen"
    } else if alive {
        "running"
    } else {
        "dead"
    };
    let processes = if alive && !record.retired {
        procfork::inspect::targets(&record.cgroup, record.init_pid).unwrap_or_default()
    } else {
        Vec::new()
    };
    let private_pages = tracker.and_then(|t| {
        let id = Cgroup::open(&record.cgroup).ok()?.id();
        t.private_pages(id, &processes).ok()
    });
    BranchInfo {
        record,
        status: status.into(),
        processes,
        private_pages,
        private_bytes: private_pages.map(|p| p * page_size()),
    }
}

/// What [`Manager::metrics_sources`] hands to a scrape.
pub struct MetricsSources {
    records: Vec<BranchRecord>,
    tracker: Option<std::sync::Arc<Tracker>>,
    effects: Option<crate::effects::Journal>,
    deferrals: Option<crate::effects::defer::Deferrals>,
}

/// The figures a metrics scrape reports (see [`crate::metrics`]), computed without the
/// manager's lock.
pub fn metrics_snapshot(src: MetricsSources) -> crate::metrics::Snapshot {
    let mut snap = crate::metrics::Snapshot::default();
    let tracker = src.tracker.as_deref();
    let list: Vec<BranchInfo> = src
        .records
        .into_iter()
        .map(|r| branch_info(r, tracker))
        .collect();
    // Branch names by cgroup id, for the per-branch series.
    let names: std::collections::HashMap<u64, String> = list
        .iter()
        .filter_map(|b| {
            Cgroup::open(&b.record.cgroup)
                .ok()
                .map(|c| (c.id(), b.record.name.clone()))
        })
        .collect();
    if let Some(t) = tracker {
        for (cg, n) in t.event_counts_per_cgroup() {
            if let Some(name) = names.get(&cg) {
                snap.branch_events.insert(name.clone(), n);
            }
        }
        snap.events = t.event_counts();
        snap.lost_events = t.stats().map(|(s, _)| s.lost).unwrap_or(0);
        snap.programs = crate::bpf::program_stats();
        snap.syscall_hooks = t.syscall_hooks_attached();
        snap.fault_hooks = t.fault_hooks_attached();
    }
    if let Some(j) = &src.effects {
        for ((cg, state), n) in j.counts_per_cgroup().unwrap_or_default() {
            if let Some(name) = names.get(&cg) {
                snap.branch_effects.insert((name.clone(), state), n);
            }
        }
        snap.effects = j.counts().unwrap_or_default();
        snap.oldest_held_s = j.oldest_held_s().unwrap_or(None);
    }
    if let Some(d) = &src.deferrals {
        snap.deferred = d.deferred_total();
    }
    snap.branches = list
        .into_iter()
        .map(|b| {
            (
                b.record.name,
                b.status,
                b.private_bytes.unwrap_or(0),
                b.private_pages.unwrap_or(0),
            )
        })
        .collect();
    snap
}

/// The memory page size.
fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |n| n as u64)
}

/// Checks a branch name: 1 to 64 of letters, digits, `.`, `_`, `-`, starting with a letter
/// or digit.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "invalid branch name {name:?}: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )))
    }
}

/// Owns the branches of one state directory.
pub struct Manager {
    state: PathBuf,
    registry: Registry,
    /// The forkscope binary that runs `__init`.
    bin: PathBuf,
    /// Host directories branches must not see (see `SandboxSpec::hidden`).
    hidden: Vec<PathBuf>,
    /// Names this state directory among others on the host (its inode, in hex): branch
    /// cgroups are `branch-<instance>-<id>` and pins `<instance>-<object>`, so daemons on
    /// different state directories never collide.
    instance: String,
    /// Per-branch traces, when the daemon loaded the eBPF programs.
    tracker: Option<std::sync::Arc<Tracker>>,
    /// Side effects held for commits (see [`crate::effects`]).
    effects: Option<crate::effects::Journal>,
    /// The seccomp listeners of deferring branches.
    deferrals: Option<crate::effects::defer::Deferrals>,
    /// Pre-started child sandboxes, by parent name (see [`warm`]).
    warm: std::collections::HashMap<String, Vec<warm::WarmChild>>,
    /// The child sandbox being pre-started for a parent off the manager's lock, by parent
    /// name (see [`warm::Warming`]).
    warming: std::collections::HashMap<String, std::sync::Arc<warm::WarmSlot>>,
    /// Empty layer directories a fork of a running branch made and did not need (nothing
    /// had changed since the previous fork), by branch id: its next fork takes them
    /// instead of making and removing new ones (on ext4, about 0.3 ms).
    spare_layers: std::collections::HashMap<u64, Vec<PathBuf>>,
    /// Directories removed off the request path (a commit's staging directory).
    garbage: garbage::Garbage,
}

/// A branch's trace: one JSON line per event of its processes (see [`crate::tracker`]).
pub fn trace_file(b: &BranchRecord) -> PathBuf {
    b.dir.join("trace.jsonl")
}

fn mkdirs(dir: &Path, subdirs: &[&str]) -> Result<()> {
    for s in subdirs {
        let p = dir.join(s);
        std::fs::create_dir_all(&p).at(&p)?;
    }
    Ok(())
}

impl Manager {
    /// Opens the state directory (one manager per directory).
    pub fn open(state: &Path, bin: &Path) -> Result<Self> {
        let registry = Registry::open(state)?;
        let state = state.canonicalize().at(state)?;
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&state).at(&state)?);
        let garbage = garbage::Garbage::open(&state)?;
        let mut manager = Self {
            state: state.clone(),
            registry,
            bin: bin.to_path_buf(),
            instance: format!("{ino:x}"),
            hidden: vec![state],
            tracker: None,
            effects: None,
            deferrals: None,
            warm: Default::default(),
            warming: Default::default(),
            spare_layers: Default::default(),
            garbage,
        };
        manager.recover()?;
        manager.sweep_unowned()?;
        manager.refreeze_lent()?;
        manager.sweep_retired()?;
        manager.sweep_unused_layers()?;
        Ok(manager)
    }

    /// Traces every running branch (and every later one) with `tracker`, appending to the
    /// branches' trace files.
    pub fn set_tracker(&mut self, tracker: std::sync::Arc<Tracker>) -> Result<()> {
        for b in self.registry.all()? {
            if b.frozen || b.retired {
                continue;
            }
            if let Ok(cg) = Cgroup::open(&b.cgroup) {
                let watch = |write_detail| crate::tracker::Watch {
                    write_detail,
                    dirty_pages: true,
                };
                let tracked = tracker.track(cg.id(), &trace_file(&b), watch(b.write_detail));
                if let Err(e) = tracked {
                    if !b.write_detail {
                        return Err(e);
                    }
                    // The branch goes on, traced without per-write detail, rather than
                    // the daemon not starting.
                    log::error!(
                        "branch {}: per-write detail unavailable ({e}); traced without it",
                        b.name
                    );
                    tracker.track(cg.id(), &trace_file(&b), watch(false))?;
                }
                tracker.set_net_policy(cg.id(), b.policy.as_ref())?;
            }
        }
        // Syscall programs an earlier daemon left attached go if no branch wants them.
        tracker.settle();
        self.tracker = Some(tracker);
        Ok(())
    }

    /// Keeps the branches' held side effects in `journal`: commits deliver them, aborts
    /// drop them.
    pub fn set_effects(&mut self, journal: crate::effects::Journal) -> Result<()> {
        let live: Vec<u64> = self
            .registry
            .all()?
            .iter()
            .filter_map(|b| Cgroup::open(&b.cgroup).ok().map(|c| c.id()))
            .collect();
        let stale = journal.retain(&live)?;
        if stale > 0 {
            log::info!("dropped {stale} recorded effects of branches that no longer exist");
        }
        self.effects = Some(journal);
        Ok(())
    }

    /// Holds deferred calls with `d`: serves the listener of every running branch whose
    /// policy defers (and every later one).
    pub fn set_deferrals(&mut self, d: crate::effects::defer::Deferrals) -> Result<()> {
        for b in self.registry.all()? {
            if !b.frozen
                && !b.retired
                && crate::sandbox::notify::listener_fd(b.init_pid).is_some()
                && let Err(e) = d.adopt(b.init_pid)
            {
                log::warn!("{}: its deferred calls cannot be served: {e}", b.name);
            }
        }
        self.deferrals = Some(d);
        Ok(())
    }

    /// What a metrics scrape reads, taken quickly under the manager's lock; the figures
    /// are computed from it afterwards ([`metrics_snapshot`]), so a scrape holds up a fork
    /// no longer than a registry read.
    pub fn metrics_sources(&self) -> MetricsSources {
        MetricsSources {
            records: self.registry.all().unwrap_or_default(),
            tracker: self.tracker.clone(),
            effects: self.effects.clone(),
            deferrals: self.deferrals.clone(),
        }
    }

    /// Where branch `name`'s init takes commands, if it is running.
    pub fn control_of(&self, name: &str) -> Result<std::path::PathBuf> {
        let b = self.get(name)?;
        if b.frozen {
            return Err(Error::Conflict(format!(
                "branch {name} is a frozen checkpoint: fork it to get a running branch"
            )));
        }
        if !Path::new(&format!("/proc/{}", b.init_pid)).exists() {
            return Err(Error::Conflict(format!(
                "branch {name} is not running (its init is gone): abort it"
            )));
        }
        Ok(b.control)
    }

    /// The side effects recorded for branch `name`, oldest first.
    pub fn effects(&self, name: &str) -> Result<Vec<crate::effects::Effect>> {
        let b = self.get(name)?;
        match (&self.effects, Cgroup::open(&b.cgroup)) {
            (Some(j), Ok(cg)) if !b.frozen => j.list(cg.id()),
            _ => Ok(Vec::new()),
        }
    }

    /// Delivers branch `b`'s held effects (its commit).
    fn release_effects(&self, b: &BranchRecord) -> Result<Vec<crate::effects::replay::Delivery>> {
        let Ok(cg) = Cgroup::open(&b.cgroup) else {
            return Ok(Vec::new());
        };
        let mut done = match &self.deferrals {
            Some(d) => d.release(cg.id()),
            None => Vec::new(),
        };
        if let Some(j) = &self.effects {
            done.extend(crate::effects::replay::release(
                j,
                cg.id(),
                &b.name,
                &self.instance,
            )?);
        }
        Ok(done)
    }

    /// Names this state directory among others on the host (its inode), for cgroups and
    /// pins.
    pub fn instance_tag(&self) -> String {
        self.instance.clone()
    }

    /// Whether branches are traced.
    pub fn traced(&self) -> bool {
        self.tracker.is_some()
    }

    /// The tracer, when branches are traced (to wait for its drain without holding the
    /// manager: [`Tracker::sync`]).
    pub fn tracker(&self) -> Option<std::sync::Arc<Tracker>> {
        self.tracker.clone()
    }

    /// The tracer's counters, when branches are traced.
    pub fn trace_status(&self) -> Result<Option<crate::api::TraceStatus>> {
        let Some(t) = &self.tracker else {
            return Ok(None);
        };
        let (stats, unattributed) = t.stats()?;
        Ok(Some(crate::api::TraceStatus {
            events: stats.events,
            lost: stats.lost,
            unattributed,
            syscall_programs_attached: t.syscall_hooks_attached(),
            page_fault_programs_attached: t.fault_hooks_attached(),
        }))
    }

    /// Adds host directories that branches started from now on must not see (the daemon
    /// hides its socket's directory this way).
    pub fn hide(&mut self, dir: &Path) {
        self.hidden.push(dir.to_path_buf());
    }

    /// `name`, if no live branch has it; with no name, `b<id>` (or `b<id>-2`, `-3`... when
    /// a user gave a branch that name).
    fn unused_name(&self, name: Option<String>, id: u64) -> Result<String> {
        let Some(name) = name else {
            let mut n = 1;
            loop {
                let generated = match n {
                    1 => format!("b{id}"),
                    _ => format!("b{id}-{n}"),
                };
                if self.registry.get(&generated)?.is_none() {
                    return Ok(generated);
                }
                n += 1;
            }
        };
        validate_name(&name)?;
        if self.registry.get(&name)?.is_some() {
            return Err(Error::Conflict(format!(
                "a live branch is already named {name:?}: pick another name or abort that branch"
            )));
        }
        Ok(name)
    }

    /// The live branch `name`.
    pub fn get(&self, name: &str) -> Result<BranchRecord> {
        let b = self.registry.get(name)?.ok_or_else(|| {
            Error::NotFound(format!(
                "no live branch named {name:?} (see `forkscope ls`)"
            ))
        })?;
        if b.retired {
            return Err(Error::Conflict(format!(
                "{name} was aborted; it is kept only while branches forked from it run (abort them and it goes)"
            )));
        }
        Ok(b)
    }

    /// Branch `name`, retired ones included (for reading what they left: their traces).
    pub fn get_any(&self, name: &str) -> Result<BranchRecord> {
        self.registry.get(name)?.ok_or_else(|| {
            Error::NotFound(format!(
                "no live branch named {name:?} (see `forkscope ls`)"
            ))
        })
    }

    /// Every live branch.
    pub fn list(&self) -> Result<Vec<BranchInfo>> {
        Ok(self
            .registry
            .all()?
            .into_iter()
            .map(|record| branch_info(record, self.tracker.as_deref()))
            .collect())
    }

    /// Starts a root branch on `workspace` running `command`, on the host's network.
    pub fn run(
        &mut self,
        name: Option<String>,
        workspace: &Path,
        command: Vec<String>,
    ) -> Result<BranchRecord> {
        self.run_with(name, workspace, command, RunOptions::default())
    }

    /// Starts a root branch as `options` say.
    pub fn run_with(
        &mut self,
        name: Option<String>,
        workspace: &Path,
        command: Vec<String>,
        options: RunOptions,
    ) -> Result<BranchRecord> {
        let RunOptions {
            net_isolated,
            write_detail,
            policy,
        } = options;
        let started = trace_notes::now_ns();
        if workspace.is_relative() {
            return Err(Error::Invalid(format!(
                "workspace {}: give an absolute path (the daemon's working directory is not the caller's)",
                workspace.display()
            )));
        }
        let workspace = workspace
            .canonicalize()
            .map_err(|e| Error::Invalid(format!("workspace {}: {e}", workspace.display())))?;
        if !workspace.is_dir() {
            return Err(Error::Invalid(format!(
                "workspace {} is not a directory",
                workspace.display()
            )));
        }
        if workspace.starts_with("/dev/shm") {
            return Err(Error::Invalid(format!(
                "workspace {}: a branch has a private /dev/shm, which would hide it; put the workspace elsewhere",
                workspace.display()
            )));
        }
        if workspace.starts_with(&self.state) || self.state.starts_with(&workspace) {
            return Err(Error::Invalid(format!(
                "workspace {} and the state directory {} must not contain each other",
                workspace.display(),
                self.state.display()
            )));
        }
        if let Some(p) = &policy {
            self.check_policy(p, &workspace, net_isolated)?;
        }
        let id = self.registry.next_id()?;
        let name = self.unused_name(name, id)?;
        let dir = branch_dir(&self.state, id);
        mkdirs(&dir, &["tmp-base"])?;
        let (ws_base, tmp_base) = (dir.join("ws-base"), dir.join("tmp-base"));
        let fork_ns = match build_base(&workspace, &ws_base) {
            Ok(stats) => {
                if !stats.copied_from.is_empty() {
                    // A copied base: commits compare the host with what was copied.
                    let f = dir.join("base-manifest.json");
                    let text =
                        serde_json::to_string(&stats.copied_from).map_err(std::io::Error::from)?;
                    std::fs::write(&f, text).at(&f)?;
                }
                stats.max_ctime_ns
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let starting = self.begin_start(
            id,
            name,
            None,
            workspace,
            command.clone(),
            vec![ws_base],
            vec![tmp_base],
            Some(fork_ns),
            Start {
                command,
                nest_in: None,
                warm: None,
                net_isolated,
                write_detail,
                checkpoint: false,
                policy,
            },
        )?;
        let b = self.finish_start(starting)?;
        self.note_start(&b, started);
        Ok(b)
    }

    /// Replaces branch `name`'s policy. Network rules take effect at once (for the
    /// branch only: its forks keep the policy they inherited). File rules are mounts made
    /// when the branch starts, and deferral needs the listener its init installs then:
    /// neither can change while it runs.
    pub fn set_policy(&mut self, name: &str, policy: Policy) -> Result<BranchRecord> {
        let mut b = self.get(name)?;
        self.check_policy(&policy, &b.workspace, b.net_isolated)?;
        let old = b.policy.clone().unwrap_or_default();
        if old
            .file_rules()
            .iter()
            .map(|r| (&r.dest, r.action))
            .collect::<Vec<_>>()
            != policy
                .file_rules()
                .iter()
                .map(|r| (&r.dest, r.action))
                .collect::<Vec<_>>()
        {
            return Err(Error::Conflict(format!(
                "{name}: file rules are mounts made when a branch starts and cannot change while it runs; fork it with --fresh under the new policy, or run a new branch"
            )));
        }
        if policy.defers() && !old.defers() {
            return Err(Error::Conflict(format!(
                "{name} was started without defer rules, so it has no listener to hold calls: start a branch with a defer rule in its policy"
            )));
        }
        if !b.frozen
            && let (Some(t), Ok(cg)) = (&self.tracker, Cgroup::open(&b.cgroup))
        {
            t.set_net_policy(cg.id(), Some(&policy))?;
        }
        b.policy = Some(policy);
        self.registry.put(&b)?;
        Ok(b)
    }

    /// Checks that `policy` can be enforced for a branch on `workspace`: network rules need
    /// the eBPF programs, buffering needs the host's network, and no file rule may reach
    /// the workspace or the daemon's own directories.
    fn check_policy(&self, policy: &Policy, workspace: &Path, net_isolated: bool) -> Result<()> {
        if self.tracker.is_none() && policy.needs_hooks() {
            return Err(Error::Invalid(
                "network policies are enforced by the eBPF programs, which this daemon does not load (it was started with --no-trace)".into(),
            ));
        }
        if net_isolated && policy.buffers() {
            return Err(Error::Invalid(
                "buffer rules need the host's network (the recording proxy listens there): drop --net isolated or use defer".into(),
            ));
        }
        for r in policy.file_rules() {
            let crate::policy::Dest::File { path } = &r.dest else {
                continue;
            };
            if path.starts_with(workspace) || workspace.starts_with(path) {
                return Err(Error::Invalid(format!(
                    "policy, line {}: {} and the workspace {} contain each other: the workspace is the branch's own already",
                    r.line,
                    path.display(),
                    workspace.display()
                )));
            }
            let guarded = std::iter::once(&self.state).chain(self.hidden.iter());
            for g in guarded {
                if path.starts_with(g) || g.starts_with(path) {
                    return Err(Error::Invalid(format!(
                        "policy, line {}: {} reaches forkscope's own directory {}, which branches never see",
                        r.line,
                        path.display(),
                        g.display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// What branch `name` changed in its workspace since its fork point.
    pub fn diff(&self, name: &str) -> Result<Vec<Change>> {
        let b = self.get(name)?;
        if b.frozen {
            return Ok(Vec::new()); // a checkpoint never changes
        }
        let upper = b.dir.join("ws/upper");
        // (Files copied at the fork for the clones are not changes until written.)
        let copies = crate::procfork::open_copies::ForkCopies::load(&b.dir);
        let mut all = changes(&upper, &b.ws_lowers)?;
        all.retain(|c| {
            c.kind != ChangeKind::Modified
                || !std::fs::symlink_metadata(upper.join(&c.path))
                    .is_ok_and(|m| copies.unchanged(&c.path, &m))
        });
        Ok(all)
    }
}
