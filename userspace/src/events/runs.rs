//! The controller's side of runs of writes merged in the kernel (forkscope_common::run):
//! [`Runs::note`] opens a run when its first record is read from the ring buffer and closes
//! it when the kernel's last merged record arrives; [`Runs::harvest`] takes what the open runs
//! have pending and turns it into merged records, so a thread that stops writing (or blocks
//! for an hour) still has its bytes in the trace within one drain.
//!
//! A run is harvested only after its first record was read, so a merged record never comes
//! before the write that started its run.

use std::collections::HashMap;

use forkscope_common::{EventKind, FdEvent, event::file_type, run::RUN_SLOTS};

use super::RawEvent;
use crate::bpf::run_slots::{RunSlots, Take};

/// A run whose first record was read.
struct Open {
    /// `tgid << 32 | tid` of the thread whose run it is.
    owner: u64,
    /// The first record's `ts_ns`, which names the run in its slot.
    id: u64,
    /// The first record: the template of the merged ones.
    first: FdEvent,
    /// Where the bytes of the next merged record start (regular files).
    next_offset: i64,
}

/// Open runs, by slot.
pub struct Runs {
    slots: RunSlots,
    open: HashMap<u32, Open>,
}

/// Whether `e` is a write record a run could start with or end with.
fn is_run_record(e: &FdEvent) -> bool {
    e.hdr.kind == EventKind::FileWrite as u32 || e.hdr.kind == EventKind::NetSend as u32
}

impl Runs {
    /// Starts with the runs the slots hold already (a restarted daemon adopting pinned maps:
    /// their first records were read by its predecessor). Where such a run's bytes start in
    /// the file is not known, so its merged records carry no offset.
    pub fn new(slots: RunSlots) -> Self {
        let open = (0..RUN_SLOTS)
            .filter_map(|index| {
                let (owner, id, first) = slots.current(index)?;
                let next_offset = -1;
                Some((
                    index,
                    Open {
                        owner,
                        id,
                        first,
                        next_offset,
                    },
                ))
            })
            .collect();
        Self { slots, open }
    }

    /// Notes a record read from the ring buffer (never one [`Runs::harvest`] made: a merged
    /// record from the ring means the kernel ended its run).
    pub fn note(&mut self, raw: &RawEvent) {
        let RawEvent::Fd(e) = raw else {
            return;
        };
        if !is_run_record(e) {
            return;
        }
        let owner = (u64::from(e.hdr.pid) << 32) | u64::from(e.hdr.tid);
        let index = e.hdr.tid & (RUN_SLOTS - 1);
        if e.ret > 0 {
            // The kernel's merged record: the rest of a run that has ended.
            if self.open.get(&index).is_some_and(|o| o.owner == owner) {
                self.open.remove(&index);
            }
        } else if self.slots.holds(index, owner, e.hdr.ts_ns) {
            self.open.insert(
                index,
                Open {
                    owner,
                    id: e.hdr.ts_ns,
                    first: *e,
                    next_offset: if e.offset >= 0 {
                        e.offset + e.bytes
                    } else {
                        -1
                    },
                },
            );
        }
    }

    /// Takes what every open run has pending, as merged records stamped `now_ns`.
    pub fn harvest(&mut self, now_ns: u64) -> Vec<RawEvent> {
        let mut out = Vec::new();
        let slots = &self.slots;
        self.open
            .retain(|&index, o| match slots.take(index, o.owner, o.id) {
                Take::Counts(calls, bytes) => {
                    let mut ev = o.first;
                    ev.hdr.ts_ns = now_ns;
                    ev.bytes = bytes as i64;
                    ev.ret = calls as i32;
                    if ev.file_type == file_type::REG && o.next_offset >= 0 {
                        ev.offset = o.next_offset;
                        o.next_offset += bytes as i64;
                    } else {
                        ev.offset = -1;
                    }
                    out.push(RawEvent::Fd(ev));
                    true
                }
                Take::Idle => true,
                Take::Gone => false,
            });
        out.sort_by_key(|e| e.header().tid);
        out
    }

    /// Runs open now (for tests and diagnostics).
    pub fn open_count(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use forkscope_common::{
        EventHeader,
        run::{PENDING_ONE_CALL, PENDING_TAG_SHIFT, pending_counts},
    };

    use super::*;

    fn first_write(tid: u32, ts: u64, offset: i64, bytes: i64) -> FdEvent {
        let hdr = EventHeader {
            kind: EventKind::FileWrite as u32,
            syscall: 1,
            pid: tid,
            tid,
            ts_ns: ts,
            cgroup: 9,
            comm: [0; 16],
        };
        FdEvent {
            file_type: file_type::REG,
            offset,
            bytes,
            ..FdEvent::new(hdr, 3)
        }
    }

    /// Plays the kernel: thread `tid` starts run `ts` in its slot with tag `tag`.
    fn kernel_starts(slots: &mut RunSlots, ev: &FdEvent, tag: u64) {
        let s = slots.slot_mut(ev.hdr.tid);
        s.owner = (u64::from(ev.hdr.pid) << 32) | u64::from(ev.hdr.tid);
        s.id = ev.hdr.ts_ns;
        s.first = *ev;
        s.pending = tag << PENDING_TAG_SHIFT;
    }

    #[test]
    fn pending_writes_become_merged_records_that_continue_the_offsets() {
        let mut runs = Runs::new(RunSlots::in_memory());
        let first = first_write(42, 1000, 0, 4096);
        kernel_starts(&mut runs.slots, &first, 1);
        runs.slots.slot_mut(42).pending += 3 * (PENDING_ONE_CALL + 4096);
        assert!(
            runs.harvest(5).is_empty(),
            "nothing before the first record was read"
        );
        runs.note(&RawEvent::Fd(first));
        let got = runs.harvest(2000);
        assert_eq!(got.len(), 1);
        let RawEvent::Fd(m) = &got[0] else {
            panic!("an fd record")
        };
        assert_eq!(
            (m.offset, m.bytes, m.ret, m.hdr.ts_ns),
            (4096, 3 * 4096, 3, 2000)
        );
        assert!(runs.harvest(2001).is_empty(), "taken once");
        // Two more writes: the next record starts where the last one ended.
        runs.slots.slot_mut(42).pending += 2 * (PENDING_ONE_CALL + 100);
        let RawEvent::Fd(m) = &runs.harvest(3000)[0] else {
            panic!("an fd record")
        };
        assert_eq!((m.offset, m.bytes, m.ret), (4 * 4096, 200, 2));
        assert_eq!(pending_counts(runs.slots.slot_mut(42).pending), (0, 0));
    }

    #[test]
    fn runs_in_the_slots_at_start_are_harvested_without_an_offset() {
        let mut slots = RunSlots::in_memory();
        kernel_starts(&mut slots, &first_write(42, 1000, 0, 4096), 1);
        slots.slot_mut(42).pending += 2 * (PENDING_ONE_CALL + 4096);
        let mut runs = Runs::new(slots);
        assert_eq!(runs.open_count(), 1);
        let RawEvent::Fd(m) = &runs.harvest(2000)[0] else {
            panic!("an fd record")
        };
        assert_eq!((m.offset, m.bytes, m.ret), (-1, 2 * 4096, 2));
    }

    #[test]
    fn a_run_the_kernel_ended_is_not_harvested_again() {
        let mut slots = RunSlots::in_memory();
        let first = first_write(7, 1000, 0, 10);
        kernel_starts(&mut slots, &first, 1);
        let mut runs = Runs::new(slots);
        runs.note(&RawEvent::Fd(first));
        assert_eq!(runs.open_count(), 1);
        // The kernel ends the run (its merged record) and starts another one in the slot.
        let second = first_write(7, 5000, 100, 10);
        kernel_starts(&mut runs.slots, &second, 2);
        runs.slots.slot_mut(7).pending += PENDING_ONE_CALL + 10;
        assert!(runs.harvest(6000).is_empty(), "the new run is not read yet");
        assert_eq!(runs.open_count(), 0, "the old run is gone");
        let merged = FdEvent {
            ret: 2,
            ..first_write(7, 4000, 10, 20)
        };
        runs.note(&RawEvent::Fd(merged));
        runs.note(&RawEvent::Fd(second));
        let RawEvent::Fd(m) = &runs.harvest(7000)[0] else {
            panic!("an fd record")
        };
        assert_eq!((m.offset, m.bytes, m.ret), (110, 10, 1));
    }

    #[test]
    fn a_write_of_a_thread_without_a_slot_opens_no_run() {
        let mut slots = RunSlots::in_memory();
        let holder = first_write(5, 1000, 0, 10);
        kernel_starts(&mut slots, &holder, 1);
        let mut runs = Runs::new(slots);
        runs.note(&RawEvent::Fd(holder));
        // Thread 5 + RUN_SLOTS maps to the same slot, which thread 5 holds.
        runs.note(&RawEvent::Fd(first_write(5 + RUN_SLOTS, 2000, 0, 10)));
        runs.slots.slot_mut(5).pending += PENDING_ONE_CALL + 10;
        let got = runs.harvest(3000);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].header().tid, 5);
    }
}
