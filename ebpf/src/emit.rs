//! Filling event headers and keeping the counters in STATS.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
};
use forkscope_common::{
    EventHeader, EventKind,
    stats::{STAT_EVENTS, STAT_LOST, STAT_READ_ERRORS},
};

use crate::maps::STATS;

/// A header for an event of `kind` caused by syscall `syscall`, for the current task. What
/// the task's run of writes has pending is sent first ([`crate::write_run::end`]), so the
/// trace keeps the thread's order and its timestamps.
#[inline(always)]
pub fn header(kind: EventKind, syscall: u32, cgroup: u64) -> EventHeader {
    let pid_tgid = bpf_get_current_pid_tgid();
    crate::write_run::end(pid_tgid);
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

/// Unread bytes in the ring buffer above which a submit wakes the consumer. Below it the
/// consumer is not woken (it drains on a short timer): a wake-up per event would cost the
/// traced process more than the event itself.
const WAKEUP_BYTES: u64 = 512 * 1024;

/// Flags for submitting an event: wake the consumer only when enough data is waiting.
#[inline(always)]
pub fn wakeup_flags() -> u64 {
    if crate::maps::EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Sends a fixed-size record (FdEvent) to userspace, counting it or its loss.
#[inline(always)]
pub fn send<T>(event: &T) {
    match crate::maps::EVENTS.output::<T>(event, wakeup_flags()) {
        Ok(()) => count_event(),
        Err(_) => count_lost(),
    }
}
