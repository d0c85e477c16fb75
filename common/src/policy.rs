//! A branch's network policy as the eBPF socket hooks read it (map `NET_POLICIES`, keyed by
//! the branch's cgroup id), the buffering proxy's address (map `PROXY`), and the record of
//! each connection the hooks sent to that proxy (map `REDIRECTS`).
//!
//! Rules are tried in order and the first that matches decides (userspace keeps the
//! policy file's order); none matching, the default action applies.

/// What happens to a side effect. The numbers are shared with userspace: never renumber.
pub const ACTION_ALLOW: u16 = 0;
/// Refused in the kernel with EPERM.
pub const ACTION_DENY: u16 = 1;
/// Held by the branch's seccomp listener until the branch commits or aborts (the socket
/// hooks let it through: the listener decides).
pub const ACTION_DEFER: u16 = 2;
/// Redirected to the daemon's recording proxy (IPv4 TCP).
pub const ACTION_BUFFER: u16 = 3;

/// Most rules a branch's network policy holds.
pub const MAX_NET_RULES: usize = 32;

/// One rule: destinations `addr & mask == net` (32-bit words in network order; IPv4 uses
/// the first word), ports `port_lo..=port_hi` (host order), of `family` (AF_INET or
/// AF_INET6).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetRule {
    pub net: [u32; 4],
    pub mask: [u32; 4],
    pub family: u16,
    pub port_lo: u16,
    pub port_hi: u16,
    pub action: u16,
}
crate::assert_size!(NetRule, 40);

/// A branch's network rules.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetPolicy {
    pub default_action: u16,
    pub _pad: u16,
    /// Rules in use at the start of `rules`.
    pub count: u32,
    pub rules: [NetRule; MAX_NET_RULES],
}
crate::assert_size!(NetPolicy, 8 + 40 * MAX_NET_RULES);

impl Default for NetPolicy {
    fn default() -> Self {
        Self {
            default_action: ACTION_ALLOW,
            _pad: 0,
            count: 0,
            rules: [NetRule::default(); MAX_NET_RULES],
        }
    }
}

/// Where buffered connections go, and the block of loopback source addresses that tells
/// the proxy which connection is which: a buffered connection is bound to source address
/// `source_base + slot` (host order), and `REDIRECTS[slot]` holds its real destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyConfig {
    /// The proxy's IPv4 address, network order (0: no proxy, buffered connections are
    /// refused).
    pub addr: u32,
    /// The proxy's port, host order.
    pub port: u16,
    pub _pad: u16,
    /// First source address of the block, host order (127.77.0.1).
    pub source_base: u32,
    pub _pad2: u32,
}
crate::assert_size!(ProxyConfig, 16);

/// Slots of `REDIRECTS` (connections in flight to the proxy at once).
pub const REDIRECT_SLOTS: u32 = 65_536;

/// A connection redirected to the proxy: who made it and where it was going.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Redirect {
    /// cgroup id of the task that connected.
    pub cgroup: u64,
    /// The real destination, network order (IPv4 in the first word).
    pub addr: [u32; 4],
    /// The real destination port, host order.
    pub port: u16,
    pub family: u16,
    /// Bumped by the hook on each use of the slot; the proxy ignores a slot it has seen
    /// with the same sequence.
    pub seq: u32,
}
crate::assert_size!(Redirect, 32);

/// A deferred call the daemon let go (map `DEFER_PASSES`, by host thread id): the hooks let
/// exactly this destination through for that thread once; any other call to a deferred
/// destination is refused (so a call can never reach one by changing its memory between the
/// daemon's look and the kernel's, or by answering its own notification).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeferPass {
    /// Network order words, as in [`NetRule::net`].
    pub addr: [u32; 4],
    /// Host order.
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}
crate::assert_size!(DeferPass, 24);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: as below.
    unsafe impl aya::Pod for super::DeferPass {}
    // SAFETY: plain #[repr(C)] integers, no implicit padding (checked by the size
    // assertions): any bit pattern is valid.
    unsafe impl aya::Pod for super::NetPolicy {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProxyConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Redirect {}
}
