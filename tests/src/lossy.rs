//! A loopback TCP listener behind a lossy link, so that senders retransmit: a Python
//! listener in a cgroup of its own, on which a tiny `cgroup_skb` ingress program (loaded
//! here with bpf(2)) drops about one data packet in eight. The sender's packets leave once,
//! are dropped on arrival, and leave again: what a sender's egress sees twice.
//!
//! Each connection's byte total arrives on a channel. Dropping the listener kills the
//! Python process and removes its cgroup (a [`Cgroup`] of forkscope's library, under
//! forkscope's cgroup; the program goes with it).

use std::{
    io::{BufRead, BufReader},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    process::{Child, Command, Stdio},
    sync::mpsc::Receiver,
};

use forkscope::cgroup::Cgroup;

/// `BPF_PROG_TYPE_CGROUP_SKB`.
const CGROUP_SKB: u32 = 8;
/// `BPF_PROG_LOAD`, `BPF_PROG_ATTACH`.
const PROG_LOAD: libc::c_long = 5;
const PROG_ATTACH: libc::c_long = 8;
/// `BPF_CGROUP_INET_INGRESS`.
const INET_INGRESS: u32 = 0;

/// The program: packets of 1000 bytes or more are dropped (return 0) when a random number
/// is 0 modulo 8; everything else passes (return 1).
///
/// ```text
/// 0: r6 = r1                    the __sk_buff
/// 1: r2 = *(u32 *)(r6 + 0)      skb->len
/// 2: if r2 < 1000 goto 8
/// 3: call bpf_get_prandom_u32
/// 4: r0 &= 7
/// 5: if r0 != 0 goto 8
/// 6: r0 = 0
/// 7: exit
/// 8: r0 = 1
/// 9: exit
/// ```
const PROGRAM: [u64; 10] = [
    insn(0xbf, 6, 1, 0, 0),
    insn(0x61, 2, 6, 0, 0),
    insn(0xa5, 2, 0, 5, 1000),
    insn(0x85, 0, 0, 0, 7),
    insn(0x57, 0, 0, 0, 7),
    insn(0x55, 0, 0, 2, 0),
    insn(0xb7, 0, 0, 0, 0),
    insn(0x95, 0, 0, 0, 0),
    insn(0xb7, 0, 0, 0, 1),
    insn(0x95, 0, 0, 0, 0),
];

/// One `struct bpf_insn` (little-endian): opcode, destination and source registers,
/// offset, immediate.
const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    (code as u64)
        | (((dst | (src << 4)) as u64) << 8)
        | ((off as u16 as u64) << 16)
        | ((imm as u32 as u64) << 32)
}

/// The listener: the Python process and its cgroup.
pub struct LossyListener {
    pub port: u16,
    child: Child,
    /// Killed and removed after the process is reaped (fields drop after `Drop::drop`).
    _cgroup: Cgroup,
}

/// The Python listener: prints its port, then each connection's byte total once the peer
/// has finished sending; closes the connection after that.
const LISTENER: &str = r"
import socket
l = socket.socket()
l.bind(('127.0.0.1', 0))
l.listen(8)
print(l.getsockname()[1], flush=True)
while True:
    c, _ = l.accept()
    n = 0
    while True:
        try:
            b = c.recv(65536)
        except OSError:
            break
        if not b:
            break
        n += len(b)
    print(n, flush=True)
    c.close()
";

impl LossyListener {
    /// Starts the listener; the byte totals arrive on the receiver, one per connection.
    pub fn start() -> (Self, Receiver<u64>) {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let cgroup = Cgroup::create(&format!(
            "test-lossy-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ))
        .expect("a test cgroup");
        let dir = std::fs::File::open(cgroup.path()).expect("the test cgroup's directory");
        let program = load_program();
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&(dir.as_raw_fd() as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&(program.as_raw_fd() as u32).to_ne_bytes());
        attr[8..12].copy_from_slice(&INET_INGRESS.to_ne_bytes());
        // SAFETY: bpf(2) reads `attr` (valid, 128 bytes) during the call.
        let r = unsafe { libc::syscall(libc::SYS_bpf, PROG_ATTACH, attr.as_ptr(), attr.len()) };
        assert_eq!(
            r,
            0,
            "attaching the lossy program: {}",
            std::io::Error::last_os_error()
        );
        // The program stays attached to the cgroup; it goes when the cgroup is removed.
        drop(program);
        let procs = cgroup.open_procs().expect("the test cgroup's cgroup.procs");
        let mut command = Command::new("python3");
        command.args(["-c", LISTENER]).stdout(Stdio::piped());
        // SAFETY: both hooks only make async-signal-safe calls (write, prctl), as pre_exec
        // hooks must. The listener runs in the cgroup from its first instruction, and dies
        // with the test even when the test is killed (its Drop never runs then).
        unsafe {
            command.pre_exec(Cgroup::enter_hook(&procs));
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().expect("python3");
        let stdout = child.stdout.take().unwrap();
        let mut listener = Self {
            port: 0,
            child,
            _cgroup: cgroup,
        };
        let mut lines = BufReader::new(stdout).lines();
        listener.port = lines
            .next()
            .and_then(Result::ok)
            .and_then(|l| l.trim().parse().ok())
            .expect("the lossy listener's port");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if tx.send(line.trim().parse().unwrap_or(0)).is_err() {
                    return;
                }
            }
        });
        (listener, rx)
    }
}

impl Drop for LossyListener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Loads [`PROGRAM`] as a cgroup_skb program.
fn load_program() -> OwnedFd {
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&CGROUP_SKB.to_ne_bytes());
    attr[4..8].copy_from_slice(&(PROGRAM.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(PROGRAM.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[24..28].copy_from_slice(&1u32.to_ne_bytes());
    attr[28..32].copy_from_slice(&(log.len() as u32).to_ne_bytes());
    attr[32..40].copy_from_slice(&(log.as_mut_ptr() as u64).to_ne_bytes());
    attr[48..53].copy_from_slice(b"lossy");
    attr[68..72].copy_from_slice(&INET_INGRESS.to_ne_bytes());
    // SAFETY: bpf(2) reads `attr` and the instructions and license it points to, and
    // writes at most `log.len()` bytes into `log`, all alive during the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, PROG_LOAD, attr.as_ptr(), attr.len()) };
    let log = String::from_utf8_lossy(&log);
    assert!(
        fd >= 0,
        "loading the lossy program: {}\n{}",
        std::io::Error::last_os_error(),
        log.trim_end_matches('\0')
    );
    // SAFETY: the kernel returned a new descriptor this process owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}
