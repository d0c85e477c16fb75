//! Types shared by the eBPF programs and the userspace controller.
//!
//! Everything here is `#[repr(C)]`, has a compile-time size assertion, and uses no `bool`
//! (u8/u32 instead) so the layout is the same on both sides with no hidden padding. With the
//! `user` feature the types implement `aya::Pod` so userspace can put them in maps.
#![cfg_attr(not(test), no_std)]

pub mod config;
pub mod egress;
pub mod event;
pub mod keys;
pub mod policy;
pub mod run;
pub mod stats;
pub mod syscalls;

pub use config::KernelOffsets;
pub use event::{EventHeader, EventKind, FdEvent, PathEvent, ProcEvent};
pub use keys::{DirtyRegionKey, PageBitmap, ProcKey, REGION_SHIFT, VerdictSlot};

/// Length of a task's `comm` (TASK_COMM_LEN).
pub const COMM_LEN: usize = 16;
/// Bytes kept of each path an event carries (NUL-terminated; longer paths are cut and flagged).
pub const PATH_LEN: usize = 512;
/// The page size the dirty-page tracker assumes (x86_64, 4 KiB pages).
pub const PAGE_SHIFT: u32 = 12;

/// Asserts at compile time that a shared type has exactly the size both sides expect.
#[macro_export]
macro_rules! assert_size {
    ($t:ty, $n:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $n);
    };
}
