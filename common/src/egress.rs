//! Bytes leaving a branch's sockets, counted per destination by the `egress` cgroup_skb
//! program for branches traced without per-write detail (no syscall program sees their
//! sends): map `EGRESS`, a per-CPU LRU hash userspace sums and turns into `net_send`
//! records.

/// One destination of one branch's packets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EgressKey {
    /// cgroup v2 id of the registered cgroup (the branch's) the sending socket belongs to.
    pub cgroup: u64,
    /// Destination address (IPv4 in the first 4 bytes, network order).
    pub addr: [u8; 16],
    /// Destination port (host order).
    pub port: u16,
    /// AF_INET or AF_INET6.
    pub family: u16,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub protocol: u8,
    pub _pad: [u8; 3],
}
crate::assert_size!(EgressKey, 32);

/// What left for one destination (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressCount {
    /// Transport payload bytes (IP packet length less the IP and TCP/UDP headers), each
    /// TCP byte once: a retransmitted segment adds only bytes its socket had not sent.
    pub bytes: u64,
    /// Packets that carried bytes counted in `bytes` (a TCP segmentation-offload packet
    /// counts once; a retransmission of bytes already counted, not at all).
    pub packets: u64,
}
crate::assert_size!(EgressCount, 16);

/// Entries `EGRESS` holds (least recently used ones are dropped past it).
pub const EGRESS_ENTRIES: u32 = 16_384;
