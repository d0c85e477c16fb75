//! Turns kernel events into [`TraceEvent`]s: absolute paths, socket addresses as text, exit
//! statuses split into code and signal.
//!
//! The kernel sends paths as programs passed them (often relative) and identifies the file
//! behind a descriptor by (device, inode). The resolver keeps what it needs to name them:
//! each process's working directory (from chdir/fchdir, inherited at fork) and the path of
//! every (device, inode) seen opened, created or renamed. What it cannot know from events
//! (descriptors opened before tracing began) it reads from /proc while the process lives.

use std::{
    borrow::Cow,
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr},
    os::unix::fs::MetadataExt,
    path::Path,
};

use forkscope_common::{
    EventKind, FdEvent, PathEvent, ProcEvent,
    event::{PATH1_TRUNCATED, PATH2_TRUNCATED, file_type},
    syscalls::{self, AT_FDCWD, O_ACCMODE, O_CREAT, O_TRUNC},
};

use super::{RawEvent, TraceEvent, decode::c_str};

/// Path and working-directory knowledge gathered from the event stream.
#[derive(Default)]
pub struct Resolver {
    inode_paths: HashMap<(u32, u64), String>,
    cwd: HashMap<u32, String>,
    comms: HashMap<u32, String>,
    /// Paths that could not be made absolute (their directory was unknown).
    pub unresolved: u64,
}

/// The kernel's encoding of a device number (MAJOR << 20 | MINOR), from a `st_dev`.
pub fn kernel_dev(st_dev: u64) -> u32 {
    let major = libc::major(st_dev);
    let minor = libc::minor(st_dev);
    (major << 20) | minor
}

/// Lexically normalizes an absolute path: removes `.`, empty components and resolves `..`.
pub fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// `path` joined onto `base` and normalized (an absolute `path` ignores `base`; an empty one
/// is `base` itself).
pub fn join(base: &str, path: &str) -> String {
    if path.starts_with('/') {
        normalize(path)
    } else if path.is_empty() {
        normalize(base)
    } else {
        normalize(&format!("{base}/{path}"))
    }
}

/// A socket family's name in traces (`inet`, `inet6`, `unix`, ...).
pub(super) fn family_name(family: u16) -> String {
    match family {
        1 => "unix".into(),
        2 => "inet".into(),
        10 => "inet6".into(),
        16 => "netlink".into(),
        n => n.to_string(),
    }
}

/// An IP address as text (IPv4 in the first 4 bytes); none for other families.
pub(super) fn addr_text(family: u16, addr: &[u8; 16]) -> Option<String> {
    match family {
        2 => Some(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]).to_string()),
        10 => Some(Ipv6Addr::from(*addr).to_string()),
        _ => None,
    }
}

fn readlink(p: String) -> Option<String> {
    std::fs::read_link(p)
        .ok()
        .map(|l| l.to_string_lossy().into_owned())
        .filter(|l| l.starts_with('/'))
}

impl Resolver {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the working directory of `pid` (the traced command's, known at spawn).
    pub fn set_cwd(&mut self, pid: u32, cwd: &str) {
        self.cwd.insert(pid, normalize(cwd));
    }

    /// Names the file at `path` by its (device, inode), for descriptors that were opened
    /// before tracing began (the traced command's inherited stdio).
    pub fn learn_file(&mut self, path: &Path) {
        if let Ok(m) = std::fs::metadata(path) {
            self.inode_paths.insert(
                (kernel_dev(m.dev()), m.ino()),
                path.to_string_lossy().into_owned(),
            );
        }
    }

    /// The last command name seen for `pid`.
    pub fn comm_of(&self, pid: u32) -> Option<&str> {
        self.comms.get(&pid).map(String::as_str)
    }

    fn cwd_of(&mut self, pid: u32) -> Option<String> {
        if let Some(c) = self.cwd.get(&pid) {
            return Some(c.clone());
        }
        let c = readlink(format!("/proc/{pid}/cwd"))?;
        self.cwd.insert(pid, c.clone());
        Some(c)
    }

    /// Absolute path of `path` relative to `dirfd` (whose directory is (dev, ino)).
    fn resolve_at(&mut self, pid: u32, dirfd: i32, dir: (u32, u64), path: &str) -> String {
        if path.starts_with('/') {
            return normalize(path);
        }
        let base = if dirfd == AT_FDCWD {
            self.cwd_of(pid)
        } else {
            self.inode_paths
                .get(&dir)
                .cloned()
                .or_else(|| readlink(format!("/proc/{pid}/fd/{dirfd}")))
        };
        match base {
            Some(b) => join(&b, path),
            None => {
                self.unresolved += 1;
                path.to_string()
            }
        }
    }

    /// Path of the open file (dev, ino) behind `fd` of `pid`.
    fn fd_path(&mut self, pid: u32, fd: i32, dev: u32, ino: u64) -> Option<String> {
        if let Some(p) = self.inode_paths.get(&(dev, ino)) {
            return Some(p.clone());
        }
        let p = readlink(format!("/proc/{pid}/fd/{fd}"));
        match &p {
            Some(p) => {
                self.inode_paths.insert((dev, ino), p.clone());
            }
            None => self.unresolved += 1,
        }
        p
    }

    /// A renamed file or directory keeps its inode: move every known path under `old`.
    fn renamed(&mut self, old: &str, new: &str) {
        let prefix = format!("{old}/");
        for p in self.inode_paths.values_mut() {
            if p == old {
                *p = new.to_string();
            } else if let Some(rest) = p.strip_prefix(&prefix) {
                *p = format!("{new}/{rest}");
            }
        }
    }

    /// Converts one kernel event; `None` for events that only feed the resolver (chdir,
    /// opens of directories).
    pub fn event(&mut self, raw: &RawEvent) -> Option<TraceEvent> {
        let h = raw.header();
        let comm = c_str(&h.comm);
        if self.comms.get(&h.pid) != Some(&comm) {
            self.comms.insert(h.pid, comm.clone());
        }
        let base = TraceEvent {
            ts_ns: h.ts_ns,
            cgroup: h.cgroup,
            pid: h.pid,
            tid: h.tid,
            comm,
            syscall: syscalls::name(h.syscall).map(Cow::Borrowed),
            ..TraceEvent::default()
        };
        match raw {
            RawEvent::Fd(e) => self.fd_event(e, base),
            RawEvent::Path(e) => self.path_event(e, base),
            RawEvent::Proc(e) => self.proc_event(e, base),
        }
    }

    fn fd_event(&mut self, e: &FdEvent, mut t: TraceEvent) -> Option<TraceEvent> {
        let kind = EventKind::from_u32(e.hdr.kind)?;
        let pid = e.hdr.pid;
        t.fd = (e.fd >= 0).then_some(e.fd); // -1: the socket hooks do not know it
        match kind {
            EventKind::NetConnect
            | EventKind::NetSend
            | EventKind::NetDenied
            | EventKind::NetBuffered => {
                t.kind = match kind {
                    EventKind::NetSend => "net_send",
                    EventKind::NetDenied => "net_denied",
                    EventKind::NetBuffered => "net_buffered",
                    _ => "net_connect",
                }
                .into();
                t.family = Some(family_name(e.family));
                t.addr = addr_text(e.family, &e.addr);
                t.port = matches!(e.family, 2 | 10).then_some(e.port);
                if kind == EventKind::NetSend {
                    t.bytes = Some(e.bytes);
                    t.calls = (e.ret > 0).then_some(e.ret as u64);
                }
                return Some(t);
            }
            EventKind::Chdir => {
                if let Some(p) = self.fd_path(pid, e.fd, e.dev, e.ino) {
                    self.cwd.insert(pid, p);
                }
                return None;
            }
            _ => {}
        }
        t.path = self.fd_path(pid, e.fd, e.dev, e.ino);
        match kind {
            EventKind::FileWrite => {
                t.kind = "file_write".into();
                t.offset = (e.offset >= 0).then_some(e.offset);
                t.bytes = Some(e.bytes);
                t.calls = (e.ret > 0).then_some(e.ret as u64);
            }
            EventKind::FileTruncate => {
                t.kind = "file_truncate".into();
                t.offset = (e.offset >= 0).then_some(e.offset);
                t.size = Some(e.bytes);
            }
            EventKind::FileMeta => {
                t.kind = "file_meta".into();
                if e.hdr.syscall == syscalls::SYS_FCHMOD {
                    t.mode = Some(format!("{:o}", e.flags & 0o7777));
                }
            }
            EventKind::FileMmap => {
                t.kind = "file_mmap".into();
                t.offset = Some(e.offset);
                t.bytes = Some(e.bytes);
                t.flags = Some(e.flags);
            }
            EventKind::FileClone => {
                t.kind = "file_clone".into();
                t.src_path = self.fd_path(pid, e.src_fd, e.src_dev, e.src_ino);
                t.offset = Some(e.offset);
                t.bytes = (e.bytes >= 0).then_some(e.bytes);
            }
            _ => return None,
        }
        Some(t)
    }

    fn path_event(&mut self, e: &PathEvent, mut t: TraceEvent) -> Option<TraceEvent> {
        let kind = EventKind::from_u32(e.hdr.kind)?;
        let pid = e.hdr.pid;
        let p1 = c_str(&e.path);
        let p2 = c_str(&e.path2);
        if e.trunc & (PATH1_TRUNCATED | PATH2_TRUNCATED) != 0 {
            t.truncated = Some(true);
        }
        let path = if kind == EventKind::FileSymlink {
            p1.clone() // the target text, never resolved
        } else {
            self.resolve_at(pid, e.dirfd, (e.dir_dev, e.dir_ino), &p1)
        };
        let needs_second = matches!(
            kind,
            EventKind::FileRename | EventKind::FileLink | EventKind::FileSymlink
        );
        let path2 =
            needs_second.then(|| self.resolve_at(pid, e.dirfd2, (e.dir2_dev, e.dir2_ino), &p2));
        t.path = Some(path.clone());
        match kind {
            EventKind::FileOpen => {
                self.inode_paths.insert((e.file_dev, e.file_ino), path);
                let write_intent = e.flags & O_ACCMODE != 0 || e.flags & (O_CREAT | O_TRUNC) != 0;
                if !write_intent && e.file_type == file_type::DIR {
                    return None;
                }
                t.kind = "file_open".into();
                t.fd = Some(e.ret as i32);
                t.flags = Some(e.flags);
                if e.flags & O_CREAT != 0 {
                    t.mode = Some(format!("{:o}", e.mode & 0o7777));
                }
            }
            EventKind::Chdir => {
                self.cwd.insert(pid, path);
                return None;
            }
            EventKind::FileTruncate => {
                t.kind = "file_truncate".into();
                t.size = Some(e.arg);
            }
            EventKind::FileRename => {
                let new = path2.expect("rename has a second path");
                self.renamed(&path, &new);
                t.kind = "file_rename".into();
                t.new_path = Some(new);
                t.flags = (e.flags != 0).then_some(e.flags);
            }
            EventKind::FileUnlink => {
                t.kind = "file_unlink".into();
                t.flags = (e.flags != 0).then_some(e.flags);
            }
            EventKind::FileMkdir => {
                t.kind = "file_mkdir".into();
                t.mode = Some(format!("{:o}", e.mode & 0o7777));
            }
            EventKind::FileMknod => {
                t.kind = "file_mknod".into();
                t.mode = Some(format!("{:o}", e.mode));
            }
            EventKind::FileMeta => {
                t.kind = "file_meta".into();
                if matches!(
                    e.hdr.syscall,
                    syscalls::SYS_CHMOD | syscalls::SYS_FCHMODAT | syscalls::SYS_FCHMODAT2
                ) {
                    t.mode = Some(format!("{:o}", e.mode & 0o7777));
                }
            }
            EventKind::FileLink => {
                t.kind = "file_link".into();
                t.new_path = path2;
            }
            EventKind::FileSymlink => {
                t.kind = "file_symlink".into();
                t.path = path2;
                t.new_path = Some(path);
            }
            _ => return None,
        }
        Some(t)
    }

    fn proc_event(&mut self, e: &ProcEvent, mut t: TraceEvent) -> Option<TraceEvent> {
        let pid = e.hdr.pid;
        t.syscall = None;
        match EventKind::from_u32(e.hdr.kind)? {
            EventKind::ProcFork => {
                if let Some(c) = self.cwd_of(pid) {
                    self.cwd.insert(e.child_pid, c);
                }
                t.kind = "proc_fork".into();
                t.child_pid = Some(e.child_pid);
            }
            EventKind::ProcExec => {
                t.kind = "proc_exec".into();
                let f = c_str(&e.filename);
                t.filename = Some(if f.starts_with('/') {
                    f
                } else {
                    self.resolve_at(pid, AT_FDCWD, (0, 0), &f)
                });
            }
            EventKind::ProcExit => {
                self.cwd.remove(&pid);
                t.kind = "proc_exit".into();
                let sig = (e.exit_code & 0x7f) as i32;
                if sig == 0 {
                    t.exit_code = Some(((e.exit_code >> 8) & 0xff) as i32);
                } else {
                    t.signal = Some(sig);
                }
            }
            _ => return None,
        }
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::decode::tests::{header, path_event};

    #[test]
    fn normalizes_dot_and_dotdot() {
        assert_eq!(normalize("/a/./b/../c//d/"), "/a/c/d");
        assert_eq!(normalize("/.."), "/");
        assert_eq!(join("/w", "x/../y"), "/w/y");
        assert_eq!(join("/w", "/abs"), "/abs");
        assert_eq!(join("/w", ""), "/w");
    }

    #[test]
    fn relative_paths_follow_chdir_and_fork() {
        let mut r = Resolver::new();
        r.set_cwd(10, "/work");
        let cd = path_event(EventKind::Chdir, 10, "sub", "");
        assert!(r.event(&RawEvent::Path(Box::new(cd))).is_none());
        let fork = ProcEvent {
            hdr: header(EventKind::ProcFork, 10),
            child_pid: 11,
            exit_code: 0,
            filename: [0; 512],
        };
        r.event(&RawEvent::Proc(Box::new(fork))).unwrap();
        let mk = path_event(EventKind::FileMkdir, 11, "../made", "");
        let t = r.event(&RawEvent::Path(Box::new(mk))).unwrap();
        assert_eq!(t.kind, "file_mkdir");
        assert_eq!(t.path.as_deref(), Some("/work/made"));
    }

    #[test]
    fn writes_are_named_by_the_inode_of_their_open_and_follow_renames() {
        let mut r = Resolver::new();
        r.set_cwd(3, "/w");
        let mut open = path_event(EventKind::FileOpen, 3, "f.tmp", "");
        open.flags = 0o1101; // O_WRONLY|O_CREAT|O_TRUNC
        open.file_dev = 9;
        open.file_ino = 77;
        open.ret = 4;
        let t = r.event(&RawEvent::Path(Box::new(open))).unwrap();
        assert_eq!(
            (t.kind.as_ref(), t.path.as_deref(), t.fd),
            ("file_open", Some("/w/f.tmp"), Some(4))
        );
        let mv = path_event(EventKind::FileRename, 3, "f.tmp", "f");
        let t = r.event(&RawEvent::Path(Box::new(mv))).unwrap();
        assert_eq!(t.new_path.as_deref(), Some("/w/f"));
        let w = FdEvent {
            file_type: file_type::REG,
            ino: 77,
            dev: 9,
            flags: 1,
            offset: 100,
            bytes: 5,
            ..FdEvent::new(header(EventKind::FileWrite, 3), 4)
        };
        let t = r.event(&RawEvent::Fd(w)).unwrap();
        assert_eq!(
            (t.path.as_deref(), t.offset, t.bytes),
            (Some("/w/f"), Some(100), Some(5))
        );
    }

    #[test]
    fn exit_status_splits_code_and_signal() {
        let mut r = Resolver::new();
        let mut e = ProcEvent {
            hdr: header(EventKind::ProcExit, 1),
            child_pid: 0,
            exit_code: 3 << 8,
            filename: [0; 512],
        };
        let t = r.event(&RawEvent::Proc(Box::new(e))).unwrap();
        assert_eq!((t.exit_code, t.signal), (Some(3), None));
        e.exit_code = 9;
        let t = r.event(&RawEvent::Proc(Box::new(e))).unwrap();
        assert_eq!((t.exit_code, t.signal), (None, Some(9)));
    }

    #[test]
    fn socket_addresses_become_text() {
        let mut r = Resolver::new();
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let e = FdEvent {
            file_type: file_type::SOCK,
            ino: 1,
            dev: 1,
            bytes: 10,
            family: 2,
            port: 8080,
            ret: 10,
            addr,
            ..FdEvent::new(header(EventKind::NetSend, 1), 3)
        };
        let t = r.event(&RawEvent::Fd(e)).unwrap();
        assert_eq!(
            (t.kind.as_ref(), t.addr.as_deref(), t.port, t.bytes),
            ("net_send", Some("127.0.0.1"), Some(8080), Some(10))
        );
    }
}
