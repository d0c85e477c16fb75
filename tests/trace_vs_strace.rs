//! `forkscope trace` against strace on real programs: for the same run (strace runs inside
//! the traced command), the files written with their byte totals and the destinations with
//! their byte totals must be the same as strace reports.

use std::{
    io::{Read, Write},
    net::{TcpListener, UdpSocket},
    path::Path,
    thread,
};

use forkscope_tests::{TempDir, TraceRun, require_root, strace, trace};

/// Runs `cmd` in `dir` under `forkscope trace -- strace ... -- cmd` and returns both views.
fn both(dir: &Path, cmd: &[&str]) -> (TraceRun, strace::Totals) {
    require_root();
    let logs = TempDir::new("strace-log");
    let log = logs.path().join("strace.log");
    let log_s = log.to_string_lossy().into_owned();
    let mut full: Vec<&str> = vec!["strace"];
    full.extend_from_slice(strace::STRACE_ARGS);
    full.extend_from_slice(&["-o", &log_s, "--"]);
    full.extend_from_slice(cmd);
    let run = trace(dir, &[], &full);
    assert_eq!(
        run.code(),
        Some(0),
        "traced command failed: {}",
        run.stderr()
    );
    let text = std::fs::read_to_string(&log).expect("strace log");
    (run, strace::totals(&text))
}

/// Asserts forkscope's per-file totals under `dir` equal strace's, and returns them.
fn assert_same_files(
    dir: &Path,
    run: &TraceRun,
    st: &strace::Totals,
) -> std::collections::BTreeMap<String, u64> {
    let ours = run.file_totals(dir);
    let theirs: std::collections::BTreeMap<String, u64> = st
        .files
        .iter()
        .filter(|(p, _)| Path::new(p).starts_with(dir))
        .map(|(p, b)| (p.clone(), *b))
        .collect();
    assert!(
        !theirs.is_empty(),
        "strace saw no file writes under {}",
        dir.display()
    );
    assert_eq!(
        ours, theirs,
        "files written: forkscope (left) vs strace (right)"
    );
    ours
}

#[test]
fn shell_redirects_match_strace() {
    let dir = TempDir::new("shell");
    let script = "echo hello > a.txt; printf abc >> a.txt; cat a.txt > b.txt; seq 1 20000 > c.txt; mkdir sub; cd sub && echo x > ../d.txt";
    let (run, st) = both(dir.path(), &["sh", "-c", script]);
    let files = assert_same_files(dir.path(), &run, &st);
    let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    assert_eq!(files[&p("a.txt")], 9);
    assert_eq!(files[&p("b.txt")], 9);
    assert_eq!(
        files[&p("c.txt")],
        std::fs::metadata(dir.path().join("c.txt")).unwrap().len()
    );
    assert_eq!(
        files[&p("d.txt")],
        2,
        "a relative path after cd must resolve against the new cwd"
    );
    assert!(run.of_kind("file_mkdir").any(|e| e["path"] == p("sub")));
}

#[test]
fn python_writes_at_offsets_match_strace() {
    let dir = TempDir::new("python");
    let script = r#"
import os
fd = os.open("data.bin", os.O_RDWR | os.O_CREAT, 0o644)
os.pwrite(fd, b"a" * 10, 10000)
os.lseek(fd, 300, 0)
os.write(fd, b"b" * 7)
os.writev(fd, [b"c" * 5, b"d" * 6])
os.pwritev(fd, [b"e" * 3], 50000)
os.close(fd)
with open("log.txt", "a") as f:
    for i in range(1000):
        f.write("line %d\n" % i)
with open("log.txt", "a") as f:
    f.write("tail\n")
"#;
    let (run, st) = both(dir.path(), &["python3", "-c", script]);
    assert_same_files(dir.path(), &run, &st);
    let data = dir.path().join("data.bin").to_string_lossy().into_owned();
    let writes: Vec<(i64, i64)> = run
        .of_kind("file_write")
        .filter(|e| e["path"] == data.as_str())
        .map(|e| (e["offset"].as_i64().unwrap(), e["bytes"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        writes,
        vec![(10000, 10), (300, 7), (307, 11), (50000, 3)],
        "offsets and sizes"
    );
    // Appends start at the end of what was there.
    let log = dir.path().join("log.txt").to_string_lossy().into_owned();
    let last = run
        .of_kind("file_write")
        .filter(|e| e["path"] == log.as_str())
        .last()
        .unwrap();
    let size = std::fs::metadata(dir.path().join("log.txt")).unwrap().len() as i64;
    assert_eq!(
        last["offset"].as_i64().unwrap() + last["bytes"].as_i64().unwrap(),
        size
    );
}

#[test]
fn git_init_and_commit_match_strace() {
    let dir = TempDir::new("git");
    let script = "git init -q . && for i in $(seq 1 40); do echo \"file $i\" > f$i.txt; done \
        && git add . && git -c user.name=t -c user.email=t@example.com commit -qm first \
        && echo change >> f1.txt && git -c user.name=t -c user.email=t@example.com commit -qam second";
    let (run, st) = both(dir.path(), &["sh", "-c", script]);
    let files = assert_same_files(dir.path(), &run, &st);
    assert!(
        files.keys().any(|p| p.contains("/.git/objects/")),
        "git object writes are seen: {files:?}"
    );
    // Objects are written to temporary names and then linked (or renamed) into place.
    let placed = |e: &serde_json::Value| {
        e["new_path"]
            .as_str()
            .unwrap_or("")
            .contains("/.git/objects/")
    };
    assert!(
        run.of_kind("file_link")
            .chain(run.of_kind("file_rename"))
            .any(placed)
    );
    assert!(
        run.of_kind("file_unlink")
            .any(|e| e["path"].as_str().unwrap_or("").contains("/.git/objects/"))
    );
}

#[test]
fn sqlite_database_writes_match_strace() {
    let dir = TempDir::new("sqlite");
    let sql = "create table t(id integer primary key, v text); \
        begin; insert into t(v) select hex(randomblob(50)) from generate_series(1, 3000); commit; \
        insert into t(v) values ('one'); insert into t(v) values ('two'); \
        update t set v = 'x' where id % 7 = 0;";
    let sql = if sqlite_has_generate_series() {
        sql.to_string()
    } else {
        sql.replace(
            "select hex(randomblob(50)) from generate_series(1, 3000)",
            "with recursive c(n) as (select 1 union all select n + 1 from c where n < 3000) select hex(randomblob(50)) from c",
        )
    };
    let (run, st) = both(dir.path(), &["sqlite3", "db.sqlite", &sql]);
    let files = assert_same_files(dir.path(), &run, &st);
    let db = dir.path().join("db.sqlite").to_string_lossy().into_owned();
    assert!(
        files[&db] >= 3000 * 50,
        "the database grew by at least the inserted data"
    );
    let written_at: Vec<i64> = run
        .of_kind("file_write")
        .filter(|e| e["path"] == db.as_str())
        .map(|e| e["offset"].as_i64().unwrap())
        .collect();
    assert!(
        written_at.iter().all(|o| o % 4096 == 0),
        "SQLite writes whole pages: {written_at:?}"
    );
}

fn sqlite_has_generate_series() -> bool {
    std::process::Command::new("sqlite3")
        .args([":memory:", "select count(*) from generate_series(1, 2);"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A one-request HTTP server on loopback; returns its port and a handle yielding the bytes it
/// received.
fn http_server() -> (u16, thread::JoinHandle<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 65536];
        loop {
            let n = conn.read(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    break;
                }
            }
        }
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            .unwrap();
        buf.len()
    });
    (port, handle)
}

#[test]
fn curl_upload_to_a_local_server_matches_strace() {
    let dir = TempDir::new("curl");
    std::fs::write(dir.path().join("payload"), vec![b'z'; 300_000]).unwrap();
    let (port, server) = http_server();
    let url = format!("http://127.0.0.1:{port}/upload");
    let (run, st) = both(
        dir.path(),
        &[
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "--data-binary",
            "@payload",
            &url,
        ],
    );
    let received = server.join().unwrap();
    let ours = run.destination_totals();
    let dest = format!("127.0.0.1:{port}");
    assert_eq!(
        ours.get(&dest),
        st.destinations.get(&dest),
        "bytes to {dest}: forkscope vs strace"
    );
    assert_eq!(
        ours[&dest] as usize, received,
        "forkscope counts exactly what the server received"
    );
    assert!(
        run.of_kind("net_connect")
            .any(|e| e["port"] == port && e["addr"] == "127.0.0.1")
    );
}

#[test]
fn udp_sendto_and_connected_send_match_strace() {
    let dir = TempDir::new("udp");
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = sink.local_addr().unwrap().port();
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for i in range(1, 41): s.sendto(b'u' * i, ('127.0.0.1', {port}))\n\
         c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         c.connect(('127.0.0.1', {port}))\n\
         for i in range(10): c.send(b'v' * 1000)\n"
    );
    let (run, st) = both(dir.path(), &["python3", "-c", &script]);
    let ours = run.destination_totals();
    let dest = format!("127.0.0.1:{port}");
    let expected = (1..=40).sum::<u64>() + 10 * 1000;
    assert_eq!(
        st.destinations.get(&dest),
        Some(&expected),
        "strace reference"
    );
    assert_eq!(ours.get(&dest), Some(&expected), "forkscope: {ours:?}");
}
