//! The threads of a process to clone. A clone made by an injected `clone3` has one thread;
//! its memory already holds every thread's stack and data, so each other thread is made
//! again by an injected `clone(CLONE_THREAD)` in the clone and given what memory does not
//! hold, read from its held original: registers (with its TLS base), FPU/SSE/AVX state,
//! signal mask, alternate signal stack, rseq registration, name, and glibc's thread-id word
//! and robust futex list (so `pthread_join` and robust mutexes keep working).
//!
//! glibc's thread-id word is found from the robust list the thread registered: in glibc's
//! `struct pthread`, `tid` sits 16 bytes before `robust_head`. It is used only if the word
//! there holds the thread's id; otherwise the clone's threads run without it (as a
//! process without glibc would).

use nix::errno::Errno;

use crate::{
    error::{Error, Result},
    inject::Tracee,
};

/// `NT_X86_XSTATE`: the XSAVE area (x87, SSE, AVX, ...).
const NT_X86_XSTATE: libc::c_int = 0x202;
/// `PTRACE_GET_RSEQ_CONFIGURATION` (Linux 5.13).
const GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
/// Room for the largest XSAVE area (AVX-512 with AMX tiles takes about 11 KiB).
const XSTATE_MAX: usize = 16384;
/// Distance from glibc's `struct pthread.tid` to its `robust_head`.
const TID_BEFORE_ROBUST_HEAD: u64 = 16;

/// glibc's per-thread words a new task must be told about.
#[derive(Clone, Copy, Debug, Default)]
pub struct GlibcWords {
    /// The robust futex list head and its length (`set_robust_list`).
    pub robust: Option<(u64, u64)>,
    /// Where the thread's id is kept (`CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID`).
    pub tid_word: Option<u64>,
}

/// An `rseq` registration: area, size, signature.
#[derive(Clone, Copy, Debug)]
struct Rseq {
    area: u64,
    size: u32,
    signature: u32,
}

/// What a thread's copy is given, read from the held original.
pub struct ThreadState {
    pub tid: u32,
    name: Vec<u8>,
    regs: libc::user_regs_struct,
    mask: u64,
    xstate: Vec<u8>,
    alt_stack: Option<[u8; 24]>,
    rseq: Option<Rseq>,
    words: GlibcWords,
    /// The CPUs it may run on (a thread's own, which its copy gets too).
    cpus: Option<nix::sched::CpuSet>,
}

/// The other threads of process `pid` (all but the leader).
pub fn other_threads(pid: u32) -> Result<Vec<u32>> {
    let dir = format!("/proc/{pid}/task");
    let entries = std::fs::read_dir(&dir).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            crate::inject::gone_mid_fork(
                nix::unistd::Pid::from_raw(pid as i32),
                "exited during the fork",
            )
        } else {
            Error::Sandbox(format!("{dir}: {e}"))
        }
    })?;
    let mut tids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|t| *t != pid)
        .collect();
    tids.sort_unstable();
    Ok(tids)
}

/// glibc's words of held task `t`, if it registered a robust list (see the module doc).
pub fn glibc_words(t: &Tracee) -> GlibcWords {
    let tid = t.pid.as_raw();
    let (mut head, mut len) = (0u64, 0u64);
    // SAFETY: get_robust_list writes one pointer into `head` and one size into `len`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            tid,
            &mut head as *mut u64,
            &mut len as *mut u64,
        )
    };
    if r != 0 || head == 0 {
        return GlibcWords::default();
    }
    let robust = Some((head, len));
    let own_id = crate::sandbox::ns_pids(tid as u32)
        .ok()
        .and_then(|ids| ids.last().copied());
    let at = head.wrapping_sub(TID_BEFORE_ROBUST_HEAD);
    let mut word = [0u8; 4];
    let tid_word = match (own_id, t.read_at(&mut word, at)) {
        (Some(id), Ok(())) if u32::from_ne_bytes(word) == id => Some(at),
        _ => None,
    };
    GlibcWords { robust, tid_word }
}

/// Reads what thread `t` (held, not frozen) needs in its copy.
pub fn read(t: &mut Tracee, pid: u32) -> Result<ThreadState> {
    let tid = t.pid.as_raw() as u32;
    let comm = format!("/proc/{pid}/task/{tid}/comm");
    let name = std::fs::read(&comm)
        .map_err(|e| Error::Sandbox(format!("{comm}: {e}")))?
        .strip_suffix(b"\n")
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    let mut xstate = vec![0u8; XSTATE_MAX];
    let mut iov = libc::iovec {
        iov_base: xstate.as_mut_ptr().cast(),
        iov_len: xstate.len(),
    };
    // SAFETY: PTRACE_GETREGSET writes at most `iov_len` bytes at `iov_base` and sets
    // `iov_len` to what it wrote.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET,
            tid as i32,
            NT_X86_XSTATE,
            &mut iov as *mut libc::iovec,
        )
    };
    if r < 0 {
        return Err(Error::Sandbox(format!(
            "reading the FPU state of thread {tid} of process {pid}: {}",
            Errno::last()
        )));
    }
    xstate.truncate(iov.iov_len);
    let mut conf = [0u64; 3];
    // SAFETY: PTRACE_GET_RSEQ_CONFIGURATION writes at most the given size (24 bytes: a
    // `struct ptrace_rseq_configuration`) into `conf`.
    let r = unsafe {
        libc::ptrace(
            GET_RSEQ_CONFIGURATION,
            tid as i32,
            std::mem::size_of_val(&conf),
            conf.as_mut_ptr(),
        )
    };
    let rseq = (r > 0 && conf[0] != 0).then(|| Rseq {
        area: conf[0],
        size: conf[1] as u32,
        signature: (conf[1] >> 32) as u32,
    });
    let alt_stack = t.alt_stack()?;
    Ok(ThreadState {
        tid,
        name,
        regs: t.saved_regs(),
        mask: t.saved_mask(),
        xstate,
        alt_stack,
        rseq,
        words: glibc_words(t),
        cpus: t.cpus().ok(),
    })
}

/// Gives `clone` (a held clone whose original registered it) its robust list again: a new
/// process starts without one.
pub fn restore_robust_list(clone: &mut Tracee, words: &GlibcWords) -> Result<()> {
    if let Some((head, len)) = words.robust {
        clone.call("set_robust_list", libc::SYS_set_robust_list, &[head, len])?;
    }
    Ok(())
}

/// Makes thread `state` again in `clone` (held, set up); returns the new thread, held,
/// which resumes from the original thread's registers when it is let go.
pub fn recreate(clone: &mut Tracee, state: &ThreadState) -> Result<Tracee> {
    let what = |e: Error| {
        Error::Sandbox(format!(
            "making thread {} ({}) again in the clone: {e}",
            state.tid,
            String::from_utf8_lossy(&state.name)
        ))
    };
    let mut flags = libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM;
    let tid_word = state.words.tid_word.unwrap_or(0);
    if tid_word != 0 {
        flags |= libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID;
    }
    let mut born = None;
    // clone(flags, stack 0: the caller's, parent_tid, child_tid, tls): the new thread starts
    // where its creator stands, on the clone's safety-net frame (see `crate::inject`).
    let r = clone.syscall_with(libc::SYS_clone, &[flags as u64, 0, 0, tid_word, 0], |p| {
        born = Some(p)
    });
    let r = match (r, born) {
        (Ok(r), _) => r,
        (Err(e), Some(new)) => {
            // The thread was made but its creator's call failed after: it is reaped here
            // too, or the leader's exit would never be reported (see below).
            let _ = nix::sys::signal::kill(clone.pid, nix::sys::signal::Signal::SIGKILL);
            super::clone::reap_exit(new);
            return Err(what(e));
        }
        (Err(e), None) => return Err(what(e)),
    };
    let Some(new) = born else {
        return Err(what(Error::Sandbox(format!(
            "clone: {}",
            Errno::from_raw(-r as i32).desc()
        ))));
    };
    let made = Tracee::adopt_clone(new, clone).and_then(|mut thread| {
        set_up(&mut thread, state)?;
        Ok(thread)
    });
    match made {
        Ok(mut thread) => {
            thread.resume_from(state.regs, state.mask);
            if let Some(cpus) = state.cpus {
                thread.cpus_at_release(cpus);
            }
            Ok(thread)
        }
        Err(e) => {
            // The whole clone is killed by the caller; this thread's exit, reported to us,
            // is reaped here (the leader's comes only after it).
            let _ = nix::sys::signal::kill(clone.pid, nix::sys::signal::Signal::SIGKILL);
            super::clone::reap_exit(new);
            Err(what(e))
        }
    }
}

fn set_up(thread: &mut Tracee, state: &ThreadState) -> Result<()> {
    restore_robust_list(thread, &state.words)?;
    if let Some(r) = state.rseq {
        thread.call(
            "rseq",
            libc::SYS_rseq,
            &[r.area, r.size as u64, 0, r.signature as u64],
        )?;
    }
    let mut name = state.name.clone();
    name.truncate(15);
    let at = thread.scratch_strings(&[&name])?;
    thread.call(
        "prctl(PR_SET_NAME)",
        libc::SYS_prctl,
        &[libc::PR_SET_NAME as u64, at[0]],
    )?;
    if let Some(stack) = state.alt_stack {
        let ss = thread.scratch_bytes(&stack, at[0])?;
        thread.call("sigaltstack", libc::SYS_sigaltstack, &[ss, 0])?;
    }
    let mut iov = libc::iovec {
        iov_base: state.xstate.as_ptr() as *mut libc::c_void,
        iov_len: state.xstate.len(),
    };
    // SAFETY: PTRACE_SETREGSET reads `iov_len` bytes at `iov_base` (the area read from the
    // original thread); the kernel does not write through it.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGSET,
            thread.pid.as_raw(),
            NT_X86_XSTATE,
            &mut iov as *mut libc::iovec,
        )
    };
    if r < 0 {
        return Err(Error::Sandbox(format!(
            "setting the FPU state: {}",
            Errno::last()
        )));
    }
    Ok(())
}

/// Reaps the exits of the new threads of a clone that was killed (their exits are
/// reported to us, their tracer, one by one).
pub fn reap(threads: &[Tracee]) {
    for t in threads {
        super::clone::reap_exit(t.pid);
    }
}
