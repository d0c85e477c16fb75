//! `forkscope trace`: run one command in a fresh cgroup with the eBPF programs watching it,
//! stream its side effects as JSON lines, and total them. The cgroup, the programs and every
//! process of the command are gone when [`run`] returns, whether the command finished, failed
//! to start, or the caller cancelled.

use std::{
    ffi::OsString,
    future::Future,
    io::Write,
    os::unix::process::ExitStatusExt,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use crate::{
    bpf::{Probe, ProbeOptions},
    cgroup::Cgroup,
    error::{Error, Result},
    events::{Resolver, Summary, TraceEvent, decode, runs::Runs},
};

/// What to trace and how.
#[derive(Clone, Debug, Default)]
pub struct TraceOptions {
    /// The command and its arguments.
    pub command: Vec<OsString>,
    /// Add the dirtied page ranges to each page_dirty_summary event.
    pub page_addresses: bool,
    /// Ring buffer and page-set sizes.
    pub probe: ProbeOptions,
}

/// How a trace ended.
#[derive(Debug)]
pub struct TraceOutcome {
    /// The command's exit status as a shell reports it (128 + signal when killed).
    pub exit_code: i32,
    /// True when the caller cancelled the trace (Ctrl-C).
    pub cancelled: bool,
    /// Totals of what the command did.
    pub summary: Summary,
}

static TRACE_SEQ: AtomicU32 = AtomicU32::new(0);

/// How often the ring buffer is drained when the programs have not woken us.
const DRAIN_INTERVAL: Duration = Duration::from_millis(10);

/// Consumes events from the ring buffer and writes them.
struct Sink<'w, W: Write> {
    out: &'w mut W,
    resolver: Resolver,
    summary: Summary,
    cgroups: std::collections::BTreeSet<u64>,
    decode_errors: u64,
    /// The command's pid until it has exec'd: before that it runs forkscope's own code
    /// (moving itself into the cgroup), which is not the command's doing.
    pre_exec_pid: Option<u32>,
    /// Runs of writes the kernel is merging.
    runs: Runs,
    /// One JSON line, serialized here and handed to `out` in one write: small writes token
    /// by token into `out` cost the consumer more than the serializing.
    line: Vec<u8>,
}

impl<W: Write> Sink<'_, W> {
    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> Result<()> {
        while let Some(item) = ring.next() {
            match decode(&item) {
                Ok(raw) => {
                    let h = raw.header();
                    if self.pre_exec_pid == Some(h.pid) {
                        if raw.kind() != forkscope_common::EventKind::ProcExec {
                            continue;
                        }
                        self.pre_exec_pid = None;
                    }
                    self.cgroups.insert(raw.header().cgroup);
                    self.runs.note(&raw);
                    if let Some(ev) = self.resolver.event(&raw) {
                        self.emit(&ev)?;
                    }
                }
                Err(e) => {
                    self.decode_errors += 1;
                    log::warn!("undecodable event: {e}");
                }
            }
        }
        // What runs of writes hold goes after what the ring buffer had.
        for raw in self.runs.harvest(crate::events::record::now_ns()) {
            if let Some(ev) = self.resolver.event(&raw) {
                self.emit(&ev)?;
            }
        }
        self.out.flush()?;
        Ok(())
    }

    fn emit(&mut self, ev: &TraceEvent) -> Result<()> {
        self.line.clear();
        crate::events::jsonl::write_line(ev, &mut self.line);
        self.out.write_all(&self.line)?;
        self.summary.add(ev);
        Ok(())
    }
}

/// Runs `opts.command` under trace, writing one JSON object per event to `out`, until the
/// command exits or `cancel` completes. Background processes the command leaves behind are
/// killed when it exits (the cgroup must be empty to be removed).
pub async fn run<W: Write>(
    opts: &TraceOptions,
    out: &mut W,
    cancel: impl Future<Output = ()>,
) -> Result<TraceOutcome> {
    if opts.command.is_empty() {
        return Err(Error::NoCommand);
    }
    let mut probe = Probe::load(&opts.probe)?;
    probe.attach()?;
    let seq = TRACE_SEQ.fetch_add(1, Ordering::Relaxed);
    let cgroup = Cgroup::create(&format!("trace-{}-{seq}", std::process::id()))?;
    probe.track(cgroup.id(), true)?;
    // SAFETY: the RingBuf owns its map descriptor, which stays open and unchanged until the
    // AsyncFd (and with it the RingBuf) is dropped.
    let mut ring =
        unsafe { AsyncFd::register(probe.take_events()?) }.map_err(|e| Error::Other(e.into()))?;

    let mut sink = Sink {
        out,
        resolver: Resolver::new(),
        summary: Summary::default(),
        cgroups: [cgroup.id()].into(),
        decode_errors: 0,
        pre_exec_pid: None,
        runs: Runs::new(probe.run_slots()?),
        line: Vec::with_capacity(1024),
    };
    // The command inherits our stdio: name them in case they are files it writes to.
    for fd in 0..3 {
        if let Ok(p) = std::fs::read_link(format!("/proc/self/fd/{fd}"))
            && p.is_file()
        {
            sink.resolver.learn_file(&p);
        }
    }

    let mut child = spawn_in(&cgroup, &opts.command)?;
    sink.pre_exec_pid = child.id();
    if let (Some(pid), Ok(cwd)) = (child.id(), std::env::current_dir()) {
        sink.resolver.set_cwd(pid, &cwd.to_string_lossy());
    }

    tokio::pin!(cancel);
    let mut cancelled = false;
    // The programs wake us only when a lot is waiting (see ebpf/src/emit.rs); the rest is
    // picked up by this timer, so events reach the output within DRAIN_INTERVAL.
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let status = loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                sink.drain(guard.get_inner_mut())?;
                guard.clear_ready();
            }
            _ = tick.tick() => sink.drain(ring.get_mut())?,
            status = child.wait() => break status?,
            () = &mut cancel, if !cancelled => {
                cancelled = true;
                cgroup.kill_all(Duration::from_secs(5))?;
            }
        }
    };
    // Whatever the command left running goes too; then every event is in the ring buffer.
    cgroup.kill_all(Duration::from_secs(5))?;
    sink.drain(ring.get_mut())?;

    emit_page_summaries(&probe, &mut sink, opts.page_addresses)?;
    sink.out.flush()?;
    sink.summary.stats = probe.stats()?;
    sink.summary.unresolved_paths = sink.resolver.unresolved;
    probe.untrack(cgroup.id())?;
    drop(probe);
    cgroup.remove()?;

    let exit_code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Ok(TraceOutcome {
        exit_code,
        cancelled,
        summary: sink.summary,
    })
}

/// Starts `command` in `cgroup`: the child writes "0" to `cgroup.procs` between fork and exec,
/// so the command runs in the cgroup from its first instruction.
fn spawn_in(cgroup: &Cgroup, command: &[OsString]) -> Result<tokio::process::Child> {
    let program = command.first().ok_or(Error::NoCommand)?;
    let procs = cgroup.open_procs()?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&command[1..]);
    // SAFETY: the hook only calls write(2), async-signal-safe as pre_exec requires, on a
    // descriptor that stays open until spawn returns.
    unsafe {
        cmd.pre_exec(Cgroup::enter_hook(&procs));
    }
    let name = program.to_string_lossy().into_owned();
    cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::CommandNotFound(name),
        std::io::ErrorKind::PermissionDenied => Error::CommandNotExecutable(name, e),
        _ => Error::Other(e),
    })
}

/// Emits one page_dirty_summary per process seen in the trace's cgroups. The kernel keeps
/// two things per process: a count of first writes and the set of pages. They agree unless
/// the set was full and evicted entries (a page of an evicted region counts again on its
/// next write; an evicted count starts again from zero): then `pages` is the larger of the
/// two, `pages_recorded` says what the set holds, and the summary counts the process as
/// inexact, so a full set is never silent.
fn emit_page_summaries<W: Write>(
    probe: &Probe,
    sink: &mut Sink<'_, W>,
    with_ranges: bool,
) -> Result<()> {
    let cgroups = sink.cgroups.clone();
    let in_trace = |cg: u64| cgroups.contains(&cg);
    let counts = probe.page_counts(in_trace)?;
    let mut sets = page_sets(probe, &in_trace)?;
    let mut procs: std::collections::BTreeMap<(u32, u64), u64> = counts
        .into_iter()
        .map(|(k, n)| ((k.tgid, k.cgroup), n))
        .collect();
    for &(cgroup, tgid) in sets.keys() {
        procs.entry((tgid, cgroup)).or_insert(0);
    }
    let now = crate::events::record::now_ns();
    for ((tgid, cgroup), counted) in procs {
        let set = sets.remove(&(cgroup, tgid)).unwrap_or_default();
        let pages = counted.max(set.pages);
        let ev = TraceEvent {
            ts_ns: now,
            cgroup,
            pid: tgid,
            tid: tgid,
            comm: sink.resolver.comm_of(tgid).unwrap_or("?").to_string(),
            kind: "page_dirty_summary".into(),
            pages: Some(pages),
            pages_recorded: (set.pages != counted).then_some(set.pages),
            bytes: Some((pages * 4096) as i64),
            page_ranges: with_ranges.then(|| coalesce(set.runs)),
            ..TraceEvent::default()
        };
        sink.emit(&ev)?;
    }
    Ok(())
}

/// What the kernel's dirty-page set holds for one process.
#[derive(Default)]
struct PageSet {
    /// Pages in the set.
    pages: u64,
    /// Runs of consecutive pages, as [first, end) page numbers.
    runs: Vec<[u64; 2]>,
}

/// The dirty-page set of each (cgroup, process id) in the current epoch, read in one pass.
fn page_sets(
    probe: &Probe,
    filter: &impl Fn(u64) -> bool,
) -> Result<std::collections::HashMap<(u64, u32), PageSet>> {
    let mut sets: std::collections::HashMap<(u64, u32), PageSet> = Default::default();
    for (proc, region, bitmap) in probe.dirty_regions(filter)? {
        let set = sets.entry((proc.cgroup, proc.tgid)).or_default();
        set.pages += bitmap.count();
        set.runs.extend(bitmap.runs(region));
    }
    Ok(sets)
}

/// Runs of page numbers ([first, end)) to sorted [start, end) address ranges, runs that
/// touch merged.
pub fn coalesce(mut runs: Vec<[u64; 2]>) -> Vec<[u64; 2]> {
    runs.sort_unstable();
    let shift = forkscope_common::PAGE_SHIFT;
    let mut out: Vec<[u64; 2]> = Vec::new();
    for [first, end] in runs {
        match out.last_mut() {
            Some(r) if r[1] >= first << shift => r[1] = r[1].max(end << shift),
            _ => out.push([first << shift, end << shift]),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::coalesce;

    #[test]
    fn coalesces_runs_of_pages_into_ranges() {
        // Runs of adjacent regions (page 512 starts the next) join; overlapping ones too.
        assert_eq!(
            coalesce(vec![[5, 6], [1, 3], [3, 4], [510, 512], [512, 515], [5, 6]]),
            vec![[0x1000, 0x4000], [0x5000, 0x6000], [0x1fe000, 0x203000]]
        );
        assert!(coalesce(vec![]).is_empty());
    }
}
