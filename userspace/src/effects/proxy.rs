//! The recording proxy: connections that a `buffer` rule redirected in the kernel arrive
//! here (see the eBPF `sock` module). Each is identified by its loopback source address,
//! which names the slot where the hook kept its real destination and branch.
//!
//! HTTP/1.x requests are recorded one by one (head and body), each journaled (see
//! [`super::Journal::open`]) before the client gets its synthetic answer (by default `202 Accepted`, set per policy);
//! keep-alive works. Anything else is recorded as the bytes of the whole connection, when
//! the client closes its side (it gets no answer). TLS is bytes the proxy cannot read:
//! use `defer` for it.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{
    Journal,
    payloads::{self, PayloadFile},
};
use crate::error::{Error, Result};

/// First loopback source address of the slot block (127.77.0.1), host order; must match
/// `ProxyConfig::source_base` given to the hooks.
pub const SOURCE_BASE: u32 = 0x7f4d_0001;
/// Largest request (head and body) or raw connection recorded.
const MAX_RECORD: usize = 16 << 20;
/// Largest HTTP head.
const MAX_HEAD: usize = 64 << 10;
/// Connections served at once (more wait to be accepted).
const MAX_CONNECTIONS: usize = 256;
/// A connection idle this long is closed.
const IDLE: std::time::Duration = std::time::Duration::from_secs(60);

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
    let listener = crate::api::listen::bind_tcp(addr).await.map_err(|e| {
        Error::Invalid(format!(
            "the recording proxy cannot listen on {addr}: {e} (choose another --proxy-addr)"
        ))
    })?;
    let local = listener.local_addr().map_err(Error::Other)?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let (journal, directory) = (journal.clone(), directory.clone());
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = serve(stream, peer, journal, directory).await {
                    log::warn!("buffering proxy, connection from {peer}: {e}");
                }
            });
        }
    });
    Ok(local)
}

async fn serve(
    stream: TcpStream,
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
    let mut c = Conn {
        stream,
        buf: Vec::new(),
    };
    // The first bytes say whether it is HTTP.
    while c.buf.len() < 8 && (c.buf.is_empty() || is_method_prefix(&c.buf)) {
        if c.more().await? == 0 {
            break;
        }
    }
    if !is_method_prefix(&c.buf) {
        // Raw bytes: the whole connection, recorded when the client closes its side.
        while c.buf.len() <= MAX_RECORD && c.more().await? > 0 {}
        if !c.buf.is_empty() {
            let bytes = std::mem::take(&mut c.buf);
            record(
                &journal,
                cgroup,
                "tcp",
                dest,
                "bytes",
                Payload::Bytes(bytes),
            )?;
        }
        return Ok(());
    }
    loop {
        // One request: the head, then the body its headers announce.
        let Some(head_end) = c.until(0, b"\r\n\r\n", MAX_HEAD).await? else {
            return Ok(()); // the client went away between requests
        };
        let head_end = head_end + 4;
        let head = String::from_utf8_lossy(&c.buf[..head_end]).into_owned();
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
        let summary: String = request_line
            .split(' ')
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let announced: Option<usize> = if chunked {
            None
        } else {
            let len: usize = header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if len > MAX_RECORD {
                return Err(Error::Invalid("HTTP body too large".into()));
            }
            Some(head_end + len)
        };
        // Journaled before the client hears anything.
        let payload = match announced {
            // A large request goes to its payload file as it arrives.
            Some(end) if end > payloads::INLINE_MAX => {
                Payload::File(c.stream_to_file(&journal, end).await?)
            }
            _ => {
                let end = match announced {
                    Some(end) => {
                        c.fill(end).await?;
                        end
                    }
                    None => c.chunked_body(head_end).await?,
                };
                let rest = c.buf.split_off(end);
                Payload::Bytes(std::mem::replace(&mut c.buf, rest))
            }
        };
        let id = record(&journal, cgroup, "http", dest, &summary, payload)?;
        let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"))
            || request_line.ends_with("HTTP/1.0");
        let (status, body) = directory.response(cgroup);
        let answer = format!(
            "HTTP/1.1 {status} {}\r\nContent-Length: {}\r\nForkscope-Effect: {id}\r\n{}\r\n{body}",
            reason(status),
            body.len(),
            if close { "Connection: close\r\n" } else { "" },
        );
        c.stream
            .write_all(answer.as_bytes())
            .await
            .map_err(Error::Other)?;
        if close {
            return Ok(());
        }
    }
}

/// A client connection and what was read from it and not used yet.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// What one read asks for at least.
const READ: usize = 256 << 10;

impl Conn {
    /// Reads what comes next (0: the client closed its side); a client idle for [`IDLE`]
    /// is dropped.
    async fn more(&mut self) -> Result<usize> {
        // Read straight into the buffer: a request body is copied once, from the socket.
        self.buf.reserve(READ);
        let n = tokio::time::timeout(IDLE, self.stream.read_buf(&mut self.buf))
            .await
            .map_err(|_| Error::Invalid("client idle too long".into()))?
            .map_err(Error::Other)?;
        Ok(n)
    }

    /// Writes the next `len` bytes (`buf`'s, then what comes) to a new payload file of
    /// `journal`, keeping only what follows them.
    async fn stream_to_file(&mut self, journal: &Journal, len: usize) -> Result<PayloadFile> {
        let mut file = journal.payload_file(len as u64)?;
        let mut left = len;
        loop {
            let take = self.buf.len().min(left);
            if take > 0 {
                // Into the page cache, at most a read's worth: short enough to do in place.
                file.write(&self.buf[..take])?;
                self.buf.drain(..take);
                left -= take;
            }
            if left == 0 {
                return Ok(file);
            }
            if self.more().await? == 0 {
                return Err(Error::Invalid("connection closed inside a request".into()));
            }
        }
    }

    /// Reads until `buf` holds `len` bytes.
    async fn fill(&mut self, len: usize) -> Result<()> {
        // Room for all of it at once, rather than growing (and copying) as it comes.
        self.buf.reserve(len.saturating_sub(self.buf.len()));
        while self.buf.len() < len {
            if self.more().await? == 0 {
                return Err(Error::Invalid("connection closed inside a request".into()));
            }
        }
        Ok(())
    }

    /// Where `needle` first occurs at or after `from`, reading as needed (each byte is
    /// scanned once); `None` if the client closes first. More than `max` bytes: an error.
    async fn until(&mut self, from: usize, needle: &[u8], max: usize) -> Result<Option<usize>> {
        let mut scanned = from;
        loop {
            if let Some(i) = find(&self.buf[scanned.min(self.buf.len())..], needle) {
                return Ok(Some(scanned + i));
            }
            scanned = self.buf.len().saturating_sub(needle.len() - 1).max(from);
            if self.buf.len() - from > max {
                return Err(Error::Invalid("HTTP request too large".into()));
            }
            if self.more().await? == 0 {
                return Ok(None);
            }
        }
    }

    /// The end of a chunked body starting at `at`: chunks (a hex size line, the bytes,
    /// CRLF), a zero size, trailer lines up to an empty one.
    async fn chunked_body(&mut self, mut at: usize) -> Result<usize> {
        let closed = || Error::Invalid("connection closed inside a chunked body".into());
        loop {
            let line_end = self
                .until(at, b"\r\n", MAX_HEAD)
                .await?
                .ok_or_else(closed)?;
            let line = String::from_utf8_lossy(&self.buf[at..line_end]).into_owned();
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| Error::Invalid(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                let mut t = line_end + 2;
                loop {
                    let e = self.until(t, b"\r\n", MAX_HEAD).await?.ok_or_else(closed)?;
                    if e == t {
                        return Ok(t + 2);
                    }
                    t = e + 2;
                }
            }
            if at + size > MAX_RECORD {
                return Err(Error::Invalid("HTTP body too large".into()));
            }
            at = line_end + 2 + size + 2;
            self.fill(at).await?;
        }
    }
}

/// What a recorded effect carries: bytes read, or a payload file already written.
enum Payload {
    Bytes(Vec<u8>),
    File(PayloadFile),
}

/// Journals an effect before its client hears anything, on this worker thread (the
/// runtime moves its other tasks away meanwhile; needs the daemon's multi-threaded runtime):
/// handing it to a blocking thread and back cost two wake-ups across CPUs per request.
fn record(
    journal: &Journal,
    cgroup: u64,
    kind: &'static str,
    dest: SocketAddr,
    summary: &str,
    payload: Payload,
) -> Result<i64> {
    tokio::task::block_in_place(|| {
        let ip = dest.ip().to_string();
        match payload {
            Payload::Bytes(b) => journal.record(cgroup, kind, &ip, dest.port(), summary, &b),
            Payload::File(f) => journal.record_file(f, cgroup, kind, &ip, dest.port(), summary),
        }
    })
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
