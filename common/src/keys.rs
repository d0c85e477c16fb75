//! Map keys shared by the eBPF programs and userspace.

/// A process inside a cgroup: key of the per-process dirty-page counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProcKey {
    /// cgroup v2 id (the cgroup directory's inode number).
    pub cgroup: u64,
    /// Thread-group id (the process id).
    pub tgid: u32,
    /// The cgroup's dirty-page epoch (map `EPOCHS`) the entry belongs to.
    pub epoch: u32,
}
crate::assert_size!(ProcKey, 16);

/// One page dirtied by one process of one cgroup in one epoch (in `proc`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DirtyPageKey {
    pub proc: ProcKey,
    /// Page number (virtual address >> PAGE_SHIFT).
    pub page: u64,
}
crate::assert_size!(DirtyPageKey, 24);

/// One slot of the direct-mapped cache of "is this cgroup traced" answers (map
/// `CGROUP_VERDICT`, indexed by the low bits of the cgroup id). The last slot holds the
/// current generation in `id`; userspace bumps it whenever the tracked set changes, which
/// invalidates every answer at once.
///
/// `tag` = generation << 33 | verdict << 32 | fold(id). A reader that sees an `id` and a
/// `tag` written by different updates (two 8-byte stores are not one atomic write) finds
/// that the fold does not match and treats the slot as empty.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictSlot {
    pub id: u64,
    pub tag: u64,
}
crate::assert_size!(VerdictSlot, 16);

/// Number of cache slots in `CGROUP_VERDICT` (a power of two); one more slot holds the
/// generation.
pub const VERDICT_SLOTS: u32 = 4096;

impl VerdictSlot {
    /// 32 bits derived from a cgroup id, to detect torn slots.
    #[inline(always)]
    pub fn fold(id: u64) -> u64 {
        (id ^ (id >> 32) ^ 0x9e37_79b9) & 0xffff_ffff
    }

    /// The slot recording `verdict` (0 or 1) for cgroup `id` in generation `generation`.
    #[inline(always)]
    pub fn new(id: u64, generation: u64, verdict: u64) -> Self {
        Self {
            id,
            tag: (generation << 33) | (verdict << 32) | Self::fold(id),
        }
    }

    /// The verdict for `id` in `generation`, if this slot holds one.
    #[inline(always)]
    pub fn verdict(&self, id: u64, generation: u64) -> Option<u64> {
        (self.id == id && self.tag & 0xffff_ffff == Self::fold(id) && self.tag >> 33 == generation)
            .then_some((self.tag >> 32) & 1)
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: as below.
    unsafe impl aya::Pod for super::VerdictSlot {}
    // SAFETY: plain #[repr(C)] integers with explicit padding fields: any bit pattern is valid
    // and there are no implicit padding bytes.
    unsafe impl aya::Pod for super::ProcKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DirtyPageKey {}
    // SAFETY: as above (KernelOffsets is all u32).
    unsafe impl aya::Pod for crate::config::KernelOffsets {}
    // SAFETY: repr(C) plain data (integers and an FdEvent of integers), no padding.
    unsafe impl aya::Pod for crate::run::WriteRun {}
}

#[cfg(test)]
mod tests {
    use super::VerdictSlot;

    #[test]
    fn verdict_slots_answer_only_for_their_id_and_generation() {
        let s = VerdictSlot::new(0x1_0000_0042, 7, 1);
        assert_eq!(s.verdict(0x1_0000_0042, 7), Some(1));
        assert_eq!(
            s.verdict(0x1_0000_0042, 8),
            None,
            "a new generation invalidates"
        );
        assert_eq!(
            s.verdict(0x1_0000_1042, 7),
            None,
            "another cgroup in the same slot"
        );
        assert_eq!(VerdictSlot::new(5, 0, 0).verdict(5, 0), Some(0));
        assert_eq!(
            VerdictSlot::default().verdict(0x42, 0),
            None,
            "an empty slot"
        );
        // A torn slot: the id of one update with the tag of another.
        let a = VerdictSlot::new(0x1_0000_0042, 3, 1);
        let b = VerdictSlot::new(0x1_0000_1042, 3, 0);
        let torn = VerdictSlot {
            id: b.id,
            tag: a.tag,
        };
        assert_eq!(torn.verdict(b.id, 3), None);
    }
}
