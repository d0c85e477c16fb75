//! Every map of forkscope's eBPF programs (userspace finds them by these names).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use forkscope_common::{
    egress::{EGRESS_ENTRIES, EgressCount, EgressKey},
    keys::{DirtyRegionKey, PageBitmap, ProcKey, VERDICT_SLOTS, VerdictSlot},
    policy::{DeferPass, NetPolicy, ProxyConfig, REDIRECT_SLOTS, Redirect},
    run::{RUN_SLOTS, WriteRun},
    stats::STAT_COUNT,
    syscalls::FAMILY_COUNT,
};

/// Events to userspace. Userspace may resize it at load time.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

/// The family programs the `syscall_exit` dispatcher tail-calls, indexed by
/// forkscope_common::syscalls::Family; userspace fills it at load.
#[map]
pub static SYSCALL_FAMILIES: ProgramArray = ProgramArray::with_max_entries(FAMILY_COUNT, 0);

/// What the dispatcher hands the family program it tail-calls (one slot per CPU).
#[map]
pub static SYSCALL_PASS: PerCpuArray<forkscope_common::syscalls::SyscallPass> =
    PerCpuArray::with_max_entries(1, 0);

/// cgroup ids the controller registered: their tasks and their descendants' are traced.
/// The value is reserved for per-cgroup options (0 today).
#[map]
pub static TRACKED_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(4096, 0);

/// Direct-mapped cache of the registration check per cgroup id (see VerdictSlot); the last
/// slot holds the generation, which userspace bumps when the registered set changes. An
/// array, not a hash: its lookups are inlined, so the rest of the host pays almost nothing.
#[map]
pub static CGROUP_VERDICT: Array<VerdictSlot> = Array::with_max_entries(VERDICT_SLOTS + 1, 0);

/// The pages dirtied per (cgroup, process, epoch), as a bitmap per 2 MiB region of the
/// process's address space. Userspace reads the current epoch's and starts a new epoch by
/// bumping the cgroup's in EPOCHS: older entries are never matched again and make way as
/// the map evicts its least recently used. Resizable at load time.
#[map]
pub static DIRTY_PAGES: LruHashMap<DirtyRegionKey, PageBitmap> =
    LruHashMap::with_max_entries(131_072, 0);

/// Number of pages per (cgroup, process, epoch) in DIRTY_PAGES, counted per CPU (sum the
/// slots).
#[map]
pub static PAGE_COUNTS: LruPerCpuHashMap<ProcKey, u64> =
    LruPerCpuHashMap::with_max_entries(65_536, 0);

/// The current dirty-page epoch of each cgroup (absent: 0), bumped by userspace after a fork
/// write-protected the cgroup's pages again.
#[map]
pub static EPOCHS: HashMap<u64, u32> = HashMap::with_max_entries(4096, 0);

/// `BPF_F_MMAPABLE`: userspace maps the array into its memory.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Runs of writes merged in the kernel, one slot per thread (see forkscope_common::run).
/// Memory-mapped by userspace, which swaps pending counts out of the slots atomically.
#[map]
pub static WRITE_RUNS: Array<WriteRun> = Array::with_max_entries(RUN_SLOTS, BPF_F_MMAPABLE);

/// Counters (see forkscope_common::stats).
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// Per-CPU scratch buffers for reading kernel structures in one helper call each.
#[map]
pub static SCRATCH: PerCpuArray<crate::kernel::Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Each branch's network policy, by the branch's cgroup id (absent: allow everything).
#[map]
pub static NET_POLICIES: HashMap<u64, NetPolicy> = HashMap::with_max_entries(4096, 0);

/// The buffering proxy (one entry).
#[map]
pub static PROXY: Array<ProxyConfig> = Array::with_max_entries(1, 0);

/// Connections sent to the proxy, by slot (see forkscope_common::policy::ProxyConfig).
#[map]
pub static REDIRECTS: Array<Redirect> = Array::with_max_entries(REDIRECT_SLOTS, 0);

/// How many connections each CPU has sent to the proxy (picks the next slot of REDIRECTS).
#[map]
pub static NEXT_REDIRECT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Deferred calls the daemon let go, by host thread id (see forkscope_common::policy::DeferPass).
#[map]
pub static DEFER_PASSES: HashMap<u32, DeferPass> = HashMap::with_max_entries(16_384, 0);

/// Payload bytes and packets the branches traced without per-write detail sent, per
/// (registered cgroup, destination) and CPU (see crate::egress).
#[map]
pub static EGRESS: LruPerCpuHashMap<EgressKey, EgressCount> =
    LruPerCpuHashMap::with_max_entries(EGRESS_ENTRIES, 0);

/// Where each TCP socket of a branch without per-write detail has sent up to: the sequence
/// number after the last payload byte `egress` counted, by socket cookie. A segment sent
/// again (a retransmission) adds only bytes past it. Sockets that closed make way as the
/// map evicts its least recently used.
#[map]
pub static TCP_SENT: LruHashMap<u64, u32> = LruHashMap::with_max_entries(65_536, 0);
