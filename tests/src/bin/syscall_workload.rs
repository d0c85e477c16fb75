//! A syscall-bound workload for benchmarking `forkscope trace` (issue #2).
//!
//! It makes many cheap system calls of the kinds forkscope traces and little else:
//!
//! 1. the write phase: `--writes N` (default 200,000) `write(2)` calls of 4 KiB each to a
//!    file in `--dir` (default `/dev/shm`, a tmpfs), rewinding with `lseek(2)` every 256
//!    writes so the file stays at 1 MiB and the cost is the system call, not page allocation;
//! 2. the send phase: `--sends N` (default 20,000) `send(2)` calls (the `sendto` syscall) of
//!    64 bytes each over a loopback TCP connection to a listener in a thread of this process
//!    that reads and discards.
//!
//! The time is measured inside the program, so whatever runs it (a tracer loading eBPF
//! programs, strace attaching) is not counted. It prints one JSON line to stdout:
//!
//! ```text
//! {"writes":200000,"sends":20000,"write_bytes":819200000,"send_bytes":1280000,
//!  "write_ns":...,"send_ns":...,"total_ns":...,
//!  "write_cpu_ns":...,"write_runq_ns":...,"send_cpu_ns":...,"send_runq_ns":...}
//! ```
//!
//! `total_ns` spans both phases and their set-up (opening the file, the listener thread and
//! the connection). The `*_cpu_ns` and `*_runq_ns` fields are the main thread's time on a CPU
//! and time waiting runnable for a CPU during each phase, from `/proc/thread-self/schedstat`
//! (omitted when that file cannot be read): they tell a tracer's in-kernel cost (more CPU
//! time) from competition with the tracer's consumer for the CPUs (more run-queue time).
//! Std only, so it builds anywhere the workspace builds.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::PathBuf,
    process::ExitCode,
    time::Instant,
};

const WRITE_SIZE: usize = 4096;
const SEND_SIZE: usize = 64;
const REWIND_EVERY: u64 = 256;

struct Config {
    dir: PathBuf,
    writes: u64,
    sends: u64,
}

const USAGE: &str = "usage: syscall_workload [--dir DIR] [--writes N] [--sends N]
  --dir DIR    directory of the scratch file (default /dev/shm, a tmpfs)
  --writes N   number of 4 KiB write(2) calls (default 200000)
  --sends N    number of 64-byte send(2) calls over loopback TCP (default 20000)";

fn parse_args() -> Result<Config, String> {
    let mut cfg = Config {
        dir: PathBuf::from("/dev/shm"),
        writes: 200_000,
        sends: 20_000,
    };
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        let a = a.to_string_lossy().into_owned();
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let mut value = || -> Result<String, String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => args
                    .next()
                    .map(|v| v.to_string_lossy().into_owned())
                    .ok_or_else(|| format!("{flag} needs a value")),
            }
        };
        let number = |s: String| -> Result<u64, String> {
            s.parse()
                .map_err(|_| format!("{flag}: `{s}` is not a number"))
        };
        match flag.as_str() {
            "--dir" => cfg.dir = PathBuf::from(value()?),
            "--writes" => cfg.writes = number(value()?)?,
            "--sends" => cfg.sends = number(value()?)?,
            _ => return Err(format!("unknown argument `{a}`\n{USAGE}")),
        }
    }
    Ok(cfg)
}

/// Removes the scratch file however the program ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn write_phase(cfg: &Config) -> std::io::Result<u64> {
    let path = cfg
        .dir
        .join(format!("syscall_workload.{}.tmp", std::process::id()));
    let mut file: File = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    let _scratch = Scratch(path);
    let buf = [0x5au8; WRITE_SIZE];
    let mut bytes = 0u64;
    for i in 0..cfg.writes {
        if i > 0 && i % REWIND_EVERY == 0 {
            file.seek(SeekFrom::Start(0))?;
        }
        // One write(2) per call: File is unbuffered. A short write on tmpfs would be a bug
        // worth seeing, so it is not retried.
        let n = file.write(&buf)?;
        if n != WRITE_SIZE {
            return Err(std::io::Error::other(format!("short write: {n} bytes")));
        }
        bytes += n as u64;
    }
    Ok(bytes)
}

fn send_phase(cfg: &Config) -> std::io::Result<u64> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut conn, _) = listener.accept()?;
        let mut buf = [0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            match conn.read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => total += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    });
    let mut stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    let payload = [0xa5u8; SEND_SIZE];
    let mut bytes = 0u64;
    for _ in 0..cfg.sends {
        // std's TcpStream::write is one send(2) (the sendto syscall) with MSG_NOSIGNAL.
        let n = stream.write(&payload)?;
        bytes += n as u64;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let received = reader
        .join()
        .map_err(|_| std::io::Error::other("reader thread panicked"))??;
    if received != bytes {
        return Err(std::io::Error::other(format!(
            "sent {bytes} bytes but the listener read {received}"
        )));
    }
    Ok(bytes)
}

/// (time on a CPU, time waiting on a run queue) of the calling thread so far, in ns.
fn schedstat() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let mut f = s.split_whitespace().map(|x| x.parse::<u64>().ok());
    Some((f.next()??, f.next()??))
}

fn main() -> ExitCode {
    let cfg = match parse_args() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("syscall_workload: {e}");
            return ExitCode::from(2);
        }
    };
    let sched_start = schedstat();
    let start = Instant::now();
    let write_bytes = match write_phase(&cfg) {
        Ok(b) => b,
        Err(e) => {
            eprintln!(
                "syscall_workload: write phase in {}: {e}",
                cfg.dir.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let write_ns = start.elapsed().as_nanos();
    let sched_mid = schedstat();
    let send_start = Instant::now();
    let send_bytes = match send_phase(&cfg) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("syscall_workload: send phase: {e}");
            return ExitCode::FAILURE;
        }
    };
    let send_ns = send_start.elapsed().as_nanos();
    let total_ns = start.elapsed().as_nanos();
    let sched_end = schedstat();
    let mut sched = String::new();
    if let (Some(a), Some(b), Some(c)) = (sched_start, sched_mid, sched_end) {
        sched = format!(
            ",\"write_cpu_ns\":{},\"write_runq_ns\":{},\"send_cpu_ns\":{},\"send_runq_ns\":{}",
            b.0 - a.0,
            b.1 - a.1,
            c.0 - b.0,
            c.1 - b.1
        );
    }
    println!(
        "{{\"writes\":{},\"sends\":{},\"write_bytes\":{write_bytes},\"send_bytes\":{send_bytes},\
         \"write_ns\":{write_ns},\"send_ns\":{send_ns},\"total_ns\":{total_ns}{sched}}}",
        cfg.writes, cfg.sends
    );
    ExitCode::SUCCESS
}
