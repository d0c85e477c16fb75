//! Which tasks are traced: those in a registered cgroup or below one.

use aya_ebpf::helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id};

use forkscope_common::keys::{VERDICT_SLOTS, VerdictSlot};

use crate::maps::{CGROUP_VERDICT, TRACKED_CGROUPS};

/// Deepest cgroup nesting the ancestor walk looks at.
const MAX_DEPTH: i32 = 32;

/// The current task's cgroup id if it is traced, `None` otherwise. The common case (a task
/// in a cgroup seen before, traced or not) costs one helper call and two inlined array reads.
#[inline(always)]
pub fn tracked() -> Option<u64> {
    // SAFETY: helper without arguments.
    let cg = unsafe { bpf_get_current_cgroup_id() };
    let generation = CGROUP_VERDICT.get(VERDICT_SLOTS).map_or(0, |g| g.id);
    let slot = CGROUP_VERDICT.get_ptr_mut((cg as u32) & (VERDICT_SLOTS - 1))?;
    // SAFETY: `slot` points to a live array element; a torn read is detected by VerdictSlot.
    let cached = unsafe { core::ptr::read_volatile(slot) };
    let verdict = match cached.verdict(cg, generation) {
        Some(v) => v,
        None => {
            let v = compute(cg) as u64;
            // SAFETY: as above; concurrent writers race benignly (each writes a valid slot).
            unsafe { core::ptr::write_volatile(slot, VerdictSlot::new(cg, generation, v)) };
            v
        }
    };
    if verdict != 0 { Some(cg) } else { None }
}

#[inline(never)]
fn compute(cg: u64) -> u8 {
    if TRACKED_CGROUPS.get_ptr(cg).is_some() {
        return 1;
    }
    let mut level = 0;
    while level < MAX_DEPTH {
        // SAFETY: helper taking an integer level; returns 0 past the task's own level.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 || id == cg {
            break;
        }
        if TRACKED_CGROUPS.get_ptr(id).is_some() {
            return 1;
        }
        level += 1;
    }
    0
}
