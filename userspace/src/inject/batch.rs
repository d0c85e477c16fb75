//! Many injected system calls for one ptrace stop: a [`Batch`] is compiled into a few
//! instructions per call (the call's registers, `syscall`, its result stored), written into
//! a page mapped in the process for the purpose, and run to an `int3`. Where one call per
//! stop costs a round trip between the daemon and the process (tens of microseconds on a
//! virtual machine), a batch of twenty costs one, plus the page's `mmap` and `munmap`.
//!
//! A call's argument may be the result of an earlier call ([`Arg::ResultOf`]: a descriptor
//! it opened). A call that must succeed ends the batch when it fails, as [`Tracee::call`]
//! would. Results go onto unused stack below the caller's scratch data.
//!
//! Only for processes that may die if the daemon does (a clone not yet set up): a daemon
//! that dies while the stub runs leaves the process to its `int3`, and SIGTRAP ends it.
//! Where the page cannot be mapped or written, the calls run one by one instead.

use nix::{
    errno::Errno,
    sys::{
        ptrace,
        signal::Signal,
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
};

use super::{Tracee, fault_point, gone_mid_fork, ptrace_err};
use crate::error::{Error, Result};

/// What a result slot holds until its call has run.
const NOT_RUN: i64 = i64::MIN;
/// The largest errno a system call returns (as -errno).
const MAX_ERRNO: i64 = 4095;
/// The fault point (see `fault_point`) passed while a stub runs: `inject-abort:-1@N`.
const STUB_RUNNING: i64 = -1;

/// An argument of a batched call.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Value(u64),
    /// The result of the batch's call with that index.
    ResultOf(usize),
}

impl From<u64> for Arg {
    fn from(v: u64) -> Arg {
        Arg::Value(v)
    }
}

/// How a failure of a call that must succeed is reported.
type Wrap<'a> = Box<dyn Fn(Error) -> Error + 'a>;

struct Call<'a> {
    nr: i64,
    args: Vec<Arg>,
    /// For a call that must succeed: what it does (for the message) and how its error is
    /// reported.
    must: Option<(String, Wrap<'a>)>,
}

/// System calls to run in a process in one go (see the module doc).
#[derive(Default)]
pub struct Batch<'a> {
    calls: Vec<Call<'a>>,
}

impl<'a> Batch<'a> {
    pub fn new() -> Batch<'a> {
        Batch::default()
    }

    /// Adds a call whose result is anything; returns its index.
    pub fn call(&mut self, nr: i64, args: &[Arg]) -> usize {
        self.push(nr, args, None)
    }

    /// Adds a call that must succeed; its failure is reported as [`Tracee::call`] reports
    /// one (`what`, the process, the errno).
    pub fn must(&mut self, what: &str, nr: i64, args: &[Arg]) -> usize {
        self.push(nr, args, Some((what.to_string(), Box::new(|e| e))))
    }

    /// Like [`Batch::must`], its error passed through `wrap`.
    pub fn must_or(
        &mut self,
        what: &str,
        nr: i64,
        args: &[Arg],
        wrap: impl Fn(Error) -> Error + 'a,
    ) -> usize {
        self.push(nr, args, Some((what.to_string(), Box::new(wrap))))
    }

    fn push(&mut self, nr: i64, args: &[Arg], must: Option<(String, Wrap<'a>)>) -> usize {
        assert!(args.len() <= 6, "a system call has at most six arguments");
        for a in args {
            if let Arg::ResultOf(i) = a {
                assert!(*i < self.calls.len(), "an argument from a later call");
            }
        }
        self.calls.push(Call {
            nr,
            args: args.to_vec(),
            must,
        });
        self.calls.len() - 1
    }

    pub fn len(&self) -> usize {
        self.calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// The stub: each call's code, then `int3`; returns it and the offset just past the
    /// `int3` (where a process that ran it through stops). `results`: where call `i` stores
    /// its result (`results + 8 * i`).
    fn compile(&self, results: u64) -> (Vec<u8>, usize) {
        // mov <reg>, imm64 for rdi, rsi, rdx, r10, r8, r9; mov <reg>, rax for the same.
        const MOV_IMM: [[u8; 2]; 6] = [
            [0x48, 0xbf],
            [0x48, 0xbe],
            [0x48, 0xba],
            [0x49, 0xba],
            [0x49, 0xb8],
            [0x49, 0xb9],
        ];
        const MOV_FROM_RAX: [[u8; 3]; 6] = [
            [0x48, 0x89, 0xc7],
            [0x48, 0x89, 0xc6],
            [0x48, 0x89, 0xc2],
            [0x49, 0x89, 0xc2],
            [0x49, 0x89, 0xc0],
            [0x49, 0x89, 0xc1],
        ];
        let mut code = Vec::new();
        // Each `jae` to the end, patched once the end is known: (where its rel32 is).
        let mut exits = Vec::new();
        for (i, call) in self.calls.iter().enumerate() {
            // Arguments from earlier results first (they go through rax), then values.
            for (r, arg) in call.args.iter().enumerate() {
                if let Arg::ResultOf(j) = arg {
                    code.extend_from_slice(&[0x48, 0xa1]); // mov rax, [moffs64]
                    code.extend_from_slice(&(results + 8 * *j as u64).to_le_bytes());
                    code.extend_from_slice(&MOV_FROM_RAX[r]);
                }
            }
            // Every argument register is set, those the call does not take to 0 (as
            // [`Tracee::syscall`] does): a register left from an earlier call could be read
            // (socket's protocol, say).
            for (r, mov) in MOV_IMM.iter().enumerate() {
                let v = match call.args.get(r) {
                    Some(Arg::ResultOf(_)) => continue,
                    Some(Arg::Value(v)) => *v,
                    None => 0,
                };
                code.extend_from_slice(mov);
                code.extend_from_slice(&v.to_le_bytes());
            }
            code.extend_from_slice(&[0x48, 0xb8]); // mov rax, imm64
            code.extend_from_slice(&(call.nr as u64).to_le_bytes());
            code.extend_from_slice(&[0x0f, 0x05]); // syscall
            code.extend_from_slice(&[0x48, 0xa3]); // mov [moffs64], rax
            code.extend_from_slice(&(results + 8 * i as u64).to_le_bytes());
            if call.must.is_some() {
                // cmp rax, -4095; jae end (an errno)
                code.extend_from_slice(&[0x48, 0x3d]);
                code.extend_from_slice(&(-MAX_ERRNO as i32).to_le_bytes());
                code.extend_from_slice(&[0x0f, 0x83, 0, 0, 0, 0]);
                exits.push(code.len() - 4);
            }
        }
        let end = code.len();
        for at in exits {
            let rel = (end - (at + 4)) as i32;
            code[at..at + 4].copy_from_slice(&rel.to_le_bytes());
        }
        code.push(0xcc); // int3
        let trapped = code.len();
        // Never reached: the int3 stops the process for the daemon, or, the daemon gone,
        // its SIGTRAP (blocked signals do not hold back a trap) ends it. Here only so that
        // nothing but an end follows the code.
        code.extend_from_slice(&[0x48, 0xc7, 0xc7, 1, 0, 0, 0]); // mov rdi, 1
        code.extend_from_slice(&[0x48, 0xc7, 0xc0]); // mov rax, exit_group
        code.extend_from_slice(&(libc::SYS_exit_group as i32).to_le_bytes());
        code.extend_from_slice(&[0x0f, 0x05]); // syscall
        (code, trapped)
    }
}

impl Tracee {
    /// Runs `batch` in the process; returns each call's raw result (a negative errno on
    /// failure), or the error of the first call that had to succeed and did not (later
    /// calls did not run). `below`: the lowest address of the caller's scratch data.
    pub fn run_batch(&mut self, batch: Batch, below: u64) -> Result<Vec<i64>> {
        let results = match self.run_stub(&batch, below)? {
            Some(r) => r,
            None => self.run_one_by_one(&batch)?,
        };
        for (call, r) in batch.calls.iter().zip(&results) {
            if let (Some((what, wrap)), true) = (&call.must, (-MAX_ERRNO..0).contains(r)) {
                return Err(wrap(Error::Sandbox(format!(
                    "{what} in process {}: {}",
                    self.pid,
                    Errno::from_raw(-*r as i32).desc()
                ))));
            }
        }
        Ok(results)
    }

    /// The batch run by a stub; `None` if no stub could be placed.
    fn run_stub(&mut self, batch: &Batch, below: u64) -> Result<Option<Vec<i64>>> {
        let results = (below - 8 * batch.len() as u64 - 64) & !15;
        let (code, trapped) = batch.compile(results);
        let len = (code.len() as u64).div_ceil(4096) * 4096;
        let page = self.syscall(
            libc::SYS_mmap,
            &[
                0,
                len,
                (libc::PROT_READ | libc::PROT_EXEC) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                u64::MAX,
                0,
            ],
        )?;
        if (-MAX_ERRNO..0).contains(&page) {
            return Ok(None);
        }
        let page = page as u64;
        let slots: Vec<u8> = std::iter::repeat_n(NOT_RUN.to_ne_bytes(), batch.len())
            .flatten()
            .collect();
        // The page is written as a debugger writes a breakpoint (ptrace's forced access).
        let placed = self.write(page, &code).and(self.write(results, &slots));
        let ran = placed.is_ok().then(|| {
            // (Fault points as for calls made one at a time, all before the stub runs.)
            for call in &batch.calls {
                fault_point(call.nr, self.pid);
            }
            self.run_to_trap(page, page + trapped as u64, results)
        });
        let unmapped = self.syscall(libc::SYS_munmap, &[page, len]);
        let unmapped = unmapped.and_then(|r| match r {
            0 => Ok(()),
            r => Err(Error::Sandbox(format!(
                "unmapping the injected code in process {}: {}",
                self.pid,
                Errno::from_raw(-r as i32).desc()
            ))),
        });
        let Some(ran) = ran else {
            unmapped?;
            return Ok(None);
        };
        ran?;
        unmapped?;
        let mut bytes = vec![0u8; 8 * batch.len()];
        self.read_at(&mut bytes, results)?;
        Ok(Some(
            bytes
                .chunks_exact(8)
                .map(|c| i64::from_ne_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        ))
    }

    /// Runs the stub at `entry` until its `int3` (whose next instruction is `end`), with
    /// the stack pointer below its `results`.
    fn run_to_trap(&mut self, entry: u64, end: u64, results: u64) -> Result<()> {
        let pid = self.pid;
        let mut regs = self.saved;
        regs.rip = entry;
        regs.rsp = (results - 128) & !15;
        regs.orig_rax = u64::MAX;
        ptrace::setregs(pid, regs).map_err(ptrace_err("PTRACE_SETREGS", pid))?;
        let cont = || ptrace::cont(pid, None).map_err(ptrace_err("PTRACE_CONT", pid));
        cont()?;
        fault_point(STUB_RUNNING, pid);
        loop {
            match waitpid(pid, Some(WaitPidFlag::__WALL)) {
                Ok(WaitStatus::Stopped(_, Signal::SIGTRAP)) => {
                    let now = ptrace::getregs(pid).map_err(ptrace_err("PTRACE_GETREGS", pid))?;
                    if now.rip == end {
                        return Ok(());
                    }
                    return Err(Error::Sandbox(format!(
                        "process {pid} stopped at {:#x} in the injected code",
                        now.rip
                    )));
                }
                Ok(WaitStatus::Stopped(_, Signal::SIGSEGV | Signal::SIGBUS | Signal::SIGILL)) => {
                    let now = ptrace::getregs(pid).map_err(ptrace_err("PTRACE_GETREGS", pid))?;
                    return Err(Error::Sandbox(format!(
                        "process {pid} faulted at {:#x} in the injected code",
                        now.rip
                    )));
                }
                Ok(WaitStatus::Stopped(_, sig)) => {
                    // A signal that cannot be blocked: delivered at detach.
                    self.pending = Some(sig);
                    cont()?;
                }
                Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => {
                    self.detached = true;
                    return Err(gone_mid_fork(pid, "was killed during the fork"));
                }
                Ok(_) => cont()?,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(ptrace_err("waitpid", pid)(e)),
            }
        }
    }

    /// The batch run one injected call at a time.
    fn run_one_by_one(&mut self, batch: &Batch) -> Result<Vec<i64>> {
        let mut results = vec![NOT_RUN; batch.len()];
        for (i, call) in batch.calls.iter().enumerate() {
            let args: Vec<u64> = call
                .args
                .iter()
                .map(|a| match a {
                    Arg::Value(v) => *v,
                    Arg::ResultOf(j) => results[*j] as u64,
                })
                .collect();
            results[i] = self.syscall(call.nr, &args)?;
            if call.must.is_some() && (-MAX_ERRNO..0).contains(&results[i]) {
                break;
            }
        }
        Ok(results)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::unistd::Pid;

    /// The mappings of process `pid`.
    fn maps(pid: u32) -> String {
        std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap()
    }

    /// The descriptors of process `pid`.
    fn fds(pid: u32) -> Vec<String> {
        let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        fds.sort();
        fds
    }

    #[test]
    fn a_batch_runs_in_a_real_process_with_results_passed_on() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        // Asleep (clock_nanosleep, or nanosleep with an older libc), done changing its own mappings (the loader, malloc).
        let start = std::time::Instant::now();
        let asleep = |s: String| {
            [libc::SYS_clock_nanosleep, libc::SYS_nanosleep]
                .iter()
                .any(|nr| s.starts_with(&format!("{nr} ")))
        };
        while !std::fs::read_to_string(format!("/proc/{pid}/syscall")).is_ok_and(asleep) {
            assert!(start.elapsed().as_secs() < 10, "sleep never slept");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let before = (maps(pid), fds(pid));
        let mut t = Tracee::seize(Pid::from_raw(pid as i32)).unwrap();
        t.arm().unwrap();
        let at = t
            .scratch_strings(&[b"/dev/null", b"/no/such/file"])
            .unwrap();
        let below = *at.iter().min().unwrap();
        let open = |b: &mut Batch, path: u64| {
            let flags = (libc::O_RDONLY | libc::O_CLOEXEC) as u64;
            let args = [libc::AT_FDCWD as i64 as u64, path, flags].map(Arg::Value);
            b.must("opening it", libc::SYS_openat, &args)
        };
        let batch = |t: &mut Tracee, stub: bool| {
            let mut b = Batch::new();
            let fd = open(&mut b, at[0]);
            let flags = [Arg::ResultOf(fd), Arg::Value(libc::F_GETFD as u64)];
            b.call(libc::SYS_fcntl, &flags);
            b.call(libc::SYS_close, &[Arg::ResultOf(fd)]);
            b.call(libc::SYS_getpid, &[]);
            // Two arguments after calls with three: its protocol is 0, not what the
            // previous call left in the register.
            let args = [libc::AF_INET as u64, libc::SOCK_STREAM as u64].map(Arg::Value);
            let sock = b.must("socket", libc::SYS_socket, &args);
            b.call(libc::SYS_close, &[Arg::ResultOf(sock)]);
            if stub {
                t.run_batch(b, below).unwrap()
            } else {
                t.run_one_by_one(&b).unwrap()
            }
        };
        let by_stub = batch(&mut t, true);
        assert!(by_stub[0] >= 3, "{by_stub:?}");
        assert_eq!(&by_stub[1..4], [libc::FD_CLOEXEC as i64, 0, pid as i64]);
        assert!(by_stub[4] >= 3 && by_stub[5] == 0, "{by_stub:?}");
        assert_eq!(batch(&mut t, false), by_stub, "the same one call at a time");
        // A call that must succeed and fails ends the batch: the calls after it never run.
        let mut b = Batch::new();
        open(&mut b, at[1]);
        b.call(libc::SYS_kill, &[Arg::Value(pid as u64), Arg::Value(9)]);
        let err = t.run_batch(b, below).unwrap_err().to_string();
        assert!(
            err.contains(&format!("opening it in process {pid}: No such file")),
            "{err}"
        );
        t.detach().unwrap();
        // Nothing is left in it: no mapping, no descriptor; it was not killed.
        assert_eq!((maps(pid), fds(pid)), before);
        assert!(child.try_wait().unwrap().is_none(), "it still runs");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_call_that_must_succeed_jumps_to_the_trap_on_an_errno() {
        let mut b = Batch::new();
        let fd = b.must("open", libc::SYS_openat, &[Arg::Value(1), Arg::Value(2)]);
        b.call(libc::SYS_close, &[Arg::ResultOf(fd)]);
        let (code, trapped) = b.compile(0x1000);
        assert_eq!(code[trapped - 1], 0xcc);
        // The jae's target is the int3.
        let jae = code.windows(2).position(|w| w == [0x0f, 0x83]).unwrap();
        let rel = i32::from_le_bytes(code[jae + 2..jae + 6].try_into().unwrap());
        assert_eq!(jae + 6 + rel as usize, trapped - 1);
        // The close loads the open's result from its slot.
        let load = code.windows(2).position(|w| w == [0x48, 0xa1]).unwrap();
        assert_eq!(
            u64::from_le_bytes(code[load + 2..load + 10].try_into().unwrap()),
            0x1000
        );
    }
}
