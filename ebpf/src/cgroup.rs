//! Which tasks are traced: those in a registered cgroup or below one, and whether with
//! per-write detail (the syscall programs) or without; the cache of those answers also
//! holds each cgroup's dirty-page epoch.

use aya_ebpf::helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id};

use forkscope_common::keys::{
    NOT_TRACED, TRACED, TRACED_NO_WRITES, TRACK_NO_WRITE_DETAIL, VERDICT_SLOTS, VerdictSlot,
};

use crate::maps::{CGROUP_VERDICT, EPOCHS, TRACKED_CGROUPS};

/// Deepest cgroup nesting the ancestor walk looks at.
const MAX_DEPTH: i32 = 32;

/// The current task's cgroup id if it is traced, `None` otherwise. The common case (a task
/// in a cgroup seen before, traced or not) costs one helper call and two inlined array reads.
#[inline(always)]
pub fn tracked() -> Option<u64> {
    let (cg, verdict) = verdict();
    if verdict != NOT_TRACED {
        Some(cg)
    } else {
        None
    }
}

/// The current task's cgroup id and the cgroup's dirty-page epoch (map `EPOCHS`) if it is
/// traced, `None` otherwise. The common case (a task in a cgroup seen before, traced or
/// not) costs one helper call and two inlined array reads.
#[inline(always)]
pub fn tracked_with_epoch() -> Option<(u64, u32)> {
    // SAFETY: helper without arguments.
    let cg = unsafe { bpf_get_current_cgroup_id() };
    let (verdict, epoch) = verdict_and_epoch(cg);
    (verdict != NOT_TRACED).then_some((cg, epoch))
}

/// The current task's cgroup id if its verdict is `want`: [`TRACED`] (with per-write
/// detail: what the syscall programs report) or [`TRACED_NO_WRITES`] (without: the socket
/// hooks then report its connections); `None` otherwise.
#[inline(always)]
pub fn tracked_as(want: u64) -> Option<u64> {
    let (cg, verdict) = verdict();
    if verdict == want { Some(cg) } else { None }
}

/// The current task's cgroup id and its verdict (cached).
#[inline(always)]
fn verdict() -> (u64, u64) {
    // SAFETY: helper without arguments.
    let cg = unsafe { bpf_get_current_cgroup_id() };
    (cg, verdict_of(cg))
}

/// The verdict for the task `task` (the typed current task) and its cgroup id, found with
/// plain loads instead of a helper call: the syscall dispatcher's test, which every syscall
/// on the host pays while it is attached.
#[inline(always)]
pub fn task_tracked_as(
    task: *const u8,
    o: &forkscope_common::KernelOffsets,
    want: u64,
) -> Option<u64> {
    let cg = crate::kernel::task_cgroup_id(task, o)?;
    (verdict_of(cg) == want).then_some(cg)
}

/// The verdict for cgroup `cg` (cached).
#[inline(always)]
fn verdict_of(cg: u64) -> u64 {
    let (generation, hit) = cached(cg);
    if let Some(v) = hit.and_then(|s| s.verdict(cg, generation)) {
        return v;
    }
    fill(cg, generation).0
}

/// The verdict and dirty-page epoch for cgroup `cg` (cached).
#[inline(always)]
fn verdict_and_epoch(cg: u64) -> (u64, u32) {
    let (generation, hit) = cached(cg);
    if let Some(v) = hit.and_then(|s| s.verdict_and_epoch(cg, generation)) {
        return v;
    }
    fill(cg, generation)
}

/// Finds the verdict and epoch of cgroup `cg` and caches them, for generation `generation`
/// (read before).
#[inline(never)]
fn fill(cg: u64, generation: u64) -> (u64, u32) {
    let v = compute(cg);
    // SAFETY: the value is copied out at once; userspace moves the cache to a new
    // generation after it changes an epoch, so one read under an older generation is
    // never matched again.
    let epoch = unsafe { EPOCHS.get(cg) }.copied().unwrap_or(0);
    // The walk read the task's ancestors as they are now: a task moved to another cgroup
    // since `cg` was read would have `cg` cached with another cgroup's verdict (which the
    // egress program also trusts), so that is not stored. The generation is the one read
    // before the walk: a change of the tracked set meanwhile leaves the slot stale.
    // SAFETY: helper without arguments.
    if unsafe { bpf_get_current_cgroup_id() } == cg
        && let Some(slot) = CGROUP_VERDICT.get_ptr_mut((cg as u32) & (VERDICT_SLOTS - 1))
    {
        // SAFETY: a live array element; concurrent writers race benignly (each writes a
        // valid slot).
        unsafe { core::ptr::write_volatile(slot, VerdictSlot::new(cg, generation, v, epoch)) };
    }
    (v, epoch)
}

/// The cache's generation and the slot of cgroup `cg` (copied; whose answers
/// [`VerdictSlot`] checks).
#[inline(always)]
fn cached(cg: u64) -> (u64, Option<VerdictSlot>) {
    let generation = CGROUP_VERDICT.get(VERDICT_SLOTS).map_or(0, |g| g.id);
    let Some(slot) = CGROUP_VERDICT.get((cg as u32) & (VERDICT_SLOTS - 1)) else {
        return (generation, None);
    };
    // SAFETY: `slot` points to a live array element; a torn read is detected by VerdictSlot.
    (generation, Some(unsafe { core::ptr::read_volatile(slot) }))
}

/// The cached verdict for cgroup `cg`, if the cache holds one (filled by the programs that
/// run in the cgroup's tasks: the verdict is the same whoever asks). For programs that run
/// on behalf of a cgroup other than the current task's (the egress program: a packet may
/// leave from a softirq), so they can skip their own walk when the cache already knows.
#[inline(always)]
pub fn cached_verdict(cg: u64) -> Option<u64> {
    let (generation, slot) = cached(cg);
    slot?.verdict(cg, generation)
}

/// The verdict of a registered cgroup whose options are at `options`.
#[inline(always)]
fn registered(options: *const u32) -> u64 {
    // SAFETY: `options` points to a live map value.
    if unsafe { *options } & TRACK_NO_WRITE_DETAIL != 0 {
        TRACED_NO_WRITES
    } else {
        TRACED
    }
}

/// The verdict for `cg`, from the nearest registered cgroup at or above it.
#[inline(never)]
fn compute(cg: u64) -> u64 {
    if let Some(options) = TRACKED_CGROUPS.get_ptr(cg) {
        return registered(options);
    }
    let mut level = 0;
    while level < MAX_DEPTH {
        // SAFETY: helper taking an integer level; returns 0 past the task's own level.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 || id == cg {
            break;
        }
        if let Some(options) = TRACKED_CGROUPS.get_ptr(id) {
            return registered(options);
        }
        level += 1;
    }
    NOT_TRACED
}
