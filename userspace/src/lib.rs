//! forkscope: branch running Linux sandboxes and see every side effect of every branch.
//!
//! This library holds everything the `forkscope` binary does; the binary only parses
//! arguments. Modules, one concern each:
//! - [`bpf`]: the embedded eBPF object, kernel offsets from BTF, loading and attaching
//!   ([`bpf::Probe`]), cgroup registration, reading maps;
//! - [`api`]: the daemon's HTTP API on a Unix socket, and its client;
//! - [`branch`]: branches (run, fork, diff, commit, abort) and their records;
//! - [`commit`]: applying a branch's changes to its parent's view (three-way, journaled);
//! - [`state`]: the daemon's SQLite registry;
//! - [`cgroup`]: cgroup v2 directories (create, move into, kill, remove);
//! - [`events`]: decoding kernel records, resolving paths and addresses, JSON records, totals;
//! - [`layers`]: branched workspaces on overlayfs (snapshot layers, diffs);
//! - [`sandbox`]: a branch's namespaces, mounts and init process;
//! - [`procfork`]: native fork of a branch's processes into a child (clone3 injected with
//!   [`inject`], ptrace system-call injection);
//! - [`trace`]: `forkscope trace` (one command, one cgroup, one trace);
//! - [`tracker`]: the daemon's per-branch traces (one probe, events by branch cgroup);
//! - [`sys`]: start-up checks (root, BTF, tracefs);
//! - [`error`]: the typed errors.

/// Writes a line to stderr like `eprintln!`, but never panics: a closed or broken stderr (a
/// reader that went away) must not crash the daemon, a branch's init or a command that is
/// cleaning up.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// [`say!`] without the newline.
#[macro_export]
macro_rules! say_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($arg)*);
    }};
}

pub mod api;
pub mod bpf;
pub mod branch;
pub mod cgroup;
pub mod commit;
pub mod effects;
pub mod error;
pub mod events;
pub mod fault;
pub mod inject;
pub mod layers;
pub mod metrics;
pub mod on_demand;
pub mod perfetto;
pub mod policy;
pub mod procfork;
pub mod report;
pub mod sandbox;
pub mod state;
pub mod sys;
pub mod trace;
pub mod tracker;

pub use error::{Error, Result};
