//! Socket activity: `connect` (with the address asked for) and the send family (`sendto`,
//! `sendmsg`, `sendmmsg`) with the bytes sent and their destination: the address passed with
//! the call, or else the socket's connected peer. `write`/`writev` on sockets are handled in
//! [`crate::fd_write`]. A send without an address continues the thread's run of writes to the
//! socket ([`crate::write_run`]).

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use forkscope_common::{EventKind, FdEvent, syscalls::*};

use crate::{
    config,
    emit::{header, send},
    kernel::{
        Peer, SysExit, file_info, file_pos_inode, inode_number, read_user, socket_peer, sys_exit,
        user_sockaddr,
    },
    write_run,
};

/// Messages of one `sendmmsg` call reported individually (the rest are summed into the last).
const MAX_MMSG: u64 = 16;
/// sizeof(struct mmsghdr) on x86_64 and the offset of its `msg_len`.
const MMSGHDR_SIZE: u64 = 64;
const MMSG_LEN_OFFSET: u64 = 56;

#[btf_tracepoint(function = "sys_exit")]
pub fn sys_exit_net(ctx: BtfTracePointContext) -> i32 {
    let _ = try_net(&ctx);
    0
}

fn try_net(ctx: &BtfTracePointContext) -> Option<()> {
    let sc = sys_exit(ctx)?;
    let SysExit {
        cgroup: cg,
        nr,
        ret,
        args: a,
        pid_tgid,
        ..
    } = sc;
    let o = config::ready_offsets()?;
    let fd = a[0] as i64;
    let file = sc.fd_file(fd);
    // A send without an address goes to the socket's peer: it can continue the thread's run.
    let unaddressed = ret > 0
        && match nr {
            SYS_SENDTO => a[4] == 0,
            // struct user_msghdr starts with `void *msg_name`.
            SYS_SENDMSG => read_user::<u64>(a[1]).unwrap_or(0) == 0,
            _ => false,
        };
    if unaddressed && write_run::merging() && {
        let inode = file_pos_inode(&o, file).1;
        write_run::extend(pid_tgid, file, inode, || inode_number(&o, inode), -1, ret)
    } {
        return Some(());
    }
    let info = file_info(&o, file);
    let mut ev = FdEvent {
        file_type: info.ftype,
        ino: info.ino,
        dev: info.dev,
        bytes: ret,
        ..FdEvent::new(header(EventKind::NetSend, nr, cg), fd as i32)
    };
    let set_peer = |ev: &mut FdEvent, p: Peer| {
        ev.family = p.family;
        ev.port = p.port;
        ev.addr = p.addr;
    };
    match nr {
        SYS_CONNECT => {
            if ret != 0 && ret != EINPROGRESS_RET {
                return None;
            }
            ev.hdr.kind = EventKind::NetConnect as u32;
            ev.bytes = 0;
            ev.ret = ret as i32;
            set_peer(
                &mut ev,
                user_sockaddr(a[1]).unwrap_or_else(|| socket_peer(&o, file)),
            );
        }
        SYS_SENDTO => {
            if ret <= 0 {
                return None;
            }
            set_peer(
                &mut ev,
                user_sockaddr(a[4]).unwrap_or_else(|| socket_peer(&o, file)),
            );
        }
        SYS_SENDMSG => {
            if ret <= 0 {
                return None;
            }
            // struct user_msghdr starts with `void *msg_name`.
            let name = read_user::<u64>(a[1]).unwrap_or(0);
            set_peer(
                &mut ev,
                user_sockaddr(name).unwrap_or_else(|| socket_peer(&o, file)),
            );
        }
        SYS_SENDMMSG => {
            if ret <= 0 {
                return None;
            }
            let default_peer = socket_peer(&o, file);
            let count = ret as u64;
            let mut i = 0;
            while i < MAX_MMSG && i < count {
                let hdr = a[1] + i * MMSGHDR_SIZE;
                let name = read_user::<u64>(hdr).unwrap_or(0);
                let len = read_user::<u32>(hdr + MMSG_LEN_OFFSET).unwrap_or(0);
                set_peer(&mut ev, user_sockaddr(name).unwrap_or(default_peer));
                ev.bytes = len as i64;
                send(&ev);
                i += 1;
            }
            return Some(());
        }
        _ => return None,
    }
    if unaddressed {
        write_run::start(pid_tgid, file, info.inode, -1, &ev);
    }
    send(&ev);
    Some(())
}
