//! Operations that name paths: the open family (with write intent, O_CREAT or O_TRUNC, or of a
//! directory, so userspace can name later writes and `*at` calls), `truncate`, the rename,
//! unlink, mkdir, link, symlink and mknod families, chmod/chown/utimes/xattr by path, and
//! `chdir`. Paths are sent as the program passed them; a directory descriptor they are
//! relative to is sent as (device, inode) and resolved to a path in userspace.

use aya_ebpf::{
    helpers::bpf_probe_read_user_str_bytes, macros::btf_tracepoint, programs::BtfTracePointContext,
};
use forkscope_common::{
    EventKind, KernelOffsets, PATH_LEN, PathEvent,
    event::{PATH1_TRUNCATED, PATH2_TRUNCATED, file_type},
    syscalls::*,
};

use crate::{
    config,
    emit::{count_event, count_lost, header},
    kernel::{SysExit, file_info, read_user, sys_exit},
    maps::EVENTS,
};

/// What one syscall's arguments mean.
struct PathOp {
    kind: EventKind,
    dirfd: i64,
    path: u64,
    dirfd2: i64,
    path2: u64,
    flags: u32,
    mode: u32,
    arg: i64,
}

const CWD: i64 = AT_FDCWD as i64;
/// `AT_REMOVEDIR`, reported in `flags` for rmdir.
const AT_REMOVEDIR: u32 = 0x200;

#[btf_tracepoint(function = "sys_exit")]
pub fn sys_exit_path_op(ctx: BtfTracePointContext) -> i32 {
    let _ = try_path_op(&ctx);
    0
}

fn op(kind: EventKind, dirfd: i64, path: u64) -> PathOp {
    PathOp {
        kind,
        dirfd,
        path,
        dirfd2: CWD,
        path2: 0,
        flags: 0,
        mode: 0,
        arg: 0,
    }
}

/// Decodes the arguments of syscall `nr`.
#[inline(always)]
fn decode(nr: u32, a: &[u64; 6]) -> Option<PathOp> {
    use EventKind::*;
    let i = |v: u64| v as i64;
    Some(match nr {
        SYS_OPEN => PathOp {
            flags: a[1] as u32,
            mode: a[2] as u32,
            ..op(FileOpen, CWD, a[0])
        },
        SYS_OPENAT => PathOp {
            flags: a[2] as u32,
            mode: a[3] as u32,
            ..op(FileOpen, i(a[0]), a[1])
        },
        SYS_OPENAT2 => {
            // struct open_how { u64 flags; u64 mode; u64 resolve; }
            let how = read_user::<[u64; 2]>(a[2])?;
            PathOp {
                flags: how[0] as u32,
                mode: how[1] as u32,
                ..op(FileOpen, i(a[0]), a[1])
            }
        }
        SYS_CREAT => PathOp {
            flags: O_CREAT | O_TRUNC | 1,
            mode: a[1] as u32,
            ..op(FileOpen, CWD, a[0])
        },
        SYS_TRUNCATE => PathOp {
            arg: i(a[1]),
            ..op(FileTruncate, CWD, a[0])
        },
        SYS_RENAME => PathOp {
            dirfd2: CWD,
            path2: a[1],
            ..op(FileRename, CWD, a[0])
        },
        SYS_RENAMEAT => PathOp {
            dirfd2: i(a[2]),
            path2: a[3],
            ..op(FileRename, i(a[0]), a[1])
        },
        SYS_RENAMEAT2 => PathOp {
            dirfd2: i(a[2]),
            path2: a[3],
            flags: a[4] as u32,
            ..op(FileRename, i(a[0]), a[1])
        },
        SYS_UNLINK => op(FileUnlink, CWD, a[0]),
        SYS_UNLINKAT => PathOp {
            flags: a[2] as u32,
            ..op(FileUnlink, i(a[0]), a[1])
        },
        SYS_RMDIR => PathOp {
            flags: AT_REMOVEDIR,
            ..op(FileUnlink, CWD, a[0])
        },
        SYS_MKDIR => PathOp {
            mode: a[1] as u32,
            ..op(FileMkdir, CWD, a[0])
        },
        SYS_MKDIRAT => PathOp {
            mode: a[2] as u32,
            ..op(FileMkdir, i(a[0]), a[1])
        },
        // symlink: `path` is the link's target text (never resolved), `path2` the new link.
        SYS_SYMLINK => PathOp {
            dirfd2: CWD,
            path2: a[1],
            ..op(FileSymlink, CWD, a[0])
        },
        SYS_SYMLINKAT => PathOp {
            dirfd2: i(a[1]),
            path2: a[2],
            ..op(FileSymlink, CWD, a[0])
        },
        SYS_LINK => PathOp {
            dirfd2: CWD,
            path2: a[1],
            ..op(FileLink, CWD, a[0])
        },
        SYS_LINKAT => PathOp {
            dirfd2: i(a[2]),
            path2: a[3],
            flags: a[4] as u32,
            ..op(FileLink, i(a[0]), a[1])
        },
        SYS_MKNOD => PathOp {
            mode: a[1] as u32,
            ..op(FileMknod, CWD, a[0])
        },
        SYS_MKNODAT => PathOp {
            mode: a[2] as u32,
            ..op(FileMknod, i(a[0]), a[1])
        },
        SYS_CHMOD => PathOp {
            mode: a[1] as u32,
            ..op(FileMeta, CWD, a[0])
        },
        SYS_FCHMODAT | SYS_FCHMODAT2 => PathOp {
            mode: a[2] as u32,
            flags: a[3] as u32,
            ..op(FileMeta, i(a[0]), a[1])
        },
        SYS_CHOWN | SYS_LCHOWN | SYS_UTIME | SYS_UTIMES | SYS_SETXATTR | SYS_LSETXATTR
        | SYS_REMOVEXATTR | SYS_LREMOVEXATTR => op(FileMeta, CWD, a[0]),
        SYS_FCHOWNAT => PathOp {
            flags: a[4] as u32,
            ..op(FileMeta, i(a[0]), a[1])
        },
        SYS_FUTIMESAT => op(FileMeta, i(a[0]), a[1]),
        // utimensat(fd, NULL, ...) is futimens(fd): the path is empty and `dirfd` is the file.
        SYS_UTIMENSAT => PathOp {
            flags: a[3] as u32,
            ..op(FileMeta, i(a[0]), a[1])
        },
        SYS_SETXATTRAT | SYS_REMOVEXATTRAT => PathOp {
            flags: a[2] as u32,
            ..op(FileMeta, i(a[0]), a[1])
        },
        SYS_CHDIR => op(Chdir, CWD, a[0]),
        _ => return None,
    })
}

fn try_path_op(ctx: &BtfTracePointContext) -> Option<()> {
    let sc = sys_exit(ctx)?;
    let SysExit {
        cgroup: cg,
        nr,
        ret,
        args: a,
        ..
    } = sc;
    let d = decode(nr, &a)?;
    let is_open = d.kind == EventKind::FileOpen;
    if ret < 0 || (!is_open && ret != 0) {
        return None;
    }
    let o = config::ready_offsets()?;
    // Read-only opens are most opens (libraries, imports, configs): they have no side effect,
    // and userspace needs only directories among them (to resolve *at() paths). Decide from
    // the flags before reading any kernel structure; directories are opened with O_DIRECTORY
    // by opendir(), fts and the like.
    if is_open && d.flags & O_ACCMODE == 0 && d.flags & (O_CREAT | O_TRUNC | O_DIRECTORY) == 0 {
        return None;
    }
    let opened = if is_open {
        file_info(&o, sc.fd_file(ret))
    } else {
        Default::default()
    };
    if is_open
        && d.flags & O_ACCMODE == 0
        && d.flags & (O_CREAT | O_TRUNC) == 0
        && opened.ftype != file_type::DIR
    {
        return None;
    }
    // What the thread's run of writes holds goes first: the header below is written into the
    // reserved record, after the reservation that orders records in the ring.
    crate::write_run::end(aya_ebpf::helpers::bpf_get_current_pid_tgid());
    let Some(mut entry) = EVENTS.reserve::<PathEvent>(0) else {
        count_lost();
        return None;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points to a reserved ring-buffer record of size_of::<PathEvent>() bytes;
    // every field is written before the record is submitted.
    unsafe {
        (*e).hdr = header(d.kind, nr, cg);
        (*e).ret = ret;
        (*e).flags = d.flags;
        (*e).mode = d.mode;
        (*e).arg = d.arg;
        (*e).dirfd = d.dirfd as i32;
        (*e).dirfd2 = d.dirfd2 as i32;
        (*e).file_dev = opened.dev;
        (*e).file_type = opened.ftype;
        (*e).file_ino = opened.ino;
        (*e).trunc = 0;
        (*e)._pad = 0;
        let (t1, rel1) = read_path(d.path, &mut (*e).path);
        let (t2, rel2) = read_path(d.path2, &mut (*e).path2);
        (*e).trunc = if t1 { PATH1_TRUNCATED } else { 0 } | if t2 { PATH2_TRUNCATED } else { 0 };
        // The symlink target text is not a path the kernel resolves: never look up its dirfd.
        let rel1 = rel1 && d.kind != EventKind::FileSymlink;
        let (dev, ino) = dir_identity(&o, &sc, d.dirfd, rel1);
        (*e).dir_dev = dev;
        (*e).dir_ino = ino;
        let (dev2, ino2) = dir_identity(&o, &sc, d.dirfd2, rel2);
        (*e).dir2_dev = dev2;
        (*e).dir2_ino = ino2;
    }
    entry.submit(crate::emit::wakeup_flags_reserved(size_of::<PathEvent>()));
    count_event();
    Some(())
}

/// Copies a user path into `buf`. Returns (truncated, relative): a relative path (or an empty
/// one, as in `utimensat(fd, NULL)`) is resolved against its directory descriptor.
#[inline(always)]
fn read_path(ptr: u64, buf: &mut [u8; PATH_LEN]) -> (bool, bool) {
    buf[0] = 0;
    if ptr == 0 {
        return (false, true);
    }
    // SAFETY: bpf_probe_read_user_str checks the source address and writes at most PATH_LEN
    // bytes into `buf`, always NUL-terminated.
    match unsafe { bpf_probe_read_user_str_bytes(ptr as *const u8, buf) } {
        Ok(s) => (s.len() + 1 >= PATH_LEN, buf[0] != b'/'),
        Err(_) => {
            buf[0] = 0;
            (false, true)
        }
    }
}

/// (device, inode) of the directory a relative path is resolved against when that directory
/// is given as a descriptor; (0, 0) for absolute paths and paths relative to the cwd.
#[inline(always)]
fn dir_identity(o: &KernelOffsets, sc: &SysExit, dirfd: i64, relative: bool) -> (u32, u64) {
    if !relative || dirfd == CWD || dirfd < 0 {
        return (0, 0);
    }
    let info = file_info(o, sc.fd_file(dirfd));
    (info.dev, info.ino)
}
