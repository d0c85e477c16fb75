//! Data written through a descriptor: `write`, `pwrite64`, `writev`, `pwritev(2)`,
//! `copy_file_range`, `sendfile` and `splice`. A regular file gives a `FileWrite` with the
//! offset and the bytes the syscall reports; a socket gives a `NetSend` to the socket's peer;
//! pipes, terminals and devices are ignored. A write that continues the thread's run (same
//! file, next offset) is merged into it ([`crate::write_run`]).

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use forkscope_common::{EventKind, FdEvent, event::file_type, syscalls::*};

use crate::{
    config,
    emit::{header, send},
    kernel::{SysExit, file_info, file_pos_inode, inode_number, read_user, socket_peer, sys_exit},
    write_run,
};

#[btf_tracepoint(function = "sys_exit")]
pub fn sys_exit_fd_write(ctx: BtfTracePointContext) -> i32 {
    let _ = try_fd_write(&ctx);
    0
}

fn try_fd_write(ctx: &BtfTracePointContext) -> Option<()> {
    let sc = sys_exit(ctx)?;
    let SysExit {
        cgroup: cg,
        nr,
        ret,
        args: a,
        pid_tgid,
        ..
    } = sc;
    if ret <= 0 {
        return None;
    }
    // (descriptor written to, offset given explicitly by the caller or -1)
    let (fd, explicit) = match nr {
        SYS_WRITE | SYS_WRITEV | SYS_SENDFILE => (a[0] as i64, -1),
        SYS_PWRITE64 | SYS_PWRITEV | SYS_PWRITEV2 => (a[0] as i64, a[3] as i64),
        // The offset pointer has been advanced by `ret` when the call returns.
        SYS_COPY_FILE_RANGE | SYS_SPLICE => (
            a[2] as i64,
            read_user::<i64>(a[3]).map_or(-1, |end| end - ret),
        ),
        _ => return None,
    };
    let o = config::ready_offsets()?;
    let file = sc.fd_file(fd);
    // The common case: the file behind the descriptor, its position and inode number.
    if write_run::merging() {
        let (pos, inode) = file_pos_inode(&o, file);
        let start = if explicit >= 0 {
            explicit
        } else if pos >= ret {
            pos - ret
        } else {
            -1
        };
        if write_run::extend(
            pid_tgid,
            file,
            inode,
            || inode_number(&o, inode),
            start,
            ret,
        ) {
            return Some(());
        }
    }
    let info = file_info(&o, file);
    // Pipes, terminals and devices: nothing to report (and the thread's run goes on).
    if info.ftype != file_type::REG && info.ftype != file_type::SOCK {
        return None;
    }
    let mut ev = FdEvent {
        file_type: info.ftype,
        ino: info.ino,
        dev: info.dev,
        flags: info.flags,
        bytes: ret,
        ..FdEvent::new(header(EventKind::FileWrite, nr, cg), fd as i32)
    };
    match info.ftype {
        file_type::REG => {
            // Without an explicit offset the write started `ret` bytes before the new
            // position (this also holds for O_APPEND, where the position is the old end).
            ev.offset = if explicit >= 0 {
                explicit
            } else if info.pos >= ret {
                info.pos - ret
            } else {
                -1
            };
        }
        file_type::SOCK => {
            let peer = socket_peer(&o, file);
            ev.hdr.kind = EventKind::NetSend as u32;
            ev.family = peer.family;
            ev.port = peer.port;
            ev.addr = peer.addr;
        }
        _ => return None,
    }
    if ev.hdr.kind == EventKind::NetSend as u32 || ev.offset >= 0 {
        write_run::start(pid_tgid, file, info.inode, ev.offset + ret, &ev);
    }
    send(&ev);
    Some(())
}
