//! Running system calls inside another process with ptrace (x86_64), the way CRIU's compel
//! does: seize and stop the process, point its instruction pointer at a `syscall`
//! instruction of its vDSO with the call's number and arguments in its registers, single-step
//! it, read the result, and put its registers back when done.
//!
//! The process is held in a ptrace stop for the whole time and its signals are blocked (they
//! stay pending and arrive after the detach). A system call it was blocked in when it was
//! stopped restarts when it resumes, as after any ptrace stop: its saved registers carry the
//! kernel's restart state.

use std::{fs::File, io::Read, os::unix::fs::FileExt};

use nix::{
    errno::Errno,
    sys::{
        ptrace::{self, Options},
        signal::Signal,
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
    unistd::Pid,
};

use crate::error::{Error, Result};

/// `PTRACE_EVENT_STOP` (a stop from `PTRACE_INTERRUPT`, or a new auto-attached clone).
const EVENT_STOP: i32 = 128;
/// `PTRACE_GETSIGMASK` / `PTRACE_SETSIGMASK`.
const GETSIGMASK: libc::c_uint = 0x420a;
const SETSIGMASK: libc::c_uint = 0x420b;
/// `PTRACE_O_SUSPEND_SECCOMP` (nix does not name it): the branch's seccomp filter refuses
/// the setns and clone3 the clone needs.
const SUSPEND_SECCOMP: libc::c_int = 1 << 21;
/// `AT_SYSINFO_EHDR`: where the vDSO is mapped.
const AT_SYSINFO_EHDR: u64 = 33;
/// Bytes below the stack pointer left alone: the x86_64 red zone, with margin.
const RED_ZONE: u64 = 256;

/// A process held in a ptrace stop, into which system calls can be injected.
pub struct Tracee {
    pub pid: Pid,
    /// Its registers and signal mask when it was stopped, put back by [`Tracee::detach`].
    saved: libc::user_regs_struct,
    saved_mask: u64,
    /// Address of a `syscall` instruction in its vDSO.
    syscall_at: u64,
    /// Its memory (readable and writable while it is traced).
    mem: File,
    /// A signal that arrived during an injection, delivered at detach.
    pending: Option<Signal>,
    detached: bool,
}

fn ptrace_err(what: &str, pid: Pid) -> impl Fn(Errno) -> Error + '_ {
    move |e| match e {
        Errno::ESRCH => Error::Sandbox(format!("process {pid} exited during the fork ({what})")),
        e => Error::Sandbox(format!("{what} of process {pid}: {e}")),
    }
}

impl Tracee {
    /// Seizes `pid` and stops it (this works on a frozen process too). Clones it makes are
    /// attached too, and seccomp is suspended for it while it is traced.
    pub fn seize(pid: Pid) -> Result<Tracee> {
        let opts = Options::PTRACE_O_TRACECLONE | Options::from_bits_retain(SUSPEND_SECCOMP);
        ptrace::seize(pid, opts).map_err(|e| match e {
            Errno::EPERM => Error::Sandbox(format!(
                "process {pid} cannot be attached (already traced by a debugger?)"
            )),
            e => ptrace_err("PTRACE_SEIZE", pid)(e),
        })?;
        let undo = |e: Error| {
            let _ = ptrace::detach(pid, None);
            e
        };
        ptrace::interrupt(pid)
            .map_err(ptrace_err("PTRACE_INTERRUPT", pid))
            .map_err(undo)?;
        Self::wait_event_stop(pid).map_err(undo)?;
        Self::held(pid).map_err(undo)
    }

    /// Takes hold of a clone that was attached at birth (`PTRACE_O_TRACECLONE`).
    pub fn adopt_clone(pid: Pid) -> Result<Tracee> {
        Self::wait_event_stop(pid)?;
        Self::held(pid)
    }

    fn wait_event_stop(pid: Pid) -> Result<()> {
        loop {
            match waitpid(pid, Some(WaitPidFlag::__WALL)) {
                Ok(WaitStatus::PtraceEvent(_, _, EVENT_STOP)) => return Ok(()),
                // A signal that was on its way: keep it for later, wait for the stop.
                Ok(WaitStatus::Stopped(_, sig)) => {
                    ptrace::cont(pid, Some(sig)).map_err(ptrace_err("PTRACE_CONT", pid))?
                }
                Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => {
                    return Err(Error::Sandbox(format!(
                        "process {pid} exited during the fork"
                    )));
                }
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(ptrace_err("waitpid", pid)(e)),
            }
        }
    }

    fn held(pid: Pid) -> Result<Tracee> {
        let saved = ptrace::getregs(pid).map_err(ptrace_err("PTRACE_GETREGS", pid))?;
        let mut saved_mask = 0u64;
        // SAFETY: PTRACE_GETSIGMASK writes 8 bytes (the sigset size given) into `saved_mask`.
        let r = unsafe {
            libc::ptrace(
                GETSIGMASK,
                pid.as_raw(),
                std::mem::size_of::<u64>(),
                &mut saved_mask as *mut u64,
            )
        };
        if r < 0 {
            return Err(ptrace_err("PTRACE_GETSIGMASK", pid)(Errno::last()));
        }
        // Block everything that can be blocked while it runs injected calls.
        set_sigmask(pid, !0u64)?;
        let mem_path = format!("/proc/{pid}/mem");
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&mem_path)
            .map_err(|e| Error::Sandbox(format!("{mem_path}: {e}")))?;
        let syscall_at = find_vdso_syscall(pid, &mem)?;
        Ok(Tracee {
            pid,
            saved,
            saved_mask,
            syscall_at,
            mem,
            pending: None,
            detached: false,
        })
    }

    /// Its registers as they were when it was stopped.
    pub fn saved_regs(&self) -> libc::user_regs_struct {
        self.saved
    }

    /// Its signal mask as it was when it was stopped.
    pub fn saved_mask(&self) -> u64 {
        self.saved_mask
    }

    /// Makes this process resume, at detach, from `regs` and `mask` (a clone resumes from
    /// its original's state).
    pub fn resume_from(&mut self, regs: libc::user_regs_struct, mask: u64) {
        self.saved = regs;
        self.saved_mask = mask;
    }

    /// Writes `strings` (each NUL-terminated) into unused stack below the red zone and
    /// returns their addresses.
    pub fn scratch_strings(&self, strings: &[&[u8]]) -> Result<Vec<u64>> {
        let mut at = self.saved.rsp - RED_ZONE;
        let mut addrs = Vec::new();
        for s in strings {
            at = (at - s.len() as u64 - 1) & !15;
            let mut bytes = s.to_vec();
            bytes.push(0);
            self.mem
                .write_all_at(&bytes, at)
                .map_err(|e| Error::Sandbox(format!("writing into process {}: {e}", self.pid)))?;
            addrs.push(at);
        }
        Ok(addrs)
    }

    /// Writes `bytes` into unused stack (below any strings written) and returns the address.
    pub fn scratch_bytes(&self, bytes: &[u8], below: u64) -> Result<u64> {
        let at = (below - bytes.len() as u64 - 64) & !15;
        self.mem
            .write_all_at(bytes, at)
            .map_err(|e| Error::Sandbox(format!("writing into process {}: {e}", self.pid)))?;
        Ok(at)
    }

    /// Runs system call `nr` with `args` in the process; returns its raw result (a negative
    /// errno on failure). `on_clone` is called with the pid of a process the call cloned.
    pub fn syscall_with(
        &mut self,
        nr: i64,
        args: &[u64],
        mut on_clone: impl FnMut(Pid),
    ) -> Result<i64> {
        let mut regs = self.saved;
        regs.rip = self.syscall_at;
        regs.rax = nr as u64;
        regs.orig_rax = u64::MAX; // not in a system call: nothing to restart
        let a = |i: usize| args.get(i).copied().unwrap_or(0);
        (regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9) =
            (a(0), a(1), a(2), a(3), a(4), a(5));
        let pid = self.pid;
        ptrace::setregs(pid, regs).map_err(ptrace_err("PTRACE_SETREGS", pid))?;
        ptrace::step(pid, None).map_err(ptrace_err("PTRACE_SINGLESTEP", pid))?;
        loop {
            match waitpid(pid, Some(WaitPidFlag::__WALL)) {
                Ok(WaitStatus::Stopped(_, Signal::SIGTRAP)) => break,
                Ok(WaitStatus::PtraceEvent(_, _, ev)) if ev == libc::PTRACE_EVENT_CLONE => {
                    let child = ptrace::getevent(pid).map_err(ptrace_err("GETEVENTMSG", pid))?;
                    on_clone(Pid::from_raw(child as i32));
                    ptrace::step(pid, None).map_err(ptrace_err("PTRACE_SINGLESTEP", pid))?;
                }
                Ok(WaitStatus::Stopped(_, sig)) => {
                    // SIGSTOP or another signal that cannot be blocked: deliver it later.
                    self.pending = Some(sig);
                    let now = ptrace::getregs(pid).map_err(ptrace_err("PTRACE_GETREGS", pid))?;
                    if now.rip == self.syscall_at {
                        ptrace::setregs(pid, regs).map_err(ptrace_err("PTRACE_SETREGS", pid))?;
                    }
                    ptrace::step(pid, None).map_err(ptrace_err("PTRACE_SINGLESTEP", pid))?;
                }
                Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => {
                    self.detached = true;
                    return Err(Error::Sandbox(format!(
                        "process {pid} was killed during the fork"
                    )));
                }
                Ok(_) => {
                    ptrace::step(pid, None).map_err(ptrace_err("PTRACE_SINGLESTEP", pid))?;
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(ptrace_err("waitpid", pid)(e)),
            }
        }
        let after = ptrace::getregs(pid).map_err(ptrace_err("PTRACE_GETREGS", pid))?;
        Ok(after.rax as i64)
    }

    /// Runs system call `nr` with `args`; returns its result.
    pub fn syscall(&mut self, nr: i64, args: &[u64]) -> Result<i64> {
        self.syscall_with(nr, args, |_| {})
    }

    /// Like [`Tracee::syscall`], failing with `what` and the errno on a negative result.
    pub fn call(&mut self, what: &str, nr: i64, args: &[u64]) -> Result<i64> {
        let r = self.syscall(nr, args)?;
        if r < 0 {
            return Err(Error::Sandbox(format!(
                "{what} in process {}: {}",
                self.pid,
                Errno::from_raw(-r as i32).desc()
            )));
        }
        Ok(r)
    }

    /// Puts its registers and signal mask back and lets it go.
    pub fn detach(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        if self.detached {
            return Ok(());
        }
        self.detached = true;
        let pid = self.pid;
        let regs = ptrace::setregs(pid, self.saved).map_err(ptrace_err("PTRACE_SETREGS", pid));
        let mask = set_sigmask(pid, self.saved_mask);
        ptrace::detach(pid, self.pending).map_err(ptrace_err("PTRACE_DETACH", pid))?;
        regs.and(mask)
    }
}

impl Drop for Tracee {
    /// A tracee is never left stopped, nor at an injected instruction.
    fn drop(&mut self) {
        let _ = self.release();
    }
}

fn set_sigmask(pid: Pid, mask: u64) -> Result<()> {
    // SAFETY: PTRACE_SETSIGMASK reads 8 bytes (the sigset size given) from `mask`.
    let r = unsafe {
        libc::ptrace(
            SETSIGMASK,
            pid.as_raw(),
            std::mem::size_of::<u64>(),
            &mask as *const u64,
        )
    };
    if r < 0 {
        return Err(ptrace_err("PTRACE_SETSIGMASK", pid)(Errno::last()));
    }
    Ok(())
}

/// The address of a `syscall` instruction (0f 05) in `pid`'s vDSO.
fn find_vdso_syscall(pid: Pid, mem: &File) -> Result<u64> {
    let auxv_path = format!("/proc/{pid}/auxv");
    let mut auxv = Vec::new();
    File::open(&auxv_path)
        .and_then(|mut f| f.read_to_end(&mut auxv))
        .map_err(|e| Error::Sandbox(format!("{auxv_path}: {e}")))?;
    let base = auxv
        .chunks_exact(16)
        .map(|c| {
            (
                u64::from_ne_bytes(c[..8].try_into().expect("8 bytes")),
                u64::from_ne_bytes(c[8..].try_into().expect("8 bytes")),
            )
        })
        .find(|(k, _)| *k == AT_SYSINFO_EHDR)
        .map(|(_, v)| v)
        .ok_or_else(|| Error::Sandbox(format!("process {pid} has no vDSO")))?;
    let mut code = vec![0u8; 8192];
    let n = mem
        .read_at(&mut code, base)
        .map_err(|e| Error::Sandbox(format!("reading the vDSO of process {pid}: {e}")))?;
    code[..n]
        .windows(2)
        .position(|w| w == [0x0f, 0x05])
        .map(|i| base + i as u64)
        .ok_or_else(|| Error::Sandbox(format!("no syscall instruction in process {pid}'s vDSO")))
}
