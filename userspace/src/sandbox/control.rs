//! The exec protocol between a client (the CLI) and a branch's init, over the init's
//! SOCK_SEQPACKET control socket: one request message (JSON, with the client's stdin,
//! stdout and stderr attached as SCM_RIGHTS), then `{"pid": N}` and finally
//! `{"exit_code": C}` or `{"signal": S}`. A client that disconnects early kills its process.
//!
//! The same socket serves the branch's terminals ([`TerminalRequest`], see
//! [`super::terminal`]): the daemon asks for a new one when it clones a process that had a
//! terminal, and `forkscope attach` connects its stdin and stdout to one.

use std::{
    io::{IoSlice, IoSliceMut},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
};

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
    connect, recvmsg, sendmsg, socket,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Largest message on the control socket.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// What to run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// Working directory inside the branch (default: the workspace).
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Not a command: a request about the branch's terminals (`argv` is then empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal: Option<TerminalRequest>,
}

/// A request about a branch's terminals.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TerminalRequest {
    /// Make a new terminal (a pseudo-terminal whose output the init copies into the
    /// branch's command log); the reply is [`ExecReply::Terminal`] with its path.
    New,
    /// Connect the attached stdin and stdout to a terminal of the branch (this path, or the
    /// newest) until stdin ends, reads Ctrl-] or the client goes; then
    /// [`ExecReply::Detached`].
    Attach { path: Option<String> },
}

/// A reply from init.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecReply {
    /// The process started (its pid inside the branch).
    Pid(i32),
    /// It exited with this code.
    ExitCode(i32),
    /// A signal killed it.
    Signal(i32),
    /// It could not be started.
    Error(String),
    /// A new terminal: the path of its slave side.
    Terminal(String),
    /// The client was detached from the terminal.
    Detached,
}

fn sock_err(what: &str) -> impl FnOnce(nix::Error) -> Error + '_ {
    move |e| Error::Sandbox(format!("{what}: {e}"))
}

/// Sends one message with optional descriptors.
pub fn send(fd: RawFd, msg: &[u8], fds: &[RawFd]) -> Result<()> {
    if fds.is_empty() {
        // A plain write: a branch whose policy defers network calls has its init under a
        // seccomp filter that holds sendmsg (see crate::sandbox::notify); the init's own
        // replies must never wait for the daemon.
        // SAFETY: the caller owns `fd` for the duration of the call.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        nix::unistd::write(borrowed, msg).map_err(sock_err("sending on the control socket"))?;
        return Ok(());
    }
    let iov = [IoSlice::new(msg)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<UnixAddr>(fd, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(sock_err("sending on the control socket"))?;
    Ok(())
}

/// Receives one message and the descriptors attached to it; an empty message means the
/// peer closed the connection (or died with a message of ours unread: a reset).
pub fn recv(fd: RawFd) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; 3]);
    let (len, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg =
            match recvmsg::<UnixAddr>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
                Err(nix::errno::Errno::ECONNRESET) => return Ok((Vec::new(), Vec::new())),
                r => r.map_err(sock_err("receiving on the control socket"))?,
            };
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(sock_err("reading control messages"))? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: SCM_RIGHTS gave us these descriptors; we are their only owner.
                fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
            }
        }
        (msg.bytes, fds)
    };
    buf.truncate(len);
    Ok((buf, fds))
}

/// Runs `req` in the branch whose init listens on `control`, with `stdio` as its stdin,
/// stdout and stderr; `on_pid` is told the pid. Returns how the process ended (or, for a
/// terminal request, the init's answer).
pub fn exec(
    control: &Path,
    req: &ExecRequest,
    stdio: [RawFd; 3],
    on_pid: impl FnOnce(i32),
) -> Result<ExecReply> {
    exec_with(control, req, &stdio, on_pid)
}

/// Asks the init listening on `control` for a new terminal; returns its path.
pub fn new_terminal(control: &Path) -> Result<String> {
    let req = ExecRequest {
        terminal: Some(TerminalRequest::New),
        ..ExecRequest::default()
    };
    match exec_with(control, &req, &[], |_| {})? {
        ExecReply::Terminal(path) => Ok(path),
        ExecReply::Error(e) => Err(Error::Sandbox(format!("a terminal for the clone: {e}"))),
        other => Err(Error::Sandbox(format!(
            "a terminal for the clone: unexpected answer {other:?}"
        ))),
    }
}

/// Connects `stdio` (stdin and stdout; the third is unused) to a terminal of the branch
/// whose init listens on `control` (`path`, or the newest) until stdin ends or reads
/// Ctrl-] (see [`super::terminal`]).
pub fn attach(control: &Path, path: Option<String>, stdio: [RawFd; 3]) -> Result<()> {
    let req = ExecRequest {
        terminal: Some(TerminalRequest::Attach { path }),
        ..ExecRequest::default()
    };
    match exec_with(control, &req, &stdio, |_| {})? {
        ExecReply::Detached => Ok(()),
        ExecReply::Error(e) => Err(Error::Invalid(e)),
        other => Err(Error::Sandbox(format!(
            "attaching: unexpected answer {other:?}"
        ))),
    }
}

fn exec_with(
    control: &Path,
    req: &ExecRequest,
    stdio: &[RawFd],
    on_pid: impl FnOnce(i32),
) -> Result<ExecReply> {
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(sock_err("creating a socket"))?;
    let addr = UnixAddr::new(control).map_err(sock_err("control socket path"))?;
    let gone = || {
        Error::Sandbox(
            "the branch's init is gone (its processes were killed, or the branch was aborted): nothing can run in it any more; abort it"
                .into(),
        )
    };
    connect(sock.as_raw_fd(), &addr).map_err(|e| match e {
        nix::errno::Errno::ECONNREFUSED | nix::errno::Errno::ENOENT => gone(),
        e => Error::Sandbox(format!(
            "connecting to the branch's init at {}: {e}",
            control.display()
        )),
    })?;
    let msg = serde_json::to_vec(req).map_err(std::io::Error::from)?;
    send(sock.as_raw_fd(), &msg, stdio)?;
    let mut pid_seen = Some(on_pid);
    loop {
        let (msg, _) = recv(sock.as_raw_fd())?;
        if msg.is_empty() {
            return Err(gone());
        }
        let reply: ExecReply = serde_json::from_slice(&msg).map_err(std::io::Error::from)?;
        match reply {
            ExecReply::Pid(p) => {
                if let Some(f) = pid_seen.take() {
                    f(p);
                }
            }
            other => return Ok(other),
        }
    }
}
