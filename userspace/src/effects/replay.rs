//! Delivering a branch's held effects at its commit, in the order they were made. An HTTP
//! request goes out as recorded, with two headers added: `Idempotency-Key` (the same on
//! every attempt: a daemon that dies after sending and before writing down the outcome
//! sends it again with the same key) and `Forkscope-Branch` (the branch's name, for
//! services that version what they do per branch). Raw TCP bytes go out as recorded.
//! An answer with a 5xx status, or no answer, is a failure: the effect is kept (`failed`),
//! the effects after it are not sent (they keep their order), and the branch's next commit
//! tries again from it.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{EffectState, Journal};
use crate::error::Result;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The outcome of delivering one effect.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Delivery {
    pub id: i64,
    pub kind: String,
    pub dest: String,
    pub summary: String,
    pub delivered: bool,
    /// The status line answered, or why it failed.
    pub result: String,
}

/// Delivers the held and failed effects of the branch with cgroup id `cgroup` (named
/// `branch`), oldest first. `instance` makes the idempotency keys unique to this state
/// directory.
pub fn release(
    journal: &Journal,
    cgroup: u64,
    branch: &str,
    instance: &str,
) -> Result<Vec<Delivery>> {
    let mut out = Vec::new();
    for e in journal.list(cgroup)? {
        // Held calls are let go by crate::effects::defer, not sent from here.
        if e.state == EffectState::Done || e.kind == "defer" {
            continue;
        }
        let payload = journal.payload(e.id)?;
        let dest: SocketAddr = match format!("{}:{}", e.addr, e.port).parse() {
            Ok(d) => d,
            Err(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let sent = if e.kind == "http" {
            let key = format!("forkscope-{instance}-{}", e.id);
            send_http(dest, &with_headers(&payload, &key, branch))
        } else {
            send_raw(dest, &payload)
        };
        let (delivered, result) = match sent {
            Ok(r) => r,
            Err(err) => (false, format!("delivery to {dest} failed: {err}")),
        };
        let state = if delivered {
            EffectState::Done
        } else {
            EffectState::Failed
        };
        journal.set_state(e.id, state, &result)?;
        out.push(Delivery {
            id: e.id,
            kind: e.kind,
            dest: dest.to_string(),
            summary: e.summary,
            delivered,
            result,
        });
        if !delivered {
            // In order: the ones after it wait for it (the next commit tries again).
            break;
        }
    }
    Ok(out)
}

/// The request with `Idempotency-Key` and `Forkscope-Branch` added after its request line.
fn with_headers(request: &[u8], key: &str, branch: &str) -> Vec<u8> {
    let line_end = request
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|i| i + 2)
        .unwrap_or(request.len());
    let mut out = request[..line_end].to_vec();
    out.extend_from_slice(
        format!("Idempotency-Key: {key}\r\nForkscope-Branch: {branch}\r\n").as_bytes(),
    );
    out.extend_from_slice(&request[line_end..]);
    out
}

fn connect(dest: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&dest, CONNECT_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Sends one request; returns whether it was delivered and the status line.
fn send_http(dest: SocketAddr, request: &[u8]) -> std::io::Result<(bool, String)> {
    let mut s = connect(dest)?;
    s.write_all(request)?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(2).any(|w| w == b"\r\n") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&got)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    let status: Option<u16> = line.split(' ').nth(1).and_then(|c| c.parse().ok());
    match status {
        Some(code) => Ok((code < 500, line)),
        None => Ok((false, format!("no HTTP answer from {dest}"))),
    }
}

/// Sends the recorded bytes of one connection and closes it.
fn send_raw(dest: SocketAddr, bytes: &[u8]) -> std::io::Result<(bool, String)> {
    let mut s = connect(dest)?;
    s.write_all(bytes)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut sink = [0u8; 4096];
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    while let Ok(n) = s.read(&mut sink) {
        if n == 0 {
            break;
        }
    }
    Ok((true, format!("{} bytes sent", bytes.len())))
}
