//! Runs of writes merged in the kernel: the slots of map `WRITE_RUNS`, shared by the eBPF
//! programs (which extend a run) and userspace (which harvests what a run has pending).
//!
//! A thread that writes the same open file again and again (a log, a database, a copy)
//! would otherwise cost one ring-buffer record per syscall. Instead the first write of a run
//! is sent as an ordinary record, and each later write that continues it (same `struct file`,
//! starting where the previous one ended; any write for a connected socket) only adds its
//! bytes to the slot's [`WriteRun::pending`] word with one atomic add. What is pending is
//! sent as one merged record, with the number of syscalls it stands for, when:
//! - the run breaks (another file, another offset) or the thread does anything else the
//!   tracer reports (the kernel swaps the word and sends the rest before the new event),
//!   or the thread exits;
//! - userspace harvests it (a few times a second and before answering a trace read): it
//!   swaps the pending count out of the word with a compare-and-swap on the mmap'ed map.
//!
//! So every byte is reported exactly once, in per-thread order, and no write of a run whose
//! first record userspace has read is held for longer than one harvest period. `pending` packs a tag (which run of the slot it belongs
//! to), a syscall count and a byte count into one word, so that a swap can never mix two
//! runs or two counts.

use crate::event::FdEvent;

/// Number of slots (a power of two). A thread uses slot `tid & (RUN_SLOTS - 1)` when no other
/// live thread holds it; a thread without a slot has every write sent as its own record.
pub const RUN_SLOTS: u32 = 4096;

/// Bits of [`WriteRun::pending`]: bytes in the low 40, syscalls in the next 16, the run's
/// tag in the top 8.
pub const PENDING_BYTES_BITS: u32 = 40;
pub const PENDING_CALLS_SHIFT: u32 = 40;
pub const PENDING_TAG_SHIFT: u32 = 56;
pub const PENDING_BYTES_MASK: u64 = (1 << PENDING_BYTES_BITS) - 1;
pub const PENDING_CALLS_MASK: u64 = 0xffff << PENDING_CALLS_SHIFT;
pub const PENDING_TAG_MASK: u64 = 0xff << PENDING_TAG_SHIFT;
/// What one write adds to `pending` besides its bytes.
pub const PENDING_ONE_CALL: u64 = 1 << PENDING_CALLS_SHIFT;
/// A run ends rather than let a count reach these (the word must never carry over).
pub const PENDING_MAX_CALLS: u64 = 0xff00;
pub const PENDING_MAX_BYTES: u64 = 1 << 39;

/// One slot of `WRITE_RUNS`. Only the owning thread's programs write its fields; userspace
/// only swaps counts out of `pending`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct WriteRun {
    /// `tgid << 32 | tid` of the thread that holds the slot (0: free).
    pub owner: u64,
    /// tag << 56 | syscalls << 40 | bytes: what the run has not reported yet.
    pub pending: u64,
    /// `ts_ns` of the run's first record (tells runs of the same slot apart in userspace).
    pub id: u64,
    /// The `struct file *` the run writes to; 0 once the run has ended (the slot stays its
    /// thread's until the thread exits).
    pub file: u64,
    /// Offset where the next write must start to continue the run (regular files).
    pub next: i64,
    /// The `struct inode *` of the run's file: with `file`, its identity (a `struct file`
    /// closed and freed can be reused at once for another file or connection).
    pub inode: u64,
    /// The run's first record, as sent: the template of its merged records.
    pub first: FdEvent,
}
crate::assert_size!(WriteRun, 48 + 128);

/// The run tag carried by a `pending` word.
#[inline(always)]
pub const fn pending_tag(pending: u64) -> u64 {
    pending >> PENDING_TAG_SHIFT
}

/// (syscalls, bytes) counted in a `pending` word.
#[inline(always)]
pub const fn pending_counts(pending: u64) -> (u64, u64) {
    (
        (pending & PENDING_CALLS_MASK) >> PENDING_CALLS_SHIFT,
        pending & PENDING_BYTES_MASK,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_word_keeps_tag_calls_and_bytes_apart() {
        let mut p = 7u64 << PENDING_TAG_SHIFT;
        for _ in 0..3 {
            p += PENDING_ONE_CALL + 4096;
        }
        assert_eq!(pending_tag(p), 7);
        assert_eq!(pending_counts(p), (3, 3 * 4096));
        // The limits leave room for one more write of the largest size a syscall moves.
        let full = (255u64 << PENDING_TAG_SHIFT)
            | ((PENDING_MAX_CALLS - 1) << PENDING_CALLS_SHIFT)
            | (PENDING_MAX_BYTES - 1);
        let next = full + PENDING_ONE_CALL + 0x7fff_f000;
        assert_eq!(pending_tag(next), 255);
        assert_eq!(
            pending_counts(next),
            (PENDING_MAX_CALLS, PENDING_MAX_BYTES - 1 + 0x7fff_f000)
        );
    }
}
