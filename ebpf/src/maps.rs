//! Every map of forkscope's eBPF programs (userspace finds them by these names).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use forkscope_common::{
    keys::{DirtyPageKey, ProcKey, VERDICT_SLOTS, VerdictSlot},
    stats::STAT_COUNT,
};

/// Events to userspace. Userspace may resize it at load time.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

/// cgroup ids the controller registered: their tasks and their descendants' are traced.
/// The value is reserved for per-cgroup options (0 today).
#[map]
pub static TRACKED_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(4096, 0);

/// Direct-mapped cache of the registration check per cgroup id (see VerdictSlot); the last
/// slot holds the generation, which userspace bumps when the registered set changes. An
/// array, not a hash: its lookups are inlined, so the rest of the host pays almost nothing.
#[map]
pub static CGROUP_VERDICT: Array<VerdictSlot> = Array::with_max_entries(VERDICT_SLOTS + 1, 0);

/// The set of pages dirtied in the current epoch, per (cgroup, process). Userspace reads it
/// and starts a new epoch by deleting a cgroup's entries. Resizable at load time.
#[map]
pub static DIRTY_PAGES: HashMap<DirtyPageKey, u8> = HashMap::with_max_entries(262_144, 0);

/// Number of entries per (cgroup, process) in DIRTY_PAGES, counted per CPU (sum the slots).
#[map]
pub static PAGE_COUNTS: PerCpuHashMap<ProcKey, u64> = PerCpuHashMap::with_max_entries(65_536, 0);

/// Counters (see forkscope_common::stats).
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// Per-CPU scratch buffers for reading kernel structures in one helper call each.
#[map]
pub static SCRATCH: PerCpuArray<crate::kernel::Scratch> = PerCpuArray::with_max_entries(1, 0);
