//! The syscalls forkscope traces: x86_64 numbers, names, and which eBPF program (hook
//! family) handles each. One table so the programs, the dispatcher and the JSON names cannot
//! disagree.

/// Which family program handles a syscall: the index of that program in the
/// `SYSCALL_FAMILIES` program array the `syscall_exit` dispatcher tail-calls into.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Data written through a descriptor: file writes, or sends when the fd is a socket.
    FdWrite = 0,
    /// Other operations on a descriptor (ftruncate, fchmod, mmap, reflink, fchdir).
    FdOp = 1,
    /// Operations naming paths (open, rename, unlink, mkdir, chmod, link, ...).
    PathOp = 2,
    /// Socket operations (connect, sendto, sendmsg, sendmmsg).
    Net = 3,
}

/// Number of [`Family`] values (entries of the `SYSCALL_FAMILIES` program array).
pub const FAMILY_COUNT: u32 = 4;

/// What the `syscall_exit` dispatcher hands the family program it tail-calls, through a
/// per-CPU slot (`SYSCALL_PASS`): found once with plain loads, so no family program walks
/// the task again (all four look descriptors up in this table).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SyscallPass {
    /// The calling task's cgroup id (traced with per-write detail).
    pub cgroup: u64,
    /// Its `tgid << 32 | pid`.
    pub pid_tgid: u64,
    /// Its descriptor table: the address of the array of `struct file *` (0: none).
    pub fd_array: u64,
    /// The number of slots of that array.
    pub max_fds: u32,
    pub _pad: u32,
}

crate::assert_size!(SyscallPass, 32);

macro_rules! syscalls {
    ($($name:ident = $nr:literal, $tp:literal, $fam:ident;)*) => {
        $(pub const $name: u32 = $nr;)*
        /// (number, name (as in `sys_exit_NAME`), family) of every traced syscall.
        pub const TRACED: &[(u32, &str, Family)] = &[$(($nr, $tp, Family::$fam)),*];

        /// The family of syscall `nr` (x86_64 numbering), or `None` when it is not traced.
        #[inline(always)]
        pub const fn family_of(nr: u32) -> Option<Family> {
            match nr {
                $($nr => Some(Family::$fam),)*
                _ => None,
            }
        }
    };
}

syscalls! {
    SYS_WRITE = 1, "write", FdWrite;
    SYS_PWRITE64 = 18, "pwrite64", FdWrite;
    SYS_WRITEV = 20, "writev", FdWrite;
    SYS_PWRITEV = 296, "pwritev", FdWrite;
    SYS_PWRITEV2 = 328, "pwritev2", FdWrite;
    SYS_COPY_FILE_RANGE = 326, "copy_file_range", FdWrite;
    SYS_SENDFILE = 40, "sendfile64", FdWrite;
    SYS_SPLICE = 275, "splice", FdWrite;
    SYS_FTRUNCATE = 77, "ftruncate", FdOp;
    SYS_FALLOCATE = 285, "fallocate", FdOp;
    SYS_FCHMOD = 91, "fchmod", FdOp;
    SYS_FCHOWN = 93, "fchown", FdOp;
    SYS_FSETXATTR = 190, "fsetxattr", FdOp;
    SYS_FREMOVEXATTR = 199, "fremovexattr", FdOp;
    SYS_IOCTL = 16, "ioctl", FdOp;
    SYS_MMAP = 9, "mmap", FdOp;
    SYS_FCHDIR = 81, "fchdir", FdOp;
    SYS_OPEN = 2, "open", PathOp;
    SYS_OPENAT = 257, "openat", PathOp;
    SYS_OPENAT2 = 437, "openat2", PathOp;
    SYS_CREAT = 85, "creat", PathOp;
    SYS_TRUNCATE = 76, "truncate", PathOp;
    SYS_RENAME = 82, "rename", PathOp;
    SYS_RENAMEAT = 264, "renameat", PathOp;
    SYS_RENAMEAT2 = 316, "renameat2", PathOp;
    SYS_UNLINK = 87, "unlink", PathOp;
    SYS_UNLINKAT = 263, "unlinkat", PathOp;
    SYS_RMDIR = 84, "rmdir", PathOp;
    SYS_MKDIR = 83, "mkdir", PathOp;
    SYS_MKDIRAT = 258, "mkdirat", PathOp;
    SYS_SYMLINK = 88, "symlink", PathOp;
    SYS_SYMLINKAT = 266, "symlinkat", PathOp;
    SYS_LINK = 86, "link", PathOp;
    SYS_LINKAT = 265, "linkat", PathOp;
    SYS_MKNOD = 133, "mknod", PathOp;
    SYS_MKNODAT = 259, "mknodat", PathOp;
    SYS_CHMOD = 90, "chmod", PathOp;
    SYS_FCHMODAT = 268, "fchmodat", PathOp;
    SYS_FCHMODAT2 = 452, "fchmodat2", PathOp;
    SYS_CHOWN = 92, "chown", PathOp;
    SYS_LCHOWN = 94, "lchown", PathOp;
    SYS_FCHOWNAT = 260, "fchownat", PathOp;
    SYS_UTIME = 132, "utime", PathOp;
    SYS_UTIMES = 235, "utimes", PathOp;
    SYS_FUTIMESAT = 261, "futimesat", PathOp;
    SYS_UTIMENSAT = 280, "utimensat", PathOp;
    SYS_SETXATTR = 188, "setxattr", PathOp;
    SYS_LSETXATTR = 189, "lsetxattr", PathOp;
    SYS_REMOVEXATTR = 197, "removexattr", PathOp;
    SYS_LREMOVEXATTR = 198, "lremovexattr", PathOp;
    SYS_SETXATTRAT = 463, "setxattrat", PathOp;
    SYS_REMOVEXATTRAT = 466, "removexattrat", PathOp;
    SYS_CHDIR = 80, "chdir", PathOp;
    SYS_CONNECT = 42, "connect", Net;
    SYS_SENDTO = 44, "sendto", Net;
    SYS_SENDMSG = 46, "sendmsg", Net;
    SYS_SENDMMSG = 307, "sendmmsg", Net;
}

/// The name of a traced syscall for display (`sendfile64` is shown as `sendfile`).
pub fn name(nr: u32) -> Option<&'static str> {
    if nr == SYS_SENDFILE {
        return Some("sendfile");
    }
    let mut i = 0;
    while i < TRACED.len() {
        if TRACED[i].0 == nr {
            return Some(TRACED[i].1);
        }
        i += 1;
    }
    None
}

/// `AT_FDCWD`: a `*at` path relative to the working directory.
pub const AT_FDCWD: i32 = -100;
/// `ioctl` request numbers of the reflink ioctls.
pub const FICLONE: u32 = 0x4004_9409;
pub const FICLONERANGE: u32 = 0x4020_940d;
/// open flags used in the programs' filters.
pub const O_ACCMODE: u32 = 0o3;
pub const O_CREAT: u32 = 0o100;
pub const O_TRUNC: u32 = 0o1000;
pub const O_APPEND: u32 = 0o2000;
pub const O_DIRECTORY: u32 = 0o200000;
/// mmap flags.
pub const PROT_WRITE: u64 = 0x2;
pub const MAP_SHARED: u64 = 0x1;
pub const MAP_SHARED_VALIDATE: u64 = 0x3;
/// -EINPROGRESS: a non-blocking connect that has started.
pub const EINPROGRESS_RET: i64 = -115;

#[cfg(test)]
mod tests {
    use super::*;

    /// The dispatcher's `match` and the table agree, and untraced syscalls have no family.
    #[test]
    fn family_of_matches_the_table() {
        for &(nr, name, family) in TRACED {
            assert_eq!(family_of(nr), Some(family), "{name} ({nr})");
        }
        // read, close, getpid, exit_group: not traced.
        for nr in [0, 3, 39, 231] {
            assert_eq!(family_of(nr), None, "syscall {nr}");
        }
        assert!(TRACED.iter().all(|&(_, _, f)| (f as u32) < FAMILY_COUNT));
    }
}
