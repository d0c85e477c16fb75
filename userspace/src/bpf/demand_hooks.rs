//! The programs of a pinned [`Probe`] (the daemon's) that cost every process on the host
//! while attached, attached only while some branch needs them ([`HookSet`]):
//!
//! - the syscall dispatcher ([`HookSet::Syscalls`], one program on the raw `sys_exit`
//!   tracepoint), while a branch asks for per-write detail: a program there sends every
//!   task on the host down the kernel's slower syscall path and runs for each syscall;
//! - the page-fault program ([`HookSet::PageFaults`], on the raw `page_fault_user` and
//!   `page_fault_kernel` tracepoints), while any branch is traced: every page fault on the
//!   host runs it (a cgroup check each).
//!
//! The links are pinned one by one under `<pin dir>/<set>-links/N`, so they survive a
//! daemon restart like the rest; the programs are pinned under `<pin dir>/progs/NAME` by
//! [`Probe::pin`], so an adopted probe can attach them again.

use std::path::Path;

use aya::programs::{
    BtfTracePoint, RawTracePoint,
    links::{FdLink, PinnedLink},
};

use super::probe::{PROGS, Probe, refused};
use crate::error::{Error, Result};

/// A set of programs attached on demand (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HookSet {
    Syscalls,
    PageFaults,
}

/// An on-demand program taken back from its pin.
pub(super) enum DemandProgram {
    /// The syscall dispatcher (`tp_btf/sys_exit`).
    Typed(BtfTracePoint),
    /// The page-fault program.
    Raw(RawTracePoint),
}

/// The syscall dispatcher and its (typed) raw tracepoint.
const SYSCALL_PROGRAM: &str = "syscall_exit";
const SYSCALL_ATTACHMENTS: [(&str, &str); 1] = [(SYSCALL_PROGRAM, "sys_exit")];

/// The page-fault program and its raw tracepoints.
const PAGE_FAULT_PROGRAM: &str = "page_fault";
const PAGE_FAULT_ATTACHMENTS: [(&str, &str); 2] = [
    (PAGE_FAULT_PROGRAM, "page_fault_user"),
    (PAGE_FAULT_PROGRAM, "page_fault_kernel"),
];

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
            HookSet::Syscalls => &[SYSCALL_PROGRAM],
            HookSet::PageFaults => &[PAGE_FAULT_PROGRAM],
        }
    }

    /// The (program, raw tracepoint) pairs to attach.
    pub(super) fn attachments(self) -> &'static [(&'static str, &'static str)] {
        match self {
            HookSet::Syscalls => &SYSCALL_ATTACHMENTS,
            HookSet::PageFaults => &PAGE_FAULT_ATTACHMENTS,
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
    /// Every one of its tracepoints is attached.
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
            n if n == set.attachments().len() => HooksState::Attached,
            _ => HooksState::Partial,
        }
    }

    /// Attaches `set`'s programs to its tracepoints and pins each link under `dir` (the
    /// directory [`Probe::pin`] used). On an error, whatever was attached is detached again.
    pub fn attach_pinned(&mut self, dir: &Path, set: HookSet) -> Result<()> {
        let links = dir.join(set.links_dir());
        std::fs::create_dir_all(&links).map_err(|e| Error::Io {
            path: links.clone(),
            cause: e,
        })?;
        for (n, &(prog, tracepoint)) in set.attachments().iter().enumerate() {
            let pin = links.join(n.to_string());
            if let Err(e) = self.attach_one(dir, prog, tracepoint, &pin) {
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
        tracepoint: &str,
        pin: &Path,
    ) -> Result<()> {
        let link: FdLink = match self.pinnable_program(dir, prog)? {
            Pinnable::Typed(p) => {
                let id = p.attach().map_err(refused(prog, tracepoint))?;
                p.take_link(id).map_err(refused(prog, "pin"))?.into()
            }
            Pinnable::Raw(p) => {
                let id = p.attach(tracepoint).map_err(refused(prog, tracepoint))?;
                p.take_link(id).map_err(refused(prog, "pin"))?.into()
            }
        };
        link.pin(pin)
            .map_err(|e| Error::Btf(format!("pinning the link of {prog} to {tracepoint}: {e}")))?;
        Ok(())
    }

    /// Detaches `set`'s links pinned under `dir` (released from parallel threads; each
    /// took well under a millisecond here).
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
    fn pinnable_program(&mut self, dir: &Path, name: &'static str) -> Result<Pinnable<'_>> {
        let typed = name == SYSCALL_PROGRAM;
        if self.ebpf.is_some() {
            return Ok(if typed {
                Pinnable::Typed(self.btf_program(name))
            } else {
                Pinnable::Raw(self.raw_program(name))
            });
        }
        if !self.pinned_programs.contains_key(name) {
            let path = dir.join(PROGS).join(name);
            let taken = refused(name, "take back from its pin");
            let p = if typed {
                DemandProgram::Typed(BtfTracePoint::from_pin(&path).map_err(taken)?)
            } else {
                DemandProgram::Raw(RawTracePoint::from_pin(&path).map_err(taken)?)
            };
            self.pinned_programs.insert(name, p);
        }
        Ok(
            match self.pinned_programs.get_mut(name).expect("inserted above") {
                DemandProgram::Typed(p) => Pinnable::Typed(p),
                DemandProgram::Raw(p) => Pinnable::Raw(p),
            },
        )
    }
}

/// An on-demand program, borrowed to be attached.
enum Pinnable<'a> {
    Typed(&'a mut BtfTracePoint),
    Raw(&'a mut RawTracePoint),
}
