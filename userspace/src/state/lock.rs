//! One daemon per state directory: a POSIX record lock on `<state>/lock`, held while a
//! registry is open.
//!
//! A record lock belongs to the process, not to the open file. A child the daemon forks (a
//! spawn, before its exec) does not inherit it, so a daemon killed while it spawns leaves
//! nothing behind that holds the lock, and a daemon restarted at once takes it; with
//! `flock` the child's copy of the descriptor kept it held until the child's exec, and a
//! restart right after a crash was refused. The kernel drops the lock when its process dies.
//!
//! Record locks have two pitfalls, and this module owns both: a second lock by the same
//! process succeeds (it holds the lock already), and closing any descriptor of the file
//! releases it. So the locks this process holds are listed, and the list is read before the
//! file is opened; nothing else opens the lock file.

use std::{
    fs, io,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::Path,
    sync::Mutex,
};

/// The (device, inode) of every lock file this process holds a lock on.
static HELD: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());

/// A held lock; dropping it releases the lock.
pub struct StateLock {
    file: Option<fs::File>,
    id: (u64, u64),
}

/// Why the lock was not taken.
pub enum Refused {
    /// Another process holds it (its pid, when the kernel says), or this one does.
    Held {
        pid: Option<i32>,
    },
    Io(io::Error),
}

impl From<io::Error> for Refused {
    fn from(e: io::Error) -> Self {
        Refused::Io(e)
    }
}

fn held() -> std::sync::MutexGuard<'static, Vec<(u64, u64)>> {
    HELD.lock().unwrap_or_else(|e| e.into_inner())
}

/// A write lock on the whole file.
fn whole_file(kind: libc::c_int) -> libc::flock {
    // SAFETY: `flock` is plain data; all zeros is a valid value, completed below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl
}

/// Takes the lock on `path` (created if missing), without waiting.
pub fn take(path: &Path) -> Result<StateLock, Refused> {
    // Held across the check, the open and the lock: another thread's registry on the same
    // file cannot come in between.
    let mut held = held();
    // Checked before opening: a descriptor opened and closed here would release the lock
    // this process holds.
    match fs::metadata(path) {
        Ok(m) if held.contains(&(m.dev(), m.ino())) => {
            return Err(Refused::Held {
                pid: Some(std::process::id() as i32),
            });
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    let m = file.metadata()?;
    let lock = whole_file(libc::F_WRLCK);
    // SAFETY: fcntl on a descriptor we own, with a pointer to a live `flock`.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &lock) } != 0 {
        let e = io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EACCES | libc::EAGAIN)) {
            return Err(e.into());
        }
        let mut holder = whole_file(libc::F_WRLCK);
        // SAFETY: as above; F_GETLK fills in `holder`.
        let asked = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut holder) };
        let pid =
            (asked == 0 && holder.l_type != libc::F_UNLCK as libc::c_short && holder.l_pid > 0)
                .then_some(holder.l_pid);
        // Closing `file` releases no lock of ours: this process holds none on it.
        return Err(Refused::Held { pid });
    }
    let id = (m.dev(), m.ino());
    held.push(id);
    Ok(StateLock {
        file: Some(file),
        id,
    })
}

impl Drop for StateLock {
    fn drop(&mut self) {
        let mut held = held();
        // Closed while the list is locked: a registry opened meanwhile by another thread
        // would otherwise take a lock this close then releases.
        drop(self.file.take());
        held.retain(|h| *h != self.id);
    }
}
