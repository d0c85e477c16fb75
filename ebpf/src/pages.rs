//! Dirtied pages: write faults from the raw tracepoints `page_fault_user` (the process
//! stores) and `page_fault_kernel` (the kernel writing into user memory, as read() does),
//! raw so that no perf record is built for every fault on the host, recorded once per
//! (cgroup, process, page) per epoch of the cgroup (EPOCHS) in DIRTY_PAGES, with a count
//! per process in PAGE_COUNTS. DIRTY_PAGES holds a bitmap per 2 MiB region: the first
//! fault in a region inserts its entry, the others (most: a process writes its heap and
//! stack page after page) find it with an inlined lookup and set their bit atomically.
//! Writes through pinned pages (O_DIRECT, process_vm_writev, io_uring fixed buffers) do
//! not fault and are not seen.

use core::intrinsics::{AtomicOrdering::Relaxed, atomic_or};

use aya_ebpf::{
    bindings::BPF_NOEXIST, helpers::bpf_get_current_pid_tgid, macros::raw_tracepoint,
    programs::RawTracePointContext,
};
use forkscope_common::{
    DirtyRegionKey, PAGE_SHIFT, PageBitmap, ProcKey, REGION_SHIFT, stats::STAT_PAGES_OVERFLOW,
};

use crate::{
    cgroup,
    maps::{DIRTY_PAGES, PAGE_COUNTS, STATS},
};

/// Bit 1 of the x86 page-fault error code: the access was a write.
const FAULT_WRITE: u64 = 1 << 1;
/// First address above the x86_64 user half.
const USER_END: u64 = 0x0000_8000_0000_0000;

/// Both raw tracepoints pass (unsigned long address, struct pt_regs *regs, unsigned long
/// error_code).
#[raw_tracepoint]
pub fn page_fault(ctx: RawTracePointContext) -> i32 {
    let _ = try_page_fault(&ctx);
    0
}

fn try_page_fault(ctx: &RawTracePointContext) -> Option<()> {
    let (address, error): (u64, u64) = (ctx.arg(0), ctx.arg(2));
    if error & FAULT_WRITE == 0 || address >= USER_END {
        return None;
    }
    let (cg, epoch) = cgroup::tracked_with_epoch()?;
    let proc = ProcKey {
        cgroup: cg,
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        epoch,
    };
    let page = address >> PAGE_SHIFT;
    let key = DirtyRegionKey {
        proc,
        region: page >> REGION_SHIFT,
    };
    let bitmap = match DIRTY_PAGES.get_ptr_mut(key) {
        Some(b) => b,
        None => {
            // The region's first page. BPF_NOEXIST: another thread of the process that
            // faulted in the region meanwhile keeps its entry, and its bit.
            let _ = DIRTY_PAGES.insert(key, PageBitmap::default(), BPF_NOEXIST as u64);
            let Some(b) = DIRTY_PAGES.get_ptr_mut(key) else {
                overflow();
                return None;
            };
            b
        }
    };
    let (word, bit) = PageBitmap::bit_of(page);
    // SAFETY: `bitmap` points to a live map value; `bit_of` gives a word index within it.
    // The or is atomic: threads of the process may fault on other pages of the region at
    // once on other CPUs, and one that finds its bit already set did not dirty the page
    // first.
    let before = unsafe {
        let word = (&raw mut (*bitmap).words).cast::<u64>().add(word);
        atomic_or::<u64, u64, { Relaxed }>(word, bit)
    };
    if before & bit == 0 {
        count_page(&proc);
    }
    Some(())
}

/// A dirtied page the set had no room for (counted, shown as not recorded).
#[inline(always)]
fn overflow() {
    if let Some(p) = STATS.get_ptr_mut(STAT_PAGES_OVERFLOW) {
        // SAFETY: per-CPU slot, written only by this CPU with preemption off.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn count_page(proc: &ProcKey) {
    // PAGE_COUNTS is per-CPU: each CPU counts its own faults, userspace sums the slots.
    if let Some(p) = PAGE_COUNTS.get_ptr_mut(proc) {
        // SAFETY: `p` points to this CPU's slot of a live map value; preemption is off.
        unsafe { *p += 1 };
    } else {
        let _ = PAGE_COUNTS.insert(proc, 1, 0);
    }
}
