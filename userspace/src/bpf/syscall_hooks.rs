//! The syscall programs of a pinned [`Probe`] (the daemon's), attached only while some
//! branch asks for per-write detail: any program on a syscall tracepoint sends every task
//! on the host down the kernel's slower syscall path, so a host whose branches want no
//! per-write detail pays nothing for them.
//!
//! The links are pinned one by one under `<pin dir>/syscall-links/N`, so they survive a
//! daemon restart like the rest; the programs are pinned under `<pin dir>/progs/NAME` by
//! [`Probe::pin`], so an adopted probe can attach them again.

use std::path::Path;

use aya::programs::{
    TracePoint,
    links::{FdLink, PinnedLink},
};

use super::probe::{
    PROGS, Probe, SYSCALL_LINKS, SYSCALL_PROGRAMS, pinnable, refused, syscall_tracepoints,
};
use crate::error::{Error, Result};

/// Whether the syscall programs are attached (see [`Probe::syscall_hooks`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyscallHooks {
    /// None is attached.
    Detached,
    /// Every tracepoint this kernel has is attached.
    Attached,
    /// Some are (a daemon died while attaching or detaching them).
    Partial,
}

impl Probe {
    /// The state of the syscall links pinned under `dir`.
    pub fn syscall_hooks(dir: &Path) -> SyscallHooks {
        let pinned = std::fs::read_dir(dir.join(SYSCALL_LINKS))
            .map(|d| d.count())
            .unwrap_or(0);
        match pinned {
            0 => SyscallHooks::Detached,
            n if n == syscall_tracepoints().0.len() => SyscallHooks::Attached,
            _ => SyscallHooks::Partial,
        }
    }

    /// Attaches the syscall programs to every `sys_exit_*` tracepoint this kernel has and
    /// pins each link under `dir` (the directory [`Probe::pin`] used). On an error,
    /// whatever was attached is detached again.
    pub fn attach_syscalls_pinned(&mut self, dir: &Path) -> Result<()> {
        let links = dir.join(SYSCALL_LINKS);
        std::fs::create_dir_all(&links).map_err(|e| Error::Io {
            path: links.clone(),
            cause: e,
        })?;
        let (present, missing) = syscall_tracepoints();
        self.missing_tracepoints = missing;
        for (n, (prog, event)) in present.into_iter().enumerate() {
            if let Err(e) = self.attach_one(dir, prog, &event, &links.join(n.to_string())) {
                Self::detach_syscalls_pinned(dir);
                return Err(e);
            }
        }
        Ok(())
    }

    fn attach_one(
        &mut self,
        dir: &Path,
        prog: &'static str,
        event: &str,
        pin: &Path,
    ) -> Result<()> {
        let program = self.syscall_program(dir, prog)?;
        let id = program
            .attach("syscalls", event)
            .map_err(refused(prog, event))?;
        let link = program.take_link(id).map_err(refused(prog, "pin"))?;
        let link = pinnable(prog, FdLink::try_from(link))?;
        link.pin(pin)
            .map_err(|e| Error::Btf(format!("pinning the link of {prog} to {event}: {e}")))?;
        Ok(())
    }

    /// Detaches the syscall links pinned under `dir`. The kernel waits for RCU grace
    /// periods per link: they are released from parallel threads (about 2 s in all here).
    pub fn detach_syscalls_pinned(dir: &Path) {
        let links = dir.join(SYSCALL_LINKS);
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

    /// The syscall program `name`: the loaded one, or the one pinned under `dir`.
    fn syscall_program(&mut self, dir: &Path, name: &'static str) -> Result<&mut TracePoint> {
        if self.ebpf.is_some() {
            return Ok(self.tracepoint(name));
        }
        if !self.pinned_programs.contains_key(name) {
            debug_assert!(SYSCALL_PROGRAMS.contains(&name));
            let path = dir.join(PROGS).join(name);
            let p = TracePoint::from_pin(&path).map_err(refused(name, "take back from its pin"))?;
            self.pinned_programs.insert(name, p);
        }
        Ok(self.pinned_programs.get_mut(name).expect("inserted above"))
    }
}
