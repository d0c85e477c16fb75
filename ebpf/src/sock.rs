//! The branches' network policies, enforced in the kernel by cgroup socket-address hooks
//! (`connect4/6`, `sendmsg4/6`) attached to forkscope's parent cgroup, so they run for every
//! branch. The policy is the one of the branch the calling task is in (not the cgroup the
//! socket was made in: a clone's inherited sockets follow the branch that uses them).
//!
//! - deny: the call fails with EPERM, and a NetDenied event is sent;
//! - buffer (IPv4 TCP connect): the destination is rewritten to the daemon's proxy and the
//!   socket bound to a loopback source address naming a slot of REDIRECTS, where the real
//!   destination is kept for the proxy; a NetBuffered event is sent. Buffering needs the
//!   host's network (the proxy listens there) and is refused otherwise;
//! - defer: held by the branch's seccomp listener in userspace before it gets here; the hook
//!   lets it through only with the one-time pass the daemon wrote for that thread and
//!   destination when it let the call go (DEFER_PASSES), and refuses it otherwise (EPERM,
//!   NetDenied): a call cannot reach a deferred destination by changing its memory after the
//!   daemon looked, by answering its own notification, or through a call the filter does not
//!   hold (sendmmsg);
//! - allow: let through.
//!
//! An IPv4-mapped IPv6 destination (`::ffff:a.b.c.d`) is judged as the IPv4 address it is.
//!
//! For a branch traced without per-write detail (no syscall program reports its
//! connections), a connect let through is reported here as NetConnect (fd -1: the hook does
//! not know the descriptor).

use aya_ebpf::{
    bindings::{bpf_sock_addr, sockaddr},
    helpers::{
        bpf_bind, bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id,
        bpf_get_current_pid_tgid, bpf_get_smp_processor_id,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use forkscope_common::{
    EventKind, FdEvent,
    keys::TRACED_NO_WRITES,
    policy::{
        ACTION_BUFFER, ACTION_DEFER, ACTION_DENY, MAX_NET_RULES, NetPolicy, REDIRECT_SLOTS,
        Redirect,
    },
};

use crate::{
    emit::{header, send},
    kernel::{AF_INET, AF_INET6},
    maps::{DEFER_PASSES, NET_POLICIES, NEXT_REDIRECT, PROXY, REDIRECTS},
};

const SOCK_STREAM: u32 = 1;
/// Let the call go on / fail it with EPERM.
const PASS: i32 = 1;
const REFUSE: i32 = 0;
/// What `judge` answers for a call sent to the proxy (PASS to the kernel).
const REDIRECTED: i32 = 2;
/// Deepest cgroup nesting looked at for a branch's policy.
const MAX_DEPTH: i32 = 8;
/// CPUs that take slots of REDIRECTS (more share theirs).
const REDIRECT_CPUS: u32 = 64;
/// Syscall numbers reported in the events' headers.
const SYS_CONNECT: u32 = 42;
const SYS_SENDMSG: u32 = 46;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    decide(&ctx, AF_INET, SYS_CONNECT)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    decide(&ctx, AF_INET6, SYS_CONNECT)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    decide(&ctx, AF_INET, SYS_SENDMSG)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    decide(&ctx, AF_INET6, SYS_SENDMSG)
}

/// The policy of the branch the current task is in (its cgroup or an ancestor's), with
/// that branch's cgroup id.
#[inline(always)]
fn policy() -> Option<(u64, &'static NetPolicy)> {
    // SAFETY: helper without arguments.
    let cg = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the map holds plain data; the reference lives for this program run.
    if let Some(p) = unsafe { NET_POLICIES.get(cg) } {
        return Some((cg, p));
    }
    let mut level = 0;
    while level < MAX_DEPTH {
        // SAFETY: helper taking an integer level; returns 0 past the task's own level.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 || id == cg {
            break;
        }
        // SAFETY: as above.
        if let Some(p) = unsafe { NET_POLICIES.get(id) } {
            return Some((id, p));
        }
        level += 1;
    }
    None
}

/// The hook's answer (PASS or REFUSE), with the connection reported when its branch is
/// traced without per-write detail and the call goes through unchanged.
fn decide(ctx: &SockAddrContext, family: u16, syscall: u32) -> i32 {
    let verdict = judge(ctx, family, syscall);
    if verdict == PASS
        && syscall == SYS_CONNECT
        && let Some(cg) = crate::cgroup::tracked_as(TRACED_NO_WRITES)
        // SAFETY: the kernel hands the program a valid context pointer for its run.
        && let Some(sa) = unsafe { ctx.sock_addr.as_ref() }
    {
        let (family, addr, _) = destination(sa, family);
        let port = u16::from_be(sa.user_port as u16);
        report(EventKind::NetConnect, SYS_CONNECT, cg, family, &addr, port);
    }
    if verdict == REDIRECTED { PASS } else { verdict }
}

/// The destination of the call: (family, address, whether an IPv4-mapped IPv6 address was
/// turned into the IPv4 address it is).
#[inline(always)]
fn destination(sa: &bpf_sock_addr, family: u16) -> (u16, [u32; 4], bool) {
    if family == AF_INET {
        return (AF_INET, [sa.user_ip4, 0, 0, 0], false);
    }
    let addr = sa.user_ip6;
    // ::ffff:a.b.c.d is a.b.c.d.
    if addr[0] == 0 && addr[1] == 0 && addr[2] == 0xffffu32.to_be() {
        return (AF_INET, [addr[3], 0, 0, 0], true);
    }
    (family, addr, false)
}

/// PASS, REFUSE, or REDIRECTED (to the proxy: passed, already reported) by the branch's
/// policy.
fn judge(ctx: &SockAddrContext, family: u16, syscall: u32) -> i32 {
    let Some((branch, p)) = policy() else {
        return PASS;
    };
    // SAFETY: the kernel hands the program a valid context pointer for its run.
    let sa: &bpf_sock_addr = match unsafe { ctx.sock_addr.as_ref() } {
        Some(s) => s,
        None => return PASS,
    };
    let (family, addr, mapped) = destination(sa, family);
    // user_port is in network order in its low 16 bits.
    let port = u16::from_be(sa.user_port as u16);
    let action = action_for(p, family, &addr, port);
    if action == ACTION_DENY {
        report(EventKind::NetDenied, syscall, branch, family, &addr, port);
        return REFUSE;
    }
    if action == ACTION_DEFER {
        if take_pass(family, &addr, port) {
            return PASS;
        }
        report(EventKind::NetDenied, syscall, branch, family, &addr, port);
        return REFUSE;
    }
    if action == ACTION_BUFFER {
        // Only IPv4 TCP connections can be buffered; anything else is refused, never let
        // out unbuffered.
        if mapped || family != AF_INET || syscall != SYS_CONNECT || sa.type_ != SOCK_STREAM {
            report(EventKind::NetDenied, syscall, branch, family, &addr, port);
            return REFUSE;
        }
        return redirect(ctx, branch, &addr, port);
    }
    PASS
}

/// Whether the daemon let this thread's deferred call to this destination go (the pass is
/// used up).
#[inline(always)]
fn take_pass(family: u16, addr: &[u32; 4], port: u16) -> bool {
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: plain data in the map; read before the entry is removed below.
    let matches = match unsafe { DEFER_PASSES.get(tid) } {
        Some(p) => p.family == family && p.port == port && p.addr == *addr,
        None => false,
    };
    if matches {
        let _ = DEFER_PASSES.remove(tid);
    }
    matches
}

/// The first matching rule's action, or the default.
#[inline(always)]
fn action_for(p: &NetPolicy, family: u16, addr: &[u32; 4], port: u16) -> u16 {
    let count = p.count as usize;
    let mut i = 0;
    while i < MAX_NET_RULES {
        if i >= count {
            break;
        }
        let r = &p.rules[i];
        if r.family == family
            && port >= r.port_lo
            && port <= r.port_hi
            && addr[0] & r.mask[0] == r.net[0]
            && addr[1] & r.mask[1] == r.net[1]
            && addr[2] & r.mask[2] == r.net[2]
            && addr[3] & r.mask[3] == r.net[3]
        {
            return r.action;
        }
        i += 1;
    }
    p.default_action
}

/// Sends the connection to the proxy (see the module doc): REDIRECTED, or REFUSE.
#[inline(always)]
fn redirect(ctx: &SockAddrContext, branch: u64, addr: &[u32; 4], port: u16) -> i32 {
    let proxy = match PROXY.get(0) {
        Some(p) if p.addr != 0 => *p,
        _ => {
            report(
                EventKind::NetDenied,
                SYS_CONNECT,
                branch,
                AF_INET,
                addr,
                port,
            );
            return REFUSE;
        }
    };
    // A slot no other connection in flight holds: this CPU's next number (a per-CPU
    // counter needs no atomic operation), with the CPU in the low bits.
    let Some(next) = NEXT_REDIRECT.get_ptr_mut(0) else {
        return REFUSE;
    };
    // SAFETY: `next` points at this CPU's slot (the program does not migrate). A program
    // preempted between the read and the write on a preemptible kernel could share a
    // number with another: the proxy then finds the later connection's record, which the
    // slot's sequence number does not tell apart (see docs/policy.md).
    let n = unsafe {
        let n = *next;
        *next = n + 1;
        n
    };
    // SAFETY: helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() } % REDIRECT_CPUS;
    let per_cpu = REDIRECT_SLOTS / REDIRECT_CPUS;
    let slot = (n % per_cpu as u64) as u32 * REDIRECT_CPUS + cpu;
    let Some(r) = REDIRECTS.get_ptr_mut(slot) else {
        return REFUSE;
    };
    // SAFETY: `r` points at a live array element; the proxy reads it only after the
    // connection arrives, which the connect below comes after.
    unsafe {
        *r = Redirect {
            cgroup: branch,
            addr: *addr,
            port,
            family: AF_INET,
            seq: (n / per_cpu as u64) as u32,
        };
    }
    let mut src = SockaddrIn {
        family: AF_INET,
        port: 0,
        addr: (proxy.source_base + slot).to_be(),
        zero: [0; 8],
    };
    // SAFETY: `src` is a valid sockaddr_in on the stack for the call.
    let bound = unsafe {
        bpf_bind(
            ctx.sock_addr,
            &mut src as *mut SockaddrIn as *mut sockaddr,
            core::mem::size_of::<SockaddrIn>() as i32,
        )
    };
    if bound != 0 {
        report(
            EventKind::NetDenied,
            SYS_CONNECT,
            branch,
            AF_INET,
            addr,
            port,
        );
        return REFUSE;
    }
    // SAFETY: the context is writable for connect4 (user_ip4/user_port).
    unsafe {
        (*ctx.sock_addr).user_ip4 = proxy.addr;
        (*ctx.sock_addr).user_port = (proxy.port.to_be()) as u32;
    }
    report(
        EventKind::NetBuffered,
        SYS_CONNECT,
        branch,
        AF_INET,
        addr,
        port,
    );
    REDIRECTED
}

#[repr(C)]
struct SockaddrIn {
    family: u16,
    port: u16,
    addr: u32,
    zero: [u8; 8],
}

#[inline(always)]
fn report(kind: EventKind, syscall: u32, branch: u64, family: u16, addr: &[u32; 4], port: u16) {
    let mut bytes = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let w = addr[i].to_ne_bytes();
        bytes[i * 4] = w[0];
        bytes[i * 4 + 1] = w[1];
        bytes[i * 4 + 2] = w[2];
        bytes[i * 4 + 3] = w[3];
        i += 1;
    }
    let ev = FdEvent {
        family,
        port,
        addr: bytes,
        ret: -1,
        ..FdEvent::new(header(kind, syscall, branch), -1)
    };
    send(&ev);
}
