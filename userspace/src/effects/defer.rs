//! Deferred calls: the daemon's side of the seccomp listener each deferring branch's init
//! installs (see [`crate::sandbox::notify`]). A thread per listener receives the held
//! calls (`connect`, `sendto` with an address, `sendmsg`), reads the destination from the
//! caller's memory, and asks the policy of the caller's branch (by cgroup: a clone still on
//! its parent branch's filter follows its own branch). Anything but `defer` goes on at once
//! (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`; the eBPF hooks judge the call again when it runs,
//! and refuse a deferred destination unless the daemon wrote a one-time pass for that
//! thread and destination, which it does only when it lets a deferred call go: what the
//! caller's memory says by then cannot get anything out unheld). A deferred call is journaled (with the
//! listener's init and the notification id, so a restarted daemon can still answer it) and
//! waits:
//! - the branch commits: the call goes on, for real, now;
//! - the branch aborts: it fails with ECANCELED;
//! - the policy's `defer_timeout` passes: it fails with ETIMEDOUT;
//! - the calling process dies: the notification lapses, recorded as such.
//!
//! A held call whose wait is interrupted (a freeze of its cgroup, as a fork or a commit
//! makes, or a signal) is withdrawn by the kernel and made again when the process resumes,
//! with a new notification: the daemon recognises it (same process and destination) and
//! keeps it under the same effect.

use std::{
    collections::HashMap,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{EffectState, Journal, replay::Delivery};
use crate::{
    error::{Error, Result},
    policy::{Action, Policy},
};

const NOTIF_RECV: libc::c_ulong = 0xc050_2100;
const NOTIF_SEND: libc::c_ulong = 0xc018_2101;
const NOTIF_ID_VALID: libc::c_ulong = 0x4008_2102;
const FLAG_CONTINUE: u32 = 1;

/// `struct seccomp_notif`.
#[repr(C)]
#[derive(Default)]
struct Notif {
    id: u64,
    pid: u32,
    flags: u32,
    nr: i32,
    arch: u32,
    ip: u64,
    args: [u64; 6],
}
const _: () = assert!(std::mem::size_of::<Notif>() == 80);

/// `struct seccomp_notif_resp`.
#[repr(C)]
struct Resp {
    id: u64,
    val: i64,
    error: i32,
    flags: u32,
}
const _: () = assert!(std::mem::size_of::<Resp>() == 24);

/// What the journal keeps to answer a held call later.
#[derive(Serialize, Deserialize)]
struct Ticket {
    /// Host pid of the init whose listener holds it.
    init: u32,
    notif: u64,
    pid: u32,
}

struct HeldCall {
    effect: i64,
    cgroup: u64,
    pid: u32,
    dest: Option<(IpAddr, u16)>,
    listener: Arc<OwnedFd>,
    notif: u64,
    since: Instant,
    timeout: Option<Duration>,
}

/// The policy of a branch, by cgroup id.
pub type PolicyOf = Box<dyn Fn(u64) -> Option<Policy> + Send + Sync>;

/// Writes the hooks' one-time pass for thread `tid`'s call to `ip`:`port` (see the eBPF
/// `sock` module): without it the kernel refuses the call.
pub type Grant = Box<dyn Fn(u32, IpAddr, u16) -> Result<()> + Send + Sync>;

/// Every listener the daemon serves and the calls held on them.
#[derive(Clone)]
pub struct Deferrals {
    inner: Arc<Inner>,
}

/// A held call released while it was being made again (see the module doc): when it
/// comes, it goes on.
struct Pass {
    pid: u32,
    dest: Option<(IpAddr, u16)>,
    until: Instant,
}

struct Inner {
    journal: Journal,
    policy_of: PolicyOf,
    grant: Grant,
    held: Mutex<Vec<HeldCall>>,
    passes: Mutex<Vec<Pass>>,
    /// Calls held since the daemon started.
    deferred: std::sync::atomic::AtomicU64,
    listeners: Mutex<HashMap<u32, Arc<OwnedFd>>>,
}

impl Deferrals {
    pub fn new(journal: Journal, policy_of: PolicyOf, grant: Grant) -> Deferrals {
        Deferrals {
            inner: Arc::new(Inner {
                journal,
                policy_of,
                grant,
                held: Mutex::new(Vec::new()),
                passes: Mutex::new(Vec::new()),
                deferred: std::sync::atomic::AtomicU64::new(0),
                listeners: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Serves the listener that branch init `init` (host pid) holds, taking a copy with
    /// pidfd_getfd, and takes back the calls the journal says are held on it.
    pub fn adopt(&self, init: u32) -> Result<()> {
        if self.inner.listeners().contains_key(&init) {
            return Ok(());
        }
        let fd = crate::sandbox::notify::listener_fd(init).ok_or_else(|| {
            Error::Sandbox(format!(
                "the init of a deferring branch (pid {init}) holds no seccomp listener"
            ))
        })?;
        let listener = Arc::new(take_fd(init, fd)?);
        self.inner.listeners().insert(init, listener.clone());
        for e in self.inner.journal.held_defers()? {
            let Ok(t) = serde_json::from_slice::<Ticket>(&e.1) else {
                continue;
            };
            if t.init == init {
                self.inner.held().push(HeldCall {
                    effect: e.0.id,
                    cgroup: e.0.cgroup,
                    pid: t.pid,
                    dest: format!("{}:{}", e.0.addr, e.0.port)
                        .parse::<std::net::SocketAddr>()
                        .ok()
                        .map(|a| (a.ip(), a.port())),
                    listener: listener.clone(),
                    notif: t.notif,
                    since: Instant::now(),
                    timeout: (self.inner.policy_of)(e.0.cgroup).and_then(|p| p.defer_timeout()),
                });
            }
        }
        let inner = self.inner.clone();
        std::thread::Builder::new()
            .name(format!("forkscope-defer-{init}"))
            .spawn(move || inner.serve(init, listener))
            .map_err(Error::Other)?;
        Ok(())
    }

    /// Calls held since the daemon started.
    pub fn deferred_total(&self) -> u64 {
        self.inner
            .deferred
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Lets every call held for the branch with cgroup id `cgroup` go on (its commit).
    pub fn release(&self, cgroup: u64) -> Vec<Delivery> {
        self.inner.finish(cgroup, None)
    }

    /// Fails every call held for the branch with cgroup id `cgroup` (its abort).
    pub fn cancel(&self, cgroup: u64) -> Vec<Delivery> {
        self.inner
            .finish(cgroup, Some((libc::ECANCELED, "the branch was aborted")))
    }
}

/// A copy of descriptor `fd` of process `pid`.
fn take_fd(pid: u32, fd: i32) -> Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; it returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return Err(Error::Sandbox(format!(
            "pidfd_open({pid}): {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: a new descriptor nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: pidfd_getfd takes a pidfd, a descriptor number and flags.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if got < 0 {
        return Err(Error::Sandbox(format!(
            "taking the seccomp listener of process {pid}: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: a new descriptor (close-on-exec) nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(got as i32) })
}

fn respond(listener: &OwnedFd, id: u64, error: Option<i32>) -> std::io::Result<()> {
    let mut r = Resp {
        id,
        val: 0,
        error: error.map_or(0, |e| -e),
        flags: if error.is_none() { FLAG_CONTINUE } else { 0 },
    };
    // SAFETY: SECCOMP_IOCTL_NOTIF_SEND reads one `seccomp_notif_resp`.
    let rc = unsafe { libc::ioctl(listener.as_raw_fd(), NOTIF_SEND, &mut r as *mut Resp) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn valid(listener: &OwnedFd, id: u64) -> bool {
    let mut id = id;
    // SAFETY: SECCOMP_IOCTL_NOTIF_ID_VALID reads one u64.
    unsafe { libc::ioctl(listener.as_raw_fd(), NOTIF_ID_VALID, &mut id as *mut u64) == 0 }
}

impl Inner {
    fn held(&self) -> std::sync::MutexGuard<'_, Vec<HeldCall>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn passes(&self) -> std::sync::MutexGuard<'_, Vec<Pass>> {
        self.passes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn listeners(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<OwnedFd>>> {
        self.listeners.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers every call held for `cgroup`: goes on (`fail` none) or fails. The held list
    /// stays locked throughout, so a call made again meanwhile (see the module doc) finds
    /// either its held entry or its pass.
    fn finish(&self, cgroup: u64, fail: Option<(i32, &str)>) -> Vec<Delivery> {
        let mut held = self.held();
        let (calls, rest): (Vec<_>, Vec<_>) = held.drain(..).partition(|h| h.cgroup == cgroup);
        *held = rest;
        let mut out = Vec::new();
        for h in calls {
            let dest = h
                .dest
                .map(|(ip, port)| format!("{ip}:{port}"))
                .unwrap_or_default();
            if fail.is_none()
                && let Some((ip, port)) = h.dest
                && let Err(e) = (self.grant)(h.pid, ip, port)
            {
                log::warn!("letting held call {} go: {e}", h.effect);
            }
            let answered = respond(&h.listener, h.notif, fail.map(|f| f.0));
            let alive = std::path::Path::new(&format!("/proc/{}", h.pid)).exists();
            let (state, delivered, result) = match (&answered, fail) {
                (Ok(()), None) => (EffectState::Done, true, "the held call went on".to_string()),
                (Ok(()), Some((_, why))) => (EffectState::Failed, false, format!("failed: {why}")),
                (Err(_), None) if alive => {
                    // Withdrawn by an interrupted wait (the commit froze the branch): it
                    // goes on when it comes again.
                    self.passes().push(Pass {
                        pid: h.pid,
                        dest: h.dest,
                        until: Instant::now() + Duration::from_secs(10),
                    });
                    (
                        EffectState::Done,
                        true,
                        "the held call goes on (made again after the commit's freeze)".to_string(),
                    )
                }
                (Err(_), _) => (
                    EffectState::Failed,
                    false,
                    "its process ended while the call was held: nothing was sent".to_string(),
                ),
            };
            let _ = self.journal.set_state(h.effect, state, &result);
            out.push(Delivery {
                id: h.effect,
                kind: "defer".into(),
                dest,
                summary: String::new(),
                delivered,
                result,
            });
        }
        out
    }

    fn serve(&self, init: u32, listener: Arc<OwnedFd>) {
        // Until every process under the filter is gone (the calls held when the daemon
        // stops stay held in the kernel, for the next daemon).
        loop {
            let mut pfd = libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, valid for the call.
            let n = unsafe { libc::poll(&mut pfd, 1, 200) };
            self.expire();
            if n <= 0 {
                continue;
            }
            if pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 && pfd.revents & libc::POLLIN == 0
            {
                break; // every process under the filter is gone
            }
            let mut notif = Notif::default();
            // SAFETY: SECCOMP_IOCTL_NOTIF_RECV fills one zeroed `seccomp_notif`.
            let rc =
                unsafe { libc::ioctl(listener.as_raw_fd(), NOTIF_RECV, &mut notif as *mut Notif) };
            if rc < 0 {
                continue; // the caller went away between poll and receive
            }
            self.decide(init, &listener, &notif);
        }
        self.listeners().remove(&init);
    }

    /// Lets the call go on, or holds it if the caller's branch defers its destination.
    fn decide(&self, init: u32, listener: &Arc<OwnedFd>, n: &Notif) {
        let go_on = || {
            let _ = respond(listener, n.id, None);
        };
        let Some((ip, port)) = destination(n) else {
            return go_on();
        };
        if !valid(listener, n.id) {
            return; // the caller died while its memory was read
        }
        let Some(cgroup) = cgroup_of(n.pid) else {
            return go_on();
        };
        let Some(policy) = (self.policy_of)(cgroup) else {
            return go_on();
        };
        if policy.net_action(ip, port) != Action::Defer {
            return go_on();
        }
        let mut held = self.held();
        let released = {
            let mut passes = self.passes();
            passes.retain(|p| p.until > Instant::now());
            let i = passes
                .iter()
                .position(|p| p.pid == n.pid && p.dest == Some((ip, port)));
            i.map(|i| passes.remove(i))
        };
        if released.is_some() {
            drop(held);
            if let Err(e) = (self.grant)(n.pid, ip, port) {
                log::warn!("letting a released call of process {} go: {e}", n.pid);
            }
            return go_on();
        }
        let call = match n.nr as i64 {
            libc::SYS_connect => "connect",
            libc::SYS_sendto => "sendto",
            _ => "sendmsg",
        };
        let ticket = Ticket {
            init,
            notif: n.id,
            pid: n.pid,
        };
        let payload = serde_json::to_vec(&ticket).unwrap_or_default();
        // The same call made again after its wait was interrupted keeps its effect.
        let again = {
            let i = held.iter().position(|h| {
                h.pid == n.pid && h.dest == Some((ip, port)) && !valid(&h.listener, h.notif)
            });
            i.map(|i| held.remove(i).effect)
        };
        let recorded = match again {
            Some(effect) => self.journal.set_payload(effect, &payload).map(|()| effect),
            None => {
                self.deferred
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.journal
                    .record(cgroup, "defer", &ip.to_string(), port, call, &payload)
            }
        };
        match recorded {
            Ok(effect) => held.push(HeldCall {
                effect,
                cgroup,
                pid: n.pid,
                dest: Some((ip, port)),
                listener: listener.clone(),
                notif: n.id,
                since: Instant::now(),
                timeout: policy.defer_timeout(),
            }),
            // Not recorded, not held: refused, never let out.
            Err(e) => {
                log::warn!("deferring a {call} of process {}: {e}", n.pid);
                let _ = respond(listener, n.id, Some(libc::EPERM));
            }
        }
    }

    /// Fails calls held past their timeout, and records those whose process died.
    fn expire(&self) {
        let mut gone = Vec::new();
        {
            let mut held = self.held();
            held.retain(|h| {
                if h.timeout.is_some_and(|t| h.since.elapsed() > t) {
                    let _ = respond(&h.listener, h.notif, Some(libc::ETIMEDOUT));
                    gone.push((
                        h.effect,
                        "failed: held longer than the policy's defer_timeout",
                    ));
                    false
                } else if !valid(&h.listener, h.notif)
                    && !std::path::Path::new(&format!("/proc/{}", h.pid)).exists()
                {
                    gone.push((
                        h.effect,
                        "its process ended while the call was held: nothing was sent",
                    ));
                    false
                } else {
                    // (Invalid with its process alive: withdrawn by an interrupted wait, it
                    // comes again; see the module doc.)
                    true
                }
            });
        }
        for (effect, why) in gone {
            let _ = self.journal.set_state(effect, EffectState::Failed, why);
        }
    }
}

/// The destination of a held call, read from the caller's memory: (address, port) for
/// IPv4 and IPv6, `None` for anything else (Unix sockets, no address).
fn destination(n: &Notif) -> Option<(IpAddr, u16)> {
    let mem = std::fs::File::open(format!("/proc/{}/mem", n.pid)).ok()?;
    let read = |at: u64, len: usize| -> Option<Vec<u8>> {
        let mut b = vec![0u8; len];
        std::os::unix::fs::FileExt::read_exact_at(&mem, &mut b, at).ok()?;
        Some(b)
    };
    let (ptr, len) = match n.nr as i64 {
        libc::SYS_connect => (n.args[1], n.args[2]),
        libc::SYS_sendto => (n.args[4], n.args[5]),
        _ => {
            // struct msghdr: msg_name, msg_namelen.
            let h = read(n.args[1], 12)?;
            (
                u64::from_ne_bytes(h[..8].try_into().ok()?),
                u32::from_ne_bytes(h[8..12].try_into().ok()?) as u64,
            )
        }
    };
    if ptr == 0 || len < 8 {
        return None;
    }
    let sa = read(ptr, (len as usize).min(28))?;
    let family = u16::from_ne_bytes([sa[0], sa[1]]) as i32;
    let port = u16::from_be_bytes([sa[2], sa[3]]);
    match family {
        libc::AF_INET => Some((IpAddr::from([sa[4], sa[5], sa[6], sa[7]]), port)),
        libc::AF_INET6 if sa.len() >= 24 => {
            let a: [u8; 16] = sa[8..24].try_into().ok()?;
            Some((IpAddr::from(a), port))
        }
        _ => None,
    }
}

/// The cgroup id (inode of its cgroup v2 directory) of process `pid`.
fn cgroup_of(pid: u32) -> Option<u64> {
    let dir = crate::cgroup::dir_of(Some(pid)).ok()?;
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(dir).ok()?).into()
}
