//! The CLI's side of the daemon API: one request, errors turned into messages.

use std::path::Path;

use anyhow::{Context, bail};
use hyper::Method;
use serde_json::Value;

/// Sends a request to the daemon and returns the JSON answer of a 2xx, or the daemon's
/// error message.
pub fn call(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (status, value) = runtime
        .block_on(forkscope::api::client::request(
            socket,
            method,
            path,
            body.as_ref(),
        ))
        .with_context(|| format!("request {path}"))?;
    if !(200..300).contains(&status) {
        let msg = value["error"].as_str().unwrap_or("no message").to_string();
        bail!("{msg} (HTTP {status})");
    }
    Ok(value)
}
