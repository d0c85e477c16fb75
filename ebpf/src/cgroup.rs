//! Which tasks are traced: those in a registered cgroup or below one.

use aya_ebpf::helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id};

use crate::maps::{CGROUP_VERDICT, TRACKED_CGROUPS};

/// Deepest cgroup nesting the ancestor walk looks at.
const MAX_DEPTH: i32 = 32;

/// The current task's cgroup id if it is traced, `None` otherwise. The common case (an
/// untraced task in a cgroup seen before) costs one helper call and one map lookup.
#[inline(always)]
pub fn tracked() -> Option<u64> {
    // SAFETY: helper without arguments.
    let cg = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the value is a plain u8 copied out immediately.
    if let Some(v) = unsafe { CGROUP_VERDICT.get(cg) } {
        return if *v != 0 { Some(cg) } else { None };
    }
    let verdict = compute(cg);
    let _ = CGROUP_VERDICT.insert(cg, verdict, 0);
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
