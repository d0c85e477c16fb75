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
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        Error::Other(std::io::Error::new(
            e.kind(),
            format!(
                "cannot reach the forkscope daemon at {} ({e}): start it with `forkscope daemon`, or set --socket / FORKSCOPE_SOCKET",
                socket.display()
            ),
        ))
    })?;
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
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| Error::State(format!("request to the daemon: {e}")))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| Error::State(format!("reading the answer: {e}")))?;
    let bytes = body.to_bytes();
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    };
    Ok((status, value))
}
