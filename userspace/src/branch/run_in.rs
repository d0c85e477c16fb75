//! Running a command in a branch and collecting its output (`POST /v1/branches/{name}/exec`):
//! the command gets pipes for stdin (the request's bytes, then end of file), stdout and
//! stderr, through the branch's init like `forkscope exec`.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;

use serde::{Deserialize, Serialize};

use crate::{
    error::{Error, Result},
    sandbox::control::{ExecReply, ExecRequest, exec},
};

/// Most bytes of stdout or stderr kept (the rest is counted, not kept).
const MAX_OUTPUT: usize = 16 << 20;

/// `POST /v1/branches/{name}/exec`
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ExecInput {
    pub argv: Vec<String>,
    /// Working directory inside the branch (default: the workspace).
    #[serde(default)]
    pub cwd: Option<std::path::PathBuf>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// What the command reads on stdin (then end of file).
    #[serde(default)]
    pub stdin: String,
}

/// What the command did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ExecOutput {
    /// Its exit code (128 + N when killed by signal N).
    pub exit_code: i32,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// Bytes of stdout and stderr beyond what was kept.
    pub truncated: u64,
}

/// Runs `input` through the init listening on `control`; returns when the command exits.
pub fn run_in(control: &std::path::Path, input: ExecInput) -> Result<ExecOutput> {
    if input.argv.is_empty() {
        return Err(Error::NoCommand);
    }
    let pipe = || std::io::pipe().map_err(Error::Other);
    let (stdin_r, mut stdin_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let collect = |mut r: std::io::PipeReader| {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let mut dropped = 0u64;
            let mut buf = [0u8; 64 << 10];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let room = MAX_OUTPUT.saturating_sub(kept.len()).min(n);
                kept.extend_from_slice(&buf[..room]);
                dropped += (n - room) as u64;
            }
            (kept, dropped)
        })
    };
    let out = collect(out_r);
    let err = collect(err_r);
    let feed = {
        let bytes = input.stdin.clone().into_bytes();
        std::thread::spawn(move || {
            let _ = stdin_w.write_all(&bytes);
        })
    };
    let req = ExecRequest {
        argv: input.argv,
        cwd: input.cwd,
        env: input.env,
        terminal: None,
    };
    let fds = [stdin_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
    let reply = exec(control, &req, fds, |_| {});
    // The command holds its own copies: ours go, so its output ends when it does.
    drop((stdin_r, out_w, err_w));
    let (stdout, d1) = out.join().unwrap_or_default();
    let (stderr, d2) = err.join().unwrap_or_default();
    let _ = feed.join();
    let (exit_code, signal) = match reply? {
        ExecReply::ExitCode(c) => (c, None),
        ExecReply::Signal(s) => (128 + s, Some(s)),
        // It could not start: as a shell says it (127 not found, 126 not runnable).
        ExecReply::Error(e) => {
            let code = if e.contains("No such file") { 127 } else { 126 };
            return Ok(ExecOutput {
                exit_code: code,
                signal: None,
                stdout: String::new(),
                stderr: format!("{e}\n"),
                truncated: 0,
            });
        }
        ExecReply::Pid(_) | ExecReply::Terminal(_) | ExecReply::Attached(_) => (-1, None),
    };
    Ok(ExecOutput {
        exit_code,
        signal,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        truncated: d1 + d2,
    })
}
