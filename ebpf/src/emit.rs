//! Filling event headers and keeping the counters in STATS.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE},
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

/// Unread bytes in the ring buffer above which a submit may wake the consumer. Below it the
/// consumer is not woken (it drains on a short timer): a wake-up per event would cost the
/// traced process more than the event itself.
const WAKEUP_BYTES: u64 = 512 * 1024;

/// Between [`WAKEUP_BYTES`] and half the ring, only a record that carries the unread bytes
/// across a multiple of this wakes the consumer: one wake-up per 64 KiB written, not one per
/// record (each is an interrupt raised on this CPU, a trap to the hypervisor on a VM). A
/// crossing two CPUs race past unseen is caught by the next one.
const WAKEUP_STEP: u64 = 64 * 1024;

/// What the ring buffer takes for a record of `len` bytes: an 8-byte header, rounded up to
/// 8 bytes.
const fn ring_bytes(len: usize) -> u64 {
    ((len as u64 + 8) + 7) & !7
}

/// Flags for a record of `len` bytes, given the unread bytes `after` it is in the buffer.
/// Past half the ring the consumer is losing the race: every record wakes it, which gives
/// it every chance to run and slows the producers (each wake-up costs them an interrupt)
/// before the ring is full and events are lost.
#[inline(always)]
fn wakeup_flags_after(after: u64, len: usize) -> u64 {
    if after < WAKEUP_BYTES {
        return BPF_RB_NO_WAKEUP as u64;
    }
    let before = after.saturating_sub(ring_bytes(len));
    if after / WAKEUP_STEP != before / WAKEUP_STEP
        || after >= crate::maps::EVENTS.query(BPF_RB_RING_SIZE as u64) / 2
    {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

#[inline(always)]
fn unread_bytes() -> u64 {
    crate::maps::EVENTS.query(BPF_RB_AVAIL_DATA as u64)
}

/// Flags for submitting a reserved record of `len` bytes (already counted as unread).
#[inline(always)]
pub fn wakeup_flags_reserved(len: usize) -> u64 {
    wakeup_flags_after(unread_bytes(), len)
}

/// Sends a fixed-size record (FdEvent) to userspace, counting it or its loss.
#[inline(always)]
pub fn send<T>(event: &T) {
    let flags = wakeup_flags_after(unread_bytes() + ring_bytes(size_of::<T>()), size_of::<T>());
    match crate::maps::EVENTS.output::<T>(event, flags) {
        Ok(()) => count_event(),
        Err(_) => count_lost(),
    }
}
