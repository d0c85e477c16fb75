//! Filling event headers and keeping the counters in STATS.

use aya_ebpf::helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns};
use forkscope_common::{
    EventHeader, EventKind,
    stats::{STAT_EVENTS, STAT_LOST, STAT_READ_ERRORS},
};

use crate::maps::STATS;

/// A header for an event of `kind` caused by syscall `syscall`, for the current task.
#[inline(always)]
pub fn header(kind: EventKind, syscall: u32, cgroup: u64) -> EventHeader {
    let pid_tgid = bpf_get_current_pid_tgid();
    EventHeader {
        kind: kind as u32,
        syscall,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cgroup,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    }
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot: no other CPU writes it, and preemption is off in the program.
        unsafe { *p += 1 };
    }
}

/// Counts an event handed to the ring buffer.
#[inline(always)]
pub fn count_event() {
    bump(STAT_EVENTS);
}

/// Counts an event dropped because the ring buffer was full.
#[inline(always)]
pub fn count_lost() {
    bump(STAT_LOST);
}

/// Counts a failed read of kernel memory.
#[inline(always)]
pub fn count_read_error() {
    bump(STAT_READ_ERRORS);
}

/// Sends a fixed-size record (FdEvent) to userspace, counting it or its loss.
#[inline(always)]
pub fn send<T>(event: &T) {
    match crate::maps::EVENTS.output::<T>(event, 0) {
        Ok(()) => count_event(),
        Err(_) => count_lost(),
    }
}
