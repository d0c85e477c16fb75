//! The exec protocol between a client (the CLI) and a branch's init, over the init's
//! SOCK_SEQPACKET control socket: one request message (JSON, with the client's stdin,
//! stdout and stderr attached as SCM_RIGHTS), then `{"pid": N}` and finally
//! `{"exit_code": C}` or `{"signal": S}`. A client that disconnects early kills its process.
//!
//! The same socket serves the branch's terminals ([`TerminalRequest`], see
//! [`super::terminal`]): the daemon asks for a new one when it clones a process that had a
//! terminal, and `forkscope attach` relays between its own terminal and one ([`attach`]).

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
    /// branch's command log) with these settings; the reply is [`ExecReply::Terminal`]
    /// with its path.
    New {
        settings: Option<super::terminal::Settings>,
    },
    /// Relay between this connection and a terminal of the branch (this path, or the
    /// newest): the reply is [`ExecReply::Attached`], then frames (see
    /// [`super::terminal`]).
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
    /// The client is attached to this terminal.
    Attached(String),
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
    request(&connect_to(control)?, req, &stdio, on_pid)
}

/// Lets another thread stop an [`exec_cancellable`] in flight: the control connection is
/// shut down, which the init takes as the client gone and kills the command.
#[derive(Debug, Default)]
pub struct Cancel {
    sock: std::sync::Mutex<Option<OwnedFd>>,
    cancelled: std::sync::atomic::AtomicBool,
}

impl Cancel {
    /// Stops the request (now, or as soon as it connects).
    pub fn cancel(&self) {
        self.cancelled
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(sock) = &*self.sock.lock().unwrap_or_else(|p| p.into_inner()) {
            let _ = nix::sys::socket::shutdown(sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
    }

    /// Whether [`Cancel::cancel`] was called.
    pub fn cancelled(&self) -> bool {
        self.cancelled.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Keeps a copy of the request's connection to shut down.
    fn arm(&self, sock: &OwnedFd) -> Result<()> {
        let copy = sock
            .try_clone()
            .map_err(|e| Error::Sandbox(format!("copying the control socket: {e}")))?;
        *self.sock.lock().unwrap_or_else(|p| p.into_inner()) = Some(copy);
        if self.cancelled() {
            self.cancel();
        }
        Ok(())
    }
}

/// [`exec`] that `cancel` can stop from another thread (an API client that went away).
pub fn exec_cancellable(
    control: &Path,
    req: &ExecRequest,
    stdio: [RawFd; 3],
    cancel: &Cancel,
) -> Result<ExecReply> {
    let sock = connect_to(control)?;
    cancel.arm(&sock)?;
    request(&sock, req, &stdio, |_| {})
}

/// Asks the init listening on `control` for a new terminal with `settings`; returns its
/// path. Waits at most a few seconds: the init is in a branch, whose processes may stop it.
pub fn new_terminal(control: &Path, settings: Option<super::terminal::Settings>) -> Result<String> {
    let req = ExecRequest {
        terminal: Some(TerminalRequest::New { settings }),
        ..ExecRequest::default()
    };
    let sock = connect_to(control)?;
    let timeout = nix::sys::time::TimeVal::new(5, 0);
    for opt in [
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimeout, &timeout),
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::SendTimeout, &timeout),
    ] {
        opt.map_err(sock_err("setting a timeout on the control socket"))?;
    }
    let reply = request(&sock, &req, &[], |_| {}).map_err(|e| {
        Error::Sandbox(format!(
            "the child's init did not make a terminal within 5 s ({e}): is it stopped?"
        ))
    })?;
    match reply {
        ExecReply::Terminal(path) => Ok(path),
        ExecReply::Error(e) => Err(Error::Sandbox(format!("a terminal for the clone: {e}"))),
        other => Err(Error::Sandbox(format!(
            "a terminal for the clone: unexpected answer {other:?}"
        ))),
    }
}

/// Relays between `input` and `output` and a terminal of the branch whose init listens on
/// `control` (`path`, or the newest; see [`super::terminal`]): what `input` gives is typed
/// into it, what it shows goes to `output`, until `input` ends or gives Ctrl-]. `attached`
/// is told the terminal's path once attached.
pub fn attach(
    control: &Path,
    path: Option<String>,
    input: std::fs::File,
    mut output: impl std::io::Write,
    attached: impl FnOnce(&str),
) -> Result<()> {
    use super::terminal::{DETACH_KEY, DETACHED, FRAME, OUTPUT};
    use nix::sys::socket::{Shutdown, shutdown};
    let req = ExecRequest {
        terminal: Some(TerminalRequest::Attach { path }),
        ..ExecRequest::default()
    };
    let sock = connect_to(control)?;
    match request(&sock, &req, &[], |_| {})? {
        ExecReply::Attached(p) => attached(&p),
        ExecReply::Error(e) => return Err(Error::Invalid(e)),
        other => {
            return Err(Error::Sandbox(format!(
                "attaching: unexpected answer {other:?}"
            )));
        }
    }
    // Keys go from a thread of their own; the end of input or Ctrl-] shuts our side.
    let keys = sock.try_clone()?;
    std::thread::spawn(move || {
        let mut input = input;
        let mut buf = [0u8; FRAME];
        loop {
            let n = std::io::Read::read(&mut input, &mut buf).unwrap_or(0);
            let typed = &buf[..n];
            let detach = typed.iter().position(|&k| k == DETACH_KEY);
            let typed = &typed[..detach.unwrap_or(n)];
            if !typed.is_empty()
                && sendmsg::<UnixAddr>(
                    keys.as_raw_fd(),
                    &[IoSlice::new(typed)],
                    &[],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .is_err()
            {
                return;
            }
            if n == 0 || detach.is_some() {
                let _ = shutdown(keys.as_raw_fd(), Shutdown::Write);
                return;
            }
        }
    });
    loop {
        let (frame, _) = recv(sock.as_raw_fd())?;
        match frame.split_first() {
            Some((&OUTPUT, data)) => {
                output.write_all(data)?;
                output.flush()?;
            }
            Some((&DETACHED, _)) => return Ok(()),
            _ => return Err(init_gone()),
        }
    }
}

fn init_gone() -> Error {
    Error::Sandbox(
        "the branch's init is gone (its processes were killed, or the branch was aborted): nothing can run in it any more; abort it"
            .into(),
    )
}

fn connect_to(control: &Path) -> Result<OwnedFd> {
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(sock_err("creating a socket"))?;
    let addr = UnixAddr::new(control).map_err(sock_err("control socket path"))?;
    connect(sock.as_raw_fd(), &addr).map_err(|e| match e {
        nix::errno::Errno::ECONNREFUSED | nix::errno::Errno::ENOENT => init_gone(),
        e => Error::Sandbox(format!(
            "connecting to the branch's init at {}: {e}",
            control.display()
        )),
    })?;
    Ok(sock)
}

/// Sends `req` (with `stdio`) on a connected control socket and waits for the final reply
/// (telling `on_pid` the pid of a started process).
fn request(
    sock: &OwnedFd,
    req: &ExecRequest,
    stdio: &[RawFd],
    on_pid: impl FnOnce(i32),
) -> Result<ExecReply> {
    let msg = serde_json::to_vec(req).map_err(std::io::Error::from)?;
    if msg.len() > MAX_MESSAGE {
        return Err(Error::Invalid(format!(
            "the command, its arguments and environment take {} KiB, and a branch's init takes requests of at most {} KiB: pass long inputs through a file in the workspace",
            msg.len().div_ceil(1024),
            MAX_MESSAGE / 1024
        )));
    }
    send(sock.as_raw_fd(), &msg, stdio)?;
    let mut pid_seen = Some(on_pid);
    loop {
        let (msg, _) = recv(sock.as_raw_fd())?;
        if msg.is_empty() {
            return Err(init_gone());
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
