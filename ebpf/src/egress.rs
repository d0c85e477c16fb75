//! Bytes a branch traced without per-write detail sends, per destination: a `cgroup_skb`
//! egress program on forkscope's parent cgroup (so it runs for the branches' packets only,
//! never for the rest of the host) adds each packet's transport payload to `EGRESS`, keyed
//! by the registered cgroup the sending socket belongs to and the destination. Branches
//! with per-write detail are skipped: their sends come from the syscall programs. A TCP
//! segment counts only its bytes past what its socket already sent (`TCP_SENT`), so a
//! retransmission adds nothing: the count is what the program sent, as a trace of its
//! syscalls would have it.

use core::intrinsics::{AtomicOrdering::Relaxed, atomic_xadd};

use aya_ebpf::{
    bindings::{__sk_buff, BPF_NOEXIST},
    helpers::{bpf_get_socket_cookie, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id},
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use forkscope_common::{
    egress::{EgressCount, EgressKey},
    keys::{TRACED_NO_WRITES, TRACK_NO_WRITE_DETAIL},
};

use crate::{
    kernel::{AF_INET, AF_INET6},
    maps::{EGRESS, TCP_SENT, TRACKED_CGROUPS},
};

/// Let the packet go (the program only counts).
const PASS: i32 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// The SYN flag in the TCP header's flags byte (it takes one sequence number).
const TCP_SYN: u8 = 0x02;
/// Deepest cgroup nesting looked at for the registered cgroup.
const MAX_DEPTH: i32 = 8;

/// `T` at `offset` in the packet (from its network header): a plain load where the packet's
/// linear part holds it (cgroup_skb programs may read the packet directly), else the
/// `bpf_skb_load_bytes` helper.
#[inline(always)]
fn load<T: Copy>(ctx: &SkBuffContext, offset: usize) -> Result<T, i64> {
    let skb = ctx.skb.skb;
    // SAFETY: reads of the program's own context; the verifier turns these two fields into
    // pointers to the start and end of the packet's linear data.
    let (data, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    let at = data + offset;
    // At least two bytes are checked: for one, LLVM turns `at + 1 <= end` into `at < end`,
    // which the verifier does not take as a range.
    if at + size_of::<T>().max(2) <= end {
        // SAFETY: [at, at + size_of::<T>()) lies within the linear data, checked just above
        // (the check the verifier requires); `T` is plain bytes.
        Ok(unsafe { core::ptr::read_unaligned(at as *const T) })
    } else {
        ctx.load(offset)
    }
}

#[cgroup_skb(egress)]
pub fn egress(ctx: SkBuffContext) -> i32 {
    let _ = count(&ctx);
    PASS
}

fn count(ctx: &SkBuffContext) -> Option<()> {
    // Headers first: most packets without payload (ACKs) stop here, before the cgroup
    // lookups. cgroup_skb sees the packet from its network header.
    let first: u8 = load(ctx, 0).ok()?;
    let mut key = EgressKey::default();
    let (l4, total) = match first >> 4 {
        4 => {
            key.family = AF_INET;
            key.protocol = load(ctx, 9).ok()?;
            let daddr: [u8; 4] = load(ctx, 16).ok()?;
            key.addr[..4].copy_from_slice(&daddr);
            (u32::from(first & 0x0f) * 4, ctx.skb.len())
        }
        6 => {
            key.family = AF_INET6;
            // (Extension headers are not followed: such packets are not counted.)
            key.protocol = load(ctx, 6).ok()?;
            key.addr = load(ctx, 24).ok()?;
            (40, ctx.skb.len())
        }
        _ => return None,
    };
    let header = match key.protocol {
        IPPROTO_TCP => {
            let off: u8 = load(ctx, l4 as usize + 12).ok()?;
            u32::from(off >> 4) * 4
        }
        IPPROTO_UDP => 8,
        _ => return None,
    };
    let mut payload = total.checked_sub(l4 + header)?;
    if payload == 0 {
        return None; // a bare ACK, SYN or FIN
    }
    key.cgroup = quiet_branch(ctx.skb.skb)?;
    if key.protocol == IPPROTO_TCP {
        payload = new_tcp_bytes(ctx, l4 as usize, payload)?;
    }
    let payload = u64::from(payload);
    let port: u16 = load(ctx, l4 as usize + 2).ok()?;
    key.port = u16::from_be(port);
    if EGRESS.get_ptr_mut(key).is_none() {
        // BPF_NOEXIST: a program that raced here first (a softirq on this CPU) keeps its
        // count; this one adds to it below.
        let _ = EGRESS.insert(key, EgressCount::default(), u64::from(BPF_NOEXIST));
    }
    let c = EGRESS.get_ptr_mut(key)?;
    // SAFETY: `c` points to this CPU's value of a live entry. The adds are atomic: a
    // softirq sending on this CPU can run this program in the middle of another run.
    unsafe {
        atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*c).bytes, payload);
        atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*c).packets, 1);
    }
    Some(())
}

/// How many of a TCP segment's `payload` bytes its socket sends for the first time (None:
/// none, the whole segment was sent before), recording how far the socket has sent.
#[inline(always)]
fn new_tcp_bytes(ctx: &SkBuffContext, l4: usize, payload: u32) -> Option<u32> {
    let seq: u32 = load(ctx, l4 + 4).ok()?;
    let flags: u8 = load(ctx, l4 + 13).ok()?;
    // The payload's first byte: a SYN (TCP Fast Open) takes a sequence number before it.
    let start = u32::from_be(seq).wrapping_add(u32::from(flags & TCP_SYN != 0));
    let end = start.wrapping_add(payload);
    // SAFETY: helper taking the program's own context; 0 for a packet without a socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let Some(sent) = TCP_SENT.get_ptr_mut(cookie) else {
        // The socket's first payload seen (or its entry was evicted): all of it is new.
        let _ = TCP_SENT.insert(cookie, end, 0);
        return Some(payload);
    };
    // SAFETY: `sent` points to a live map value; a socket's segments are sent one at a
    // time (under its lock), so nothing else updates it meanwhile.
    let upto = unsafe { *sent };
    // Sequence numbers wrap: compare by the signed difference.
    if end.wrapping_sub(upto) as i32 <= 0 {
        return None; // sent before
    }
    let from = if start.wrapping_sub(upto) as i32 > 0 {
        start
    } else {
        upto
    };
    // SAFETY: as above.
    unsafe { *sent = end };
    Some(end.wrapping_sub(from))
}

/// The registered cgroup (at or above the socket's) if it asked for no per-write detail.
#[inline(always)]
fn quiet_branch(skb: *mut __sk_buff) -> Option<u64> {
    // SAFETY: helper taking the program's own context.
    let own = unsafe { bpf_skb_cgroup_id(skb) };
    // A branch with per-write detail, or none: the verdict cache usually knows (its
    // syscalls filled it), which spares the walk. Without per-write detail the walk finds
    // the registered cgroup, which the key needs.
    if matches!(crate::cgroup::cached_verdict(own), Some(v) if v != TRACED_NO_WRITES) {
        return None;
    }
    let mut level = 0;
    let mut id = own;
    loop {
        if let Some(options) = TRACKED_CGROUPS.get_ptr(id) {
            // SAFETY: `options` points to a live map value.
            return (unsafe { *options } & TRACK_NO_WRITE_DETAIL != 0).then_some(id);
        }
        if level >= MAX_DEPTH {
            return None;
        }
        // SAFETY: helper taking the program's own context and an integer level; 0 past
        // the socket's own level.
        id = unsafe { bpf_skb_ancestor_cgroup_id(skb, level) };
        if id == 0 || id == own {
            return None;
        }
        level += 1;
    }
}
