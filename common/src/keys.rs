//! Map keys shared by the eBPF programs and userspace.

/// A process inside a cgroup: key of the per-process dirty-page counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProcKey {
    /// cgroup v2 id (the cgroup directory's inode number).
    pub cgroup: u64,
    /// Thread-group id (the process id).
    pub tgid: u32,
    pub _pad: u32,
}
crate::assert_size!(ProcKey, 16);

/// One page dirtied by one process of one cgroup in the current epoch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DirtyPageKey {
    pub proc: ProcKey,
    /// Page number (virtual address >> PAGE_SHIFT).
    pub page: u64,
}
crate::assert_size!(DirtyPageKey, 24);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers with explicit padding fields: any bit pattern is valid
    // and there are no implicit padding bytes.
    unsafe impl aya::Pod for super::ProcKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DirtyPageKey {}
    // SAFETY: as above (KernelOffsets is all u32).
    unsafe impl aya::Pod for crate::config::KernelOffsets {}
}
