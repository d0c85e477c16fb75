//! A minimal HTTP/1 client for the daemon's Unix socket (what the CLI uses).

use std::path::Path;

use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, body::Bytes};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

use crate::error::{Error, Result};

/// Sends one request to the daemon at `socket` and returns the status code and JSON body
/// (`Value::Null` when empty).
pub async fn request(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value)> {
    let resp = send(socket, method, path, body).await?;
    let status = resp.status().as_u16();
    Ok((status, json_body(resp).await?))
}

/// Sends one request and hands each chunk of a 2xx answer's body to `on_chunk` as it
/// arrives (for streams such as a followed trace). Returns the status, and the JSON body of
/// an answer that is not 2xx.
pub async fn request_stream(
    socket: &Path,
    method: Method,
    path: &str,
    mut on_chunk: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<(u16, Value)> {
    let resp = send(socket, method, path, None).await?;
    let status = resp.status().as_u16();
    if !(200..300).contains(&status) {
        return Ok((status, json_body(resp).await?));
    }
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Error::State(format!("reading the answer: {e}")))?;
        if let Some(data) = frame.data_ref() {
            on_chunk(data)?;
        }
    }
    Ok((status, Value::Null))
}

async fn send(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> Result<hyper::Response<hyper::body::Incoming>> {
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        let what = if e.kind() == std::io::ErrorKind::PermissionDenied {
            "run as root, or as a member of the group the daemon was given with --socket-group"
        } else if e.kind() == std::io::ErrorKind::WouldBlock {
            "its queue of connections is full and nobody takes them: the daemon that made it \
             is gone or stuck; start it again with `forkscope daemon` (it takes the socket over)"
        } else {
            "start it with `forkscope daemon`, or set --socket / FORKSCOPE_SOCKET"
        };
        Error::Other(std::io::Error::new(
            e.kind(),
            format!(
                "cannot reach the forkscope daemon at {} ({e}): {what}",
                socket.display()
            ),
        ))
    })?;
    // A daemon killed while it spawned a process leaves its socket listening in that child
    // (see `super::listen`): the connection is accepted by the kernel and never answered.
    if let Some(pid) = stream.peer_cred().ok().and_then(|c| c.pid())
        && pid > 0
        && !super::listen::alive(pid)
    {
        return Err(Error::Other(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!(
                "the forkscope daemon that listened at {} (pid {pid}) is gone; a process it \
                 was starting still holds the socket, and nobody answers there: start the \
                 daemon again with `forkscope daemon` (it takes the socket over)",
                socket.display()
            ),
        )));
    }
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Error::State(format!("HTTP handshake: {e}")))?;
    tokio::spawn(conn);
    let bytes = body
        .map(|b| serde_json::to_vec(b).unwrap_or_default())
        .unwrap_or_default();
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "forkscope")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .map_err(|e| Error::State(format!("building request: {e}")))?;
    sender
        .send_request(req)
        .await
        .map_err(|e| Error::State(format!("request to the daemon: {e}")))
}

async fn json_body(resp: hyper::Response<hyper::body::Incoming>) -> Result<Value> {
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| Error::State(format!("reading the answer: {e}")))?;
    let bytes = body.to_bytes();
    Ok(if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    })
}
