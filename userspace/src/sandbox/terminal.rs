//! A branch's terminals, owned by its init: pseudo-terminals (of the branch's own devpts
//! instance, see [`super::mounts`]) made for the clones of processes that had a terminal
//! (see [`crate::procfork`]), so a clone never shares the parent's terminal. The init holds
//! each master side (and a slave descriptor, so the master never reads as hung up), copies
//! what the terminal shows into the branch's command log, and relays to one attached client
//! at a time (`forkscope attach`) over the client's control connection: the client's
//! messages are typed into the terminal, and the terminal's output goes to the client as
//! [`OUTPUT`] frames; the client ends it by shutting its side down, and gets [`DETACHED`].
//!
//! Served from the init's own poll loop, never blocking: every descriptor is non-blocking
//! and each direction has a bounded buffer. While a client's buffer is full the terminal is
//! not read (the program on it waits, as on a slow terminal); typed input waits in its
//! buffer while the terminal's input queue is full, and its output keeps being read.

use std::{
    io::Write,
    os::{
        fd::{AsFd, AsRawFd, OwnedFd, RawFd},
        unix::fs::OpenOptionsExt,
    },
};

use nix::{
    errno::Errno,
    fcntl::OFlag,
    poll::PollFlags,
    pty::{grantpt, posix_openpt, ptsname_r, unlockpt},
    sys::socket::{MsgFlags, recv, send},
};
use serde::{Deserialize, Serialize};

use super::control::{self, ExecReply};
use crate::error::{Error, Result};

/// Ctrl-]: a client detaches when it is typed.
pub const DETACH_KEY: u8 = 0x1d;
/// First byte of a frame to the client: the rest is the terminal's output.
pub const OUTPUT: u8 = b'o';
/// A frame to the client: it is detached.
pub const DETACHED: u8 = b'd';

/// Most bytes buffered in each direction.
const CAP: usize = 64 * 1024;
/// Largest frame sent at once, either way (a client's message of input too: a
/// SOCK_SEQPACKET message read short would lose its end).
pub const FRAME: usize = 4096;

/// A terminal's settings, as the terminal a clone replaces had them: `struct termios` (as
/// TCGETS gives it) and the window size (rows, columns, x and y pixels).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub termios: Vec<u8>,
    pub winsize: [u16; 4],
}

impl Settings {
    /// The settings of terminal descriptor `fd`.
    pub fn of(fd: RawFd) -> Option<Settings> {
        let mut t = std::mem::MaybeUninit::<libc::termios>::zeroed();
        let mut w = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TCGETS and TIOCGWINSZ write one termios and one winsize into the
        // buffers passed, which are that size; a failure leaves them unused.
        let ok = unsafe {
            libc::ioctl(fd, libc::TCGETS, t.as_mut_ptr()) == 0
                && libc::ioctl(fd, libc::TIOCGWINSZ, &mut w) == 0
        };
        if !ok {
            return None;
        }
        // SAFETY: TCGETS filled the termios.
        let t = unsafe { t.assume_init() };
        // SAFETY: viewing a plain C struct (no padding holes read as anything but bytes)
        // as its bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&t as *const libc::termios).cast::<u8>(),
                std::mem::size_of::<libc::termios>(),
            )
        };
        Some(Settings {
            termios: bytes.to_vec(),
            winsize: [w.ws_row, w.ws_col, w.ws_xpixel, w.ws_ypixel],
        })
    }

    /// Applies them to terminal descriptor `fd`.
    fn apply(&self, fd: RawFd) -> Result<()> {
        if self.termios.len() != std::mem::size_of::<libc::termios>() {
            return Err(Error::Invalid("terminal settings of the wrong size".into()));
        }
        let w = libc::winsize {
            ws_row: self.winsize[0],
            ws_col: self.winsize[1],
            ws_xpixel: self.winsize[2],
            ws_ypixel: self.winsize[3],
        };
        // SAFETY: the buffer holds exactly one `struct termios` (checked above) and `w` is
        // a winsize; TCSETS and TIOCSWINSZ only read them.
        let ok = unsafe {
            libc::ioctl(fd, libc::TCSETS, self.termios.as_ptr()) == 0
                && libc::ioctl(fd, libc::TIOCSWINSZ, &w) == 0
        };
        if !ok {
            return Err(Error::Sandbox(format!(
                "setting the terminal: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }
}

/// A client attached to a terminal: its connection (non-blocking), and whether it has
/// asked to detach (what it typed is still to be delivered).
struct Client {
    conn: OwnedFd,
    leaving: bool,
}

/// One terminal of the branch.
struct Terminal {
    path: String,
    master: OwnedFd,
    _slave: std::fs::File,
    client: Option<Client>,
    to_client: Vec<u8>,
    to_master: Vec<u8>,
}

/// The terminals of a branch (in its init).
#[derive(Default)]
pub struct Terminals {
    all: Vec<Terminal>,
}

fn set_nonblocking(fd: &impl AsFd) -> Result<()> {
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)
        .map_err(|e| Error::Sandbox(format!("fcntl: {e}")))?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(flags))
        .map_err(|e| Error::Sandbox(format!("fcntl: {e}")))?;
    Ok(())
}

fn reply(conn: &impl AsRawFd, r: &ExecReply) {
    let _ = control::send(
        conn.as_raw_fd(),
        &serde_json::to_vec(r).unwrap_or_default(),
        &[],
    );
}

impl Terminals {
    /// Makes a new terminal with `settings`; returns its slave's path.
    pub fn create(&mut self, settings: Option<&Settings>) -> Result<String> {
        fn err(what: &'static str) -> impl FnOnce(nix::Error) -> Error {
            move |e| Error::Sandbox(format!("{what}: {e}"))
        }
        let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
            .map_err(err("opening /dev/ptmx"))?;
        grantpt(&master).map_err(err("grantpt"))?;
        unlockpt(&master).map_err(err("unlockpt"))?;
        let path = ptsname_r(&master).map_err(err("ptsname"))?;
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| Error::Sandbox(format!("{path}: {e}")))?;
        if let Some(s) = settings {
            s.apply(slave.as_raw_fd())?;
        }
        let master: OwnedFd = master.into();
        set_nonblocking(&master)?;
        self.all.push(Terminal {
            path: path.clone(),
            master,
            _slave: slave,
            client: None,
            to_client: Vec::new(),
            to_master: Vec::new(),
        });
        Ok(path)
    }

    /// Attaches the client on `conn` to terminal `path` (default: the newest): replies
    /// [`ExecReply::Attached`], or an error if there is no such terminal. A client
    /// attached before is detached.
    pub fn attach(&mut self, path: Option<&str>, conn: OwnedFd) {
        let found = match path {
            Some(p) => self.all.iter().position(|t| t.path == p),
            None => self.all.len().checked_sub(1),
        };
        let Some(i) = found else {
            let known: Vec<&str> = self.all.iter().map(|t| t.path.as_str()).collect();
            let why = if known.is_empty() {
                "this branch has no terminal: a fork gives one to the clone of a process that had a terminal".to_string()
            } else {
                format!(
                    "no terminal {}: this branch has {}",
                    path.unwrap_or_default(),
                    known.join(", ")
                )
            };
            reply(&conn, &ExecReply::Error(why));
            return;
        };
        reply(&conn, &ExecReply::Attached(self.all[i].path.clone()));
        if set_nonblocking(&conn).is_err() {
            return;
        }
        let t = &mut self.all[i];
        if let Some(old) = t.client.take() {
            let _ = send(old.conn.as_raw_fd(), &[DETACHED], MsgFlags::MSG_NOSIGNAL);
        }
        t.to_client.clear();
        t.client = Some(Client {
            conn,
            leaving: false,
        });
    }

    /// The descriptors to poll and the events wanted, in the order [`Terminals::serve`]
    /// takes their results.
    pub fn wanted(&self) -> Vec<(RawFd, PollFlags)> {
        let mut fds = Vec::new();
        for t in &self.all {
            let mut m = PollFlags::empty();
            if t.to_client.len() < CAP {
                m |= PollFlags::POLLIN;
            }
            if !t.to_master.is_empty() {
                m |= PollFlags::POLLOUT;
            }
            fds.push((t.master.as_raw_fd(), m));
            if let Some(c) = &t.client {
                let mut e = PollFlags::empty();
                // (Read only with room for a whole message.)
                if CAP.saturating_sub(t.to_master.len()) >= FRAME && !c.leaving {
                    e |= PollFlags::POLLIN;
                }
                if !t.to_client.is_empty() || c.leaving {
                    e |= PollFlags::POLLOUT;
                }
                fds.push((c.conn.as_raw_fd(), e));
            }
        }
        fds
    }

    /// Moves what can move without blocking, given the events that came for the
    /// descriptors of [`Terminals::wanted`] (same order); the terminals' output also goes
    /// to `log`.
    pub fn serve(&mut self, events: &[PollFlags], log: &mut std::fs::File) {
        let mut events = events.iter().copied();
        let mut buf = [0u8; 16 * 1024];
        for t in &mut self.all {
            let on_master = events.next().unwrap_or(PollFlags::empty());
            let on_conn = if t.client.is_some() {
                events.next().unwrap_or(PollFlags::empty())
            } else {
                PollFlags::empty()
            };
            if on_master.intersects(PollFlags::POLLIN) {
                let room = if t.client.is_some() {
                    CAP.saturating_sub(t.to_client.len()).min(buf.len())
                } else {
                    buf.len()
                };
                if let Ok(n) = nix::unistd::read(&t.master, &mut buf[..room]) {
                    let _ = log.write_all(&buf[..n]);
                    if t.client.is_some() {
                        t.to_client.extend_from_slice(&buf[..n]);
                    }
                }
            }
            if on_master.intersects(PollFlags::POLLOUT)
                && let Ok(n) = nix::unistd::write(&t.master, &t.to_master)
            {
                t.to_master.drain(..n);
            }
            let Some(c) = &mut t.client else { continue };
            if on_conn.intersects(PollFlags::POLLIN) {
                match recv(c.conn.as_raw_fd(), &mut buf[..FRAME], MsgFlags::empty()) {
                    // The client shut its side: it is leaving (what it typed goes on).
                    Ok(0) => c.leaving = true,
                    Ok(n) => t.to_master.extend_from_slice(&buf[..n]),
                    Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
                    Err(_) => {
                        t.client = None;
                        continue;
                    }
                }
            } else if on_conn.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
                // Gone without a word.
                t.client = None;
                continue;
            }
            while !t.to_client.is_empty() {
                let n = t.to_client.len().min(FRAME);
                let mut frame = Vec::with_capacity(n + 1);
                frame.push(OUTPUT);
                frame.extend_from_slice(&t.to_client[..n]);
                match send(c.conn.as_raw_fd(), &frame, MsgFlags::MSG_NOSIGNAL) {
                    Ok(_) => {
                        t.to_client.drain(..n);
                    }
                    Err(Errno::EAGAIN) | Err(Errno::EINTR) => break,
                    Err(_) => {
                        t.to_client.clear();
                        c.leaving = true;
                        break;
                    }
                }
            }
            if c.leaving && t.to_client.is_empty() {
                match send(c.conn.as_raw_fd(), &[DETACHED], MsgFlags::MSG_NOSIGNAL) {
                    Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
                    _ => t.client = None,
                }
            }
        }
    }
}
