//! Per-branch traces in the daemon: one loaded [`Probe`] watches every branch's cgroup, and a
//! reader thread appends each event, as a JSON line, to the trace file of the branch whose
//! cgroup it came from (`<branch dir>/trace.jsonl`).
//!
//! The syscall programs (per-write detail) are attached only while some tracked cgroup
//! asks for them, the page-fault programs only while any cgroup is tracked; each set is
//! detached a grace period ([`DETACH_GRACE`] by default) after the last cgroup that needed
//! it goes, or when the daemon stops with none needing it (see [`crate::on_demand`]).
//!
//! Events are attributed by the cgroup id the eBPF programs record: a branch's processes all
//! live in its cgroup. The trace starts when the branch's cgroup is created, before its
//! init is born in it, so nothing the branch does is missed (the first events are the
//! init's own: the sandbox's setup processes before it stay in the daemon's cgroup).

use std::{
    collections::{HashMap, HashSet},
    fs::{File, OpenOptions},
    io::{BufWriter, Write},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};

use crate::{
    bpf::egress_map::EgressMap,
    bpf::{HookSet, Probe, ProbeOptions, Stats},
    error::{IoContext, Result},
    events::{RawEvent, TraceEvent, decode::decode, egress::Egress, resolve::Resolver, runs::Runs},
    on_demand::OnDemand,
};

/// How often the reader drains the ring buffer (at once when [`Tracker::sync`] asks).
const DRAIN_INTERVAL: Duration = Duration::from_millis(20);

/// How long the syscall programs stay attached by default after the last cgroup that asked
/// for per-write detail stopped being tracked (a branch aborted and another started right
/// after pays neither the detach nor the attach).
pub const DETACH_GRACE: Duration = Duration::from_secs(3);

/// How often the bytes sent by branches without per-write detail become `net_send`
/// records (at once when [`Tracker::sync`] asks).
const EGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// How long [`Tracker::sync`] waits for the reader at most.
const SYNC_TIMEOUT: Duration = Duration::from_secs(1);

/// Drains asked of the reader ([`Tracker::sync`]) and drains it finished: a drain counts
/// when it began after the request.
#[derive(Default)]
struct Drains {
    requested: u64,
    done: u64,
}

/// The drain counters and the condition both sides wait on.
type DrainSignal = Arc<(Mutex<Drains>, std::sync::Condvar)>;

/// Where events go; the reader holds it while it writes a batch.
struct Sinks {
    /// Open trace files (and their paths) by cgroup id.
    files: HashMap<u64, (std::path::PathBuf, BufWriter<File>)>,
    resolver: Resolver,
    /// Events from cgroups no branch owns any more (a branch aborted with events in flight).
    unattributed: u64,
    /// Events written to traces, by kind (for the metrics).
    kinds: HashMap<std::borrow::Cow<'static, str>, u64>,
    /// Events written to traces, by cgroup (for the per-branch metrics).
    per_cgroup: HashMap<u64, u64>,
    /// Runs of writes the kernel is merging.
    runs: Runs,
    /// What branches without per-write detail sent (none if the map could not be opened).
    egress_map: Option<EgressMap>,
    egress: Egress,
    /// One JSON line, built here and written whole (reused from event to event).
    line: Vec<u8>,
}

impl Sinks {
    /// Writes one event into the trace of the branch it belongs to.
    fn route(&mut self, raw: &RawEvent) {
        if let Some(ev) = self.resolver.event(raw) {
            self.write(&ev);
        }
    }

    /// Writes `ev` into the trace of the branch whose cgroup is `ev.cgroup`, counted for
    /// the metrics; false (and counted as unattributed) when no branch owns that cgroup.
    fn write(&mut self, ev: &TraceEvent) -> bool {
        let Some((_, out)) = self.files.get_mut(&ev.cgroup) else {
            self.unattributed += 1;
            return false;
        };
        *self.per_cgroup.entry(ev.cgroup).or_insert(0) += 1;
        match self.kinds.get_mut(&ev.kind) {
            Some(n) => *n += 1,
            None => {
                self.kinds.insert(ev.kind.clone(), 1);
            }
        }
        if !write_line(out, &mut self.line, ev) {
            log::warn!("writing the trace of cgroup {} failed", ev.cgroup);
        }
        true
    }
}

impl Sinks {
    /// Writes `net_send` records for what the branches without per-write detail sent since
    /// the last harvest.
    fn harvest_egress(&mut self) {
        let Some(map) = &self.egress_map else {
            return;
        };
        let counts = map.counts();
        let files = &self.files;
        let records = self
            .egress
            .harvest(&counts, crate::events::record::now_ns(), |c| {
                files.contains_key(&c)
            });
        let mut written = HashSet::new();
        for ev in records {
            if self.write(&ev) {
                written.insert(ev.cgroup);
            }
        }
        // The trace first, then the totals it now holds (see events::egress).
        for cgroup in written {
            if let Some((path, out)) = self.files.get_mut(&cgroup) {
                let _ = out.flush();
                let saved = egress_seen_path(path);
                if let Err(e) = self.egress.save(cgroup, &saved) {
                    log::warn!("writing {}: {e}", saved.display());
                }
            }
        }
    }
}

/// Where the egress totals written to the trace at `trace` are kept (see events::egress).
fn egress_seen_path(trace: &Path) -> std::path::PathBuf {
    trace.with_file_name("egress-seen.json")
}

/// What a tracked cgroup needs watched beyond its processes, connections and sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watch {
    /// Every write, send, open and path change (the syscall programs).
    pub write_detail: bool,
    /// The pages its processes dirty (the page-fault programs): false for a checkpoint,
    /// whose processes never run.
    pub dirty_pages: bool,
}

/// Events written per hold of the sinks' lock, so tracking a new branch never waits long.
const BATCH: usize = 4096;

/// The daemon's tracer. Dropping it stops the reader; the pinned programs stay attached
/// until [`Tracker::unpin`].
pub struct Tracker {
    probe: Mutex<Probe>,
    sinks: Arc<Mutex<Sinks>>,
    stop: Arc<AtomicBool>,
    drains: DrainSignal,
    /// The ring buffer until the reader starts.
    ring: Mutex<Option<RingBuf<MapData>>>,
    reader: Mutex<Option<JoinHandle<()>>>,
    pin_dir: std::path::PathBuf,
    /// Whether the programs were adopted from pins rather than loaded.
    pub adopted: bool,
    /// Each branch's policy, by cgroup id (for the recording proxy's answers).
    policies: Mutex<HashMap<u64, crate::policy::Policy>>,
    /// The syscall programs: wanted by cgroups that ask for per-write detail.
    syscalls: OnDemand,
    /// The page-fault programs: wanted by every traced cgroup.
    faults: OnDemand,
}

impl Tracker {
    /// Removes every pin set of `instance` (a daemon that does not trace leaves no programs
    /// of an earlier one attached).
    pub fn remove_pins(instance: &str) -> Result<()> {
        for p in pin_sets(instance) {
            crate::bpf::unpin(&p)?;
        }
        Ok(())
    }

    /// Adopts the programs pinned for `instance` (the state directory's tag), or loads,
    /// attaches and pins them. Events are read once [`Tracker::start_reading`] is called
    /// (after the branches are registered, so what waited in the ring buffer reaches them).
    /// The syscall programs stay attached `detach_grace` after the last branch that asked
    /// for them goes.
    pub fn start(opts: &ProbeOptions, instance: &str, detach_grace: Duration) -> Result<Self> {
        crate::sys::ensure_tracefs()?;
        crate::sys::ensure_bpffs()?;
        let root = Path::new(crate::bpf::PIN_ROOT);
        let pin_dir = root.join(format!("{instance}-{}", crate::bpf::object_id()));
        // Pins of this state directory left by another build: their programs go.
        for p in pin_sets(instance).into_iter().filter(|p| *p != pin_dir) {
            log::info!("removing pins of another forkscope build: {}", p.display());
            crate::bpf::unpin(&p)?;
        }
        let (mut probe, adopted) = match Probe::adopt(&pin_dir)? {
            Some(p) => (p, true),
            None => {
                crate::bpf::unpin(&pin_dir)?; // an incomplete set
                let mut probe = Probe::load(opts)?;
                probe.attach_base()?;
                if let Err(e) = probe.pin(&pin_dir) {
                    let _ = crate::bpf::unpin(&pin_dir);
                    return Err(e);
                }
                (probe, false)
            }
        };
        let syscalls = OnDemand::new(HookSet::Syscalls, pin_dir.clone(), detach_grace);
        let faults = OnDemand::new(HookSet::PageFaults, pin_dir.clone(), detach_grace);
        let ring = probe.take_events()?;
        let runs = Runs::new(probe.run_slots()?);
        let egress_map = EgressMap::open(&pin_dir)
            .inspect_err(|e| {
                log::warn!("sends of branches without per-write detail will not be traced: {e}")
            })
            .ok();
        Ok(Self {
            probe: Mutex::new(probe),
            sinks: Arc::new(Mutex::new(Sinks {
                files: HashMap::new(),
                resolver: Resolver::new(),
                kinds: HashMap::new(),
                per_cgroup: HashMap::new(),
                unattributed: 0,
                runs,
                egress_map,
                egress: Egress::default(),
                line: Vec::with_capacity(1024),
            })),
            stop: Arc::new(AtomicBool::new(false)),
            drains: Arc::default(),
            ring: Mutex::new(Some(ring)),
            reader: Mutex::new(None),
            pin_dir,
            adopted,
            policies: Mutex::new(HashMap::new()),
            syscalls,
            faults,
        })
    }

    /// Starts the reader thread (once).
    pub fn start_reading(&self) -> Result<()> {
        let Some(ring) = self.ring.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return Ok(());
        };
        let (sinks, stop, drains) = (self.sinks.clone(), self.stop.clone(), self.drains.clone());
        let handle = std::thread::Builder::new()
            .name("forkscope-tracer".into())
            .spawn(move || read_loop(ring, &sinks, &stop, &drains))
            .map_err(crate::Error::Other)?;
        *self.reader.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(())
    }

    /// Waits until every event in the ring buffer now is in the trace files (a drain that
    /// began after this call), at most [`SYNC_TIMEOUT`]: a trace read right after a
    /// command exits then holds that command's events (the reader otherwise drains every
    /// [`DRAIN_INTERVAL`]).
    pub fn sync(&self) {
        if self
            .reader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
        {
            return;
        }
        let (lock, cv) = &*self.drains;
        let mut d = lock.lock().unwrap_or_else(|p| p.into_inner());
        d.requested += 1;
        let want = d.requested;
        cv.notify_all();
        let deadline = std::time::Instant::now() + SYNC_TIMEOUT;
        while d.done < want {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                log::warn!("the trace reader did not drain within {SYNC_TIMEOUT:?}");
                break;
            }
            d = cv
                .wait_timeout(d, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Removes the pins: the programs detach once this tracer is dropped.
    pub fn unpin(&self) -> Result<()> {
        crate::bpf::unpin(&self.pin_dir)
    }

    fn probe(&self) -> std::sync::MutexGuard<'_, Probe> {
        self.probe.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sinks(&self) -> std::sync::MutexGuard<'_, Sinks> {
        self.sinks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts appending the events of cgroup `id` to `file`, with what `watch` asks for
    /// (the on-demand programs it needs are attached first if they were not). `id` must not
    /// be tracked already.
    pub fn track(&self, id: u64, file: &Path, watch: Watch) -> Result<()> {
        let write_detail = watch.write_detail;
        let wanted = (|| {
            if watch.dirty_pages {
                self.faults.want(id, &self.probe)?;
            }
            if write_detail {
                self.syscalls.want(id, &self.probe)?;
            }
            self.track_file(id, file, write_detail)
        })();
        if wanted.is_err() {
            self.faults.release(id);
            self.syscalls.release(id);
        }
        wanted
    }

    fn track_file(&self, id: u64, file: &Path, write_detail: bool) -> Result<()> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
            .at(file)?;
        {
            let mut sinks = self.sinks();
            // Saved totals belong to the pinned map they were read from: a freshly loaded
            // map (another build, an incomplete pin set) counts from zero.
            if self.adopted {
                sinks.egress.load(id, &egress_seen_path(file));
            }
            sinks
                .files
                .insert(id, (file.to_path_buf(), BufWriter::new(out)));
        }
        if let Err(e) = self.probe().track(id, write_detail) {
            self.sinks().files.remove(&id);
            return Err(e);
        }
        Ok(())
    }

    /// Detaches what no branch needs after the grace period (called once the branches are
    /// tracked again after a restart).
    pub fn settle(&self) {
        self.syscalls.settle();
        self.faults.settle();
    }

    /// Whether the syscall programs are attached now.
    pub fn syscall_hooks_attached(&self) -> bool {
        self.syscalls.attached()
    }

    /// Whether the page-fault programs are attached now.
    pub fn fault_hooks_attached(&self) -> bool {
        self.faults.attached()
    }

    /// Enforces `policy`'s network rules for the branch whose cgroup is `id` (none: allow
    /// everything).
    pub fn set_net_policy(&self, id: u64, policy: Option<&crate::policy::Policy>) -> Result<()> {
        let compiled = policy.map(|p| p.net());
        self.probe().set_net_policy(id, compiled.as_ref())?;
        let mut all = self.policies.lock().unwrap_or_else(|p| p.into_inner());
        match policy {
            Some(p) => all.insert(id, p.clone()),
            None => all.remove(&id),
        };
        Ok(())
    }

    /// The policy of the branch whose cgroup is `id`.
    pub fn policy(&self, id: u64) -> Option<crate::policy::Policy> {
        let all = self.policies.lock().unwrap_or_else(|p| p.into_inner());
        all.get(&id).cloned()
    }

    /// Events written to traces since the tracer started, by kind.
    pub fn event_counts(&self) -> HashMap<String, u64> {
        self.sinks()
            .kinds
            .iter()
            .map(|(k, n)| (k.to_string(), *n))
            .collect()
    }

    /// Events written to each cgroup's trace since the tracer started.
    pub fn event_counts_per_cgroup(&self) -> HashMap<u64, u64> {
        self.sinks().per_cgroup.clone()
    }

    /// Lets thread `tid`'s deferred call to `ip`:`port` through the hooks, once (see
    /// forkscope_common::policy::DeferPass).
    pub fn grant_defer(&self, tid: u32, ip: std::net::IpAddr, port: u16) -> Result<()> {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        };
        let (addr, family) = match ip {
            std::net::IpAddr::V4(a) => ([u32::from_ne_bytes(a.octets()), 0, 0, 0], libc::AF_INET),
            std::net::IpAddr::V6(a) => {
                let o = a.octets();
                let w = |i: usize| u32::from_ne_bytes(o[i * 4..i * 4 + 4].try_into().expect("4"));
                ([w(0), w(1), w(2), w(3)], libc::AF_INET6)
            }
        };
        self.probe().grant_defer(
            tid,
            forkscope_common::policy::DeferPass {
                addr,
                port,
                family: family as u16,
                _pad: 0,
            },
        )
    }

    /// Tells the policy hooks where the recording proxy listens.
    pub fn set_proxy(&self, addr: std::net::SocketAddrV4) -> Result<()> {
        self.probe()
            .set_proxy(forkscope_common::policy::ProxyConfig {
                addr: u32::from_ne_bytes(addr.ip().octets()),
                port: addr.port(),
                _pad: 0,
                source_base: crate::effects::proxy::SOURCE_BASE,
                _pad2: 0,
            })
    }

    /// Stops tracing cgroup `id` (and enforcing its network policy) and closes its trace
    /// file (after writing what was read).
    pub fn untrack(&self, id: u64) {
        let _ = self.probe().untrack(id);
        self.syscalls.release(id);
        self.faults.release(id);
        let mut sinks = self.sinks();
        sinks.harvest_egress(); // what it sent last
        sinks.egress.forget(id);
        if let Some(m) = sinks.egress_map.as_mut() {
            m.forget(id);
        }
        sinks.per_cgroup.remove(&id);
        if let Some((_, mut out)) = sinks.files.remove(&id) {
            let _ = out.flush();
        }
    }

    /// Appends `ev`, written by the daemon (a branch operation), to the trace of cgroup `id`,
    /// between the kernel's events; nothing when it is not traced.
    pub fn note(&self, id: u64, ev: &TraceEvent) {
        let mut guard = self.sinks();
        let sinks = &mut *guard;
        if let Some((file, out)) = sinks.files.get_mut(&id)
            && !(write_line(out, &mut sinks.line, ev) && out.flush().is_ok())
        {
            log::warn!("writing {} to {} failed", ev.kind, file.display());
        }
    }

    /// Stops tracing whatever writes to `file` (a branch whose cgroup is already gone).
    pub fn forget_file(&self, file: &Path) {
        let ids: Vec<u64> = self
            .sinks()
            .files
            .iter()
            .filter(|(_, (p, _))| p == file)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.untrack(id);
        }
    }

    /// Starts a new dirty-page epoch for the given cgroups (after a fork write-protected
    /// their pages again). Errors are logged: accounting never fails a fork.
    pub fn new_epoch(&self, cgroups: &[u64]) {
        if let Err(e) = self.probe().new_epoch(|c| cgroups.contains(&c)) {
            log::warn!("starting a new dirty-page epoch: {e}");
        }
    }

    /// Pages first written since the current epoch began by the live processes `pids` of
    /// cgroup `id`: the pages those processes made their own since the branch's last fork.
    pub fn private_pages(&self, id: u64, pids: &[u32]) -> Result<u64> {
        let counts = self.probe().page_counts(|c| c == id)?;
        Ok(counts
            .iter()
            .filter(|(k, _)| pids.contains(&k.tgid))
            .map(|(_, n)| n)
            .sum())
    }

    /// The programs' counters (events, lost events), and events no branch claimed.
    pub fn stats(&self) -> Result<(Stats, u64)> {
        let stats = self.probe().stats()?;
        Ok((stats, self.sinks().unattributed))
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = r.join();
        }
        self.syscalls.stop();
        self.faults.stop();
    }
}

/// The pin directories of `instance` under [`crate::bpf::PIN_ROOT`], one per object build.
fn pin_sets(instance: &str) -> Vec<std::path::PathBuf> {
    let prefix = format!("{instance}-");
    std::fs::read_dir(crate::bpf::PIN_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

/// Appends `ev` to a trace as one JSON line; false if it could not be written. The line is
/// built first in `line` and written whole (cheaper than small writes token by token).
fn write_line(out: &mut BufWriter<File>, line: &mut Vec<u8>, ev: &TraceEvent) -> bool {
    line.clear();
    crate::events::jsonl::write_line(ev, line);
    out.write_all(line).is_ok()
}

fn read_loop(
    mut ring: RingBuf<MapData>,
    sinks: &Mutex<Sinks>,
    stop: &AtomicBool,
    drains: &DrainSignal,
) {
    let (lock, cv) = &**drains;
    let mut egress_at = std::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // Every DRAIN_INTERVAL, or at once when asked; what was asked before this drain
        // began is answered when it ends.
        let (asked, syncing) = {
            let mut d = lock.lock().unwrap_or_else(|p| p.into_inner());
            if d.requested == d.done {
                d = cv
                    .wait_timeout(d, DRAIN_INTERVAL)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            (d.requested, d.requested != d.done)
        };
        loop {
            let mut guard = sinks.lock().unwrap_or_else(|p| p.into_inner());
            let s = &mut *guard;
            let mut n = 0;
            while n < BATCH {
                let Some(item) = ring.next() else {
                    break;
                };
                n += 1;
                if let Ok(raw) = decode(&item) {
                    s.runs.note(&raw);
                    s.route(&raw);
                }
            }
            if n < BATCH {
                // The ring is empty: what runs of writes hold goes after it.
                for raw in s.runs.harvest(crate::events::record::now_ns()) {
                    s.route(&raw);
                }
                if syncing || egress_at.elapsed() >= EGRESS_INTERVAL {
                    s.harvest_egress();
                    egress_at = std::time::Instant::now();
                }
            }
            for (_, out) in s.files.values_mut() {
                let _ = out.flush();
            }
            if n < BATCH {
                break;
            }
        }
        let mut d = lock.lock().unwrap_or_else(|p| p.into_inner());
        d.done = d.done.max(asked);
        cv.notify_all();
    }
}

/// The recording proxy's view of the tracer: the hooks' redirect records and the
/// branches' policies.
pub struct ProxyDirectory(pub Arc<Tracker>);

impl crate::effects::proxy::Directory for ProxyDirectory {
    fn redirect(&self, slot: u32) -> Option<(u64, std::net::SocketAddr)> {
        let mut probe = self.0.probe();
        let r = probe.redirect(slot).ok()?;
        // Read once: a later connection from that source address (a process binding it on
        // purpose) finds nothing.
        let _ = probe.clear_redirect(slot);
        (r.cgroup != 0).then(|| {
            (
                r.cgroup,
                crate::effects::proxy::destination(r.addr[0], r.port),
            )
        })
    }

    fn response(&self, cgroup: u64) -> (u16, String) {
        let all = self.0.policies.lock().unwrap_or_else(|p| p.into_inner());
        all.get(&cgroup)
            .map(|p| p.buffer_response())
            .unwrap_or((202, String::new()))
    }
}
