//! The CLI's side of the daemon API: one request, errors turned into messages.

use std::path::Path;

use anyhow::{Context, bail};
use hyper::Method;
use serde_json::Value;

/// The API path of branch `name` followed by `tail` (such as `/fork`), the name
/// percent-encoded: whatever a user types (spaces, `?`, `#`, `/`) names a branch and never
/// becomes part of the request's path or query.
pub fn branch_path(name: &str, tail: &str) -> String {
    /// Everything but RFC 3986's unreserved characters.
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    format!(
        "/v1/branches/{}{tail}",
        percent_encoding::utf8_percent_encode(name, SEGMENT)
    )
}

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

/// Sends a GET for a streamed text answer (a branch's trace) and returns all of it.
pub fn call_text(socket: &Path, method: Method, path: &str) -> anyhow::Result<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut text = Vec::new();
    let (status, err) = runtime
        .block_on(forkscope::api::client::request_stream(
            socket,
            method,
            path,
            |chunk| {
                text.extend_from_slice(chunk);
                Ok(())
            },
        ))
        .with_context(|| format!("request {path}"))?;
    if !(200..300).contains(&status) {
        bail!(
            "{} (HTTP {status})",
            err["error"].as_str().unwrap_or("no message")
        );
    }
    Ok(String::from_utf8_lossy(&text).into_owned())
}
