//! [`Probe`]: one loaded instance of forkscope's eBPF programs with its maps.

use std::collections::HashMap as StdHashMap;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap, ProgramArray, RingBuf},
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr,
        ProgramError, RawTracePoint, TracePoint,
        cgroup_skb::CgroupSkbLinkId,
        cgroup_sock_addr::CgroupSockAddrLinkId,
        links::{FdLink, PinnedLink},
        raw_trace_point::RawTracePointLinkId,
        tp_btf::BtfTracePointLinkId,
        trace_point::TracePointLinkId,
    },
};
use forkscope_common::{
    DirtyRegionKey, PageBitmap, ProcKey, VerdictSlot,
    keys::{GENERATION_MASK, TRACK_NO_WRITE_DETAIL, VERDICT_SLOTS},
    policy::{DeferPass, NetPolicy, ProxyConfig, Redirect},
    stats::{STAT_EVENTS, STAT_LOST, STAT_PAGES_OVERFLOW, STAT_READ_ERRORS},
    syscalls::Family,
};

use super::{EBPF_OBJECT, offsets};
use crate::error::{Error, Result};

/// Sizes chosen at load time.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// Ring buffer size in bytes (a power of two, multiple of the page size).
    pub ring_bytes: u32,
    /// Capacity of the dirty-page set, in 2 MiB regions (of one process each) across all
    /// traced processes.
    pub dirty_region_capacity: u32,
    /// Merge runs of writes to one file or socket into one record (see
    /// forkscope_common::run); false sends a record per syscall.
    pub merge_writes: bool,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            ring_bytes: 16 << 20,
            dirty_region_capacity: 1 << 17,
            merge_writes: true,
        }
    }
}

/// One page dirtied by one process of one cgroup in the cgroup's current epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DirtyPage {
    pub proc: ProcKey,
    /// Page number (virtual address >> PAGE_SHIFT).
    pub page: u64,
}

/// Counters kept by the eBPF programs, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Events handed to the ring buffer.
    pub events: u64,
    /// Events dropped because the ring buffer was full.
    pub lost: u64,
    /// Dirtied pages not recorded because the page set was full.
    pub pages_overflow: u64,
    /// Kernel memory reads that failed.
    pub read_errors: u64,
}

/// The pin that marks a complete set of pins (see [`Probe::pin`]).
const COMPLETE: &str = "complete";

/// Rebuilds a typed map from a pinned one.
type MapKind = fn(MapData) -> Map;

/// The maps userspace uses (see [`super::MAPS`]), and how to rebuild each from a pinned copy.
const MAPS: [(&str, MapKind); 17] = [
    ("EVENTS", Map::RingBuf),
    ("TRACKED_CGROUPS", Map::HashMap),
    ("CGROUP_VERDICT", Map::Array),
    ("DIRTY_PAGES", Map::LruHashMap),
    ("PAGE_COUNTS", Map::PerCpuLruHashMap),
    ("EPOCHS", Map::HashMap),
    ("STATS", Map::PerCpuArray),
    ("SCRATCH", Map::PerCpuArray),
    ("NET_POLICIES", Map::HashMap),
    ("PROXY", Map::Array),
    ("REDIRECTS", Map::Array),
    ("NEXT_REDIRECT", Map::PerCpuArray),
    ("DEFER_PASSES", Map::HashMap),
    ("WRITE_RUNS", Map::Array),
    ("EGRESS", Map::PerCpuLruHashMap),
    ("SYSCALL_FAMILIES", Map::ProgramArray),
    ("SYSCALL_PASS", Map::PerCpuArray),
];

/// Loaded eBPF programs and their maps. Dropping it detaches and unloads everything, except
/// what was pinned (see [`Probe::pin`]).
pub struct Probe {
    /// The programs, when this instance loaded them (not when adopted from pins).
    pub(super) ebpf: Option<Ebpf>,
    maps: StdHashMap<&'static str, Map>,
    /// Attachments, by program name, so they can be detached all at once (see `detach`).
    tracepoint_links: Vec<(&'static str, TracePointLinkId)>,
    raw_links: Vec<(&'static str, RawTracePointLinkId)>,
    btf_links: Vec<(&'static str, BtfTracePointLinkId)>,
    sock_links: Vec<(&'static str, CgroupSockAddrLinkId)>,
    skb_links: Vec<CgroupSkbLinkId>,
    /// On-demand programs taken back from their pins (an adopted probe has no `ebpf`).
    pub(super) pinned_programs: StdHashMap<&'static str, super::demand_hooks::DemandProgram>,
}

/// The family programs the `syscall_exit` dispatcher tail-calls (never attached
/// themselves), by [`Family`].
const FAMILY_PROGRAMS: [(Family, &str); 4] = [
    (Family::FdWrite, "sys_exit_fd_write"),
    (Family::FdOp, "sys_exit_fd_op"),
    (Family::PathOp, "sys_exit_path_op"),
    (Family::Net, "sys_exit_net"),
];

/// The tracepoint of the dispatcher and of the family programs it tail-calls (typed raw
/// tracepoints: `tp_btf/sys_exit`).
pub(super) const SYSCALL_TRACEPOINT: &str = "sys_exit";

/// Where [`Probe::pin`] pins the programs attached on demand, under the pin directory.
pub(super) const PROGS: &str = "progs";

pub(super) fn refused(program: &str, what: &str) -> impl FnOnce(ProgramError) -> Error {
    let (program, what) = (program.to_string(), what.to_string());
    move |source| Error::ProgramRefused {
        program,
        what,
        cause: Box::new(source),
    }
}

/// A link as one that can be pinned, or why this kernel cannot make one.
pub(super) fn pinnable(
    prog: &str,
    link: std::result::Result<FdLink, aya::programs::links::LinkError>,
) -> Result<FdLink> {
    link.map_err(|e| {
        Error::Btf(format!(
            "{prog}: this kernel cannot make a pinnable link: {e}"
        ))
    })
}

/// Puts each family program into the dispatcher's program array (`SYSCALL_FAMILIES`), at
/// its [`Family`] index. The pinned array keeps them loaded and in place for an adopting
/// daemon.
fn fill_families(ebpf: &Ebpf, map: &mut Map) -> Result<()> {
    let mut families: ProgramArray<&mut MapData> =
        ProgramArray::try_from(map).map_err(map_err("SYSCALL_FAMILIES"))?;
    for (family, name) in FAMILY_PROGRAMS {
        let fd = ebpf
            .program(name)
            .ok_or_else(|| Error::Btf(format!("program {name} missing from the embedded object")))?
            .fd()
            .map_err(refused(name, "take the descriptor of"))?;
        families
            .set(family as u32, fd, 0)
            .map_err(map_err("SYSCALL_FAMILIES"))?;
    }
    Ok(())
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> Error {
    move |source| Error::Map {
        name,
        cause: Box::new(source),
    }
}

impl Probe {
    /// Loads the object with this kernel's structure offsets and loads (verifies) every
    /// program. Nothing is attached yet.
    pub fn load(opts: &ProbeOptions) -> Result<Self> {
        crate::sys::preflight()?;
        bump_memlock_rlimit();
        let offsets = offsets::from_running_kernel()?;
        let mut ebpf = EbpfLoader::new()
            .override_global("OFFSETS", &offsets, true)
            .override_global("MERGE_WRITES", &u32::from(opts.merge_writes), true)
            .map_max_entries("EVENTS", opts.ring_bytes)
            .map_max_entries("DIRTY_PAGES", opts.dirty_region_capacity)
            .load(EBPF_OBJECT)?;
        // The syscall programs are typed raw tracepoints: the kernel's BTF names their hook.
        let btf = aya::Btf::from_sys_fs()
            .map_err(|e| Error::Btf(format!("{}: {e}", crate::sys::VMLINUX_BTF)))?;
        for name in super::PROGRAMS {
            let prog = ebpf.program_mut(name).ok_or_else(|| {
                Error::Btf(format!("program {name} missing from the embedded object"))
            })?;
            match prog {
                aya::programs::Program::TracePoint(p) => p.load(),
                aya::programs::Program::RawTracePoint(p) => p.load(),
                aya::programs::Program::BtfTracePoint(p) => p.load(SYSCALL_TRACEPOINT, &btf),
                aya::programs::Program::CgroupSockAddr(p) => p.load(),
                aya::programs::Program::CgroupSkb(p) => p.load(),
                _ => unreachable!(
                    "forkscope builds tracepoint, raw and typed raw tracepoint, socket-address \
                     and skb programs"
                ),
            }
            .map_err(refused(name, "load"))?;
        }
        let mut maps = StdHashMap::new();
        for (name, _) in MAPS {
            let map = ebpf.take_map(name).ok_or_else(|| {
                Error::Btf(format!("map {name} missing from the embedded object"))
            })?;
            maps.insert(name, map);
        }
        fill_families(
            &ebpf,
            maps.get_mut("SYSCALL_FAMILIES").expect("taken above"),
        )?;
        Ok(Self {
            ebpf: Some(ebpf),
            maps,
            tracepoint_links: Vec::new(),
            raw_links: Vec::new(),
            btf_links: Vec::new(),
            sock_links: Vec::new(),
            skb_links: Vec::new(),
            pinned_programs: StdHashMap::new(),
        })
    }

    /// Pins the maps (`DIR/maps/NAME`), the programs attached on demand (`DIR/progs/NAME`,
    /// see [`Probe::attach_pinned`]) and every attachment (`DIR/links/N`)
    /// under `dir` on a BPF filesystem: the programs stay attached, and keep recording into the maps, when
    /// this process exits, until [`unpin`] removes them. [`Probe::adopt`] takes them back.
    pub fn pin(&mut self, dir: &std::path::Path) -> Result<()> {
        let pin_err =
            |what: String| move |e: aya::pin::PinError| Error::Btf(format!("pinning {what}: {e}"));
        for sub in ["maps", "links"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| Error::Io {
                path: dir.join(sub),
                cause: e,
            })?;
        }
        for (name, map) in &self.maps {
            map.pin(dir.join("maps").join(name))
                .map_err(pin_err(format!("map {name}")))?;
        }
        std::fs::create_dir_all(dir.join(PROGS)).map_err(|e| Error::Io {
            path: dir.join(PROGS),
            cause: e,
        })?;
        let on_demand = super::HookSet::Syscalls
            .programs()
            .iter()
            .chain(super::HookSet::PageFaults.programs());
        for &prog in on_demand {
            self.loaded(prog)
                .expect("on-demand program in the loaded object")
                .pin(dir.join(PROGS).join(prog))
                .map_err(pin_err(format!("program {prog}")))?;
        }
        let mut links: Vec<FdLink> = Vec::new();
        for (prog, id) in std::mem::take(&mut self.tracepoint_links) {
            let link = self
                .tracepoint(prog)
                .take_link(id)
                .map_err(refused(prog, "pin"))?;
            links.push(pinnable(prog, FdLink::try_from(link))?);
        }
        for (prog, id) in std::mem::take(&mut self.raw_links) {
            let link = self
                .raw_program(prog)
                .take_link(id)
                .map_err(refused(prog, "pin"))?;
            links.push(link.into());
        }
        for (prog, id) in std::mem::take(&mut self.btf_links) {
            let link = self
                .btf_program(prog)
                .take_link(id)
                .map_err(refused(prog, "pin"))?;
            links.push(link.into());
        }
        for (prog, id) in std::mem::take(&mut self.sock_links) {
            let link = self
                .sock_program(prog)
                .take_link(id)
                .map_err(refused(prog, "pin"))?;
            links.push(pinnable(prog, FdLink::try_from(link))?);
        }
        for id in std::mem::take(&mut self.skb_links) {
            let link = self
                .skb_program()
                .take_link(id)
                .map_err(refused("egress", "pin"))?;
            links.push(pinnable("egress", FdLink::try_from(link))?);
        }
        for (n, link) in links.into_iter().enumerate() {
            let pinned: PinnedLink = link
                .pin(dir.join("links").join(n.to_string()))
                .map_err(pin_err(format!("link {n}")))?;
            drop(pinned); // the pin keeps it attached
        }
        // Last: the mark of a complete set (bpffs holds only BPF objects, so the mark is the
        // STATS map pinned once more). A set without it is never adopted.
        self.map("STATS")
            .pin(dir.join(COMPLETE))
            .map_err(pin_err("the completion mark".into()))?;
        Ok(())
    }

    /// Takes back the maps a previous [`Probe::pin`] left under `dir`, whose programs are
    /// still attached; `None` when `dir` holds no complete set.
    pub fn adopt(dir: &std::path::Path) -> Result<Option<Self>> {
        if !dir.join(COMPLETE).exists() {
            return Ok(None);
        }
        let mut maps = StdHashMap::new();
        for (name, make) in MAPS {
            match MapData::from_pin(dir.join("maps").join(name)) {
                Ok(data) => {
                    maps.insert(name, make(data));
                }
                Err(_) => return Ok(None),
            }
        }
        Ok(Some(Self {
            ebpf: None,
            maps,
            tracepoint_links: Vec::new(),
            raw_links: Vec::new(),
            btf_links: Vec::new(),
            sock_links: Vec::new(),
            skb_links: Vec::new(),
            pinned_programs: StdHashMap::new(),
        }))
    }

    /// Loaded program `name` (only for a probe that loaded the object).
    fn loaded(&mut self, name: &str) -> Option<&mut aya::programs::Program> {
        self.ebpf.as_mut().and_then(|e| e.program_mut(name))
    }

    /// Loaded program `name` as its type `P` (only for a probe that loaded the object).
    fn program_as<P>(&mut self, name: &str) -> &mut P
    where
        for<'a> &'a mut P: TryFrom<&'a mut aya::programs::Program>,
    {
        self.loaded(name)
            .and_then(|p| p.try_into().ok())
            .unwrap_or_else(|| panic!("program {name} of the expected type in the loaded object"))
    }

    pub(super) fn tracepoint(&mut self, name: &str) -> &mut TracePoint {
        self.program_as(name)
    }

    pub(super) fn raw_program(&mut self, name: &str) -> &mut RawTracePoint {
        self.program_as(name)
    }

    pub(super) fn btf_program(&mut self, name: &str) -> &mut BtfTracePoint {
        self.program_as(name)
    }

    fn sock_program(&mut self, name: &str) -> &mut CgroupSockAddr {
        self.program_as(name)
    }

    fn skb_program(&mut self) -> &mut CgroupSkb {
        self.program_as("egress")
    }

    fn map(&self, name: &'static str) -> &Map {
        self.maps.get(name).expect("map taken at load")
    }

    fn map_mut(&mut self, name: &'static str) -> &mut Map {
        self.maps.get_mut(name).expect("map taken at load")
    }

    /// Attaches what a tracer with per-write detail for every cgroup it tracks needs: the
    /// syscall and page-fault programs (see [`super::HookSet`]) and the process programs.
    /// Not the cgroup hooks (socket addresses, egress): they enforce network policies and
    /// count what branches without per-write detail send, neither of which such a tracer
    /// has, and the egress program would cost each of its packets a run.
    pub fn attach(&mut self) -> Result<()> {
        self.attach_set(super::HookSet::Syscalls)?;
        self.attach_set(super::HookSet::PageFaults)?;
        self.attach_process()
    }

    /// Attaches `set`'s programs, unpinned (detached with the probe). While the syscall
    /// program is attached, every task on the host takes the kernel's slower syscall path.
    fn attach_set(&mut self, set: super::HookSet) -> Result<()> {
        for &(prog, tracepoint) in set.attachments() {
            if set == super::HookSet::Syscalls {
                let id = self
                    .btf_program(prog)
                    .attach()
                    .map_err(refused(prog, tracepoint))?;
                self.btf_links.push((prog, id));
            } else {
                let id = self
                    .raw_program(prog)
                    .attach(tracepoint)
                    .map_err(refused(prog, tracepoint))?;
                self.raw_links.push((prog, id));
            }
        }
        Ok(())
    }

    /// Attaches what costs the rest of the host (almost) nothing: the scheduler's process
    /// tracepoints and the cgroup hooks (socket addresses, egress) on forkscope's parent
    /// cgroup: what the daemon keeps attached. The syscall and page-fault programs are
    /// attached apart (see [`super::HookSet`]).
    pub fn attach_base(&mut self) -> Result<()> {
        self.attach_process()?;
        self.attach_cgroup_hooks()
    }

    /// Attaches the process programs: fork, exec, exit.
    fn attach_process(&mut self) -> Result<()> {
        for (prog, category, event) in [
            ("process_exec", "sched", "sched_process_exec"),
            ("process_exit", "sched", "sched_process_exit"),
        ] {
            let id = self
                .tracepoint(prog)
                .attach(category, event)
                .map_err(refused(prog, event))?;
            self.tracepoint_links.push((prog, id));
        }
        let id = self
            .raw_program("process_fork")
            .attach("sched_process_fork")
            .map_err(refused("process_fork", "attach"))?;
        self.raw_links.push(("process_fork", id));
        Ok(())
    }

    /// Attaches the cgroup hooks: the socket-address programs (network policies, and the
    /// connections of branches without per-write detail) and the egress program (what those
    /// branches send).
    fn attach_cgroup_hooks(&mut self) -> Result<()> {
        // The policy hooks, on forkscope's parent cgroup: they run for every branch (and
        // look up the policy of the calling task's branch). Other daemons' hooks may be
        // attached there too.
        let parent = crate::cgroup::cgroup2_root()?.join("forkscope");
        std::fs::create_dir_all(&parent).map_err(|e| Error::Io {
            path: parent.clone(),
            cause: e,
        })?;
        let dir = std::fs::File::open(&parent).map_err(|e| Error::Io {
            path: parent.clone(),
            cause: e,
        })?;
        for prog in super::SOCK_PROGRAMS {
            let id = self
                .sock_program(prog)
                // A link (flags 0) coexists with other links on the cgroup, other daemons' too.
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(refused(prog, "attach to the forkscope cgroup"))?;
            self.sock_links.push((prog, id));
        }
        let id = self
            .skb_program()
            .attach(&dir, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)
            .map_err(refused("egress", "attach to the forkscope cgroup"))?;
        self.skb_links.push(id);
        Ok(())
    }

    /// Detaches every program (a dozen links), from parallel threads: a link whose release
    /// waits in the kernel (a tracepoint's, for an RCU grace period) does not hold up the
    /// others.
    pub fn detach(&mut self) {
        let mut owned: Vec<Box<dyn Send>> = Vec::new();
        for (prog, id) in std::mem::take(&mut self.tracepoint_links) {
            if let Ok(link) = self.tracepoint(prog).take_link(id) {
                owned.push(Box::new(link));
            }
        }
        for (prog, id) in std::mem::take(&mut self.raw_links) {
            if let Ok(link) = self.raw_program(prog).take_link(id) {
                owned.push(Box::new(link));
            }
        }
        for (prog, id) in std::mem::take(&mut self.btf_links) {
            if let Ok(link) = self.btf_program(prog).take_link(id) {
                owned.push(Box::new(link));
            }
        }
        for (prog, id) in std::mem::take(&mut self.sock_links) {
            if let Ok(link) = self.sock_program(prog).take_link(id) {
                owned.push(Box::new(link));
            }
        }
        for id in std::mem::take(&mut self.skb_links) {
            if let Ok(link) = self.skb_program().take_link(id) {
                owned.push(Box::new(link));
            }
        }
        std::thread::scope(|scope| {
            for link in owned {
                scope.spawn(move || drop(link));
            }
        });
    }

    /// Takes the event ring buffer (once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .maps
            .remove("EVENTS")
            .ok_or_else(|| Error::State("the event ring buffer was taken already".into()))?;
        RingBuf::try_from(map).map_err(map_err("EVENTS"))
    }

    /// The slots of the runs of writes merged in the kernel, mapped into memory.
    pub fn run_slots(&self) -> Result<super::run_slots::RunSlots> {
        let Map::Array(data) = self.map("WRITE_RUNS") else {
            return Err(Error::Btf("WRITE_RUNS is not an array map".into()));
        };
        use std::os::fd::AsFd;
        super::run_slots::RunSlots::map(data.fd().as_fd())
    }

    fn hash<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>> {
        HashMap::try_from(self.map_mut(name)).map_err(map_err(name))
    }

    /// Starts tracing the tasks of cgroup `id` and of its descendants; without
    /// `write_detail`, the syscall programs skip them (process, page and socket-hook
    /// records still come).
    pub fn track(&mut self, id: u64, write_detail: bool) -> Result<()> {
        let options = if write_detail {
            0
        } else {
            TRACK_NO_WRITE_DETAIL
        };
        self.hash::<u64, u32>("TRACKED_CGROUPS")?
            .insert(id, options, 0)
            .map_err(map_err("TRACKED_CGROUPS"))?;
        self.clear_verdicts()
    }

    /// Stops tracing cgroup `id`.
    pub fn untrack(&mut self, id: u64) -> Result<()> {
        let _ = self.hash::<u64, u32>("TRACKED_CGROUPS")?.remove(&id);
        let _ = self.hash::<u64, u32>("EPOCHS")?.remove(&id);
        let _ = self.hash::<u64, NetPolicy>("NET_POLICIES")?.remove(&id);
        self.clear_verdicts()
    }

    /// Sets the network policy of the branch whose cgroup is `id` (`None`: allow all).
    pub fn set_net_policy(&mut self, id: u64, policy: Option<&NetPolicy>) -> Result<()> {
        let mut map = self.hash::<u64, NetPolicy>("NET_POLICIES")?;
        match policy {
            Some(p) => map.insert(id, *p, 0).map_err(map_err("NET_POLICIES")),
            None => {
                let _ = map.remove(&id);
                Ok(())
            }
        }
    }

    /// Tells the hooks where the buffering proxy listens.
    pub fn set_proxy(&mut self, proxy: ProxyConfig) -> Result<()> {
        let mut map: Array<&mut MapData, ProxyConfig> =
            Array::try_from(self.map_mut("PROXY")).map_err(map_err("PROXY"))?;
        map.set(0, proxy, 0).map_err(map_err("PROXY"))
    }

    /// Lets thread `tid`'s deferred call to `pass`'s destination through the hooks, once.
    pub fn grant_defer(&mut self, tid: u32, pass: DeferPass) -> Result<()> {
        self.hash::<u32, DeferPass>("DEFER_PASSES")?
            .insert(tid, pass, 0)
            .map_err(map_err("DEFER_PASSES"))
    }

    /// Forgets the connection the hooks recorded in `slot` of REDIRECTS (each is read once).
    pub fn clear_redirect(&mut self, slot: u32) -> Result<()> {
        let mut map: Array<&mut MapData, Redirect> =
            Array::try_from(self.map_mut("REDIRECTS")).map_err(map_err("REDIRECTS"))?;
        map.set(slot, Redirect::default(), 0)
            .map_err(map_err("REDIRECTS"))
    }

    /// The connection the hooks recorded in `slot` of REDIRECTS.
    pub fn redirect(&self, slot: u32) -> Result<Redirect> {
        let map: Array<&MapData, Redirect> =
            Array::try_from(self.map("REDIRECTS")).map_err(map_err("REDIRECTS"))?;
        map.get(&slot, 0).map_err(map_err("REDIRECTS"))
    }

    /// Forgets every cached tracked/untracked verdict (after the tracked set changed) by
    /// moving the cache to a new generation.
    fn clear_verdicts(&mut self) -> Result<()> {
        let mut cache: Array<&mut MapData, VerdictSlot> =
            Array::try_from(self.map_mut("CGROUP_VERDICT")).map_err(map_err("CGROUP_VERDICT"))?;
        let generation = cache
            .get(&VERDICT_SLOTS, 0)
            .map_err(map_err("CGROUP_VERDICT"))?
            .id;
        let next = VerdictSlot {
            id: (generation + 1) & GENERATION_MASK,
            ..VerdictSlot::default()
        };
        cache
            .set(VERDICT_SLOTS, next, 0)
            .map_err(map_err("CGROUP_VERDICT"))
    }

    /// The programs' counters, summed over CPUs.
    pub fn stats(&self) -> Result<Stats> {
        let map: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.map("STATS")).map_err(map_err("STATS"))?;
        let sum =
            |i: u32| -> Result<u64> { Ok(map.get(&i, 0).map_err(map_err("STATS"))?.iter().sum()) };
        Ok(Stats {
            events: sum(STAT_EVENTS)?,
            lost: sum(STAT_LOST)?,
            pages_overflow: sum(STAT_PAGES_OVERFLOW)?,
            read_errors: sum(STAT_READ_ERRORS)?,
        })
    }

    /// Dirtied-page counts of the current epoch per process, for processes whose cgroup
    /// satisfies `cgroup_filter`.
    pub fn page_counts(
        &self,
        cgroup_filter: impl Fn(u64) -> bool,
    ) -> Result<StdHashMap<ProcKey, u64>> {
        let map: PerCpuHashMap<&MapData, ProcKey, u64> =
            PerCpuHashMap::try_from(self.map("PAGE_COUNTS")).map_err(map_err("PAGE_COUNTS"))?;
        let epochs = self.epochs()?;
        let mut out = StdHashMap::new();
        for item in map.iter() {
            let (k, v) = item.map_err(map_err("PAGE_COUNTS"))?;
            if cgroup_filter(k.cgroup) && current(&epochs, &k) {
                out.insert(k, v.iter().sum());
            }
        }
        Ok(out)
    }

    /// Each cgroup's current dirty-page epoch (absent: 0).
    fn epochs(&self) -> Result<StdHashMap<u64, u32>> {
        let map: HashMap<&MapData, u64, u32> =
            HashMap::try_from(self.map("EPOCHS")).map_err(map_err("EPOCHS"))?;
        Ok(map.iter().filter_map(|kv| kv.ok()).collect())
    }

    /// The set of dirtied pages (page numbers) of the current epoch, for processes whose
    /// cgroup satisfies `cgroup_filter`: one item per page (see [`Probe::dirty_regions`]
    /// for the compact form).
    pub fn dirty_pages(&self, cgroup_filter: impl Fn(u64) -> bool) -> Result<Vec<DirtyPage>> {
        Ok(self
            .dirty_regions(cgroup_filter)?
            .into_iter()
            .flat_map(|(proc, region, bitmap)| {
                bitmap
                    .pages(region)
                    .map(move |page| DirtyPage { proc, page })
            })
            .collect())
    }

    /// The dirtied pages of the current epoch as the kernel keeps them: (process, region,
    /// bitmap of the region's pages), for processes whose cgroup satisfies `cgroup_filter`.
    pub fn dirty_regions(
        &self,
        cgroup_filter: impl Fn(u64) -> bool,
    ) -> Result<Vec<(ProcKey, u64, PageBitmap)>> {
        let epochs = self.epochs()?;
        let map: HashMap<&MapData, DirtyRegionKey, PageBitmap> =
            HashMap::try_from(self.map("DIRTY_PAGES")).map_err(map_err("DIRTY_PAGES"))?;
        Ok(map
            .iter()
            .filter_map(|kv| kv.ok())
            .filter(|(k, _)| cgroup_filter(k.proc.cgroup) && current(&epochs, &k.proc))
            .map(|(k, bitmap)| (k.proc, k.region, bitmap))
            .collect())
    }

    /// Starts a new epoch for the cgroups matching `cgroup_filter`: their dirtied pages are
    /// forgotten, so each page counts again on its next write fault (a fork write-protects
    /// them). The cgroup's epoch is bumped (constant time, whatever the number of pages);
    /// the old epoch's entries are never matched again and the LRU maps evict them.
    pub fn new_epoch(&mut self, cgroup_filter: impl Fn(u64) -> bool) -> Result<()> {
        let epochs = self.epochs()?;
        let mut counts: PerCpuHashMap<&mut MapData, ProcKey, u64> =
            PerCpuHashMap::try_from(self.map_mut("PAGE_COUNTS")).map_err(map_err("PAGE_COUNTS"))?;
        let stale: Vec<ProcKey> = counts
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| cgroup_filter(k.cgroup))
            .collect();
        for k in &stale {
            let _ = counts.remove(k);
        }
        let mut cgroups: Vec<u64> = stale.iter().map(|k| k.cgroup).collect();
        cgroups.sort_unstable();
        cgroups.dedup();
        if cgroups.is_empty() {
            return Ok(());
        }
        let mut map = self.hash::<u64, u32>("EPOCHS")?;
        let bumped = cgroups.into_iter().try_for_each(|cg| {
            let next = epochs.get(&cg).copied().unwrap_or(0).wrapping_add(1);
            map.insert(cg, next, 0).map_err(map_err("EPOCHS"))
        });
        // The verdict cache holds each cgroup's epoch too (for the page-fault program): moved
        // on even when a bump failed, so the epochs bumped before it are the ones read.
        let cleared = self.clear_verdicts();
        bumped.and(cleared)
    }
}

/// Whether `k` belongs to its cgroup's current epoch.
fn current(epochs: &StdHashMap<u64, u32>, k: &ProcKey) -> bool {
    k.epoch == epochs.get(&k.cgroup).copied().unwrap_or(0)
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.detach();
    }
}

/// Removes what [`Probe::pin`] left under `dir`: the programs detach once nothing else
/// holds them.
pub fn unpin(dir: &std::path::Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Io {
            path: dir.to_path_buf(),
            cause: e,
        }),
        _ => Ok(()),
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones to the cgroup. Raising
/// the limit may be refused (no CAP_SYS_RESOURCE): that is fine on current kernels.
fn bump_memlock_rlimit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid rlimit struct; failure is ignored on purpose.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if ret != 0 {
        log::debug!("could not raise RLIMIT_MEMLOCK (fine on kernels >= 5.11)");
    }
}
