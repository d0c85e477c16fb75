//! A branch's terminals, owned by its init: pseudo-terminals made for clones of processes
//! that had one (see [`crate::procfork`]), so a clone never shares the parent's terminal.
//! The init holds each master side (and a slave descriptor, so the master never reads as
//! hung up between the clone's descriptors), copies everything written to the terminal into
//! the branch's command log, and connects one attached client at a time (`forkscope attach`):
//! the client's stdin goes to the terminal, the terminal's output to the client's stdout too,
//! until stdin ends, reads Ctrl-] or the client goes.
//!
//! One thread per terminal: the init's own loop never waits on a terminal or a client.

use std::{
    io::Write,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
        unix::fs::OpenOptionsExt,
    },
    sync::{Arc, Mutex},
    time::Duration,
};

use nix::{
    fcntl::OFlag,
    poll::{PollFd, PollFlags, PollTimeout, poll},
    pty::{grantpt, posix_openpt, ptsname_r, unlockpt},
};

use super::control::{self, ExecReply};
use crate::error::{Error, Result};

/// Ctrl-]: detaches an attached client.
pub const DETACH_KEY: u8 = 0x1d;

/// A client attached to a terminal: its stdin, stdout and connection.
struct Client {
    input: OwnedFd,
    output: OwnedFd,
    conn: OwnedFd,
}

/// One terminal of the branch.
struct Terminal {
    path: String,
    /// A client waiting to be picked up by the terminal's thread.
    waiting: Arc<Mutex<Option<Client>>>,
}

/// The terminals of a branch (in its init).
#[derive(Default)]
pub struct Terminals {
    all: Vec<Terminal>,
}

impl Terminals {
    /// Makes a new terminal whose output is copied into `log`; returns its slave's path.
    pub fn create(&mut self, log: &std::fs::File) -> Result<String> {
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
        let log = log.try_clone()?;
        let waiting = Arc::new(Mutex::new(None));
        let w = waiting.clone();
        let master: OwnedFd = master.into();
        std::thread::Builder::new()
            .name("terminal".into())
            .spawn(move || pump(master, slave, log, w))
            .map_err(|e| Error::Sandbox(format!("a thread for the terminal: {e}")))?;
        self.all.push(Terminal {
            path: path.clone(),
            waiting,
        });
        Ok(path)
    }

    /// Hands a client (stdin, stdout, connection) to terminal `path` (default: the newest).
    /// Replies with an error if there is no such terminal.
    pub fn attach(&self, path: Option<&str>, input: OwnedFd, output: OwnedFd, conn: OwnedFd) {
        let found = match path {
            Some(p) => self.all.iter().find(|t| t.path == p),
            None => self.all.last(),
        };
        let Some(t) = found else {
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
        let client = Client {
            input,
            output,
            conn,
        };
        let mut slot = t.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = slot.replace(client) {
            reply(&old.conn, &ExecReply::Detached);
        }
    }
}

fn reply(conn: &OwnedFd, r: &ExecReply) {
    let _ = control::send(
        conn.as_raw_fd(),
        &serde_json::to_vec(r).unwrap_or_default(),
        &[],
    );
}

/// Copies the terminal's output into the log (and to the attached client), and the
/// client's input to the terminal. Runs for the init's life (the init holds a slave, so
/// the master never hangs up).
fn pump(
    master: OwnedFd,
    _slave: std::fs::File,
    mut log: std::fs::File,
    waiting: Arc<Mutex<Option<Client>>>,
) {
    let mut client: Option<Client> = None;
    let mut buf = [0u8; 4096];
    loop {
        let picked = waiting.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(c) = picked
            && let Some(old) = client.replace(c)
        {
            reply(&old.conn, &ExecReply::Detached);
        }
        let mut fds = vec![PollFd::new(master.as_fd(), PollFlags::POLLIN)];
        if let Some(c) = &client {
            fds.push(PollFd::new(c.input.as_fd(), PollFlags::POLLIN));
            fds.push(PollFd::new(c.conn.as_fd(), PollFlags::POLLIN));
        }
        if poll(&mut fds, PollTimeout::from(100u16)).is_err() {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        if ready[0] {
            match nix::unistd::read(&master, &mut buf) {
                Ok(n) if n > 0 => {
                    let _ = log.write_all(&buf[..n]);
                    if let Some(c) = &client
                        && write_all(c.output.as_fd(), &buf[..n]).is_err()
                    {
                        client = None;
                    }
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        let Some(c) = &client else { continue };
        // The client went away (its connection reads as closed): it is simply dropped.
        if ready.get(2) == Some(&true) {
            client = None;
            continue;
        }
        if ready.get(1) == Some(&true) {
            let n = nix::unistd::read(&c.input, &mut buf).unwrap_or(0);
            let keys = &buf[..n];
            let detach = n == 0 || keys.contains(&DETACH_KEY);
            let typed = match keys.iter().position(|&k| k == DETACH_KEY) {
                Some(i) => &keys[..i],
                None => keys,
            };
            let _ = write_all(master.as_fd(), typed);
            if detach {
                reply(&c.conn, &ExecReply::Detached);
                client = None;
            }
        }
    }
}

fn write_all(fd: BorrowedFd, mut data: &[u8]) -> nix::Result<()> {
    while !data.is_empty() {
        match nix::unistd::write(fd, data) {
            Ok(0) => return Err(nix::errno::Errno::EIO),
            Ok(n) => data = &data[n..],
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
