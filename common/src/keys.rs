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

/// log2 of the pages per region of the dirty-page set: one map entry holds a bitmap of
/// 512 consecutive pages (2 MiB of 4 KiB pages), so a fault on a region already in the
/// map sets a bit instead of inserting an entry.
pub const REGION_SHIFT: u32 = 9;
/// Pages per region (see [`REGION_SHIFT`]).
pub const REGION_PAGES: u64 = 1 << REGION_SHIFT;

/// One region of the address space of one process of one cgroup in one epoch (in `proc`):
/// key of map `DIRTY_PAGES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DirtyRegionKey {
    pub proc: ProcKey,
    /// Region number (page number >> REGION_SHIFT).
    pub region: u64,
}
crate::assert_size!(DirtyRegionKey, 24);

/// Which pages of a region were dirtied: bit `p % 64` of word `p / 64` for the region's
/// page `p` (0 to 511).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageBitmap {
    pub words: [u64; (REGION_PAGES / 64) as usize],
}
crate::assert_size!(PageBitmap, 64);

impl PageBitmap {
    /// Where page number `page` is in its region's bitmap: (word index, bit mask). The
    /// one place the layout is written down (the page-fault program sets bits with it).
    #[inline(always)]
    pub const fn bit_of(page: u64) -> (usize, u64) {
        (
            ((page >> 6) & (REGION_PAGES / 64 - 1)) as usize,
            1 << (page & 63),
        )
    }

    /// Whether page `page` (of this bitmap's region) is set.
    #[inline(always)]
    fn has(&self, page: u64) -> bool {
        let (word, mask) = Self::bit_of(page);
        self.words[word] & mask != 0
    }

    /// The runs of consecutive pages set in the bitmap of region `region`, as [first, end)
    /// page numbers, in order.
    pub fn runs(self, region: u64) -> impl Iterator<Item = [u64; 2]> {
        let base = region << REGION_SHIFT;
        let mut p = 0u64;
        core::iter::from_fn(move || {
            while p < REGION_PAGES && !self.has(p) {
                p += 1;
            }
            if p == REGION_PAGES {
                return None;
            }
            let first = p;
            while p < REGION_PAGES && self.has(p) {
                p += 1;
            }
            Some([base + first, base + p])
        })
    }

    /// How many pages the bitmap holds.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The page numbers set in the bitmap of region `region`, in order.
    pub fn pages(self, region: u64) -> impl Iterator<Item = u64> {
        self.runs(region).flat_map(|[first, end]| first..end)
    }
}

/// One slot of the direct-mapped cache of "is this cgroup traced" answers (map
/// `CGROUP_VERDICT`, indexed by the low bits of the cgroup id). The last slot holds the
/// current generation in `id`; userspace bumps it whenever the tracked set changes, which
/// invalidates every answer at once.
///
/// `tag` = generation << 34 | verdict << 32 | fold(id), the verdict one of [`NOT_TRACED`],
/// [`TRACED`] and [`TRACED_NO_WRITES`]. `epoch` = the cgroup's dirty-page epoch (map
/// `EPOCHS`) << 32 | (fold(id) ^ generation), so that the page-fault program, the hottest,
/// needs no lookup of its own for it: userspace moves the cache to a new generation when it
/// starts an epoch. A reader that sees fields written by different updates (8-byte stores
/// are not one atomic write) finds that a fold does not match and treats the slot as empty.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictSlot {
    pub id: u64,
    pub tag: u64,
    pub epoch: u64,
}
crate::assert_size!(VerdictSlot, 24);

/// Verdict: the cgroup is not traced.
pub const NOT_TRACED: u64 = 0;
/// Verdict: the cgroup is traced, with per-write detail (the syscall programs report it).
pub const TRACED: u64 = 1;
/// Verdict: the cgroup is traced without per-write detail (the syscall programs skip it;
/// process, page and socket-hook records still come).
pub const TRACED_NO_WRITES: u64 = 2;

/// Bit of a `TRACKED_CGROUPS` value: the cgroup asks for no per-write detail.
pub const TRACK_NO_WRITE_DETAIL: u32 = 1;

/// Generations are kept to this many bits (the tag holds 30 above the verdict).
pub const GENERATION_MASK: u64 = 0x3fff_ffff;

/// Number of cache slots in `CGROUP_VERDICT` (a power of two); one more slot holds the
/// generation.
pub const VERDICT_SLOTS: u32 = 4096;

impl VerdictSlot {
    /// 32 bits derived from a cgroup id, to detect torn slots.
    #[inline(always)]
    pub fn fold(id: u64) -> u64 {
        (id ^ (id >> 32) ^ 0x9e37_79b9) & 0xffff_ffff
    }

    /// The check word under a slot's epoch: ties it to the id and generation of its update.
    #[inline(always)]
    fn epoch_check(id: u64, generation: u64) -> u64 {
        (Self::fold(id) ^ generation) & 0xffff_ffff
    }

    /// The slot recording `verdict` (0 to 3) and dirty-page epoch `epoch` for cgroup `id` in
    /// generation `generation`.
    #[inline(always)]
    pub fn new(id: u64, generation: u64, verdict: u64, epoch: u32) -> Self {
        Self {
            id,
            tag: (generation << 34) | ((verdict & 3) << 32) | Self::fold(id),
            epoch: ((epoch as u64) << 32) | Self::epoch_check(id, generation),
        }
    }

    /// The verdict for `id` in `generation`, if this slot holds one.
    #[inline(always)]
    pub fn verdict(&self, id: u64, generation: u64) -> Option<u64> {
        (self.id == id && self.tag & 0xffff_ffff == Self::fold(id) && self.tag >> 34 == generation)
            .then_some((self.tag >> 32) & 3)
    }

    /// The verdict and dirty-page epoch for `id` in `generation`, if this slot holds them.
    #[inline(always)]
    pub fn verdict_and_epoch(&self, id: u64, generation: u64) -> Option<(u64, u32)> {
        let verdict = self.verdict(id, generation)?;
        (self.epoch & 0xffff_ffff == Self::epoch_check(id, generation))
            .then_some((verdict, (self.epoch >> 32) as u32))
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
    unsafe impl aya::Pod for super::DirtyRegionKey {}
    // SAFETY: repr(C), eight u64.
    unsafe impl aya::Pod for super::PageBitmap {}
    // SAFETY: as above (KernelOffsets is all u32).
    unsafe impl aya::Pod for crate::config::KernelOffsets {}
    // SAFETY: repr(C) plain data (integers and an FdEvent of integers), no padding.
    unsafe impl aya::Pod for crate::run::WriteRun {}
    // SAFETY: repr(C) integers with explicit padding fields, no implicit padding.
    unsafe impl aya::Pod for crate::egress::EgressKey {}
    // SAFETY: repr(C), two u64.
    unsafe impl aya::Pod for crate::egress::EgressCount {}
}

#[cfg(test)]
mod tests {
    use super::VerdictSlot;

    #[test]
    fn a_bitmap_names_its_pages() {
        let mut b = super::PageBitmap::default();
        b.words[0] = 0b101;
        b.words[7] = 1 << 63;
        let pages: Vec<u64> = b.pages(3).collect();
        assert_eq!(pages, [3 * 512, 3 * 512 + 2, 3 * 512 + 511]);
        let runs: Vec<[u64; 2]> = b.runs(3).collect();
        assert_eq!(runs, [[1536, 1537], [1538, 1539], [2047, 2048]]);
        assert_eq!(b.count(), 3);
        let mut full = super::PageBitmap {
            words: [u64::MAX; 8],
        };
        full.words[1] = !(1 << 5);
        let runs: Vec<[u64; 2]> = full.runs(0).collect();
        assert_eq!(runs, [[0, 69], [70, 512]]);
        assert_eq!(full.count(), 511);
        assert_eq!(super::PageBitmap::default().pages(1).count(), 0);
    }

    #[test]
    fn verdict_slots_answer_only_for_their_id_and_generation() {
        let s = VerdictSlot::new(0x1_0000_0042, 7, 1, 9);
        assert_eq!(s.verdict(0x1_0000_0042, 7), Some(1));
        assert_eq!(s.verdict_and_epoch(0x1_0000_0042, 7), Some((1, 9)));
        assert_eq!(s.verdict_and_epoch(0x1_0000_0042, 8), None);
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
        assert_eq!(VerdictSlot::new(5, 0, 0, 0).verdict(5, 0), Some(0));
        let most = super::GENERATION_MASK;
        assert_eq!(
            VerdictSlot::new(9, most, super::TRACED_NO_WRITES, u32::MAX).verdict(9, most),
            Some(super::TRACED_NO_WRITES),
            "the largest generation keeps the two-bit verdict"
        );
        assert_eq!(
            VerdictSlot::default().verdict(0x42, 0),
            None,
            "an empty slot"
        );
        // A torn slot: the id of one update with the tag of another.
        let a = VerdictSlot::new(0x1_0000_0042, 3, 1, 4);
        let b = VerdictSlot::new(0x1_0000_1042, 3, 0, 5);
        let torn = VerdictSlot { id: b.id, ..a };
        assert_eq!(torn.verdict(b.id, 3), None);
        // The verdict of one update with the epoch of another cgroup's, or of the same
        // cgroup's in another generation.
        let torn = VerdictSlot {
            epoch: b.epoch,
            ..a
        };
        assert_eq!(torn.verdict(a.id, 3), Some(1));
        assert_eq!(torn.verdict_and_epoch(a.id, 3), None);
        let later = VerdictSlot::new(a.id, 4, 1, 5);
        let torn = VerdictSlot {
            epoch: later.epoch,
            ..a
        };
        assert_eq!(torn.verdict_and_epoch(a.id, 3), None);
    }
}
