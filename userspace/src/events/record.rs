//! The JSON shape of one trace event (one line of `forkscope trace` output). Fields that do
//! not apply to a kind are left out.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// Now on the clock of [`TraceEvent::ts_ns`] (CLOCK_MONOTONIC, as the kernel's
/// `bpf_ktime_get_ns`), for events written from user space.
pub fn now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// One side effect, as written to the trace.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TraceEvent {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// cgroup v2 id of the task.
    pub cgroup: u64,
    /// Process id.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// The task's command name.
    pub comm: String,
    /// file_open, file_write, file_truncate, file_rename, file_unlink, file_mkdir, file_meta,
    /// file_mmap, file_link, file_symlink, file_mknod, file_clone, net_connect, net_send,
    /// proc_fork, proc_exec, proc_exit, page_dirty_summary; and the branch's own operations,
    /// written by the daemon: branch_start, branch_fork, branch_commit.
    pub kind: Cow<'static, str>,
    /// The syscall that caused it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub syscall: Option<Cow<'static, str>>,
    /// Absolute path of the file (for file_symlink: the new link).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub path: Option<String>,
    /// rename/link: the new path; symlink: the link's target text.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub new_path: Option<String>,
    /// file_clone: the source file.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub src_path: Option<String>,
    /// Where in the file the operation started.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub offset: Option<i64>,
    /// Bytes written or sent (file_mmap: length of the mapping).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bytes: Option<i64>,
    /// file_write, net_send: how many syscalls a record merged from a run of writes stands
    /// for (absent for a record of one syscall). A run is one thread writing one file at
    /// consecutive offsets, or one connected socket; `offset` is where the record's bytes
    /// start.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub calls: Option<u64>,
    /// net_send of a branch traced without per-write detail: the packets that carried
    /// `bytes` since the previous such record (counted as they left the branch's sockets;
    /// `pid` and `tid` are 0, `comm` is empty).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub packets: Option<u64>,
    /// file_truncate: the new size (truncate/ftruncate) or the length of the range (fallocate).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub size: Option<i64>,
    /// The descriptor used.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub fd: Option<i32>,
    /// Open flags, AT_* flags or mmap protection, as the syscall got them.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub flags: Option<u32>,
    /// Mode argument (open with O_CREAT, mkdir, mknod, chmod), octal text.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mode: Option<String>,
    /// Socket family: inet, inet6, unix, or the number.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub family: Option<String>,
    /// IP address as text.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub addr: Option<String>,
    /// Port.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub port: Option<u16>,
    /// proc_fork: the new process.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub child_pid: Option<u32>,
    /// proc_exec: the executed file.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub filename: Option<String>,
    /// proc_exit: the exit code (0-255), when the process exited normally.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub exit_code: Option<i32>,
    /// proc_exit: the signal that killed the process.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub signal: Option<i32>,
    /// page_dirty_summary: pages the process dirtied.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pages: Option<u64>,
    /// page_dirty_summary, only when it differs from `pages`: the pages the kernel's
    /// dirty-page set still holds for the process. The set was full and evicted some of its
    /// entries (raise `--dirty-regions`): `pages` is then the larger of the count and the
    /// set, a page may have counted twice, and `page_ranges` may miss pages.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pages_recorded: Option<u64>,
    /// page_dirty_summary with --page-addresses: dirtied ranges as [start, end) addresses.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub page_ranges: Option<Vec<[u64; 2]>>,
    /// Set when a path was longer than the kernel side keeps and was cut.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub truncated: Option<bool>,
    /// branch_start: the branch it was forked from (none for a root branch).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub parent: Option<String>,
    /// branch_fork: the branches it made.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub children: Option<Vec<String>>,
    /// branch_commit: what the commit wrote into (a branch, or the host directory).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub target: Option<String>,
    /// branch_fork, branch_commit: how long the operation took, from `ts_ns`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub duration_ns: Option<u64>,
    /// branch_fork, branch_commit: where that time went, microseconds per phase.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub phases_us: Option<std::collections::BTreeMap<String, u64>>,
}
