//! The sandbox's mount namespace, built as real root before the user namespace is entered:
//! overlays on `/tmp` and the workspace, a private `/dev/shm`, everything else read-only.

use std::path::Path;

use nix::{
    mount::{MsFlags, mount},
    sched::{CloneFlags, unshare},
};

use super::SandboxSpec;
use crate::error::{Error, Result};

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const AT_RECURSIVE: u32 = 0x8000;

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Sets or clears read-only on the mount at `path` (and those below it with `recursive`).
fn set_readonly(path: &Path, readonly: bool, recursive: bool) -> Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::Sandbox("NUL in a mount path".into()))?;
    let attr = MountAttr {
        attr_set: if readonly { MOUNT_ATTR_RDONLY } else { 0 },
        attr_clr: if readonly { 0 } else { MOUNT_ATTR_RDONLY },
        propagation: 0,
        userns_fd: 0,
    };
    let flags = if recursive { AT_RECURSIVE } else { 0 };
    // SAFETY: mount_setattr with a NUL-terminated path and a correctly sized mount_attr.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if ret != 0 {
        return Err(Error::Sandbox(format!(
            "mount_setattr {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

fn sys(what: String) -> impl FnOnce(nix::Error) -> Error {
    move |e| Error::Sandbox(format!("{what}: {e}"))
}

/// Builds the mount namespace (the caller is real root, single-threaded).
pub fn setup(spec: &SandboxSpec) -> Result<()> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(sys("unshare(CLONE_NEWNS)".into()))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys("making / private".into()))?;
    // The workspace (or the state directory holding its layers) may lie under /tmp, which the
    // branch's /tmp overlay is about to cover: hold its layers by descriptor and name them
    // through /proc/self/fd, which still resolves to them afterwards.
    let mut held = Vec::new();
    let mut by_fd = |p: &Path| -> Result<std::path::PathBuf> {
        let f =
            std::fs::File::open(p).map_err(|e| Error::Sandbox(format!("{}: {e}", p.display())))?;
        let path = std::path::PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&f)
        ));
        held.push(f);
        Ok(path)
    };
    let ws = spec.workspace_stack.stack();
    let ws = crate::layers::overlay::Stack {
        lowers: ws.lowers.iter().map(|l| by_fd(l)).collect::<Result<_>>()?,
        upper: by_fd(&ws.upper)?,
        work: by_fd(&ws.work)?,
    };
    spec.tmp_stack.stack().mount(Path::new("/tmp"))?;
    // A workspace under /tmp gets its mount point in the branch's /tmp.
    std::fs::create_dir_all(&spec.workspace).map_err(|e| {
        Error::Sandbox(format!(
            "workspace mount point {}: {e}",
            spec.workspace.display()
        ))
    })?;
    ws.mount(&spec.workspace)?;
    drop(held);
    mount(
        Some("tmpfs"),
        "/dev/shm",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )
    .map_err(sys("mounting a private /dev/shm".into()))?;
    for dir in &spec.hidden {
        // Never hide the workspace or what leads to it.
        if spec.workspace.starts_with(dir) || !dir.is_dir() {
            continue;
        }
        mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("size=4k,mode=0555"),
        )
        .map_err(sys(format!("hiding {}", dir.display())))?;
    }
    set_readonly(Path::new("/"), true, true)?;
    for writable in [
        Path::new("/tmp"),
        spec.workspace.as_path(),
        Path::new("/dev/shm"),
    ] {
        set_readonly(writable, false, false)?;
    }
    Ok(())
}

/// Inside the new pid namespace: a /proc that shows the branch's processes only.
pub fn mount_proc() -> Result<()> {
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        // Read-only like the host's /proc it covers (the kernel refuses a new proc mount
        // that would be less restricted than the locked one).
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(sys("mounting /proc for the branch's pid namespace".into()))
}
