//! The programs of a pinned [`Probe`] (the daemon's) that cost every process on the host
//! while attached, attached only while some branch needs them ([`HookSet`]):
//!
//! - the syscall programs ([`HookSet::Syscalls`]), while a branch asks for per-write
//!   detail: any program on a syscall tracepoint sends every task on the host down the
//!   kernel's slower syscall path;
//! - the page-fault programs ([`HookSet::PageFaults`]), while any branch is traced: every
//!   page fault on the host runs them (a cgroup check each).
//!
//! The links are pinned one by one under `<pin dir>/<set>-links/N`, so they survive a
//! daemon restart like the rest; the programs are pinned under `<pin dir>/progs/NAME` by
//! [`Probe::pin`], so an adopted probe can attach them again.

use std::path::Path;

use aya::programs::{
    TracePoint,
    links::{FdLink, PinnedLink},
};

use super::probe::{PROGS, Probe, SYSCALL_PROGRAMS, pinnable, refused, syscall_tracepoints};
use crate::error::{Error, Result};

/// A set of programs attached on demand (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HookSet {
    Syscalls,
    PageFaults,
}

/// The page-fault program and its tracepoints.
const PAGE_FAULT_PROGRAM: &str = "page_fault";
const PAGE_FAULT_TRACEPOINTS: [&str; 2] = ["page_fault_user", "page_fault_kernel"];

impl HookSet {
    /// Where its links are pinned, under the pin directory.
    fn links_dir(self) -> &'static str {
        match self {
            HookSet::Syscalls => "syscall-links",
            HookSet::PageFaults => "fault-links",
        }
    }

    /// Its programs (pinned under `progs/`).
    pub(super) fn programs(self) -> &'static [&'static str] {
        match self {
            HookSet::Syscalls => SYSCALL_PROGRAMS,
            HookSet::PageFaults => &[PAGE_FAULT_PROGRAM],
        }
    }

    /// The (program, category, tracepoint) triples to attach on this kernel, and the
    /// tracepoints it lacks.
    pub(super) fn attachments(self) -> (Vec<(&'static str, &'static str, String)>, Vec<String>) {
        match self {
            HookSet::Syscalls => {
                let (present, missing) = syscall_tracepoints();
                let present = present
                    .into_iter()
                    .map(|(prog, event)| (prog, "syscalls", event))
                    .collect();
                (present, missing)
            }
            HookSet::PageFaults => (
                PAGE_FAULT_TRACEPOINTS
                    .iter()
                    .map(|e| (PAGE_FAULT_PROGRAM, "exceptions", e.to_string()))
                    .collect(),
                Vec::new(),
            ),
        }
    }

    /// What it is, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            HookSet::Syscalls => "syscall programs",
            HookSet::PageFaults => "page-fault programs",
        }
    }
}

/// Whether a set's programs are attached (see [`Probe::hooks_state`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HooksState {
    /// None is attached.
    Detached,
    /// Every tracepoint this kernel has is attached.
    Attached,
    /// Some are (a daemon died while attaching or detaching them).
    Partial,
}

impl Probe {
    /// The state of `set`'s links pinned under `dir`.
    pub fn hooks_state(dir: &Path, set: HookSet) -> HooksState {
        let pinned = std::fs::read_dir(dir.join(set.links_dir()))
            .map(|d| d.count())
            .unwrap_or(0);
        match pinned {
            0 => HooksState::Detached,
            n if n == set.attachments().0.len() => HooksState::Attached,
            _ => HooksState::Partial,
        }
    }

    /// Attaches `set`'s programs to every tracepoint of it this kernel has and pins each
    /// link under `dir` (the directory [`Probe::pin`] used). On an error, whatever was
    /// attached is detached again.
    pub fn attach_pinned(&mut self, dir: &Path, set: HookSet) -> Result<()> {
        let links = dir.join(set.links_dir());
        std::fs::create_dir_all(&links).map_err(|e| Error::Io {
            path: links.clone(),
            cause: e,
        })?;
        let (present, missing) = set.attachments();
        if set == HookSet::Syscalls {
            self.missing_tracepoints = missing;
        }
        for (n, (prog, category, event)) in present.into_iter().enumerate() {
            let pin = links.join(n.to_string());
            if let Err(e) = self.attach_one(dir, prog, category, &event, &pin) {
                Self::detach_pinned(dir, set);
                return Err(e);
            }
        }
        Ok(())
    }

    fn attach_one(
        &mut self,
        dir: &Path,
        prog: &'static str,
        category: &str,
        event: &str,
        pin: &Path,
    ) -> Result<()> {
        let program = self.pinnable_program(dir, prog)?;
        let id = program
            .attach(category, event)
            .map_err(refused(prog, event))?;
        let link = program.take_link(id).map_err(refused(prog, "pin"))?;
        let link = pinnable(prog, FdLink::try_from(link))?;
        link.pin(pin)
            .map_err(|e| Error::Btf(format!("pinning the link of {prog} to {event}: {e}")))?;
        Ok(())
    }

    /// Detaches `set`'s links pinned under `dir`. The kernel waits for RCU grace periods
    /// per link: they are released from parallel threads (about 2 s in all for the
    /// syscall programs here).
    pub fn detach_pinned(dir: &Path, set: HookSet) {
        let links = dir.join(set.links_dir());
        let owned: Vec<FdLink> = std::fs::read_dir(&links)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let link = PinnedLink::from_pin(e.path());
                match link.map(|l| l.unpin()) {
                    Ok(Ok(fd)) => Some(fd),
                    _ => {
                        // Not a link any more (or unreadable): removing the pin releases it.
                        let _ = std::fs::remove_file(e.path());
                        None
                    }
                }
            })
            .collect();
        std::thread::scope(|scope| {
            for link in owned {
                scope.spawn(move || drop(link));
            }
        });
        let _ = std::fs::remove_dir(&links);
    }

    /// The on-demand program `name`: the loaded one, or the one pinned under `dir`.
    fn pinnable_program(&mut self, dir: &Path, name: &'static str) -> Result<&mut TracePoint> {
        if self.ebpf.is_some() {
            return Ok(self.tracepoint(name));
        }
        if !self.pinned_programs.contains_key(name) {
            let path = dir.join(PROGS).join(name);
            let p = TracePoint::from_pin(&path).map_err(refused(name, "take back from its pin"))?;
            self.pinned_programs.insert(name, p);
        }
        Ok(self.pinned_programs.get_mut(name).expect("inserted above"))
    }
}
