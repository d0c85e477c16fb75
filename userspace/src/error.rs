//! The library's error type: every failure says what was wrong and, where there is one, what
//! to do about it.

use std::{io, path::PathBuf};

/// Errors of the forkscope library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "forkscope needs root (CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN) to load eBPF programs and create cgroups: run it as root"
    )]
    NotRoot,
    #[error(
        "this kernel exposes no BTF at /sys/kernel/btf/vmlinux (CONFIG_DEBUG_INFO_BTF=y is needed to find kernel structure offsets)"
    )]
    NoBtf,
    #[error("kernel structure {0} not found in BTF: this kernel is not supported")]
    BtfMissing(String),
    #[error("reading BTF: {0}")]
    Btf(String),
    #[error(
        "no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo): mount one with `mount -t cgroup2 none /sys/fs/cgroup`"
    )]
    NoCgroup2,
    #[error("tracefs is not mounted at /sys/kernel/tracing and mounting it failed: {0}")]
    NoTracefs(io::Error),
    #[error("the kernel refused eBPF program `{program}` ({what}): {cause}")]
    ProgramRefused {
        program: String,
        what: String,
        cause: Box<aya::programs::ProgramError>,
    },
    #[error("loading the eBPF object: {0}")]
    Load(Box<aya::EbpfError>),
    #[error("eBPF map {name}: {cause}")]
    Map {
        name: &'static str,
        cause: Box<aya::maps::MapError>,
    },
    #[error("command not found: {0}")]
    CommandNotFound(String),
    #[error("command not executable: {0}: {1}")]
    CommandNotExecutable(String, io::Error),
    #[error("no command given: put the command after `--`, for example `forkscope trace -- ls`")]
    NoCommand,
    #[error("state: {0}")]
    State(String),
    /// A request that cannot be right (bad name, bad workspace): HTTP 400.
    #[error("{0}")]
    Invalid(String),
    /// The caller may not do this (a request from inside a branch): HTTP 403.
    #[error("{0}")]
    Forbidden(String),
    /// No such branch: HTTP 404.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (name taken, live children): HTTP 409.
    #[error("{0}")]
    Conflict(String),
    /// The daemon cannot do it now (it is stopping): HTTP 503.
    #[error("{0}")]
    Unavailable(String),
    /// Both sides of a commit changed the same paths: HTTP 409, nothing applied.
    #[error("{}", conflicts_message(target, paths))]
    Conflicts { target: String, paths: Vec<PathBuf> },
    /// A commit passed its commit point but could not finish; its journal is kept and
    /// replayed when the daemon starts or the branch is committed again: HTTP 500.
    #[error(
        "the commit is incomplete ({0}); the branches involved stay frozen until it is finished: fix the cause, then run `forkscope commit` again or restart the daemon"
    )]
    CommitIncomplete(String),
    #[error("sandbox: {0}")]
    Sandbox(String),
    /// A process of the branch cannot be cloned faithfully: HTTP 409, nothing forked.
    #[error("{0}")]
    CannotClone(String),
    #[error("layers: {0}")]
    Layer(String),
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: io::Error },
    #[error("{0}")]
    Other(io::Error),
}

fn conflicts_message(target: &str, paths: &[PathBuf]) -> String {
    let list: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    format!(
        "{} path(s) changed both in the branch and in {target} since the fork point, so nothing was applied: {}. Look at both versions, or choose a side with --prefer branch or --prefer target",
        paths.len(),
        list.join(", ")
    )
}

// Messages carry their cause inline (no `source()` chain), so printing an error with its chain
// never repeats the cause.

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Other(e)
    }
}

impl From<aya::EbpfError> for Error {
    fn from(e: aya::EbpfError) -> Self {
        Error::Load(Box::new(e))
    }
}

/// Result with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a path to an io::Error.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|cause| Error::Io {
            path: path.into(),
            cause,
        })
    }
}
