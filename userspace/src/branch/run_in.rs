//! Running a command in a branch and collecting its output (`POST /v1/branches/{name}/exec`):
//! the command gets pipes for stdin (the request's bytes, then end of file), stdout and
//! stderr, through the branch's init like `forkscope exec`.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, mpsc::Sender};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::{
    error::{Error, Result},
    sandbox::control::{Cancel, ExecReply, ExecRequest, exec_cancellable},
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

/// How long output is still collected once the command has exited, for what it wrote
/// last. Background processes it left holding its stdout or stderr are not waited for:
/// what they write later is read and dropped, so they neither block nor get SIGPIPE.
const OUTPUT_GRACE: Duration = Duration::from_millis(200);

/// Runs `input` through the init listening on `control`; returns when the command exits
/// (with what it wrote until then), or soon after `cancel` is used, which kills it.
pub fn run_in(control: &std::path::Path, input: ExecInput, cancel: &Cancel) -> Result<ExecOutput> {
    if input.argv.is_empty() {
        return Err(Error::NoCommand);
    }
    let pipe = || std::io::pipe().map_err(Error::Other);
    let (stdin_r, mut stdin_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (ended, ends) = std::sync::mpsc::channel();
    let out = Captured::collect(out_r, ended.clone())?;
    let err = Captured::collect(err_r, ended)?;
    // Fed from a thread of its own, never joined: a command that does not read its stdin
    // (or a background process that holds it) must not hold the answer.
    let bytes = input.stdin.into_bytes();
    std::thread::Builder::new()
        .name("forkscope-exec-in".into())
        .spawn(move || {
            let _ = stdin_w.write_all(&bytes);
        })
        .map_err(Error::Other)?;
    let req = ExecRequest {
        argv: input.argv,
        cwd: input.cwd,
        env: input.env,
        terminal: None,
    };
    let fds = [stdin_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
    let reply = exec_cancellable(control, &req, fds, cancel);
    // The command holds its own copies: ours go, so its output ends when it does.
    drop((stdin_r, out_w, err_w));
    let deadline = Instant::now() + OUTPUT_GRACE;
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(Instant::now());
        if ends.recv_timeout(left).is_err() {
            break;
        }
    }
    let (stdout, d1) = out.take();
    let (stderr, d2) = err.take();
    if cancel.cancelled() {
        return Err(Error::Unavailable(
            "the command was stopped: its client went away or the daemon is stopping".into(),
        ));
    }
    let (exit_code, signal) = match reply? {
        ExecReply::ExitCode(c) => (c, None),
        ExecReply::Signal(s) => (128 + s, Some(s)),
        // It could not start: as a shell says it (127 not found, 126 not runnable).
        ExecReply::Error(e) => {
            return Ok(ExecOutput {
                exit_code: not_started_code(&e),
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

/// The exit code a shell gives a command that could not start with error `e`: 127 when
/// it was not found, 126 otherwise (found but not runnable).
pub fn not_started_code(e: &str) -> i32 {
    if e.contains("No such file") { 127 } else { 126 }
}

/// What one of the command's output pipes gave, filled by a thread of its own.
struct Captured(Arc<Mutex<Capture>>);

#[derive(Default)]
struct Capture {
    kept: Vec<u8>,
    /// Bytes beyond MAX_OUTPUT, or written after the answer was made.
    dropped: u64,
    /// Set once the answer took what was kept: the rest is read and dropped.
    taken: bool,
}

impl Captured {
    /// Reads `r` to its end on a thread of its own, which tells `ended` when it gets there.
    fn collect(mut r: std::io::PipeReader, ended: Sender<()>) -> Result<Self> {
        let shared = Arc::new(Mutex::new(Capture::default()));
        let filled = shared.clone();
        std::thread::Builder::new()
            .name("forkscope-exec-out".into())
            .spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match r.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    };
                    let mut c = filled.lock().unwrap_or_else(|p| p.into_inner());
                    let room = if c.taken {
                        0
                    } else {
                        MAX_OUTPUT.saturating_sub(c.kept.len()).min(n)
                    };
                    c.kept.extend_from_slice(&buf[..room]);
                    c.dropped += (n - room) as u64;
                }
                let _ = ended.send(());
            })
            .map_err(Error::Other)?;
        Ok(Self(shared))
    }

    /// What was read until now, and how many bytes were dropped; later bytes are dropped.
    fn take(&self) -> (Vec<u8>, u64) {
        let mut c = self.0.lock().unwrap_or_else(|p| p.into_inner());
        c.taken = true;
        (std::mem::take(&mut c.kept), c.dropped)
    }
}
