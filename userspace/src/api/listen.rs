//! Taking the daemon's listening addresses as it starts. A daemon killed while it was
//! spawning a process leaves that child, until its exec, holding a copy of every socket the
//! daemon listened on: the API socket still accepts connections, which nobody answers, and
//! the metrics and proxy ports are still taken. A daemon restarted at once must not take
//! that for another daemon, so a port in use is tried again for a short while, and an API
//! socket belongs to another daemon only if something answers on it.

use std::{
    io::{self, Read, Write},
    net::SocketAddr,
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

use tokio::net::TcpListener;

/// How long a dead daemon's sockets may outlive it (its child's exec) before a port in use
/// or a silent API socket is taken for a live one.
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

/// Whether a live server answers on the Unix socket `path`: any HTTP answer within
/// [`SETTLE`] (the request names no route, so a daemon answers 404 at once, however busy
/// its branches keep it). A socket nobody listens on refuses the connection; one that only a
/// dead daemon's child holds accepts it and never answers.
pub fn answered(path: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(path) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(SETTLE));
    let _ = s.set_write_timeout(Some(SETTLE));
    let asked = s.write_all(b"GET / HTTP/1.1\r\nHost: forkscope\r\nConnection: close\r\n\r\n");
    let mut first = [0u8; 1];
    asked.is_ok() && matches!(s.read(&mut first), Ok(1))
}
