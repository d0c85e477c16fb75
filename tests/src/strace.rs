//! Totals from `strace -f -yy` output, the reference the tracer is checked against: bytes
//! written per file and bytes sent per destination, from the write and send syscalls.

use std::collections::{BTreeMap, HashMap};

/// The strace arguments that produce the output [`totals`] reads (to put before `-- CMD`).
pub const STRACE_ARGS: &[&str] = &[
    "-f",
    "-qq",
    "-yy",
    "-e",
    "signal=none",
    "-e",
    "trace=write,pwrite64,writev,pwritev,pwritev2,sendto,sendmsg,sendmmsg,copy_file_range,sendfile,splice",
];

/// Bytes per file path and per destination (`addr:port` or `[addr6]:port`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub files: BTreeMap<String, u64>,
    pub destinations: BTreeMap<String, u64>,
}

/// One finished syscall: name, argument text, result.
struct Call {
    name: String,
    args: String,
    ret: i64,
}

/// Joins `<unfinished ...>` / `<... resumed>` pairs and yields finished calls.
fn calls(text: &str) -> Vec<Call> {
    let mut pending: HashMap<String, (String, String)> = HashMap::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((pid, rest)) = line.split_once(char::is_whitespace) else {
            continue;
        };
        let rest = rest.trim_start();
        let (name, body) = if let Some(r) = rest.strip_prefix("<... ") {
            let Some((name, tail)) = r.split_once(" resumed>") else {
                continue;
            };
            let Some((_, head)) = pending.remove(pid) else {
                continue;
            };
            (name.to_string(), format!("{head}{tail}"))
        } else {
            let Some((name, body)) = rest.split_once('(') else {
                continue;
            };
            if let Some(head) = body.strip_suffix(" <unfinished ...>") {
                pending.insert(pid.to_string(), (name.to_string(), head.to_string()));
                continue;
            }
            (name.to_string(), body.to_string())
        };
        let Some((args, result)) = body.rsplit_once(") = ") else {
            continue;
        };
        let Some(ret) = result
            .split_whitespace()
            .next()
            .and_then(|r| r.parse().ok())
        else {
            continue;
        };
        out.push(Call {
            name,
            args: args.to_string(),
            ret,
        });
    }
    out
}

/// The `N<...>` descriptor annotations of an argument list, in order.
fn fd_specs(args: &str) -> Vec<String> {
    let b = args.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let at_arg_start = i == 0 || b[i - 1] == b' ' || b[i - 1] == b'(' || b[i - 1] == b'[';
        if at_arg_start && b[i].is_ascii_digit() {
            let mut j = i;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            if j < b.len() && b[j] == b'<' {
                let mut k = j + 1;
                while k < b.len() && !(b[k] == b'>' && b[k - 1] != b'-') {
                    k += 1;
                }
                out.push(args[j + 1..k.min(b.len())].to_string());
                i = k;
                continue;
            }
        }
        i += 1;
    }
    out
}

/// The destination named in a sockaddr argument, if any.
fn sockaddr_dest(args: &str) -> Option<String> {
    if let Some(p) = args.split("sin_port=htons(").nth(1) {
        let port = p.split(')').next()?;
        let addr = args
            .split("sin_addr=inet_addr(\"")
            .nth(1)?
            .split('"')
            .next()?;
        return Some(format!("{addr}:{port}"));
    }
    if let Some(p) = args.split("sin6_port=htons(").nth(1) {
        let port = p.split(')').next()?;
        let addr = args
            .split("inet_pton(AF_INET6, \"")
            .nth(1)?
            .split('"')
            .next()?;
        return Some(format!("[{addr}]:{port}"));
    }
    None
}

/// The peer of a `TCP:[local->peer]` style socket annotation.
fn socket_peer(spec: &str) -> Option<String> {
    let inner = spec.split_once(":[")?.1.strip_suffix(']')?;
    let peer = inner.split_once("->")?.1;
    Some(peer.to_string())
}

/// Totals bytes written to files and sent to destinations.
pub fn totals(text: &str) -> Totals {
    let mut t = Totals::default();
    for c in calls(text) {
        if c.ret <= 0 {
            continue;
        }
        let specs = fd_specs(&c.args);
        let target = match c.name.as_str() {
            "copy_file_range" | "splice" => specs.get(1),
            _ => specs.first(),
        };
        let Some(spec) = target else { continue };
        if spec.starts_with('/') {
            let path = spec.strip_suffix(" (deleted)").unwrap_or(spec);
            if !path.starts_with("/dev/") {
                *t.files.entry(path.to_string()).or_default() += c.ret as u64;
            }
            continue;
        }
        let is_inet = spec.starts_with("TCP") || spec.starts_with("UDP");
        if !is_inet {
            continue;
        }
        if c.name == "sendmmsg" {
            continue; // per-message lengths are not in the result; not used by the tests
        }
        if let Some(dest) = sockaddr_dest(&c.args).or_else(|| socket_peer(spec)) {
            *t.destinations.entry(dest).or_default() += c.ret as u64;
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_files_sockets_and_resumed_calls() {
        let log = r#"9059  sendto(5<TCP:[127.0.0.1:47542->127.0.0.1:40205]>, "xx"..., 100000, 0, NULL, 0) = 100000
9059  sendto(4<UDP:[0.0.0.0:54275]>, "yy"..., 100, 0, {sa_family=AF_INET, sin_port=htons(9), sin_addr=inet_addr("127.0.0.1")}, 16) = 100
9059  pwrite64(5</tmp/tt/data.bin>, "aaaaaaaaaa", 10, 4096) = 10
9060  write(1</tmp/tt/out (deleted)>, "abc", 3 <unfinished ...>
9059  write(5</tmp/tt/data.bin>, "bbbbbbb", 7) = 7
9060  <... write resumed>) = 3
9061  write(1<pipe:[1234]>, "x", 1) = 1
9061  write(3</tmp/tt/fail>, "x", 1) = -1 ENOSPC (No space left on device)
9062  copy_file_range(3</tmp/a>, NULL, 4</tmp/b>, NULL, 65536, 0) = 20
"#;
        let t = totals(log);
        assert_eq!(t.files["/tmp/tt/data.bin"], 17);
        assert_eq!(t.files["/tmp/tt/out"], 3);
        assert_eq!(t.files["/tmp/b"], 20);
        assert!(!t.files.contains_key("/tmp/tt/fail"));
        assert_eq!(t.destinations["127.0.0.1:40205"], 100000);
        assert_eq!(t.destinations["127.0.0.1:9"], 100);
    }
}
