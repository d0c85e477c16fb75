//! The seccomp filter that lets the daemon hold network calls of a branch whose policy
//! defers some (see [`crate::effects::defer`]). The branch's init installs it when the branch
//! starts, before anything runs in it, so every process of the branch (its command, every
//! `exec`, every fork and clone) inherits it; it keeps the listener descriptor, which the
//! daemon takes a copy of with `pidfd_getfd` (again after a restart: the init's copy keeps
//! the listener, and the calls waiting on it, alive meanwhile).
//!
//! Held for the daemon to decide: `connect`, `sendto` with a destination address (a send
//! on a connected socket passes: its connect was decided), and `sendmsg` (its destination
//! is in memory the filter cannot read). Everything else passes.

use std::os::fd::{FromRawFd, OwnedFd};

use crate::error::{Error, Result};

const SECCOMP_SET_MODE_FILTER: libc::c_uint = 1;
const SECCOMP_FILTER_FLAG_NEW_LISTENER: libc::c_uint = 1 << 3;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_USER_NOTIF: u32 = 0x7fc0_0000;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// Offsets in `struct seccomp_data`: nr, arch, args[4] (low and high words).
const NR: u32 = 0;
const ARCH: u32 = 4;
const ARG4_LO: u32 = 16 + 4 * 8;
const ARG4_HI: u32 = 16 + 4 * 8 + 4;

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The filter program (classic BPF).
fn program() -> Vec<libc::sock_filter> {
    let ld = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    let jeq = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    let ret = (libc::BPF_RET | libc::BPF_K) as u16;
    vec![
        /* 0 */ stmt(ld, ARCH),
        /* 1 */ jump(jeq, AUDIT_ARCH_X86_64, 0, 9), // other arch: allow (11)
        /* 2 */ stmt(ld, NR),
        /* 3 */ jump(jeq, libc::SYS_connect as u32, 8, 0), // notify (12)
        /* 4 */ jump(jeq, libc::SYS_sendmsg as u32, 7, 0), // notify
        /* 5 */ jump(jeq, libc::SYS_sendto as u32, 0, 5), // not sendto: allow
        /* 6 */ stmt(ld, ARG4_LO),
        /* 7 */ jump(jeq, 0, 0, 4), // a destination: notify
        /* 8 */ stmt(ld, ARG4_HI),
        /* 9 */ jump(jeq, 0, 0, 2), // a destination: notify
        /* 10 */ stmt(ret, SECCOMP_RET_ALLOW), // sendto on a connected socket
        /* 11 */ stmt(ret, SECCOMP_RET_ALLOW),
        /* 12 */ stmt(ret, SECCOMP_RET_USER_NOTIF),
    ]
}

/// Installs the filter on the calling thread (no_new_privs must be set: the branch's other
/// filters set it) and returns the listener.
pub fn install() -> Result<OwnedFd> {
    let mut prog = program();
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: seccomp(2) reads `fprog` and the instructions it points to, which live
    // across the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_SET_MODE_FILTER,
            SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &fprog as *const libc::sock_fprog,
        )
    };
    if fd < 0 {
        return Err(Error::Sandbox(format!(
            "installing the seccomp listener for deferred calls: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: seccomp returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // Never inherited by what the init starts.
    nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| Error::Sandbox(format!("the seccomp listener: {e}")))?;
    Ok(fd)
}

/// The descriptor number of the seccomp listener that process `pid` holds, if any.
pub fn listener_fd(pid: u32) -> Option<i32> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    for e in dir.flatten() {
        let Ok(link) = std::fs::read_link(e.path()) else {
            continue; // closed meanwhile
        };
        if link.to_string_lossy() == "anon_inode:seccomp notify" {
            return e.file_name().to_str()?.parse().ok();
        }
    }
    None
}
