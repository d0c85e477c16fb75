//! The daemon's JSON HTTP API on a Unix socket ([`server`]) and the client the CLI uses
//! ([`client`]).
//!
//! | method and path | body | answer |
//! |---|---|---|
//! | `GET /v1/status` | | version, state directory, branch count |
//! | `GET /v1/branches` | | every live branch |
//! | `POST /v1/branches` | `{"name"?, "workspace", "command": [..], "net"?, "policy"?: "<TOML>"}` | the new root branch (201) |
//! | `GET /v1/branches/{name}` | | one branch (with its `policy`) |
//! | `PUT /v1/branches/{name}/policy` | `{"policy": "<TOML>"}` | the branch with its new policy |
//! | `GET /v1/branches/{name}/effects` | | its recorded side effects, oldest first, with state and age |
//! | `POST /v1/branches/{name}/exec` | `{"argv": [..], "cwd"?, "env"?: [[k, v]], "stdin"?}` | once it exits: `{"exit_code", "signal", "stdout", "stderr", "truncated"}` |
//! | `POST /v1/branches/{name}/fork` | `{"name"?, "count"?, "frozen"?}` | `{"branches": [..], "phases": {..}}` (201) |
//! | `GET /v1/branches/{name}/diff` | | changed paths since the fork point |
//! | `POST /v1/branches/{name}/commit` | `{"prefer"?: "branch" \| "target"}` | `{"target", "changes": [..], "conflicts": [..], "phases": {..}, "effects": [..]}` (effects: each held effect's delivery) |
//! | `GET /v1/branches/{name}/trace[?follow=true]` | | the branch's events as JSON lines (`application/x-ndjson`); `follow` streams new ones until the branch is aborted |
//! | `DELETE /v1/branches/{name}[?recursive=true]` | | abort (204); `recursive` aborts the branches forked from it first; without it, a branch whose forks run is retired (kept as `NAME~ID` until the last of them goes) |
//!
//! Errors are `{"error": "..."}` with 400 (bad input), 403 (request from inside a branch),
//! 404 (unknown branch, or no such path), 405 (a method the path does not take), 409
//! (conflict; a commit's conflicting paths are also listed in `"conflicts"`), 413 (a body
//! over 64 MiB), 503 (the daemon is stopping) or 500. The workspace of `POST /v1/branches`
//! is an absolute path.
//!
//! `exec`: the answer carries what the command wrote until it exited, and for 200 ms more;
//! what background processes it left write later is read and dropped (they neither block
//! the answer nor die of SIGPIPE). A client that goes away before the answer kills the
//! command's process group, as `forkscope exec` does on Ctrl-C. A daemon asked to stop
//! (SIGTERM) ends followed traces and running `exec`s (503, the command killed) and waits
//! at most 10 s for other requests.

pub mod client;
pub mod listen;
pub mod server;

use serde::{Deserialize, Serialize};

/// `POST /v1/branches`
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunRequest {
    #[serde(default)]
    pub name: Option<String>,
    pub workspace: std::path::PathBuf,
    #[serde(default)]
    pub command: Vec<String>,
    /// `host` (the default: the host's network, read-only like the rest) or `isolated` (a
    /// network namespace of its own with loopback only, inherited by its forks).
    #[serde(default)]
    pub net: Option<String>,
    /// `on` (the default: every write, send, open and path change is a trace event; the
    /// syscall programs are attached while any such branch lives, at a cost to every
    /// process on the host) or `off` (files known from the branch's layers; inherited by
    /// its forks).
    #[serde(default)]
    pub write_detail: Option<String>,
    /// The side-effect policy, in TOML (see [`crate::policy`]); none allows everything.
    #[serde(default)]
    pub policy: Option<String>,
}

/// `PUT /v1/branches/{name}/policy`
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PolicyRequest {
    /// The new policy, in TOML.
    pub policy: String,
}

/// `POST /v1/branches/{name}/fork` takes a [`crate::branch::ForkOptions`].
pub use crate::branch::ForkOptions as ForkRequest;

/// `GET /v1/status`
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub state_dir: std::path::PathBuf,
    pub branches: usize,
    /// The per-branch tracer's counters (absent with `--no-trace`).
    #[serde(default)]
    pub trace: Option<TraceStatus>,
    /// Where Prometheus scrapes `/metrics` (absent: not served).
    #[serde(default)]
    pub metrics_addr: Option<String>,
}

/// The daemon tracer's counters since it started.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct TraceStatus {
    /// Events the eBPF programs recorded.
    pub events: u64,
    /// Events dropped because the ring buffer was full.
    pub lost: u64,
    /// Events from cgroups no live branch owned.
    pub unattributed: u64,
    /// Whether the syscall programs are attached (some branch asks for per-write detail).
    #[serde(default)]
    pub syscall_programs_attached: bool,
    /// Whether the page-fault programs are attached (some branch is traced).
    #[serde(default)]
    pub page_fault_programs_attached: bool,
}

/// Default socket path.
pub const DEFAULT_SOCKET: &str = "/run/forkscope/forkscope.sock";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/forkscope";
