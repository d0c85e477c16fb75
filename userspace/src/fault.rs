//! Fault injection for tests, set by environment variables of the daemon: points where it
//! waits for a test to look at things (this module), aborts, or kills (see
//! `crate::inject` and `crate::commit::journal` for those points).

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

/// Whether `FORKSCOPE_FAULT` names `point` exactly.
pub fn armed(point: &str) -> bool {
    std::env::var("FORKSCOPE_FAULT").is_ok_and(|f| f == point)
}

/// Holds the calling thread at a gate: creates the file named by `FORKSCOPE_FAULT_WAIT` with
/// `.reached` appended, then waits (at most a minute) until that file itself exists. Without
/// `FORKSCOPE_FAULT_WAIT`, or once the file exists, it returns at once.
pub fn hold_at_gate() {
    let Some(open) = std::env::var_os("FORKSCOPE_FAULT_WAIT").map(PathBuf::from) else {
        return;
    };
    let mut reached = open.clone().into_os_string();
    reached.push(".reached");
    let _ = std::fs::write(&reached, b"");
    let until = Instant::now() + Duration::from_secs(60);
    while !open.exists() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
}
