//! The daemon's Prometheus metrics (`forkscope daemon --metrics-addr`, `GET /metrics`).
//!
//! Operations record into histograms (atomic updates: recording never waits on anything a
//! fork holds). Figures that live elsewhere are read when Prometheus scrapes ([`Metrics::
//! scrape`], outside the branch manager's lock but for one registry read): branches by state and their private memory (the branch list), events by kind
//! and lost events (the tracer), held and recorded side effects by kind and state (the
//! effects journal), the eBPF programs' run time and run count (the kernel's BPF stats,
//! switched on while the daemon runs). Names follow Prometheus conventions: base units,
//! `_seconds`, `_bytes`, `_total` for counters.
//!
//! Per-branch series (`forkscope_branch_*{branch}`) are off by default and capped
//! (`--metrics-branch-labels N`): a fork storm must not explode the series count.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus::{
    CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::error::{Error, Result};

/// Buckets for operation latencies: 100 us to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// How long a rendered scrape is served again to other scrapes.
const FRESH: std::time::Duration = std::time::Duration::from_millis(500);

/// What a scrape reads from the rest of the daemon.
#[derive(Default)]
pub struct Snapshot {
    /// (name, state, private bytes, private pages) of every live branch.
    pub branches: Vec<(String, String, u64, u64)>,
    /// Per live branch (by name): events written to its trace, and its recorded side effects
    /// by state.
    pub branch_events: HashMap<String, u64>,
    pub branch_effects: HashMap<(String, String), u64>,
    /// Events written to traces, by kind, since the tracer started.
    pub events: HashMap<String, u64>,
    /// Events the ring buffer dropped.
    pub lost_events: u64,
    /// (kind, state) -> count of recorded side effects.
    pub effects: HashMap<(String, String), u64>,
    /// Calls held by `defer` rules since the daemon started.
    pub deferred: u64,
    /// Age of the oldest effect still held (seconds), if any.
    pub oldest_held_s: Option<f64>,
    /// (program, run time in ns, runs) of forkscope's eBPF programs.
    pub programs: Vec<(String, u64, u64)>,
    /// Whether the syscall programs (per-write detail) are attached.
    pub syscall_hooks: bool,
    /// Whether the page-fault programs are attached.
    pub fault_hooks: bool,
}

fn err(e: prometheus::Error) -> Error {
    Error::State(format!("metrics: {e}"))
}

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    pub fork_seconds: Histogram,
    pub fork_phase_seconds: HistogramVec,
    pub commit_seconds: Histogram,
    pub abort_seconds: Histogram,
    branches: IntGaugeVec,
    private_bytes: IntGauge,
    private_pages: IntGauge,
    syscall_hooks: IntGauge,
    fault_hooks: IntGauge,
    events: IntCounterVec,
    lost_events: IntCounter,
    effects: IntGaugeVec,
    oldest_held: prometheus::Gauge,
    decisions: IntCounterVec,
    bpf_run_time: CounterVec,
    bpf_runs: IntCounterVec,
    branch_private_bytes: IntGaugeVec,
    branch_events: IntCounterVec,
    branch_effects: IntGaugeVec,
    /// The branches with per-branch series at the last scrape.
    branch_listed: Mutex<Vec<String>>,
    /// The last scrape's text and when it was made.
    last: Mutex<Option<(std::time::Instant, String)>>,
    /// Per-branch series allowed (0: none).
    branch_cap: usize,
    /// What counters last read from their sources, to add only the difference.
    seen: Mutex<HashMap<String, u64>>,
}

impl Metrics {
    /// Registers every metric; `branch_cap` per-branch series at most (0: none).
    pub fn new(branch_cap: usize) -> Result<Metrics> {
        let registry = Registry::new();
        let hist = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))
        };
        let fork_seconds = hist(
            "forkscope_fork_duration_seconds",
            "Time of each fork operation (all its children), from the request to the reply.",
        )
        .map_err(err)?;
        let commit_seconds = hist(
            "forkscope_commit_duration_seconds",
            "Time of each commit, files and held side effects.",
        )
        .map_err(err)?;
        let abort_seconds =
            hist("forkscope_abort_duration_seconds", "Time of each abort.").map_err(err)?;
        let fork_phase_seconds = HistogramVec::new(
            HistogramOpts::new(
                "forkscope_fork_phase_duration_seconds",
                "Time of each phase of each fork: check, freeze, files (snapshot), seize, thaw, plan, start (child sandboxes), processes (native clones), record.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["phase"],
        )
        .map_err(err)?;
        let branches = IntGaugeVec::new(
            Opts::new("forkscope_branches", "Live branches by state."),
            &["state"],
        )
        .map_err(err)?;
        let private_bytes = IntGauge::new(
            "forkscope_private_memory_bytes",
            "Memory the branches' processes made their own since their last fork (first-written pages), summed over branches.",
        )
        .map_err(err)?;
        let private_pages =
            IntGauge::new("forkscope_private_memory_pages", "The same, in pages.").map_err(err)?;
        let syscall_hooks = IntGauge::new(
            "forkscope_syscall_programs_attached",
            "1 while the syscall programs are attached (some branch asks for per-write detail): every process on the host then takes the kernel's slower syscall path; 0 otherwise.",
        )
        .map_err(err)?;
        let fault_hooks = IntGauge::new(
            "forkscope_page_fault_programs_attached",
            "1 while the page-fault programs are attached (some branch is traced): every page fault on the host runs them; 0 otherwise.",
        )
        .map_err(err)?;
        let events = IntCounterVec::new(
            Opts::new(
                "forkscope_events_total",
                "Side-effect events written to branch traces, by kind.",
            ),
            &["kind"],
        )
        .map_err(err)?;
        let lost_events = IntCounter::new(
            "forkscope_lost_events_total",
            "Events dropped because the ring buffer was full.",
        )
        .map_err(err)?;
        let effects = IntGaugeVec::new(
            Opts::new(
                "forkscope_side_effects",
                "Recorded side effects by kind (http, tcp: buffered; defer: held calls) and state (held, done, failed).",
            ),
            &["kind", "state"],
        )
        .map_err(err)?;
        let oldest_held = prometheus::Gauge::new(
            "forkscope_side_effect_oldest_held_age_seconds",
            "Age of the oldest side effect still waiting for its branch's commit (0: none).",
        )
        .map_err(err)?;
        let decisions = IntCounterVec::new(
            Opts::new(
                "forkscope_policy_decisions_total",
                "Network calls a policy did not simply allow, by action (deny, buffer, defer).",
            ),
            &["action"],
        )
        .map_err(err)?;
        let bpf_run_time = CounterVec::new(
            Opts::new(
                "forkscope_bpf_program_run_time_seconds_total",
                "Time the kernel spent in each of forkscope's eBPF programs (kernel BPF stats).",
            ),
            &["program"],
        )
        .map_err(err)?;
        let bpf_runs = IntCounterVec::new(
            Opts::new(
                "forkscope_bpf_program_runs_total",
                "Runs of each of forkscope's eBPF programs.",
            ),
            &["program"],
        )
        .map_err(err)?;
        let branch_private_bytes = IntGaugeVec::new(
            Opts::new(
                "forkscope_branch_private_memory_bytes",
                "Private memory per branch (only with --metrics-branch-labels).",
            ),
            &["branch"],
        )
        .map_err(err)?;
        let branch_events = IntCounterVec::new(
            Opts::new(
                "forkscope_branch_events_total",
                "Events written to each branch's trace (only with --metrics-branch-labels; a branch's series goes with it).",
            ),
            &["branch"],
        )
        .map_err(err)?;
        let branch_effects = IntGaugeVec::new(
            Opts::new(
                "forkscope_branch_side_effects",
                "Recorded side effects per branch and state (only with --metrics-branch-labels).",
            ),
            &["branch", "state"],
        )
        .map_err(err)?;
        let build = IntGaugeVec::new(
            Opts::new(
                "forkscope_build_info",
                "The running forkscope's version (always 1).",
            ),
            &["version"],
        )
        .map_err(err)?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for c in [
            Box::new(fork_seconds.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(commit_seconds.clone()),
            Box::new(abort_seconds.clone()),
            Box::new(fork_phase_seconds.clone()),
            Box::new(branches.clone()),
            Box::new(private_bytes.clone()),
            Box::new(private_pages.clone()),
            Box::new(events.clone()),
            Box::new(lost_events.clone()),
            Box::new(effects.clone()),
            Box::new(oldest_held.clone()),
            Box::new(decisions.clone()),
            Box::new(bpf_run_time.clone()),
            Box::new(bpf_runs.clone()),
            Box::new(branch_private_bytes.clone()),
            Box::new(branch_events.clone()),
            Box::new(branch_effects.clone()),
            Box::new(build),
            Box::new(syscall_hooks.clone()),
            Box::new(fault_hooks.clone()),
        ] {
            registry.register(c).map_err(err)?;
        }
        // Series that exist from the start, so that rates and alerts have something to read.
        for state in ["running", "frozen", "retired", "dead"] {
            branches.with_label_values(&[state]).set(0);
        }
        for action in ["deny", "buffer", "defer"] {
            decisions.with_label_values(&[action]);
        }
        Ok(Metrics {
            registry,
            fork_seconds,
            fork_phase_seconds,
            commit_seconds,
            abort_seconds,
            branches,
            private_bytes,
            private_pages,
            syscall_hooks,
            fault_hooks,
            events,
            lost_events,
            effects,
            oldest_held,
            decisions,
            bpf_run_time,
            bpf_runs,
            branch_private_bytes,
            branch_events,
            branch_effects,
            branch_listed: Mutex::new(Vec::new()),
            last: Mutex::new(None),
            branch_cap,
            seen: Mutex::new(HashMap::new()),
        })
    }

    /// Records one fork's phases (microseconds).
    pub fn fork_phases(&self, phases: &crate::branch::ForkPhases) {
        for (phase, us) in [
            ("check", phases.check_us),
            ("freeze", phases.freeze_us),
            ("files", phases.files_us),
            ("seize", phases.seize_us),
            ("thaw", phases.thaw_us),
            ("plan", phases.plan_us),
            ("start", phases.start_us),
            ("processes", phases.processes_us),
            ("record", phases.record_us),
        ] {
            self.fork_phase_seconds
                .with_label_values(&[phase])
                .observe(us as f64 / 1e6);
        }
    }

    /// What to add to counter `key` now that its source counts `now`: the increase since
    /// last seen, or all of `now` if the source started again from zero (a daemon restart
    /// of the tracer, say). Callers hold the scrape lock ([`Metrics::scrape`]).
    fn delta(&self, key: String, now: u64) -> u64 {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let last = seen.insert(key, now).unwrap_or(0);
        if now >= last { now - last } else { now }
    }

    /// Brings the scraped figures up to date with `s`.
    fn refresh(&self, s: &Snapshot) {
        self.branches.reset();
        for state in ["running", "frozen", "retired", "dead"] {
            self.branches.with_label_values(&[state]).set(0);
        }
        let (mut bytes, mut pages) = (0u64, 0u64);
        for (_, state, b, p) in &s.branches {
            self.branches.with_label_values(&[state.as_str()]).inc();
            bytes += b;
            pages += p;
        }
        self.private_bytes.set(bytes as i64);
        self.private_pages.set(pages as i64);
        self.syscall_hooks.set(i64::from(s.syscall_hooks));
        self.fault_hooks.set(i64::from(s.fault_hooks));
        // Per-branch series: only the branches shown now (capped); a branch that went away
        // takes its series with it.
        self.branch_private_bytes.reset();
        self.branch_effects.reset();
        let shown: Vec<&String> = s
            .branches
            .iter()
            .take(self.branch_cap)
            .map(|b| &b.0)
            .collect();
        {
            let mut listed = self.branch_listed.lock().unwrap_or_else(|p| p.into_inner());
            for gone in listed.iter().filter(|n| !shown.contains(n)) {
                let _ = self.branch_events.remove_label_values(&[gone.as_str()]);
            }
            *listed = shown.iter().map(|n| n.to_string()).collect();
        }
        for (name, _, bytes, _) in s.branches.iter().take(self.branch_cap) {
            self.branch_private_bytes
                .with_label_values(&[name.as_str()])
                .set(*bytes as i64);
            let events = s.branch_events.get(name).copied().unwrap_or(0);
            let d = self.delta(format!("branch_events/{name}"), events);
            self.branch_events
                .with_label_values(&[name.as_str()])
                .inc_by(d);
            for state in ["held", "done", "failed"] {
                let n = s
                    .branch_effects
                    .get(&(name.clone(), state.to_string()))
                    .copied()
                    .unwrap_or(0);
                self.branch_effects
                    .with_label_values(&[name.as_str(), state])
                    .set(n as i64);
            }
        }
        for (kind, n) in &s.events {
            let d = self.delta(format!("events/{kind}"), *n);
            self.events.with_label_values(&[kind.as_str()]).inc_by(d);
        }
        let d = self.delta("lost".into(), s.lost_events);
        self.lost_events.inc_by(d);
        for (action, n) in [
            ("deny", s.events.get("net_denied").copied().unwrap_or(0)),
            ("buffer", s.events.get("net_buffered").copied().unwrap_or(0)),
            ("defer", s.deferred),
        ] {
            let d = self.delta(format!("decisions/{action}"), n);
            self.decisions.with_label_values(&[action]).inc_by(d);
        }
        self.effects.reset();
        for kind in ["http", "tcp", "defer"] {
            for state in ["held", "done", "failed"] {
                self.effects.with_label_values(&[kind, state]).set(0);
            }
        }
        for ((kind, state), n) in &s.effects {
            self.effects
                .with_label_values(&[kind.as_str(), state.as_str()])
                .set(*n as i64);
        }
        self.oldest_held.set(s.oldest_held_s.unwrap_or(0.0));
        for (prog, ns, runs) in &s.programs {
            let d = self.delta(format!("bpf_ns/{prog}"), *ns);
            self.bpf_run_time
                .with_label_values(&[prog.as_str()])
                .inc_by(d as f64 / 1e9);
            let d = self.delta(format!("bpf_runs/{prog}"), *runs);
            self.bpf_runs.with_label_values(&[prog.as_str()]).inc_by(d);
        }
    }

    /// One scrape: `read` gathers the figures, which update the metrics, which are
    /// rendered; all under one lock, so concurrent scrapes never interleave (a counter
    /// moves forward once per increase). A scrape within [`FRESH`] of the last one gets
    /// the same text without reading anything again.
    pub fn scrape(&self, read: impl FnOnce() -> Snapshot) -> Result<String> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, text)) = &*last
            && at.elapsed() < FRESH
        {
            return Ok(text.clone());
        }
        self.refresh(&read());
        let text = self.render()?;
        *last = Some((std::time::Instant::now(), text.clone()));
        Ok(text)
    }

    /// The metrics in Prometheus's text format.
    fn render(&self) -> Result<String> {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .map_err(err)?;
        String::from_utf8(out).map_err(|e| Error::State(format!("metrics: {e}")))
    }
}
