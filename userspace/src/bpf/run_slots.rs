//! The `WRITE_RUNS` map mapped into this process's memory (protocol in
//! forkscope_common::run): the eBPF programs add each merged write to its slot's pending word,
//! and [`RunSlots::take`] swaps the count out with a compare-and-swap, so a count is taken
//! exactly once, by the controller or by the kernel when the run ends.

use std::{
    os::fd::BorrowedFd,
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use forkscope_common::run::{PENDING_TAG_MASK, RUN_SLOTS, WriteRun, pending_counts};

use crate::error::{Error, Result};

/// Where the slots live: the kernel's map, or (unit tests) plain memory.
enum Backing {
    Mapped {
        len: usize,
    },
    /// Kept alive (and freed) with the slots; `base` points into it.
    #[cfg(test)]
    Owned(#[allow(dead_code)] Box<[WriteRun]>),
}

/// The slots of `WRITE_RUNS`.
pub struct RunSlots {
    base: NonNull<WriteRun>,
    backing: Backing,
}

// SAFETY: the mapping is plain shared memory; every access that can race with the kernel is
// atomic (`pending`) or re-checked by a compare-and-swap of it (see `take`).
unsafe impl Send for RunSlots {}

/// What [`RunSlots::take`] found in a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// The run's pending (syscalls, bytes), now taken.
    Counts(u64, u64),
    /// The run is still the slot's, with nothing pending.
    Idle,
    /// The slot holds another run now (the kernel sent the rest of this one).
    Gone,
}

impl RunSlots {
    /// Maps the array whose descriptor is `fd` (created with `BPF_F_MMAPABLE`).
    pub fn map(fd: BorrowedFd<'_>) -> Result<Self> {
        let bytes = RUN_SLOTS as usize * std::mem::size_of::<WriteRun>();
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .map_or(4096, |p| p as usize);
        let len = bytes.div_ceil(page) * page;
        // SAFETY: maps `len` bytes of the array (its whole value area, rounded up to a page as
        // the kernel allows) shared with the kernel; the result is checked.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                std::num::NonZeroUsize::new(len).expect("non-zero"),
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                fd,
                0,
            )
        }
        .map_err(|e| Error::Btf(format!("mapping the WRITE_RUNS map into memory: {e}")))?;
        Ok(Self {
            base: ptr.cast(),
            backing: Backing::Mapped { len },
        })
    }

    /// Slots in plain memory, for unit tests of the protocol.
    #[cfg(test)]
    pub fn in_memory() -> Self {
        let zero: WriteRun = unsafe_zeroed();
        let mut owned = vec![zero; RUN_SLOTS as usize].into_boxed_slice();
        Self {
            base: NonNull::new(owned.as_mut_ptr()).expect("non-null"),
            backing: Backing::Owned(owned),
        }
    }

    /// Slot `index` (masked into range).
    fn slot(&self, index: u32) -> *mut WriteRun {
        // SAFETY: the index is masked below RUN_SLOTS, the number of slots mapped.
        unsafe { self.base.as_ptr().add((index & (RUN_SLOTS - 1)) as usize) }
    }

    /// Whether slot `index` holds run `id` of thread `owner` (`tgid << 32 | tid`).
    pub fn holds(&self, index: u32, owner: u64, id: u64) -> bool {
        let s = self.slot(index);
        // SAFETY: `s` points into the mapping; volatile reads of fields the kernel may be
        // writing (a torn value only makes the comparison fail).
        unsafe {
            std::ptr::read_volatile(&raw const (*s).owner) == owner
                && std::ptr::read_volatile(&raw const (*s).id) == id
        }
    }

    /// The run slot `index` holds, if any: (owner, run id, first record).
    pub fn current(&self, index: u32) -> Option<(u64, u64, forkscope_common::FdEvent)> {
        let s = self.slot(index);
        // SAFETY: `s` points into the mapping. The fields change only when the owner starts a
        // new run, after which `take` finds another run id and gives `Gone`; a copy taken in
        // the very instant a run starts could mix two templates (only a restarted daemon
        // reads slots this way, once).
        unsafe {
            let owner = std::ptr::read_volatile(&raw const (*s).owner);
            (owner != 0).then(|| {
                (
                    owner,
                    std::ptr::read_volatile(&raw const (*s).id),
                    std::ptr::read_volatile(&raw const (*s).first),
                )
            })
        }
    }

    /// Takes what run `id` of thread `owner` has pending in slot `index`.
    pub fn take(&self, index: u32, owner: u64, id: u64) -> Take {
        let s = self.slot(index);
        // SAFETY: `pending` is 8-byte aligned inside the mapping and only accessed atomically.
        let word = unsafe { AtomicU64::from_ptr(&raw mut (*s).pending) };
        loop {
            let seen = word.load(Ordering::Acquire);
            // Read after the word: the kernel publishes a run's fields before its tag.
            if !self.holds(index, owner, id) {
                return Take::Gone;
            }
            let (calls, bytes) = pending_counts(seen);
            if calls == 0 {
                return Take::Idle;
            }
            // Fails if the kernel added a write or ended the run meanwhile: read again.
            if word
                .compare_exchange(
                    seen,
                    seen & PENDING_TAG_MASK,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
            {
                return Take::Counts(calls, bytes);
            }
        }
    }

    /// Slot `index` for tests that play the kernel's part.
    #[cfg(test)]
    pub fn slot_mut(&mut self, index: u32) -> &mut WriteRun {
        // SAFETY: in-memory slots of a test, not shared with a kernel.
        unsafe { &mut *self.slot(index) }
    }
}

/// An all-zero slot.
#[cfg(test)]
fn unsafe_zeroed() -> WriteRun {
    // SAFETY: WriteRun is plain integers, for which all-zero is valid.
    unsafe { std::mem::zeroed() }
}

impl Drop for RunSlots {
    fn drop(&mut self) {
        match &self.backing {
            Backing::Mapped { len } => {
                // SAFETY: unmaps exactly what `map` mapped; nothing refers to it any more.
                let _ = unsafe { nix::sys::mman::munmap(self.base.cast(), *len) };
            }
            #[cfg(test)]
            Backing::Owned(_) => {}
        }
    }
}
