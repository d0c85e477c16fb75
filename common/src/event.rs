//! Events the eBPF programs send to userspace through the ring buffer.
//!
//! Every record starts with an [`EventHeader`]; its `kind` says which of the three record
//! shapes follows: [`FdEvent`] (an operation on an open descriptor: writes, sends, ftruncate,
//! fchmod, shared mappings, reflinks), [`PathEvent`] (an operation naming paths: open, rename,
//! unlink, mkdir, chmod, link, ...), or [`ProcEvent`] (fork, exec, exit).

use crate::{COMM_LEN, PATH_LEN};

/// What happened. The numbers are part of the format between kernel and userspace: never
/// renumber, only add.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A file opened with write intent, O_TRUNC or O_CREAT, or a directory opened (PathEvent).
    FileOpen = 1,
    /// Bytes written into a regular file (FdEvent).
    FileWrite = 2,
    /// A file's size changed by truncate/ftruncate/fallocate (PathEvent or FdEvent).
    FileTruncate = 3,
    /// rename/renameat/renameat2 (PathEvent, `path2` is the new path).
    FileRename = 4,
    /// unlink/unlinkat/rmdir (PathEvent).
    FileUnlink = 5,
    /// mkdir/mkdirat (PathEvent).
    FileMkdir = 6,
    /// chmod/chown/utimes/xattr changes (PathEvent or FdEvent).
    FileMeta = 7,
    /// A writable shared mapping of a file (FdEvent: offset and length of the mapping).
    FileMmap = 8,
    /// connect() on an IPv4/IPv6/Unix socket (FdEvent).
    NetConnect = 9,
    /// Bytes sent on a socket (FdEvent).
    NetSend = 10,
    /// A new process (ProcEvent, `child_pid`).
    ProcFork = 11,
    /// exec (ProcEvent, `filename`).
    ProcExec = 12,
    /// The last thread of a process exited (ProcEvent, `exit_code`).
    ProcExit = 13,
    /// chdir/fchdir: lets userspace resolve relative paths (PathEvent or FdEvent).
    Chdir = 14,
    /// link/linkat: `path` the existing file, `path2` the new name (PathEvent).
    FileLink = 15,
    /// symlink/symlinkat: `path` the target text, `path2` the new link (PathEvent).
    FileSymlink = 16,
    /// mknod/mknodat (PathEvent).
    FileMknod = 17,
    /// FICLONE/FICLONERANGE reflink into a file (FdEvent; `src_*` is the source file).
    FileClone = 18,
    /// connect() or sendmsg() refused by the branch's policy (FdEvent: family, address and
    /// port asked for; `fd` is -1).
    NetDenied = 19,
    /// connect() redirected to the buffering proxy by the branch's policy (FdEvent: the
    /// real destination; `fd` is -1).
    NetBuffered = 20,
}

impl EventKind {
    /// Decodes a kind number; `None` for a number this build does not know.
    pub fn from_u32(v: u32) -> Option<Self> {
        use EventKind::*;
        Some(match v {
            1 => FileOpen,
            2 => FileWrite,
            3 => FileTruncate,
            4 => FileRename,
            5 => FileUnlink,
            6 => FileMkdir,
            7 => FileMeta,
            8 => FileMmap,
            9 => NetConnect,
            10 => NetSend,
            11 => ProcFork,
            12 => ProcExec,
            13 => ProcExit,
            14 => Chdir,
            15 => FileLink,
            16 => FileSymlink,
            17 => FileMknod,
            18 => FileClone,
            19 => NetDenied,
            20 => NetBuffered,
            _ => return None,
        })
    }
}

/// Starts every event record.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    /// An [`EventKind`] number.
    pub kind: u32,
    /// The syscall number (x86_64) that caused the event, or [`EventHeader::NO_SYSCALL`].
    pub syscall: u32,
    /// Thread-group id (process id as userspace sees it).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns).
    pub ts_ns: u64,
    /// cgroup v2 id of the task's cgroup.
    pub cgroup: u64,
    /// The task's comm, NUL-padded.
    pub comm: [u8; COMM_LEN],
}
crate::assert_size!(EventHeader, 48);

impl EventHeader {
    /// `syscall` of events that no syscall caused (fork, exec, exit tracepoints).
    pub const NO_SYSCALL: u32 = u32::MAX;
}

/// Values of [`FdEvent::file_type`] and [`PathEvent::file_type`]: `i_mode >> 12`.
pub mod file_type {
    pub const UNKNOWN: u32 = 0;
    pub const FIFO: u32 = 0o01;
    pub const CHR: u32 = 0o02;
    pub const DIR: u32 = 0o04;
    pub const BLK: u32 = 0o06;
    pub const REG: u32 = 0o10;
    pub const LNK: u32 = 0o12;
    pub const SOCK: u32 = 0o14;
}

/// An operation on an open file descriptor.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FdEvent {
    pub hdr: EventHeader,
    /// The descriptor written to (for NetConnect: the socket).
    pub fd: i32,
    /// `i_mode >> 12` of the file behind `fd` (see [`file_type`]).
    pub file_type: u32,
    /// Inode number of the file behind `fd` (0 if it could not be read).
    pub ino: u64,
    /// Device (`s_dev`, kernel encoding MAJOR << 20 | MINOR) of the file behind `fd`.
    pub dev: u32,
    /// `f_flags` of the open file, or the operation's flags (mmap: prot << 32 is not used;
    /// FileMeta: the mode for fchmod).
    pub flags: u32,
    /// Offset in the file where the operation started (-1 if unknown).
    pub offset: i64,
    /// Bytes written or sent (the syscall's result), or the length of the range.
    pub bytes: i64,
    /// FileClone: the source descriptor.
    pub src_fd: i32,
    /// FileClone: the source's device.
    pub src_dev: u32,
    /// FileClone: the source's inode.
    pub src_ino: u64,
    /// Sockets: AF_INET (2), AF_INET6 (10), AF_UNIX (1), or 0.
    pub family: u16,
    /// Sockets: destination port, host byte order.
    pub port: u16,
    /// NetConnect: the syscall's result. FileWrite and NetSend: how many syscalls a record
    /// merged from a run of writes stands for (0 for a record of one syscall; see
    /// [`crate::run`]).
    pub ret: i32,
    /// Sockets: destination address (IPv4 in the first 4 bytes; IPv4-mapped IPv6 as sent).
    pub addr: [u8; 16],
}
crate::assert_size!(FdEvent, 128);

impl FdEvent {
    /// An event about descriptor `fd` with everything else unknown: no offset (-1), no
    /// source, no peer. Programs fill in what they know with struct update syntax.
    pub const fn new(hdr: EventHeader, fd: i32) -> Self {
        Self {
            hdr,
            fd,
            file_type: 0,
            ino: 0,
            dev: 0,
            flags: 0,
            offset: -1,
            bytes: 0,
            src_fd: -1,
            src_dev: 0,
            src_ino: 0,
            family: 0,
            port: 0,
            ret: 0,
            addr: [0; 16],
        }
    }
}

/// Flags in [`PathEvent::trunc`].
pub const PATH1_TRUNCATED: u32 = 1;
pub const PATH2_TRUNCATED: u32 = 2;

/// An operation that names one or two paths.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PathEvent {
    pub hdr: EventHeader,
    /// The syscall's result (the new descriptor for open).
    pub ret: i64,
    /// Open flags, AT_* flags, rename flags, or the mode for chmod/mkdir/mknod.
    pub flags: u32,
    /// The mode argument (open with O_CREAT, mkdir, mknod, chmod).
    pub mode: u32,
    /// Directory descriptor `path` is relative to (AT_FDCWD = -100).
    pub dirfd: i32,
    /// Directory descriptor `path2` is relative to.
    pub dirfd2: i32,
    /// Device of `dirfd`'s directory (0 when `path` is absolute or relative to the cwd).
    pub dir_dev: u32,
    /// Device of `dirfd2`'s directory.
    pub dir2_dev: u32,
    /// Inode of `dirfd`'s directory.
    pub dir_ino: u64,
    /// Inode of `dirfd2`'s directory.
    pub dir2_ino: u64,
    /// Open: device of the opened file.
    pub file_dev: u32,
    /// Open: `i_mode >> 12` of the opened file.
    pub file_type: u32,
    /// Open: inode of the opened file.
    pub file_ino: u64,
    /// truncate: the new length.
    pub arg: i64,
    /// [`PATH1_TRUNCATED`] | [`PATH2_TRUNCATED`] when a path did not fit.
    pub trunc: u32,
    pub _pad: u32,
    /// The path as the program passed it, NUL-terminated.
    pub path: [u8; PATH_LEN],
    /// The second path (rename/link/symlink), NUL-terminated.
    pub path2: [u8; PATH_LEN],
}
crate::assert_size!(PathEvent, 48 + 80 + 2 * PATH_LEN);

/// A process lifecycle event.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProcEvent {
    pub hdr: EventHeader,
    /// ProcFork: the new process's id.
    pub child_pid: u32,
    /// ProcExit: the raw exit status (`task_struct.exit_code`: code << 8 | signal).
    pub exit_code: u32,
    /// ProcExec: the executed file, NUL-terminated.
    pub filename: [u8; PATH_LEN],
}
crate::assert_size!(ProcEvent, 48 + 8 + PATH_LEN);
