//! Runs of writes merged in the kernel (the protocol is in forkscope_common::run): a write
//! that continues the current thread's run only adds to its slot's pending word; the first
//! write of a run is sent as an ordinary record and becomes the run's template; what is
//! pending is sent as one merged record when the run ends.

use core::intrinsics::{
    AtomicOrdering::{Relaxed, Release},
    atomic_cxchg, atomic_xadd, atomic_xchg,
};

use aya_ebpf::helpers::bpf_ktime_get_ns;
use forkscope_common::{
    FdEvent,
    event::file_type,
    run::{
        PENDING_MAX_BYTES, PENDING_MAX_CALLS, PENDING_ONE_CALL, PENDING_TAG_SHIFT, RUN_SLOTS,
        WriteRun, pending_counts, pending_tag,
    },
};

use crate::{
    emit::{count_event, count_lost, wakeup_flags_reserved},
    maps::{EVENTS, WRITE_RUNS},
};

/// Set by userspace at load: 0 sends every write as its own record (`trace --every-write`).
#[unsafe(no_mangle)]
static MERGE_WRITES: u32 = 0;

/// Whether runs of writes are merged (`--every-write` turns it off).
#[inline(always)]
pub fn merging() -> bool {
    // SAFETY: a valid, aligned static; volatile only stops constant folding of the zero.
    unsafe { core::ptr::read_volatile(&raw const MERGE_WRITES) != 0 }
}

/// The slot thread `pid_tgid` would use (by its thread id).
#[inline(always)]
fn slot(pid_tgid: u64) -> Option<*mut WriteRun> {
    WRITE_RUNS.get_ptr_mut((pid_tgid as u32) & (RUN_SLOTS - 1))
}

// Atomic operations on a slot's words (the target has no `core::sync::atomic` types with
// read-modify-write operations; the intrinsics compile to BPF atomic instructions).
// SAFETY (all three): `run` points to a live, aligned array element, and map values stay
// mapped while the program runs.

/// Adds `v` to the slot's pending word.
#[inline(always)]
fn pending_add(run: *mut WriteRun, v: u64) {
    // SAFETY: see above.
    unsafe { atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*run).pending, v) };
}

/// Replaces the slot's pending word, returning what it held.
#[inline(always)]
fn pending_swap(run: *mut WriteRun, v: u64) -> u64 {
    // SAFETY: see above.
    unsafe { atomic_xchg::<u64, { Relaxed }>(&raw mut (*run).pending, v) }
}

/// Replaces the slot's pending word after every store before it (a release swap).
#[inline(always)]
fn pending_publish(run: *mut WriteRun, v: u64) {
    // SAFETY: see above.
    unsafe { atomic_xchg::<u64, { Release }>(&raw mut (*run).pending, v) };
}

/// Sets the slot's owner to `new` if it is `old`.
#[inline(always)]
fn owner_cas(run: *mut WriteRun, old: u64, new: u64) -> bool {
    // SAFETY: see above.
    unsafe { atomic_cxchg::<u64, { Relaxed }, { Relaxed }>(&raw mut (*run).owner, old, new).1 }
}

/// Adds a write of `bytes` starting at `start` (regular files) on `file` (whose
/// `struct inode *` is `inode`) to the run of thread `pid_tgid` if it continues it; true
/// when that is all there is to do. The identity is the `struct file` and its inode: a
/// `struct file` closed and freed can be reused at once for another file or connection,
/// which the run must not absorb. For a regular file the inode pointer and the offset tell
/// (an inode is freed only once no file uses it and the cache evicts it, and another file's
/// writes would have to start at this run's next offset). A socket has no offset and its
/// inode is freed with it, one grace period after the close, to be reused by the next
/// socket: there `inode_number` (read only then) must also be the run's.
#[inline(always)]
pub fn extend(
    pid_tgid: u64,
    file: u64,
    inode: u64,
    inode_number: impl FnOnce() -> u64,
    start: i64,
    bytes: i64,
) -> bool {
    if file == 0 || bytes <= 0 || !merging() {
        return false;
    }
    let Some(run) = slot(pid_tgid) else {
        return false;
    };
    // SAFETY: `run` is a live array element; while thread `pid_tgid` owns the slot only its
    // own programs write these fields (userspace only swaps counts out of `pending`).
    unsafe {
        if (*run).owner != pid_tgid || (*run).file != file || (*run).inode != inode {
            return false;
        }
        let regular = (*run).first.file_type == file_type::REG;
        if regular {
            if start != (*run).next {
                return false;
            }
        } else if inode_number() != (*run).first.ino {
            return false;
        }
        let (calls, pending_bytes) = pending_counts(core::ptr::read_volatile(&(*run).pending));
        if calls >= PENDING_MAX_CALLS || pending_bytes >= PENDING_MAX_BYTES {
            return false;
        }
        if regular {
            (*run).next = start + bytes;
        }
        pending_add(run, PENDING_ONE_CALL + bytes as u64);
    }
    true
}

/// Ends thread `pid_tgid`'s run, sending what it has pending: called before any other
/// record of the thread, so the trace keeps the thread's order, and no later write joins a
/// run that something else interrupted.
#[inline(always)]
pub fn end(pid_tgid: u64) {
    let Some(run) = slot(pid_tgid) else {
        return;
    };
    // SAFETY: as in `extend`.
    unsafe {
        if (*run).owner != pid_tgid || (*run).file == 0 {
            return;
        }
        (*run).file = 0; // nothing continues it any more
        let seen = core::ptr::read_volatile(&(*run).pending);
        if pending_counts(seen).0 == 0 {
            return;
        }
        // Userspace may take the count in between: the swap returns what is left. The new
        // tag makes any compare-and-swap userspace prepared on the old word fail.
        let tag = (pending_tag(seen) + 1) & 0xff;
        let left = pending_swap(run, tag << PENDING_TAG_SHIFT);
        send_pending(run, left);
    }
}

/// Sends the merged record for the `left` part of `run` (the run's last bytes).
#[inline(never)]
fn send_pending(run: *mut WriteRun, left: u64) {
    let (calls, bytes) = pending_counts(left);
    if calls == 0 {
        return;
    }
    // Built in the ring buffer itself: the stack is too small for a copy of the record in
    // the socket hooks' call chains.
    let Some(mut entry) = EVENTS.reserve::<FdEvent>(0) else {
        count_lost();
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` is a reserved record of size_of::<FdEvent>() bytes, fully written before
    // submit; `run` as in `extend`.
    unsafe {
        *e = (*run).first;
        (*e).hdr.ts_ns = bpf_ktime_get_ns();
        (*e).bytes = bytes as i64;
        (*e).ret = calls as i32;
        (*e).offset = if (*e).file_type == file_type::REG {
            (*run).next - bytes as i64
        } else {
            -1
        };
    }
    entry.submit(wakeup_flags_reserved(size_of::<FdEvent>()));
    count_event();
}

/// Makes `ev` (the record about to be sent for a write ending at `next` on `file`, whose
/// `struct inode *` is `inode`) the first record of thread `pid_tgid`'s run, when the
/// thread holds its slot or can take a free one. Called before the record is sent, so a
/// reader that reads it finds the run published.
#[inline(always)]
pub fn start(pid_tgid: u64, file: u64, inode: u64, next: i64, ev: &FdEvent) {
    if file == 0 || !merging() {
        return;
    }
    let Some(run) = slot(pid_tgid) else {
        return;
    };
    // SAFETY: as in `extend`; the slot is taken with a compare-and-swap so two threads
    // sharing it cannot both write it.
    unsafe {
        if (*run).owner == pid_tgid {
            end(pid_tgid); // the fields below are the previous run's until then
        } else if !owner_cas(run, 0, pid_tgid) {
            return; // another live thread holds the slot
        }
        (*run).id = ev.hdr.ts_ns;
        (*run).next = next;
        (*run).inode = inode;
        (*run).first = *ev;
        (*run).file = file;
        // A new tag publishes the fields above (a release swap): userspace only reads them
        // after seeing the tag with a count. Nothing is pending after `end` (userspace only
        // ever takes counts away).
        let tag = (pending_tag(core::ptr::read_volatile(&(*run).pending)) + 1) & 0xff;
        pending_publish(run, tag << PENDING_TAG_SHIFT);
    }
}

/// Ends thread `pid_tgid`'s run and frees its slot (the thread exits, or execs and gets
/// another thread id).
#[inline(always)]
pub fn release(pid_tgid: u64) {
    end(pid_tgid);
    if let Some(run) = slot(pid_tgid) {
        owner_cas(run, pid_tgid, 0);
    }
}
