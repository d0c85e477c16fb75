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
    os::{fd::AsRawFd, unix::fs::MetadataExt, unix::net::UnixStream},
    path::Path,
    time::{Duration, Instant},
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

/// The pid of the process that is listening on the Unix socket `path` (the one that called
/// `listen`, which the kernel hands every connection as its peer), if a connection is
/// accepted there: `Some(None)` when the kernel does not say who.
fn listener_pid(path: &Path) -> Option<Option<i32>> {
    let s = UnixStream::connect(path).ok()?;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt on a socket we own, writing at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    Some((r == 0 && cred.pid > 0).then_some(cred.pid))
}

/// Whether another live process listens on the Unix socket `path`. A socket nobody listens
/// on refuses the connection; one whose listener has died (its socket left open only in a
/// child that has not exec'd yet) does not count. When the kernel does not name the
/// listener, a connection accepted counts as a live one.
pub fn held_by_a_live_process(path: &Path) -> bool {
    match listener_pid(path) {
        None => false,
        Some(None) => true,
        Some(Some(pid)) => alive(pid),
    }
}

/// Whether process `pid` lives (a zombie, dead but not yet reaped, does not).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which ends with the line's last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The (device, inode) of the socket file this daemon bound at `path`, to remove it at
/// stop only if it is still ours.
pub fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}
