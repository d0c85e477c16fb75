//! Indexes of the per-CPU counters the eBPF programs keep (map `STATS`).

/// Events written to the ring buffer.
pub const STAT_EVENTS: u32 = 0;
/// Events dropped because the ring buffer was full (lost events: always reported).
pub const STAT_LOST: u32 = 1;
/// Dirtied pages not recorded because the page set was full.
pub const STAT_PAGES_OVERFLOW: u32 = 2;
/// Kernel structure reads that failed (the event is sent with what could be read).
pub const STAT_READ_ERRORS: u32 = 3;
/// Number of counters.
pub const STAT_COUNT: u32 = 4;
