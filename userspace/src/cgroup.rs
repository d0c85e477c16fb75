//! cgroup v2 directories: finding the hierarchy, creating a cgroup, moving a process into it,
//! killing everything in it, and removing it. A [`Cgroup`] removes itself (after killing its
//! processes) when dropped, so an error or Ctrl-C never leaks one.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::error::{Error, IoContext, Result};

/// The mount point of the cgroup v2 hierarchy (from /proc/self/mountinfo).
pub fn cgroup2_root() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").at("/proc/self/mountinfo")?;
    parse_cgroup2_mount(&info).ok_or(Error::NoCgroup2)
}

/// The cgroup v2 directory process `pid` is in (`None`: the calling process).
pub fn dir_of(pid: Option<u32>) -> Result<PathBuf> {
    let file = match pid {
        Some(pid) => format!("/proc/{pid}/cgroup"),
        None => "/proc/self/cgroup".to_string(),
    };
    let text = fs::read_to_string(&file).at(&file)?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or(Error::NoCgroup2)?;
    Ok(cgroup2_root()?.join(rel.trim_start_matches('/')))
}

/// Finds the first cgroup2 mount point in the text of a mountinfo file.
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// `clone3` flag: the child is born in the cgroup whose directory descriptor is in
/// `clone_args.cgroup` (Linux 5.7), so it is never moved there (a move waits for an RCU
/// grace period, about 6 ms on these machines).
pub const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `fork()` whose child is born in the cgroup of directory `dir` (`clone3` with
/// [`CLONE_INTO_CGROUP`], exit signal SIGCHLD). Returns the child's pid in the parent, 0 in
/// the child.
///
/// # Safety
///
/// As for `fork()`: the calling process must be single-threaded, or the child may only
/// call async-signal-safe functions.
pub unsafe fn fork_into(dir: &fs::File) -> std::io::Result<i32> {
    /// `struct clone_args` up to `cgroup` (CLONE_ARGS_SIZE_VER2, 88 bytes).
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    const _: () = assert!(std::mem::size_of::<CloneArgs>() == 88);
    let args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: std::os::fd::AsRawFd::as_raw_fd(dir) as u64,
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM copies the process as fork() does (the caller
    // guarantees what the child may run); `args` is a valid clone_args of the size given.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r as i32)
}

/// The extended attribute a cgroup forkscope froze carries until forkscope thaws it.
const FROZEN_MARK: &std::ffi::CStr = c"trusted.forkscope.frozen";
/// The extended attribute a cgroup someone else froze carries while forkscope thaws it for
/// a while (a fork clones its processes): it is frozen again, also by a daemon that starts
/// after one that died meanwhile.
const LENT_MARK: &std::ffi::CStr = c"trusted.forkscope.lent";
/// The attribute [`Cgroup::keeps_marks`] tries.
const PROBE_MARK: &std::ffi::CStr = c"trusted.forkscope.probe";

/// `p` as a C string.
fn path_c(p: &Path) -> std::io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other)
}

/// Sets extended attribute `name` of `p` to "1".
fn xattr_set(p: &Path, name: &std::ffi::CStr) -> std::io::Result<()> {
    let path = path_c(p)?;
    let value = b"1";
    // SAFETY: both strings are NUL-terminated; setxattr reads `value.len()` bytes.
    let r = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr() as *const libc::c_void,
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether `p` has extended attribute `name`.
fn xattr_exists(p: &Path, name: &std::ffi::CStr) -> std::io::Result<bool> {
    let path = path_c(p)?;
    // SAFETY: both strings are NUL-terminated; a null buffer of size 0 only asks for the
    // attribute's size.
    let r = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
    match r {
        r if r >= 0 => Ok(true),
        _ => match std::io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::ENODATA) => Ok(false),
            e => Err(e),
        },
    }
}

/// Removes extended attribute `name` of `p` (one that is not there is no error).
fn xattr_remove(p: &Path, name: &std::ffi::CStr) -> std::io::Result<()> {
    let path = path_c(p)?;
    // SAFETY: both strings are NUL-terminated.
    let r = unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) };
    if r == 0 {
        return Ok(());
    }
    match std::io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::ENODATA) => Ok(()),
        e => Err(e),
    }
}

/// A cgroup v2 directory owned by forkscope.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    id: u64,
    removed: bool,
    /// Whether dropping the handle kills and removes the cgroup (handles that created it).
    remove_on_drop: bool,
}

impl Cgroup {
    /// Creates `<cgroup2 root>/forkscope/<name>`.
    pub fn create(name: &str) -> Result<Self> {
        let parent = cgroup2_root()?.join("forkscope");
        fs::create_dir_all(&parent).at(&parent)?;
        let path = parent.join(name);
        fs::create_dir(&path).at(&path)?;
        // The cgroup id the kernel reports (bpf_get_current_cgroup_id) is the directory's inode.
        let id = fs::metadata(&path).at(&path)?.ino();
        Ok(Self {
            path,
            id,
            removed: false,
            remove_on_drop: true,
        })
    }

    /// A handle on an existing cgroup (a live branch's). Unlike one from [`Cgroup::create`],
    /// dropping it leaves the cgroup alone; [`Cgroup::remove`] still removes it.
    pub fn open(path: &Path) -> Result<Self> {
        let id = fs::metadata(path).at(path)?.ino();
        Ok(Self {
            path: path.to_path_buf(),
            id,
            removed: false,
            remove_on_drop: false,
        })
    }

    /// Keeps the cgroup after this handle is dropped (a branch outlives the request that
    /// created it); returns its directory.
    pub fn keep(mut self) -> PathBuf {
        self.remove_on_drop = false;
        self.path.clone()
    }

    /// Whether the cgroup is asked to be frozen (its own `cgroup.freeze`: someone froze it,
    /// forkscope or another).
    pub fn is_frozen(&self) -> bool {
        fs::read_to_string(self.path.join("cgroup.freeze")).is_ok_and(|s| s.trim() == "1")
    }

    /// Whether a cgroup above it keeps it frozen (frozen, without its own `cgroup.freeze`):
    /// it cannot be thawed from here.
    pub fn frozen_by_ancestor(&self) -> bool {
        !self.is_frozen()
            && fs::read_to_string(self.path.join("cgroup.events"))
                .is_ok_and(|s| s.lines().any(|l| l == "frozen 1"))
    }

    /// Freezes the cgroup for whoever froze it before (it was thawed for a while): unlike
    /// [`Cgroup::freeze`], a timeout leaves the freeze asked for, not undone, and the freeze
    /// is not marked as forkscope's; the mark of [`Cgroup::thaw_for_a_while`] goes once the
    /// freeze is asked for.
    pub fn refreeze(&self, timeout: Duration) -> Result<()> {
        self.ask_frozen(true)
            .inspect_err(|e| log::warn!("{}: freezing it again: {e}", self.path.display()))?;
        if let Err(e) = xattr_remove(&self.path, LENT_MARK) {
            log::warn!("{}: removing the thaw mark: {e}", self.path.display());
        }
        self.wait_frozen(true, timeout)
    }

    /// Thaws a cgroup someone else froze, for a while: it carries a mark until
    /// [`Cgroup::refreeze`], so that a daemon that dies meanwhile leaves it to be frozen
    /// again by the next ([`Cgroup::lent_by_someone`]), even if its owner thawed it
    /// meanwhile (the mark cannot tell). The freeze mark of forkscope's own
    /// is left as it is (there is none on someone else's freeze).
    pub fn thaw_for_a_while(&self, timeout: Duration) -> Result<()> {
        // Best effort, as the freeze mark: where it cannot be kept, a daemon that dies
        // meanwhile leaves the branch thawed.
        if let Err(e) = xattr_set(&self.path, LENT_MARK) {
            log::warn!(
                "thaw mark of {} (a daemon restarted after a crash may not freeze it again): {e}",
                self.path.display()
            );
        }
        self.ask_frozen(false)?;
        self.wait_frozen(false, timeout)
    }

    /// Whether someone else froze the cgroup and forkscope thawed it for a while, and did
    /// not freeze it again (a daemon died meanwhile).
    pub fn lent_by_someone(&self) -> bool {
        xattr_exists(&self.path, LENT_MARK).is_ok_and(|e| e)
    }

    /// Freezes (`true`) or thaws every process in the cgroup and waits until it is done. A
    /// freeze that fails (not frozen within `timeout`) is undone before the error returns, so
    /// no caller leaves a cgroup frozen by a request it gave up on. The cgroup carries
    /// forkscope's mark while frozen ([`Cgroup::frozen_by_forkscope`]).
    pub fn freeze(&self, frozen: bool, timeout: Duration) -> Result<()> {
        if frozen {
            self.mark_frozen(true);
            let done = self.set_frozen(timeout);
            if done.is_err() {
                let _ = self.thaw(timeout);
            }
            done
        } else {
            self.thaw(timeout)
        }
    }

    /// Thaws the cgroup; its freeze mark goes as soon as it is asked to thaw, whether or
    /// not the thaw completes in time (a cgroup above it may hold it frozen).
    fn thaw(&self, timeout: Duration) -> Result<()> {
        self.ask_frozen(false)?;
        self.mark_frozen(false);
        self.wait_frozen(false, timeout)
    }

    /// Whether forkscope froze the cgroup (its mark, an extended attribute of the cgroup's
    /// directory, is there: it outlives a daemon that crashed and goes with the cgroup);
    /// `None` where the filesystem keeps no such attribute.
    pub fn frozen_by_forkscope(&self) -> Option<bool> {
        xattr_exists(&self.path, FROZEN_MARK).ok()
    }

    /// Puts forkscope's freeze mark on the cgroup, or takes it off. Best effort: where it
    /// cannot be kept, a daemon that starts thaws every branch, as without marks.
    fn mark_frozen(&self, ours: bool) {
        let r = if ours {
            xattr_set(&self.path, FROZEN_MARK)
        } else {
            xattr_remove(&self.path, FROZEN_MARK)
        };
        if let Err(e) = r {
            log::warn!(
                "freeze mark of {} (a daemon restarted after a crash may not thaw it): {e}",
                self.path.display()
            );
        }
    }

    /// Whether freeze marks can be kept on this cgroup (one is set, read back and removed):
    /// without, a daemon that starts cannot tell whose a freeze is.
    pub fn keeps_marks(&self) -> bool {
        let kept = xattr_set(&self.path, PROBE_MARK).is_ok()
            && xattr_exists(&self.path, PROBE_MARK).is_ok_and(|e| e);
        let _ = xattr_remove(&self.path, PROBE_MARK);
        kept
    }

    /// Freezes the cgroup and waits until it is (no mark: see [`Cgroup::freeze`]).
    fn set_frozen(&self, timeout: Duration) -> Result<()> {
        self.ask_frozen(true)?;
        self.wait_frozen(true, timeout)
    }

    /// Writes the cgroup's own `cgroup.freeze` (without waiting for it to take effect).
    fn ask_frozen(&self, frozen: bool) -> Result<()> {
        let p = self.path.join("cgroup.freeze");
        fs::write(&p, if frozen { "1" } else { "0" }).at(&p)
    }

    fn wait_frozen(&self, frozen: bool, timeout: Duration) -> Result<()> {
        let events = self.path.join("cgroup.events");
        let want = if frozen { "frozen 1" } else { "frozen 0" };
        let start = Instant::now();
        loop {
            let text = fs::read_to_string(&events).at(&events)?;
            if text.lines().any(|l| l == want) {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(Error::Io {
                    path: self.path.clone(),
                    cause: std::io::Error::other(format!("not {want} after {timeout:?}")),
                });
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// The cgroup's id (inode number of its directory).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens `cgroup.procs` for writing: writing "0" to it moves the writer into the cgroup
    /// (used between fork and exec of a traced command).
    pub fn open_procs(&self) -> Result<fs::File> {
        let p = self.path.join("cgroup.procs");
        fs::OpenOptions::new().write(true).open(&p).at(p)
    }

    /// A `pre_exec` hook that moves the child into this cgroup between fork and exec, so the
    /// program runs in the cgroup from its first instruction. `procs` is this cgroup's
    /// [`Cgroup::open_procs`], kept open until the child is spawned.
    pub fn enter_hook(
        procs: &fs::File,
    ) -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
        let fd = std::os::fd::AsRawFd::as_raw_fd(procs);
        move || {
            // SAFETY: write(2) on an open descriptor is async-signal-safe, as a pre_exec hook
            // must be; writing "0" to cgroup.procs moves the writing process.
            if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        }
    }

    /// Whether any process is still in the cgroup or below it.
    pub fn populated(&self) -> Result<bool> {
        let p = self.path.join("cgroup.events");
        let text = fs::read_to_string(&p).at(&p)?;
        Ok(text.lines().any(|l| l == "populated 1"))
    }

    /// Kills every process in the cgroup and below (cgroup.kill) and waits until it is empty.
    pub fn kill_all(&self, timeout: Duration) -> Result<()> {
        if !self.populated()? {
            return Ok(());
        }
        let p = self.path.join("cgroup.kill");
        fs::write(&p, "1").at(&p)?;
        let start = Instant::now();
        while self.populated()? {
            if start.elapsed() > timeout {
                return Err(Error::Io {
                    path: self.path.clone(),
                    cause: std::io::Error::other("processes still alive after cgroup.kill"),
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// Kills what is left and removes the directory.
    pub fn remove(mut self) -> Result<()> {
        self.remove_now()
    }

    fn remove_now(&mut self) -> Result<()> {
        if self.removed {
            return Ok(());
        }
        self.kill_all(Duration::from_secs(5))?;
        remove_tree(&self.path)?;
        self.removed = true;
        Ok(())
    }
}

/// Removes a cgroup directory and the cgroups its processes created below it (children first:
/// a cgroup with children cannot be removed). Only directories are removed; the files in a
/// cgroup directory are the kernel's interface and go with it.
fn remove_tree(path: &Path) -> Result<()> {
    for entry in fs::read_dir(path).at(path)? {
        let entry = entry.at(path)?;
        if entry.file_type().at(entry.path())?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    fs::remove_dir(path).at(path)
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if !self.remove_on_drop {
            return;
        }
        if let Err(e) = self.remove_now() {
            log::warn!("could not remove cgroup {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_mountinfo() {
        let text = "\
35 25 0:30 / /sys/fs/cgroup rw,relatime shared:9 - tmpfs tmpfs rw,mode=755
36 35 0:31 / /sys/fs/cgroup/cpu rw,relatime shared:10 - cgroup cgroup rw,cpu
45 35 0:40 / /sys/fs/cgroup/unified rw,relatime shared:19 - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_cgroup2_mount(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn no_cgroup2_gives_none() {
        let text = "36 35 0:31 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(parse_cgroup2_mount(text), None);
    }
}
