//! Running system calls inside another process with ptrace (x86_64), the way CRIU's compel
//! does: seize and stop the process, point its instruction pointer at a `syscall`
//! instruction of its vDSO with the call's number and arguments in its registers, single-step
//! it, read the result, and put its registers back when done.
//!
//! The process is held in a ptrace stop for the whole time and its signals are blocked (they
//! stay pending and arrive after the detach). A system call it was blocked in when it was
//! stopped restarts when it resumes, as after any ptrace stop: its saved registers carry the
//! kernel's restart state.
//!
//! **If the daemon dies mid-injection**, the kernel detaches the process where it stands.
//! So where the process has glibc, each call runs at a `syscall; ret` of its libc with the
//! stack pointer on a signal frame written below its stack (CRIU's parasite does the same):
//! after the call, `ret` lands on glibc's `__restore_rt`, and `rt_sigreturn` puts back the
//! process's registers, signal mask and x87/SSE state as they were when it was stopped (AVX
//! upper halves are reset; a system call it was blocked in is entered again, except that a
//! sleep's restart block is lost, so a nanosleep or a poll with a timeout returns EINTR). A
//! second frame below it holds an `exit_group`: a clone is born with its stack pointer on
//! that one ([`Tracee::exit_frame`]), so a clone cut off at any instant before it was set up
//! ends itself. Without glibc, calls run at a `syscall` of the vDSO and that safety net is
//! missing. What the calls already did stays done (see `crate::procfork::clone`).
//!
//! A process that may die with the daemon (a clone not yet set up) can take many calls in
//! one stop instead: see [`batch`].

mod batch;

pub use batch::{Arg, Batch};

use std::{fs::File, io::Read, os::unix::fs::FileExt};

use nix::{
    errno::Errno,
    sched::{CpuSet, sched_getaffinity, sched_setaffinity},
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
/// `PTRACE_GETFPREGS`: the FXSAVE area (512 bytes).
const GETFPREGS: libc::c_uint = 14;
/// `struct rt_sigframe` on x86_64: return address (8), `ucontext` (304), `siginfo` (128).
const FRAME_SIZE: u64 = 440;
/// Offsets in the frame: `uc.uc_flags`, `uc.uc_stack`, `uc.uc_mcontext`, `uc.uc_sigmask`.
const UC_FLAGS: u64 = 8;
const UC_STACK: u64 = 24;
const UC_MCONTEXT: u64 = 48;
const UC_SIGMASK: u64 = 304;
/// `UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS`: restore the stack segment exactly.
const UC_SS_FLAGS: u64 = 0x2 | 0x4;
/// `SS_DISABLE` for `stack_t.ss_flags`.
const SS_DISABLE: u32 = 2;
/// Restart codes a system call interrupted by the stop returns (see `arch_do_signal_or_restart`).
const ERESTARTSYS: i64 = -512;
const ERESTARTNOINTR: i64 = -513;
const ERESTARTNOHAND: i64 = -514;
const ERESTART_RESTARTBLOCK: i64 = -516;

/// Code of the process's libc that makes injection safe (see the module doc).
#[derive(Clone, Copy, Debug)]
pub struct Gadgets {
    /// `syscall; ret`.
    syscall_ret: u64,
    /// `__restore_rt`: `mov $15, %rax; syscall`.
    restore_rt: u64,
}

/// The safety net's frames in a process (see the module doc).
#[derive(Clone, Copy, Debug)]
struct Net {
    gadgets: Gadgets,
    /// The frame injected calls return onto: it puts the process back as it was stopped
    /// (in a clone: the exit frame).
    frame: u64,
    /// The frame that ends the process.
    exit_frame: u64,
}

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
    /// The safety net (see the module doc), once [`Tracee::arm`] has written its frames.
    net: Option<Net>,
    /// libc's gadgets, found at seize time.
    gadgets: Option<Gadgets>,
    /// Calls are single-stepped (a clone) rather than stopped at entry and exit.
    by_steps: bool,
    /// Whether its signals are blocked for injected calls.
    blocked: bool,
    /// The CPUs it is given when it is let go, if not the ones it has (see
    /// [`Tracee::cpus_at_release`]).
    cpus_at_release: Option<CpuSet>,
}

fn ptrace_err(what: &str, pid: Pid) -> impl Fn(Errno) -> Error + '_ {
    move |e| match e {
        Errno::ESRCH => gone_mid_fork(pid, &format!("exited during the fork ({what})")),
        e => Error::Sandbox(format!("{what} of process {pid}: {e}")),
    }
}

/// A process of the branch (or its clone) that died while it was being forked: the branch
/// changed under the fork (HTTP 409), which was undone.
pub(crate) fn gone_mid_fork(pid: Pid, how: &str) -> Error {
    Error::Conflict(format!(
        "process {pid} {how}: nothing was forked; fork again"
    ))
}

impl Tracee {
    /// Seizes `pid` and stops it (this works on a frozen process too). Clones it makes are
    /// attached too, and seccomp is suspended for it while it is traced.
    pub fn seize(pid: Pid) -> Result<Tracee> {
        let opts = Options::PTRACE_O_TRACECLONE
            | Options::PTRACE_O_TRACESYSGOOD
            | Options::from_bits_retain(SUSPEND_SECCOMP);
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
        Self::held_with(pid, None, true).map_err(undo)
    }

    /// Seizes and stops `tid`, another thread of `leader`'s process (same vDSO). Its only
    /// injected call is the question of its alternate signal stack
    /// ([`Tracee::alt_stack`]), made through its system-call stops.
    pub fn seize_thread(tid: Pid, leader: &Tracee) -> Result<Tracee> {
        let opts = Options::PTRACE_O_TRACESYSGOOD | Options::from_bits_retain(SUSPEND_SECCOMP);
        ptrace::seize(tid, opts).map_err(ptrace_err("PTRACE_SEIZE", tid))?;
        let undo = |e: Error| {
            let _ = ptrace::detach(tid, None);
            e
        };
        ptrace::interrupt(tid)
            .map_err(ptrace_err("PTRACE_INTERRUPT", tid))
            .map_err(undo)?;
        Self::wait_event_stop(tid).map_err(undo)?;
        let mut t = Self::held_with(tid, Some(leader.syscall_at), false).map_err(undo)?;
        t.by_steps = false;
        Ok(t)
    }

    /// Its alternate signal stack (a `stack_t`), if it has one, asked with one injected
    /// call. The process must not be frozen.
    pub fn alt_stack(&mut self) -> Result<Option<[u8; 24]>> {
        let at = (self.scratch_top() - 64) & !15;
        let mut stack = [0u8; 24];
        if self.syscall(libc::SYS_sigaltstack, &[0, at])? != 0 {
            return Ok(None);
        }
        self.read_at(&mut stack, at)?;
        let flags = u32::from_ne_bytes(stack[8..12].try_into().expect("4 bytes"));
        Ok((flags & SS_DISABLE == 0).then_some(stack))
    }

    /// Reads its memory at `at`.
    pub fn read_at(&self, buf: &mut [u8], at: u64) -> Result<()> {
        self.mem
            .read_exact_at(buf, at)
            .map_err(|e| Error::Sandbox(format!("reading process {}: {e}", self.pid)))
    }

    /// Takes hold of a clone of `original` that was attached at birth
    /// (`PTRACE_O_TRACECLONE`), born with its stack pointer on the exit frame
    /// ([`Tracee::exit_frame`], a copy of the original's in its own memory, or its own for a
    /// thread it made): calls injected into it return onto that frame, so it ends itself
    /// should it be cut off before it is set up.
    pub fn adopt_clone(pid: Pid, original: &Tracee) -> Result<Tracee> {
        Self::wait_event_stop(pid)?;
        // Its memory is the original's: same vDSO, same libc.
        let mut t = Self::held_with(pid, Some(original.syscall_at), false)?;
        t.net = original.net.map(|n| Net {
            frame: n.exit_frame,
            ..n
        });
        // Its original's CPUs, which a cpuset of the cgroup it was born in may have changed.
        t.cpus_at_release = original.cpus().ok();
        Ok(t)
    }

    /// The CPUs it may run on (its own: each thread has its set).
    pub fn cpus(&self) -> Result<CpuSet> {
        sched_getaffinity(self.pid).map_err(ptrace_err("sched_getaffinity", self.pid))
    }

    /// Makes its release give it `cpus` instead of its original's (a thread made again in a
    /// clone: its original thread's, not those of the thread that made it).
    pub fn cpus_at_release(&mut self, cpus: CpuSet) {
        self.cpus_at_release = Some(cpus);
    }

    /// Points a held process without the safety net (no glibc) at an `exit_group(1)` on its
    /// vDSO's `syscall` instruction, now and between injected calls: a clone let go before
    /// it is set up then ends itself. [`Tracee::resume_from`] sets what it resumes from.
    pub fn park_on_exit(&mut self) -> Result<()> {
        let exit = exit_at(self.saved, self.syscall_at);
        ptrace::setregs(self.pid, exit).map_err(ptrace_err("PTRACE_SETREGS", self.pid))?;
        self.saved = exit;
        Ok(())
    }

    /// The frame that ends the process (see the module doc), once [`Tracee::arm`] wrote it:
    /// a clone made with its stack pointer there ends itself if it is let go before it is
    /// set up.
    pub fn exit_frame(&self) -> Option<u64> {
        self.net.map(|n| n.exit_frame)
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
                    return Err(gone_mid_fork(pid, "exited during the fork"));
                }
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(ptrace_err("waitpid", pid)(e)),
            }
        }
    }

    /// Reads the stopped process's state. `syscall_at`: its vDSO's `syscall`, if known;
    /// `with_net`: look for libc's gadgets (an original, not a clone).
    fn held_with(pid: Pid, syscall_at: Option<u64>, with_net: bool) -> Result<Tracee> {
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
        let mem_path = format!("/proc/{pid}/mem");
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&mem_path)
            .map_err(|e| Error::Sandbox(format!("{mem_path}: {e}")))?;
        let syscall_at = match syscall_at {
            Some(at) => at,
            None => find_vdso_syscall(pid, &mem)?,
        };
        let mut t = Tracee {
            pid,
            saved,
            saved_mask,
            syscall_at,
            mem,
            pending: None,
            detached: false,
            net: None,
            gadgets: None,
            by_steps: !with_net,
            blocked: false,
            cpus_at_release: None,
        };
        if with_net {
            t.gadgets = find_gadgets(pid, &t.mem);
        }
        Ok(t)
    }

    /// Writes the safety net's frame (see the module doc), so that from now on a daemon
    /// crash leaves the process as it was stopped. It takes one injected call: the process
    /// must not be frozen.
    pub fn arm(&mut self) -> Result<()> {
        match (self.gadgets, self.net) {
            (Some(g), None) => self.spread_net(g),
            _ => Ok(()),
        }
    }

    /// Writes the signal frame that restores the process as it was stopped (see the module
    /// doc) and makes later calls run at libc's `syscall; ret` with the stack on it.
    fn spread_net(&mut self, g: Gadgets) -> Result<()> {
        // Its alternate signal stack, which rt_sigreturn sets again from the frame: asked
        // with one call made the plain way (the frame is not there yet), before the scratch
        // space that call uses holds the FXSAVE area.
        let stack = self.alt_stack()?.unwrap_or_else(|| {
            let mut disabled = [0u8; 24];
            disabled[8..12].copy_from_slice(&SS_DISABLE.to_ne_bytes());
            disabled
        });
        // The FXSAVE area (64-aligned) just below the red zone, the frame below it.
        let fx = (self.saved.rsp - RED_ZONE - 512) & !63;
        let frame = (fx - FRAME_SIZE - 64) & !15;
        let mut fpregs = [0u8; 512];
        // SAFETY: PTRACE_GETFPREGS writes a 512-byte user_fxsr_struct into `fpregs`.
        let got = unsafe {
            libc::ptrace(
                GETFPREGS,
                self.pid.as_raw(),
                0,
                fpregs.as_mut_ptr() as *mut libc::c_void,
            )
        };
        let fpstate = if got == 0 {
            self.write(fx, &fpregs)?;
            fx
        } else {
            0 // the kernel then resets the FPU state
        };
        let mut head = vec![0u8; (UC_MCONTEXT) as usize];
        head[..8].copy_from_slice(&g.restore_rt.to_ne_bytes());
        head[UC_FLAGS as usize..UC_FLAGS as usize + 8].copy_from_slice(&UC_SS_FLAGS.to_ne_bytes());
        head[UC_STACK as usize..UC_STACK as usize + 24].copy_from_slice(&stack);
        self.write(frame, &head)?;
        let resume = restarted(self.saved);
        self.write_mcontext(frame, &resume, fpstate)?;
        self.write(frame + UC_SIGMASK, &self.saved_mask.to_ne_bytes())?;
        self.write(frame + UC_SIGMASK + 8, &[0u8; 128])?;
        // The exit frame below it: the same head, registers that run exit_group(1), every
        // signal blocked, no FPU state.
        let exit_frame = (frame - FRAME_SIZE - 64) & !15;
        self.write(exit_frame, &head)?;
        self.write_mcontext(exit_frame, &exit_at(self.saved, g.syscall_ret), 0)?;
        self.write(exit_frame + UC_SIGMASK, &(!0u64).to_ne_bytes())?;
        self.write(exit_frame + UC_SIGMASK + 8, &[0u8; 128])?;
        self.net = Some(Net {
            gadgets: g,
            frame,
            exit_frame,
        });
        Ok(())
    }

    /// Writes `regs` as the frame's `uc_mcontext` (a `struct sigcontext`).
    fn write_mcontext(&self, frame: u64, r: &libc::user_regs_struct, fpstate: u64) -> Result<()> {
        let seg = (r.cs & 0xffff)
            | ((r.gs & 0xffff) << 16)
            | ((r.fs & 0xffff) << 32)
            | ((r.ss & 0xffff) << 48);
        let words: [u64; 32] = [
            r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15, r.rdi, r.rsi, r.rbp, r.rbx,
            r.rdx, r.rax, r.rcx, r.rsp, r.rip, r.eflags, seg, 0, 0, 0, 0, fpstate, 0, 0, 0, 0, 0,
            0, 0, 0,
        ];
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        self.write(frame + UC_MCONTEXT, &bytes)
    }

    fn write(&self, at: u64, bytes: &[u8]) -> Result<()> {
        self.mem
            .write_all_at(bytes, at)
            .map_err(|e| Error::Sandbox(format!("writing into process {}: {e}", self.pid)))
    }

    /// Where scratch data may go: below the frames, or below the red zone.
    fn scratch_top(&self) -> u64 {
        match self.net {
            Some(n) => n.exit_frame.min(n.frame) - 64,
            None => self.saved.rsp - RED_ZONE,
        }
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
        let mut at = self.scratch_top();
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
        fault_point(nr, self.pid);
        // Everything that can be blocked is, while it runs an injected call. Without the
        // safety net the mask is put back after each call; with it, it stays blocked (the
        // frame restores it, should the daemon die).
        if !self.blocked {
            set_sigmask(self.pid, !0u64)?;
            self.blocked = true;
        }
        let mut regs = self.saved;
        regs.rip = self.syscall_at;
        if let Some(n) = self.net {
            regs.rip = n.gadgets.syscall_ret;
            regs.rsp = n.frame;
        }
        regs.rax = nr as u64;
        regs.orig_rax = u64::MAX; // not in a system call: nothing to restart
        let a = |i: usize| args.get(i).copied().unwrap_or(0);
        (regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9) =
            (a(0), a(1), a(2), a(3), a(4), a(5));
        let pid = self.pid;
        // A clone is single-stepped (fast). An original is taken through the call's entry
        // and exit stops instead: a single-step leaves the trap flag forced on between calls,
        // and a process the kernel lets go there (the daemon died) would die of the SIGTRAP.
        let by_steps = self.by_steps;
        let resume = move || {
            if by_steps {
                ptrace::step(pid, None).map_err(ptrace_err("PTRACE_SINGLESTEP", pid))
            } else {
                ptrace::syscall(pid, None).map_err(ptrace_err("PTRACE_SYSCALL", pid))
            }
        };
        ptrace::setregs(pid, regs).map_err(ptrace_err("PTRACE_SETREGS", pid))?;
        resume()?;
        let mut entered = false;
        loop {
            match waitpid(pid, Some(WaitPidFlag::__WALL)) {
                Ok(WaitStatus::Stopped(_, Signal::SIGTRAP)) if by_steps => break,
                Ok(WaitStatus::PtraceSyscall(_)) if !by_steps => {
                    if entered {
                        break;
                    }
                    entered = true;
                    resume()?;
                }
                Ok(WaitStatus::PtraceEvent(_, _, ev)) if ev == libc::PTRACE_EVENT_CLONE => {
                    let child = ptrace::getevent(pid).map_err(ptrace_err("GETEVENTMSG", pid))?;
                    on_clone(Pid::from_raw(child as i32));
                    resume()?;
                }
                Ok(WaitStatus::Stopped(_, sig)) => {
                    // SIGSTOP or another signal that cannot be blocked: deliver it later.
                    self.pending = Some(sig);
                    let now = ptrace::getregs(pid).map_err(ptrace_err("PTRACE_GETREGS", pid))?;
                    if now.rip == regs.rip {
                        ptrace::setregs(pid, regs).map_err(ptrace_err("PTRACE_SETREGS", pid))?;
                    }
                    resume()?;
                }
                Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => {
                    self.detached = true;
                    return Err(gone_mid_fork(pid, "was killed during the fork"));
                }
                Ok(_) => resume()?,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(ptrace_err("waitpid", pid)(e)),
            }
        }
        let after = ptrace::getregs(pid).map_err(ptrace_err("PTRACE_GETREGS", pid))?;
        if self.net.is_none() {
            // No safety net: never leave it at an injected instruction between calls.
            ptrace::setregs(pid, self.saved).map_err(ptrace_err("PTRACE_SETREGS", pid))?;
            set_sigmask(pid, self.saved_mask)?;
            self.blocked = false;
        }
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

    /// Lets the process go as [`Tracee::detach`] does, keeping this handle (detached: it
    /// can inject nothing more, and dropping it does nothing).
    pub fn let_go(&mut self) -> Result<()> {
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
        // Best effort, as reading them was: a cpuset of the child's may not hold them all.
        if let Some(cpus) = self.cpus_at_release.take()
            && let Err(e) = sched_setaffinity(pid, &cpus)
        {
            log::warn!("giving process {pid} its original's CPUs: {e}");
        }
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

/// Registers `r` made to run `exit_group(1)` at the `syscall` instruction at `syscall`.
fn exit_at(mut r: libc::user_regs_struct, syscall: u64) -> libc::user_regs_struct {
    r.rip = syscall;
    r.rax = libc::SYS_exit_group as u64;
    r.orig_rax = u64::MAX;
    r.rdi = 1;
    r
}

/// Registers to resume from, with an interrupted system call set up to restart as the
/// kernel would have on the way back to user space (rt_sigreturn does not).
fn restarted(mut r: libc::user_regs_struct) -> libc::user_regs_struct {
    if (r.orig_rax as i64) < 0 {
        return r;
    }
    match r.rax as i64 {
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
            r.rax = r.orig_rax;
            r.rip -= 2;
        }
        ERESTART_RESTARTBLOCK => {
            r.rax = libc::SYS_restart_syscall as u64;
            r.rip -= 2;
        }
        _ => {}
    }
    r.orig_rax = u64::MAX;
    r
}

/// Fault injection for tests: `FORKSCOPE_FAULT=inject-abort:N` aborts the daemon before its
/// Nth injected system call (counted over the process's life), and
/// `FORKSCOPE_FAULT=inject-abort:NR@N` before its Nth injected call of system call number
/// NR (a point that does not move when a process has a descriptor more or less).
/// `inject-kill:` instead kills the process the call is for (`pid`), once: a process that
/// dies mid-fork. `inject-wait:` instead holds the daemon there, once
/// ([`crate::fault::hold_at_gate`]): a test looks at the processes meanwhile. NR -1 is the
/// point where a batch's code has just been set running (see [`batch`]): its calls' own
/// points are passed just before.
fn fault_point(nr: i64, pid: Pid) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    #[derive(Clone, Copy, PartialEq)]
    enum Fault {
        Abort,
        Kill,
        Wait,
    }
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    type Point = Option<(Fault, Option<i64>, usize)>;
    static AT: std::sync::OnceLock<Point> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| {
        let point = std::env::var("FORKSCOPE_FAULT").ok()?;
        let (fault, point) = [
            ("inject-abort:", Fault::Abort),
            ("inject-kill:", Fault::Kill),
            ("inject-wait:", Fault::Wait),
        ]
        .into_iter()
        .find_map(|(prefix, f)| point.strip_prefix(prefix).map(|p| (f, p.to_string())))?;
        match point.split_once('@') {
            Some((nr, n)) => Some((fault, Some(nr.parse().ok()?), n.parse().ok()?)),
            None => Some((fault, None, point.parse().ok()?)),
        }
    });
    let Some((fault, only, n)) = *at else {
        return;
    };
    if only.is_some_and(|only| only != nr) {
        return;
    }
    let count = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
    match fault {
        Fault::Abort if count >= n => std::process::abort(),
        Fault::Kill if count == n => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        Fault::Wait if count == n => crate::fault::hold_at_gate(),
        _ => {}
    }
}

/// `syscall; ret` and `__restore_rt` in the process's libc, if it has one. Their offsets in
/// a libc's executable mapping are searched once per libc file (device, inode) and kept.
fn find_gadgets(pid: Pid, mem: &File) -> Option<Gadgets> {
    type Offsets = std::collections::HashMap<(String, u64), Option<(u64, u64)>>;
    static KNOWN: std::sync::Mutex<Option<Offsets>> = std::sync::Mutex::new(None);
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || f[1] != "r-xp" || !f[5].contains("libc.so") {
            continue;
        }
        let (a, b) = f[0].split_once('-')?;
        let (a, b) = (
            u64::from_str_radix(a, 16).ok()?,
            u64::from_str_radix(b, 16).ok()?,
        );
        let key = (f[3].to_string(), f[4].parse::<u64>().ok()?);
        let mut known = KNOWN.lock().unwrap_or_else(|p| p.into_inner());
        let offsets = known
            .get_or_insert_with(Default::default)
            .entry(key)
            .or_insert_with(|| {
                let mut code = vec![0u8; (b - a) as usize];
                let n = mem.read_at(&mut code, a).ok()?;
                let code = &code[..n];
                let find = |pat: &[u8]| code.windows(pat.len()).position(|w| w == pat);
                let syscall_ret = find(&[0x0f, 0x05, 0xc3])?;
                let restore_rt = find(&[0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05])?;
                Some((syscall_ret as u64, restore_rt as u64))
            });
        let (sr, rt) = (*offsets)?;
        return Some(Gadgets {
            syscall_ret: a + sr,
            restore_rt: a + rt,
        });
    }
    None
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
