//! The policy file (TOML) into a [`Policy`], with errors that name the line and say what to
//! write instead.
//!
//! ```toml
//! default = "allow"        # allow | deny | defer | buffer (network destinations no rule matches)
//! buffer_status = 202      # optional: the answer to a buffered HTTP request, and its body
//! buffer_body = ""
//! defer_timeout = 3600     # optional: seconds a deferred call may wait for the commit
//! [[rule]]
//! class = "net"            # or "file"
//! dest = "127.0.0.2/32"    # CIDR, address or host name; for files: path = "/srv/shared"
//! ports = "8000-8100"      # optional: "N", "N-M" or N
//! action = "defer"         # allow | deny | defer | buffer | share (files)
//! ```

use std::net::{IpAddr, ToSocketAddrs};
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::{Action, Dest, MAX_RULES, Policy, Rule};
use crate::error::{Error, Result};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    default: Option<Spanned<String>>,
    buffer_status: Option<Spanned<i64>>,
    buffer_body: Option<String>,
    defer_timeout: Option<Spanned<i64>>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    class: Option<Spanned<String>>,
    dest: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    ports: Option<Spanned<Ports>>,
    action: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Ports {
    One(i64),
    Text(String),
}

/// 1-based line of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

/// Parses and checks a policy file's text.
pub fn parse(text: &str) -> Result<Policy> {
    let file: File = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        let msg = e.message().trim().to_string();
        Error::Invalid(match line {
            Some(l) => format!("policy, line {l}: {msg}"),
            None => format!("policy: {msg}"),
        })
    })?;
    let err = |at: usize, msg: String| {
        Error::Invalid(format!("policy, line {}: {msg}", line_of(text, at)))
    };
    let default = match &file.default {
        Some(d) => {
            let a = action(d.get_ref()).map_err(|m| err(d.span().start, m))?;
            if a == Action::Share {
                return Err(err(
                    d.span().start,
                    "default \"share\" is for files only: the default applies to network destinations (allow, deny, defer or buffer)".into(),
                ));
            }
            a
        }
        None => Action::Allow,
    };
    let mut rules = Vec::new();
    for raw in &file.rule {
        let at = raw.span().start;
        let r = raw.get_ref();
        let line = line_of(text, at);
        let class = r.class.as_ref().ok_or_else(|| {
            err(
                at,
                "this rule has no class: add class = \"net\" or class = \"file\"".into(),
            )
        })?;
        let act = r.action.as_ref().ok_or_else(|| {
            err(at, "this rule has no action: add action = \"allow\", \"deny\", \"defer\", \"buffer\" or \"share\"".into())
        })?;
        let a = action(act.get_ref()).map_err(|m| err(act.span().start, m))?;
        match class.get_ref().as_str() {
            "net" => {
                if r.path.is_some() {
                    return Err(err(
                        at,
                        "a net rule takes dest (a CIDR, address or host name), not path".into(),
                    ));
                }
                if a == Action::Share {
                    return Err(err(
                        act.span().start,
                        "\"share\" is for file rules: a net rule allows, denies, defers or buffers"
                            .into(),
                    ));
                }
                let dest = r.dest.as_ref().ok_or_else(|| {
                    err(at, "this net rule has no dest: add dest = \"10.0.0.0/8\" (a CIDR, an address or a host name)".into())
                })?;
                let ports = match &r.ports {
                    Some(p) => ports(p.get_ref()).map_err(|m| err(p.span().start, m))?,
                    None => (0, u16::MAX),
                };
                for (addr, prefix) in
                    destinations(dest.get_ref()).map_err(|m| err(dest.span().start, m))?
                {
                    if a == Action::Buffer && addr.is_ipv6() {
                        return Err(err(
                            dest.span().start,
                            format!(
                                "{addr}: buffer works for IPv4 TCP only; use defer or deny for IPv6 destinations"
                            ),
                        ));
                    }
                    rules.push(Rule {
                        dest: Dest::Net {
                            addr,
                            prefix,
                            ports,
                        },
                        action: a,
                        line,
                    });
                }
            }
            "file" => {
                if r.dest.is_some() || r.ports.is_some() {
                    return Err(err(
                        at,
                        "a file rule takes path = \"/some/dir\", not dest or ports".into(),
                    ));
                }
                if a == Action::Defer || a == Action::Buffer {
                    return Err(err(
                        act.span().start,
                        format!(
                            "{a:?} is not built for files: a file rule shares (share or allow) or denies",
                            a = act.get_ref()
                        ),
                    ));
                }
                let p = r.path.as_ref().ok_or_else(|| {
                    err(
                        at,
                        "this file rule has no path: add path = \"/srv/shared\"".into(),
                    )
                })?;
                let path = PathBuf::from(p.get_ref());
                if !path.is_absolute() {
                    return Err(err(
                        p.span().start,
                        format!("path {:?} is relative: give an absolute path", p.get_ref()),
                    ));
                }
                if path.starts_with("/tmp") || path == std::path::Path::new("/") {
                    return Err(err(
                        p.span().start,
                        format!(
                            "path {:?}: /tmp is the branch's own already, and / cannot be shared whole",
                            p.get_ref()
                        ),
                    ));
                }
                if !path.exists() {
                    return Err(err(
                        p.span().start,
                        format!(
                            "path {:?} does not exist on the host: create it or fix the rule",
                            p.get_ref()
                        ),
                    ));
                }
                // Judged and mounted as what it is: symlinks and `..` resolved now.
                let path = path
                    .canonicalize()
                    .map_err(|e| err(p.span().start, format!("path {:?}: {e}", p.get_ref())))?;
                if path == std::path::Path::new("/")
                    || ["/tmp", "/proc", "/sys", "/dev", "/run"]
                        .iter()
                        .any(|k| path.starts_with(k))
                {
                    return Err(err(
                        p.span().start,
                        format!(
                            "path {:?} is {}: /, /tmp, /proc, /sys, /dev and /run cannot be shared or denied",
                            p.get_ref(),
                            path.display()
                        ),
                    ));
                }
                rules.push(Rule {
                    dest: Dest::File { path },
                    action: a,
                    line,
                });
            }
            other => {
                return Err(err(
                    class.span().start,
                    format!("unknown class {other:?}: use \"net\" or \"file\""),
                ));
            }
        }
    }
    let net = rules
        .iter()
        .filter(|r| matches!(r.dest, Dest::Net { .. }))
        .count();
    if net > MAX_RULES {
        return Err(Error::Invalid(format!(
            "policy: {net} network rules (host names count once per address); at most {MAX_RULES}"
        )));
    }
    let buffer_status = match &file.buffer_status {
        Some(st) => Some(
            u16::try_from(*st.get_ref())
                .ok()
                .filter(|c| (200..600).contains(c))
                .ok_or_else(|| {
                    err(
                        st.span().start,
                        format!(
                            "buffer_status {} is not an HTTP status (200 to 599)",
                            st.get_ref()
                        ),
                    )
                })?,
        ),
        None => None,
    };
    let defer_timeout_s = match &file.defer_timeout {
        Some(t) if *t.get_ref() > 0 => Some(*t.get_ref() as u64),
        Some(t) => {
            return Err(err(
                t.span().start,
                format!(
                    "defer_timeout {} must be a number of seconds above 0",
                    t.get_ref()
                ),
            ));
        }
        None => None,
    };
    Ok(Policy {
        default,
        rules,
        buffer_status,
        buffer_body: file.buffer_body,
        defer_timeout_s,
    })
}

fn action(s: &str) -> std::result::Result<Action, String> {
    Ok(match s {
        "allow" => Action::Allow,
        "deny" => Action::Deny,
        "defer" => Action::Defer,
        "buffer" => Action::Buffer,
        "share" => Action::Share,
        other => {
            return Err(format!(
                "unknown action {other:?}: use allow, deny, defer, buffer or share"
            ));
        }
    })
}

fn ports(p: &Ports) -> std::result::Result<(u16, u16), String> {
    let one = |s: &str| -> std::result::Result<u16, String> {
        s.trim()
            .parse::<u16>()
            .map_err(|_| format!("port {s:?} is not a number from 0 to 65535"))
    };
    match p {
        Ports::One(n) => u16::try_from(*n)
            .map(|n| (n, n))
            .map_err(|_| format!("port {n} is not a number from 0 to 65535")),
        Ports::Text(t) => {
            let (lo, hi) = match t.split_once('-') {
                Some((a, b)) => (one(a)?, one(b)?),
                None => {
                    let n = one(t)?;
                    (n, n)
                }
            };
            if lo > hi {
                return Err(format!(
                    "ports {t:?}: the range is backwards (write \"{hi}-{lo}\")"
                ));
            }
            Ok((lo, hi))
        }
    }
}

/// The addresses a dest names: a CIDR, an address (a /32 or /128), or a host name (each of
/// its addresses, resolved now).
fn destinations(d: &str) -> std::result::Result<Vec<(IpAddr, u8)>, String> {
    if let Some((a, p)) = d.split_once('/') {
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("dest {d:?}: {a:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("dest {d:?}: the prefix length must be 0 to {max}"))?;
        return Ok(vec![(addr, prefix)]);
    }
    if let Ok(addr) = d.parse::<IpAddr>() {
        return Ok(vec![(addr, if addr.is_ipv4() { 32 } else { 128 })]);
    }
    let resolved: Vec<IpAddr> = (d, 0)
        .to_socket_addrs()
        .map_err(|e| format!("dest {d:?} does not resolve ({e}): give an address or a CIDR"))?
        .map(|s| s.ip())
        .collect();
    if resolved.is_empty() {
        return Err(format!("dest {d:?} resolves to no address"));
    }
    let mut out: Vec<(IpAddr, u8)> = resolved
        .into_iter()
        .map(|a| (a, if a.is_ipv4() { 32 } else { 128 }))
        .collect();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn the_documented_shape_is_accepted() {
        let p = parse(
            "default = \"allow\"\n[[rule]]\nclass = \"net\"\ndest = \"127.0.0.2/32\"\nports = \"8000-8100\"\naction = \"buffer\"\n",
        )
        .unwrap();
        assert_eq!(p.default, Action::Allow);
        assert_eq!(p.rules.len(), 1);
        assert_eq!(p.rules[0].line, 2);
        assert_eq!(p.rules[0].action, Action::Buffer);
        let p = parse("defer_timeout = 30\n[[rule]]\nclass = \"net\"\ndest = \"127.0.0.2\"\naction = \"defer\"\n").unwrap();
        assert_eq!(p.rules[0].action, Action::Defer);
        assert_eq!(p.defer_timeout(), Some(std::time::Duration::from_secs(30)));
    }

    #[test]
    fn errors_name_the_line_and_what_to_write() {
        let e = error(
            "default = \"allow\"\n[[rule]]\nclass = \"net\"\ndest = \"10.0.0.0/8\"\naction = \"maybe\"\n",
        );
        assert!(
            e.contains("line 5") && e.contains("unknown action \"maybe\""),
            "{e}"
        );
        let e = error("[[rule]]\nclass = \"net\"\ndest = \"10.0.0.0/40\"\naction = \"deny\"\n");
        assert!(e.contains("line 3") && e.contains("prefix length"), "{e}");
        let e = error(
            "[[rule]]\nclass = \"net\"\ndest = \"10.0.0.1\"\nports = \"90-80\"\naction = \"deny\"\n",
        );
        assert!(e.contains("line 4") && e.contains("backwards"), "{e}");
        let e = error("default = \"allow\"\ncolour = 3\n");
        assert!(e.contains("line 2") && e.contains("colour"), "{e}");
        let e = error("[[rule]]\nclass = \"disk\"\naction = \"deny\"\n");
        assert!(e.contains("line 2") && e.contains("unknown class"), "{e}");
        let e = error(
            "[[rule]]\nclass = \"net\"\ndest = \"no-such-host.invalid\"\naction = \"deny\"\n",
        );
        assert!(
            e.contains("line 3") && e.contains("does not resolve"),
            "{e}"
        );
        let e =
            error("[[rule]]\nclass = \"file\"\npath = \"/srv/no/such/dir\"\naction = \"share\"\n");
        assert!(e.contains("line 3") && e.contains("does not exist"), "{e}");
        let e = error("[[rule]]\nclass = \"net\"\ndest = \"::1\"\naction = \"buffer\"\n");
        assert!(e.contains("IPv4 TCP only"), "{e}");
        let e = error("default = \"allow\"\n[[rule]]\nclass = \"net\"\naction = \"deny\"\n");
        assert!(e.contains("line 2") && e.contains("no dest"), "{e}");
        let e = error("default = 3\n");
        assert!(e.contains("line 1"), "{e}");
    }
}
