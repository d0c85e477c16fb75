//! The mark a fork leaves in the parent branch's directory while it injects calls into one
//! of its processes (`forking-PID.json`): which process (pid and start time) and which
//! descriptors it had before. A daemon that dies mid-fork leaves the mark behind, and the
//! next one knows exactly which descriptors the fork opened there: the process is stopped
//! meanwhile, so its opens took the lowest free numbers in turn (the child's cgroup, its own
//! pid namespace, the child's pid namespace), and nothing else of the program is touched.
//! Written without fsync: it only has to survive the daemon, not the machine (whose
//! processes do not survive either).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{
    commit::journal::process_start,
    error::{Error, IoContext, Result},
};

/// The descriptors a fork opens in the original, in order.
pub const OPENED: usize = 3;

#[derive(Debug, Serialize, Deserialize)]
pub struct ForkMark {
    pub pid: u32,
    /// Start time of the process (field 22 of /proc/PID/stat): a reused pid is not it.
    pub start: u64,
    /// Its descriptors before the fork's opens.
    pub fds: Vec<i32>,
}

fn file(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("forking-{pid}.json"))
}

fn open_fds(pid: u32) -> Result<Vec<i32>> {
    let dir = format!("/proc/{pid}/fd");
    let mut fds: Vec<i32> = std::fs::read_dir(&dir)
        .map_err(|e| Error::Sandbox(format!("{dir}: {e}")))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    Ok(fds)
}

impl ForkMark {
    /// Marks process `pid` (stopped) as being forked, in `dir`.
    pub fn write(dir: &Path, pid: u32) -> Result<PathBuf> {
        let mark = ForkMark {
            pid,
            start: process_start(pid).ok_or_else(|| {
                crate::inject::gone_mid_fork(
                    nix::unistd::Pid::from_raw(pid as i32),
                    "exited during the fork",
                )
            })?,
            fds: open_fds(pid)?,
        };
        let f = file(dir, pid);
        let text = serde_json::to_vec(&mark)
            .map_err(std::io::Error::from)
            .at(&f)?;
        std::fs::write(&f, text).at(&f)?;
        Ok(f)
    }

    /// The mark a crashed fork left for `pid` in `dir`, if any and if it is still the same
    /// process (a mark of another is removed).
    pub fn read(dir: &Path, pid: u32) -> Option<(ForkMark, PathBuf)> {
        let f = file(dir, pid);
        let mark: ForkMark = serde_json::from_slice(&std::fs::read(&f).ok()?).ok()?;
        if mark.pid != pid || process_start(pid) != Some(mark.start) {
            let _ = std::fs::remove_file(&f);
            return None;
        }
        Some((mark, f))
    }

    /// Every mark in `dir`: (pid, file).
    pub fn all(dir: &Path) -> Vec<(u32, PathBuf)> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let pid = name.strip_prefix("forking-")?.strip_suffix(".json")?;
                Some((pid.parse().ok()?, e.path()))
            })
            .collect()
    }

    /// The numbers the fork's opens took: the lowest free ones, in turn.
    pub fn opened(&self) -> [i32; OPENED] {
        let mut out = [0; OPENED];
        let mut n = 0;
        for slot in out.iter_mut() {
            while self.fds.binary_search(&n).is_ok() {
                n += 1;
            }
            *slot = n;
            n += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_opens_take_the_lowest_free_numbers() {
        let m = ForkMark {
            pid: 1,
            start: 0,
            fds: vec![0, 1, 2, 4, 6],
        };
        assert_eq!(m.opened(), [3, 5, 7]);
    }
}
