//! The recording proxy: connections that a `buffer` rule redirected in the kernel arrive
//! here (see the eBPF `sock` module). Each is identified by its loopback source address,
//! which names the slot where the hook kept its real destination and branch.
//!
//! HTTP/1.x requests are recorded one by one (head and body), each journaled durably
//! before the client gets its synthetic answer (by default `202 Accepted`, set per policy);
//! keep-alive works. Anything else is recorded as the bytes of the whole connection, when
//! the client closes its side (it gets no answer). TLS is bytes the proxy cannot read:
//! use `defer` for it.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::Journal;
use crate::error::{Error, Result};

/// First loopback source address of the slot block (127.77.0.1), host order; must match
/// `ProxyConfig::source_base` given to the hooks.
pub const SOURCE_BASE: u32 = 0x7f4d_0001;
/// Largest request (head and body) or raw connection recorded.
const MAX_RECORD: usize = 16 << 20;
/// Largest HTTP head.
const MAX_HEAD: usize = 64 << 10;

/// What the proxy asks the rest of the daemon.
pub trait Directory: Send + Sync + 'static {
    /// The connection recorded in `slot`: (branch cgroup id, real destination).
    fn redirect(&self, slot: u32) -> Option<(u64, SocketAddr)>;
    /// The synthetic HTTP answer for the branch with cgroup id `cgroup`: status and body.
    fn response(&self, cgroup: u64) -> (u16, String);
}

/// Binds the proxy on `addr` and serves in the background; returns where it listens.
pub async fn start(
    addr: SocketAddr,
    journal: Journal,
    directory: Arc<dyn Directory>,
) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        Error::Invalid(format!(
            "the recording proxy cannot listen on {addr}: {e} (choose another --proxy-addr)"
        ))
    })?;
    let local = listener.local_addr().map_err(Error::Other)?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let (journal, directory) = (journal.clone(), directory.clone());
            tokio::spawn(async move {
                if let Err(e) = serve(stream, peer, journal, directory).await {
                    log::warn!("buffering proxy, connection from {peer}: {e}");
                }
            });
        }
    });
    Ok(local)
}

async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    journal: Journal,
    directory: Arc<dyn Directory>,
) -> Result<()> {
    let SocketAddr::V4(p) = peer else {
        return Ok(());
    };
    let slot = u32::from(*p.ip()).wrapping_sub(SOURCE_BASE);
    let Some((cgroup, dest)) = directory.redirect(slot) else {
        return Ok(()); // not a redirected connection: nothing to record
    };
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    // The first bytes say whether it is HTTP.
    loop {
        if buf.len() >= 8 || (!buf.is_empty() && !is_method_prefix(&buf)) {
            break;
        }
        let n = stream.read(&mut chunk).await.map_err(Error::Other)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if !is_method_prefix(&buf) {
        // Raw bytes: the whole connection, recorded when the client closes its side.
        loop {
            let n = stream.read(&mut chunk).await.map_err(Error::Other)?;
            if n == 0 || buf.len() > MAX_RECORD {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        if !buf.is_empty() {
            record(&journal, cgroup, "tcp", dest, "bytes", buf).await?;
        }
        return Ok(());
    }
    loop {
        // One request: the head, then the body its headers announce.
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > MAX_HEAD {
                return Err(Error::Invalid("HTTP head too large".into()));
            }
            let n = stream.read(&mut chunk).await.map_err(Error::Other)?;
            if n == 0 {
                return Ok(()); // the client went away between requests
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let request_line = head.lines().next().unwrap_or("").to_string();
        let header = |name: &str| {
            head.lines().skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        let chunked =
            header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let end = if chunked {
            loop {
                if let Some(i) = find(&buf[head_end..], b"0\r\n\r\n") {
                    break head_end + i + 5;
                }
                if buf.len() > MAX_RECORD {
                    return Err(Error::Invalid("HTTP body too large".into()));
                }
                let n = stream.read(&mut chunk).await.map_err(Error::Other)?;
                if n == 0 {
                    return Err(Error::Invalid(
                        "connection closed inside a chunked body".into(),
                    ));
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        } else {
            let len: usize = header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if len > MAX_RECORD {
                return Err(Error::Invalid("HTTP body too large".into()));
            }
            while buf.len() < head_end + len {
                let n = stream.read(&mut chunk).await.map_err(Error::Other)?;
                if n == 0 {
                    return Err(Error::Invalid("connection closed inside a body".into()));
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            head_end + len
        };
        let rest = buf.split_off(end);
        let request = std::mem::replace(&mut buf, rest);
        let summary: String = request_line
            .split(' ')
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        // Journaled (on disk) before the client hears anything.
        let id = record(&journal, cgroup, "http", dest, &summary, request).await?;
        let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"))
            || request_line.ends_with("HTTP/1.0");
        let (status, body) = directory.response(cgroup);
        let answer = format!(
            "HTTP/1.1 {status} {}\r\nContent-Length: {}\r\nForkscope-Effect: {id}\r\n{}\r\n{body}",
            reason(status),
            body.len(),
            if close { "Connection: close\r\n" } else { "" },
        );
        stream
            .write_all(answer.as_bytes())
            .await
            .map_err(Error::Other)?;
        if close {
            return Ok(());
        }
    }
}

async fn record(
    journal: &Journal,
    cgroup: u64,
    kind: &'static str,
    dest: SocketAddr,
    summary: &str,
    payload: Vec<u8>,
) -> Result<i64> {
    let (journal, summary) = (journal.clone(), summary.to_string());
    tokio::task::spawn_blocking(move || {
        journal.record(
            cgroup,
            kind,
            &dest.ip().to_string(),
            dest.port(),
            &summary,
            &payload,
        )
    })
    .await
    .map_err(|e| Error::State(format!("journal worker: {e}")))?
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Whether `b` starts (or could start) with an HTTP method and a space.
fn is_method_prefix(b: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"PATCH ",
        b"HEAD ",
        b"OPTIONS ",
        b"CONNECT ",
        b"TRACE ",
    ];
    METHODS.iter().any(|m| {
        let n = m.len().min(b.len());
        n > 0 && b[..n] == m[..n]
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        _ => "Recorded",
    }
}

/// The real destination in a hook's record: an IPv4 address kept as a network-order word.
pub fn destination(word: u32, port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::from(word.to_ne_bytes()), port))
}
