//! Taking the daemon's listening addresses as it starts. A daemon killed while it was
//! spawning a process leaves that child, until its exec, holding a copy of every socket the
//! daemon listened on: the API socket still accepts connections, which nobody answers, and
//! the metrics and proxy ports are still taken. A daemon restarted at once must not take
//! that for another daemon: a port in use is tried again for a short while, and the API
//! socket belongs to another daemon only if the process that made it listen still lives.
//! The CLI asks the same of the socket it connects to ([`alive`]), rather than wait forever
//! for an answer.

use std::{
    io,
    net::SocketAddr,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::Path,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::{
        signal::kill,
        socket::{
            AddressFamily, SockFlag, SockType, UnixAddr, connect, getsockopt, socket,
            sockopt::PeerCredentials,
        },
    },
    unistd::Pid,
};

use tokio::net::TcpListener;

/// How long a dead daemon's ports may stay taken (until its child's exec) before a port in
/// use is reported.
pub const SETTLE: Duration = Duration::from_secs(2);

/// Binds a TCP listener on `addr`, trying again while the address is in use, for up to
/// [`SETTLE`].
pub async fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let deadline = Instant::now() + SETTLE;
    loop {
        match TcpListener::bind(addr).await {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            bound => return bound,
        }
    }
}

/// Who listens on a Unix socket, as a connection to it finds.
enum Listener {
    /// Nobody: the connection is refused (or the socket cannot be reached).
    Nobody,
    /// Connections are not being taken: the queue of those waiting to be accepted is full.
    QueueFull,
    /// A connection was accepted by the kernel; the pid of the process that called `listen`
    /// (the kernel hands it to every connection as its peer), if the kernel says.
    Accepted(Option<i32>),
}

/// Connects to the Unix socket `path` without waiting: a full queue is an answer too (a
/// blocking connect would wait for room there forever).
fn listener(path: &Path) -> Listener {
    let Ok(fd) = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return Listener::Nobody;
    };
    let Ok(addr) = UnixAddr::new(path) else {
        return Listener::Nobody;
    };
    match connect(fd.as_raw_fd(), &addr) {
        Ok(()) => Listener::Accepted(
            getsockopt(&fd, PeerCredentials)
                .ok()
                .map(|c| c.pid())
                .filter(|pid| *pid > 0),
        ),
        Err(Errno::EAGAIN) => Listener::QueueFull,
        Err(_) => Listener::Nobody,
    }
}

/// Whether another live process listens on the Unix socket `path`. A socket nobody listens
/// on refuses the connection; one whose listener has died (its socket left open only in a
/// child that has not exec'd yet) does not count. When the kernel does not name the
/// listener, a connection accepted counts as a live one. A queue of connections that stays
/// full for [`SETTLE`] has nobody taking them (a live daemon accepts at once; each client
/// that gave up on a dead one's socket left its connection there): it does not count, even
/// if a daemon stuck for that long made it (one on another state directory: one on the
/// same directory was refused by the state lock before).
pub async fn held_by_a_live_process(path: &Path) -> bool {
    let deadline = Instant::now() + SETTLE;
    loop {
        match listener(path) {
            Listener::Nobody => return false,
            Listener::Accepted(None) => return true,
            Listener::Accepted(Some(pid)) => return alive(pid),
            Listener::QueueFull if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Listener::QueueFull => {
                log::warn!(
                    "{}: its queue of connections stayed full for {} s, nobody takes them: \
                     taken over",
                    path.display(),
                    SETTLE.as_secs()
                );
                return false;
            }
        }
    }
}

/// Whether process `pid` (as the caller's pid namespace numbers it) lives: a zombie, dead
/// but not yet reaped, does not. Asked with a null signal, which needs no sight of /proc
/// (`hidepid` hides root's processes from other users); /proc only tells a zombie, and a
/// process whose /proc entry cannot be read counts as alive.
pub fn alive(pid: i32) -> bool {
    // (EPERM: it exists, another user's.)
    if let Err(Errno::ESRCH) = kill(Pid::from_raw(pid), None) {
        return false;
    }
    match std::fs::read(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which ends with the line's last ')'.
        Ok(stat) => {
            let after_name = stat.rsplit(|b| *b == b')').next().unwrap_or_default();
            let state = after_name.iter().find(|b| !b.is_ascii_whitespace());
            !matches!(state, Some(b'Z') | Some(b'X'))
        }
        Err(_) => true,
    }
}

/// The (device, inode) of the socket file this daemon bound at `path`, to remove it at
/// stop only if it is still ours.
pub fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}
