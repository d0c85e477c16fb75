//! A recording HTTP server on loopback, standing in for the outside world.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
};

/// A TCP server on `addr` (port chosen by the kernel), serving in a thread: each
/// connection is handed to `serve`, and what it returns comes out of the receiver.
pub fn tcp_server<T: Send + 'static>(
    addr: &str,
    serve: impl Fn(TcpStream) -> T + Send + 'static,
) -> (u16, std::sync::mpsc::Receiver<T>) {
    let l = TcpListener::bind((addr, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            if tx.send(serve(c)).is_err() {
                return;
            }
        }
    });
    (port, rx)
}

/// A recording HTTP server on `addr`: answers 200 to every request and passes on (head,
/// body) of each.
pub fn recording_http_server(addr: &str) -> (u16, std::sync::mpsc::Receiver<(String, Vec<u8>)>) {
    tcp_server(addr, |mut c| {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break got.len(),
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        };
        let head = String::from_utf8_lossy(&got[..head_end]).into_owned();
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap_or(0))
            })
            .unwrap_or(0);
        while got.len() < head_end + len {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        (head, got[head_end..].to_vec())
    })
}
