//! Directories the daemon no longer needs, removed off the request path.
//!
//! A commit's staging directory holds, once the commit is done, the files it replaced in
//! the host workspace (see [`crate::commit::journal`]); freeing them costs about 0.13 ms
//! per file on ext4. It is renamed into `<state dir>/garbage/` and removed by a thread
//! after the answer. The directory is emptied when the daemon starts (what a daemon
//! killed meanwhile left), and the threads are waited for when the manager is dropped
//! (the daemon stops).

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    thread::JoinHandle,
};

use crate::error::{IoContext, Result};

/// `<state dir>/garbage/` and the threads removing what is in it.
pub(super) struct Garbage {
    dir: PathBuf,
    removing: Vec<JoinHandle<()>>,
}

/// How long a removal waits before it starts.
const AFTER_ANSWER: std::time::Duration = std::time::Duration::from_millis(10);

/// Makes each name in the garbage directory unique within the daemon.
static NEXT: AtomicU64 = AtomicU64::new(0);

impl Garbage {
    /// Opens `<state>/garbage/`, removing whatever an earlier daemon left there.
    pub(super) fn open(state: &Path) -> Result<Self> {
        let dir = state.join("garbage");
        // (Best effort: another manager of this process may still be removing its own.)
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).at(&dir)?;
        Ok(Self {
            dir,
            removing: Vec::new(),
        })
    }

    /// Removes `path`: in a thread when it can be moved into the garbage directory (the
    /// same filesystem), else at once.
    pub(super) fn dispose(&mut self, path: &Path) {
        self.removing.retain(|h| !h.is_finished());
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let to = self.dir.join(format!("{}-{n}", std::process::id()));
        match std::fs::rename(path, &to) {
            Ok(()) => {
                let spawned = std::thread::Builder::new()
                    .name("forkscope-garbage".into())
                    .spawn({
                        let to = to.clone();
                        move || {
                            // Behind everything else (niceness is per thread on Linux), and
                            // once the answer is out: a file's removal is one long system
                            // call that a kernel without preemption does not interrupt.
                            // SAFETY: setpriority on the calling thread (who = 0).
                            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
                            std::thread::sleep(AFTER_ANSWER);
                            let _ = std::fs::remove_dir_all(&to);
                        }
                    });
                match spawned {
                    Ok(h) => self.removing.push(h),
                    Err(_) => {
                        let _ = std::fs::remove_dir_all(&to);
                    }
                }
            }
            Err(_) => {
                let _ = std::fs::remove_dir_all(path);
            }
        }
    }

    /// Waits until everything disposed of so far is removed.
    fn wait(&mut self) {
        for h in self.removing.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Garbage {
    fn drop(&mut self) {
        self.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("forkscope-garbage-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn full_dir(at: &Path) -> PathBuf {
        std::fs::create_dir_all(at.join("sub")).unwrap();
        std::fs::write(at.join("sub/file"), "x").unwrap();
        at.to_path_buf()
    }

    #[test]
    fn what_an_earlier_daemon_left_goes_when_the_garbage_opens() {
        let state = scratch("left");
        full_dir(&state.join("garbage/123-0"));
        let _g = Garbage::open(&state).unwrap();
        let left: Vec<_> = std::fs::read_dir(state.join("garbage")).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        std::fs::remove_dir_all(&state).unwrap();
    }

    #[test]
    fn a_disposed_directory_is_moved_away_at_once_and_removed() {
        let state = scratch("dispose");
        let mut g = Garbage::open(&state).unwrap();
        let staging = full_dir(&state.join("staging"));
        g.dispose(&staging);
        assert!(!staging.exists(), "moved out of the way at once");
        g.wait();
        let left: Vec<_> = std::fs::read_dir(state.join("garbage")).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");

        // On another filesystem (a tmpfs) it cannot be moved: removed at once.
        let elsewhere = std::path::Path::new("/dev/shm")
            .join(format!("forkscope-garbage-test-{}", std::process::id()));
        let elsewhere = full_dir(&elsewhere);
        g.dispose(&elsewhere);
        assert!(!elsewhere.exists());
        drop(g);
        std::fs::remove_dir_all(&state).unwrap();
    }
}
