//! Side-effect policies: per branch, what each side effect outside the branch does. A
//! policy is written in TOML ([`parse`]), kept in the branch's record, inherited by its
//! forks, and enforced by the eBPF socket hooks (network rules, compiled by [`Policy::net`])
//! and by the branch's mounts (file rules, [`Policy::file_mounts`]).
//!
//! Precedence: rules are tried in the file's order and the first that matches decides;
//! none matching, `default` decides for the network. Files outside the workspace and
//! `/tmp` are read-only unless a rule shares them.

mod parse;

use std::net::IpAddr;
use std::path::PathBuf;

use forkscope_common::policy::{
    ACTION_ALLOW, ACTION_BUFFER, ACTION_DEFER, ACTION_DENY, MAX_NET_RULES, NetPolicy, NetRule,
};
use serde::{Deserialize, Serialize};

pub use parse::parse;

/// What happens to a side effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Happens now, traced.
    Allow,
    /// Refused: EPERM for the network (in the kernel), EROFS for files.
    Deny,
    /// Held until the branch commits (then it happens) or aborts (then it fails).
    Defer,
    /// Network: sent to the daemon's recording proxy, replayed on commit.
    Buffer,
    /// Files: writes go through to the host's file (traced).
    Share,
}

impl Action {
    fn code(self) -> u16 {
        match self {
            Action::Allow | Action::Share => ACTION_ALLOW,
            Action::Deny => ACTION_DENY,
            Action::Defer => ACTION_DEFER,
            Action::Buffer => ACTION_BUFFER,
        }
    }
}

/// What a rule matches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dest {
    /// Addresses `addr/prefix` and ports `ports.0..=ports.1`.
    Net {
        addr: IpAddr,
        prefix: u8,
        ports: (u16, u16),
    },
    /// A path and everything below it.
    File { path: PathBuf },
}

/// One rule, with the line it was written on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub dest: Dest,
    pub action: Action,
    pub line: usize,
}

/// A branch's policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// For network destinations no rule matches.
    pub default: Action,
    pub rules: Vec<Rule>,
    /// The answer the recording proxy gives a buffered HTTP request: status and body
    /// (default 202 Accepted, empty).
    #[serde(default)]
    pub buffer_status: Option<u16>,
    #[serde(default)]
    pub buffer_body: Option<String>,
    /// How long a deferred call may wait for the commit before it fails (seconds).
    #[serde(default)]
    pub defer_timeout_s: Option<u64>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            default: Action::Allow,
            rules: Vec::new(),
            buffer_status: None,
            buffer_body: None,
            defer_timeout_s: None,
        }
    }
}

/// How a path outside the workspace is mounted in the branch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMount {
    pub path: PathBuf,
    pub writable: bool,
}

impl Policy {
    /// Whether it has network rules (or a default) that are not plain allow: what the eBPF
    /// hooks enforce (defer included: they let a deferred call through only with its pass).
    pub fn needs_hooks(&self) -> bool {
        self.net() != Policy::default().net()
    }

    /// Whether anything is held for the branch's commit (its init then installs the
    /// seccomp listener).
    pub fn defers(&self) -> bool {
        self.default == Action::Defer || self.rules.iter().any(|r| r.action == Action::Defer)
    }

    /// How long a deferred call may be held (default: one hour).
    pub fn defer_timeout(&self) -> Option<std::time::Duration> {
        Some(std::time::Duration::from_secs(
            self.defer_timeout_s.unwrap_or(3600),
        ))
    }

    /// The synthetic answer to a buffered HTTP request.
    pub fn buffer_response(&self) -> (u16, String) {
        (
            self.buffer_status.unwrap_or(202),
            self.buffer_body.clone().unwrap_or_default(),
        )
    }

    /// Whether any network rule buffers.
    pub fn buffers(&self) -> bool {
        self.default == Action::Buffer || self.rules.iter().any(|r| r.action == Action::Buffer)
    }

    /// The network rules as the eBPF hooks read them.
    pub fn net(&self) -> NetPolicy {
        let mut p = NetPolicy {
            default_action: self.default.code(),
            ..NetPolicy::default()
        };
        for r in &self.rules {
            let Dest::Net {
                addr,
                prefix,
                ports,
            } = &r.dest
            else {
                continue;
            };
            let (net, mask, family) = words(*addr, *prefix);
            p.rules[p.count as usize] = NetRule {
                net,
                mask,
                family,
                port_lo: ports.0,
                port_hi: ports.1,
                action: r.action.code(),
            };
            p.count += 1;
        }
        p
    }

    /// The action for a connection to `addr`:`port` (the same decision the hooks make; an
    /// IPv4-mapped IPv6 address is the IPv4 address it maps).
    pub fn net_action(&self, addr: IpAddr, port: u16) -> Action {
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
            v4 => v4,
        };
        for r in &self.rules {
            if let Dest::Net {
                addr: a,
                prefix,
                ports,
            } = &r.dest
                && port >= ports.0
                && port <= ports.1
                && contains(*a, *prefix, addr)
            {
                return r.action;
            }
        }
        self.default
    }

    /// The mounts the file rules ask for, in the order to make them: the last rule first,
    /// so that of two nested paths the earlier rule's mount ends on top (first match wins).
    pub fn file_mounts(&self) -> Vec<FileMount> {
        self.rules
            .iter()
            .rev()
            .filter_map(|r| match &r.dest {
                Dest::File { path } => Some(FileMount {
                    path: path.clone(),
                    writable: r.action == Action::Share || r.action == Action::Allow,
                }),
                Dest::Net { .. } => None,
            })
            .collect()
    }

    /// The file rules only (they are fixed when a branch starts).
    pub fn file_rules(&self) -> Vec<&Rule> {
        self.rules
            .iter()
            .filter(|r| matches!(r.dest, Dest::File { .. }))
            .collect()
    }
}

/// Network-order words of `addr` masked to `prefix` bits, the mask, and the family.
fn words(addr: IpAddr, prefix: u8) -> ([u32; 4], [u32; 4], u16) {
    let (bytes, family, bits): ([u8; 16], u16, u32) = match addr {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            (b, libc::AF_INET as u16, 32)
        }
        IpAddr::V6(a) => (a.octets(), libc::AF_INET6 as u16, 128),
    };
    let mut net = [0u32; 4];
    let mut mask = [0u32; 4];
    for i in 0..4 {
        let start = i as u32 * 32;
        let m: u32 = if start >= bits {
            0
        } else {
            let take = (prefix as u32).saturating_sub(start).min(32);
            if take == 0 {
                0
            } else {
                u32::MAX << (32 - take)
            }
        };
        let w = u32::from_be_bytes(bytes[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
        // Network order in memory: the kernel's words are read as native integers.
        mask[i] = m.to_be();
        net[i] = (w & m).to_be();
    }
    (net, mask, family)
}

/// Whether `addr/prefix` contains `ip`.
fn contains(addr: IpAddr, prefix: u8, ip: IpAddr) -> bool {
    match (addr, ip) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix as u32)
            };
            u32::from(a) & m == u32::from(b) & m
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - prefix as u32)
            };
            u128::from(a) & m == u128::from(b) & m
        }
        _ => false,
    }
}

/// Most network rules a policy may hold (after host names are resolved).
pub const MAX_RULES: usize = MAX_NET_RULES;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_matching_rule_decides_then_the_default() {
        let p = parse(
            r#"
default = "deny"
[[rule]]
class = "net"
dest = "127.0.0.2/32"
ports = "8000-8100"
action = "buffer"
[[rule]]
class = "net"
dest = "127.0.0.0/8"
action = "allow"
"#,
        )
        .unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(p.net_action(ip("127.0.0.2"), 8050), Action::Buffer);
        assert_eq!(p.net_action(ip("127.0.0.2"), 9000), Action::Allow);
        assert_eq!(p.net_action(ip("127.0.0.9"), 80), Action::Allow);
        assert_eq!(p.net_action(ip("10.0.0.1"), 80), Action::Deny);
        assert_eq!(p.net_action(ip("::ffff:127.0.0.2"), 8050), Action::Buffer);
        let n = p.net();
        assert_eq!(n.count, 2);
        assert_eq!(n.rules[0].net[0], u32::from_ne_bytes([127, 0, 0, 2]));
        assert_eq!(n.rules[1].mask[0], u32::from_ne_bytes([255, 0, 0, 0]));
        assert_eq!((n.rules[0].port_lo, n.rules[0].port_hi), (8000, 8100));
        assert_eq!((n.rules[1].port_lo, n.rules[1].port_hi), (0, 65535));
        assert_eq!(n.default_action, ACTION_DENY);
    }

    #[test]
    fn nested_file_rules_mount_the_earlier_rule_last() {
        let dir = std::path::PathBuf::from("/var/tmp");
        let sub = dir.join("forkscope-policy-test-sub");
        std::fs::create_dir_all(&sub).unwrap();
        let text = format!(
            "[[rule]]\nclass = \"file\"\npath = \"{}\"\naction = \"deny\"\n[[rule]]\nclass = \"file\"\npath = \"{}\"\naction = \"share\"\n",
            sub.display(),
            dir.display()
        );
        let p = parse(&text).unwrap();
        let m = p.file_mounts();
        assert_eq!(m[0].path, dir);
        assert!(m[0].writable);
        assert_eq!(m[1].path, sub);
        assert!(!m[1].writable);
        std::fs::remove_dir(&sub).unwrap();
    }
}
