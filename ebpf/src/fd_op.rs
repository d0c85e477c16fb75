//! Descriptor operations other than writing data: `ftruncate`, `fallocate`, `fchmod`,
//! `fchown`, `fsetxattr`, `fremovexattr`, the reflink ioctls (`FICLONE`, `FICLONERANGE`),
//! writable shared file mappings (`mmap`: the stores themselves make no syscall) and `fchdir`.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use forkscope_common::{EventKind, FdEvent, event::file_type, syscalls::*};

use crate::{
    config,
    emit::{header, send},
    kernel::{SysExit, file_info, read_user, sys_exit},
};

#[btf_tracepoint(function = "sys_exit")]
pub fn sys_exit_fd_op(ctx: BtfTracePointContext) -> i32 {
    let _ = try_fd_op(&ctx);
    0
}

fn try_fd_op(ctx: &BtfTracePointContext) -> Option<()> {
    let sc = sys_exit(ctx)?;
    let SysExit {
        cgroup: cg,
        nr,
        ret,
        args: a,
        ..
    } = sc;
    // (kind, fd, offset, bytes, flags, source fd)
    let (kind, fd, offset, bytes, flags, src_fd) = match nr {
        SYS_MMAP => {
            // Failed mmaps return -errno; addresses are never in the last page.
            if (ret as u64) > (-4096i64) as u64
                || a[2] & PROT_WRITE == 0
                || !matches!(a[3] & 0x3, MAP_SHARED | MAP_SHARED_VALIDATE)
                || (a[4] as i64) < 0
            {
                return None;
            }
            (
                EventKind::FileMmap,
                a[4] as i64,
                a[5] as i64,
                a[1] as i64,
                a[2] as u32,
                -1,
            )
        }
        _ if ret != 0 => return None,
        SYS_FTRUNCATE => (EventKind::FileTruncate, a[0] as i64, -1, a[1] as i64, 0, -1),
        SYS_FALLOCATE => (
            EventKind::FileTruncate,
            a[0] as i64,
            a[2] as i64,
            a[3] as i64,
            a[1] as u32,
            -1,
        ),
        SYS_FCHMOD => (EventKind::FileMeta, a[0] as i64, -1, 0, a[1] as u32, -1),
        SYS_FCHOWN | SYS_FSETXATTR | SYS_FREMOVEXATTR => {
            (EventKind::FileMeta, a[0] as i64, -1, 0, 0, -1)
        }
        SYS_FCHDIR => (EventKind::Chdir, a[0] as i64, -1, 0, 0, -1),
        SYS_IOCTL => {
            let cmd = a[1] as u32;
            if cmd == FICLONE {
                (EventKind::FileClone, a[0] as i64, 0, -1, 0, a[2] as i64)
            } else if cmd == FICLONERANGE {
                // struct file_clone_range { s64 src_fd; u64 src_offset; u64 src_length; u64 dest_offset; }
                let range = read_user::<[i64; 4]>(a[2])?;
                (
                    EventKind::FileClone,
                    a[0] as i64,
                    range[3],
                    range[2],
                    0,
                    range[0],
                )
            } else {
                return None;
            }
        }
        _ => return None,
    };
    let o = config::ready_offsets()?;
    let info = file_info(&o, sc.fd_file(fd));
    if kind == EventKind::FileMmap && info.ftype != file_type::REG {
        return None;
    }
    let src = if src_fd >= 0 {
        file_info(&o, sc.fd_file(src_fd))
    } else {
        Default::default()
    };
    let ev = FdEvent {
        file_type: info.ftype,
        ino: info.ino,
        dev: info.dev,
        flags,
        offset,
        bytes,
        src_fd: src_fd as i32,
        src_dev: src.dev,
        src_ino: src.ino,
        ret: ret as i32,
        ..FdEvent::new(header(kind, nr, cg), fd as i32)
    };
    send(&ev);
    Some(())
}
