//! The sandbox's mount namespace, built as real root before the user namespace is entered:
//! overlays on `/tmp` and the workspace, a private `/dev` ([`private_dev`]: the stateless
//! devices, a terminal instance of the branch's own, `/dev/shm`), the paths the policy
//! shares writable, everything else read-only.
//!
//! A pre-started sandbox ([`SandboxSpec::deferred`]) gets its overlays later, when the
//! fork that takes it has snapshotted the layers: `/tmp` and the workspace are then covered
//! by empty read-only tmpfs placeholders made shared, the branch's mount namespace (made
//! later, owned by its user namespace) receives them as slaves, and the overlays mounted on
//! them afterwards from this namespace ([`mount_deferred`]) propagate into it, locked.

use std::path::Path;

use nix::{
    mount::{MsFlags, mount},
    sched::{CloneFlags, unshare},
};

use super::SandboxSpec;
use crate::error::{Error, Result};

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const AT_RECURSIVE: u32 = 0x8000;
const AT_EMPTY_PATH: u32 = 0x1000;

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
    set_readonly_at(
        libc::AT_FDCWD,
        path,
        readonly,
        if recursive { AT_RECURSIVE } else { 0 },
    )
}

/// `mount_setattr(dirfd, path, flags)` setting or clearing read-only.
fn set_readonly_at(dirfd: i32, path: &Path, readonly: bool, flags: u32) -> Result<()> {
    let (set, clear) = if readonly {
        (MOUNT_ATTR_RDONLY, 0)
    } else {
        (0, MOUNT_ATTR_RDONLY)
    };
    set_attrs_at(dirfd, path, set, clear, flags)
}

/// `mount_setattr(dirfd, path, flags)` setting the attributes `set` and clearing `clear`.
fn set_attrs_at(dirfd: i32, path: &Path, set: u64, clear: u64, flags: u32) -> Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::Sandbox("NUL in a mount path".into()))?;
    let attr = MountAttr {
        attr_set: set,
        attr_clr: clear,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr with a NUL-terminated path and a correctly sized mount_attr.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd,
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

/// What a deferred set-up keeps for [`mount_deferred`]: the state directory (holding every
/// layer), by descriptor, as the placeholders and the hidden directories cover it. It is a
/// bind mount of this namespace kept writable (overlayfs takes its upper directory only from
/// the mounter's namespace), under the read-only tmpfs that hides the state directory: in the
/// branch's namespace that tmpfs is locked over it.
pub struct Deferred {
    state: std::fs::File,
    state_path: std::path::PathBuf,
}

impl Deferred {
    /// `path` (under the state directory) as reachable through the held descriptor.
    fn resolve(&self, path: &Path) -> Result<std::path::PathBuf> {
        let rel = path.strip_prefix(&self.state_path).map_err(|_| {
            Error::Sandbox(format!(
                "layer {} is not under the state directory",
                path.display()
            ))
        })?;
        Ok(Path::new(&format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&self.state)
        ))
        .join(rel))
    }
}

/// Mounts a deferred sandbox's overlays (`/tmp` first: a workspace under `/tmp` gets its
/// mount point there).
pub fn mount_deferred(
    d: &Deferred,
    workspace: &Path,
    ws: &super::StackSpec,
    tmp: &super::StackSpec,
) -> Result<()> {
    let stack = |s: &super::StackSpec| -> Result<crate::layers::overlay::Stack> {
        Ok(crate::layers::overlay::Stack {
            lowers: s
                .lowers
                .iter()
                .map(|l| d.resolve(l))
                .collect::<Result<_>>()?,
            upper: d.resolve(&s.upper)?,
            work: d.resolve(&s.work)?,
        })
    };
    stack(tmp)?.mount(Path::new("/tmp"))?;
    std::fs::create_dir_all(workspace).map_err(|e| {
        Error::Sandbox(format!(
            "workspace mount point {}: {e}",
            workspace.display()
        ))
    })?;
    stack(ws)?.mount(workspace)
}

/// An empty read-only tmpfs at `path`, shared, for a deferred overlay to land on.
fn placeholder(path: &Path) -> Result<()> {
    mount(
        Some("tmpfs"),
        path,
        Some("tmpfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("size=4k,mode=0555"),
    )
    .map_err(sys(format!("placeholder on {}", path.display())))?;
    mount(
        None::<&str>,
        path,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .map_err(sys(format!("making {} shared", path.display())))
}

/// Builds the mount namespace (the caller is real root, single-threaded). Deferred, the
/// overlays are placeholders and what [`mount_deferred`] needs is returned.
pub fn setup(spec: &SandboxSpec) -> Result<Option<Deferred>> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(sys("unshare(CLONE_NEWNS)".into()))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys("making / private".into()))?;
    // The policy's file rules: each path its own mount, before the overlays and the hidden
    // directories go on top of what they cover.
    for m in &spec.file_mounts {
        mount(
            Some(m.path.as_path()),
            m.path.as_path(),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(sys(format!("binding {} for the policy", m.path.display())))?;
    }
    let state = match &spec.deferred {
        Some(state) => {
            mount(
                Some(state.as_path()),
                state.as_path(),
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(sys(format!("binding {}", state.display())))?;
            let f = std::fs::File::open(state)
                .map_err(|e| Error::Sandbox(format!("{}: {e}", state.display())))?;
            Some((f, state.clone()))
        }
        None => None,
    };
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
    let deferred = match state {
        Some((f, state_path)) => {
            placeholder(Path::new("/tmp"))?;
            if !spec.workspace.starts_with("/tmp") {
                placeholder(&spec.workspace)?;
            }
            Some(Deferred {
                state: f,
                state_path,
            })
        }
        None => {
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
            None
        }
    };
    drop(held);
    private_dev()?;
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
    // Read-only, and no device reachable but those of the branch's own /dev (a device node
    // elsewhere, in the workspace say, opens nothing).
    set_attrs_at(
        libc::AT_FDCWD,
        Path::new("/"),
        MOUNT_ATTR_RDONLY | MOUNT_ATTR_NODEV,
        0,
        AT_RECURSIVE,
    )?;
    set_attrs_at(libc::AT_FDCWD, Path::new("/dev"), 0, MOUNT_ATTR_NODEV, 0)?;
    // Its terminals' owner and mode may change (`mesg`, terminal programs).
    let pts = Path::new("/dev/pts");
    set_attrs_at(
        libc::AT_FDCWD,
        pts,
        0,
        MOUNT_ATTR_RDONLY | MOUNT_ATTR_NODEV,
        0,
    )?;
    let writable: &[&Path] = if deferred.is_some() {
        &[Path::new("/dev/shm")] // the overlays mounted later are writable
    } else {
        &[
            Path::new("/tmp"),
            spec.workspace.as_path(),
            Path::new("/dev/shm"),
        ]
    };
    for w in writable {
        set_readonly(w, false, false)?;
    }
    for m in spec.file_mounts.iter().filter(|m| m.writable) {
        set_readonly(&m.path, false, false)?;
    }
    if let Some(d) = &deferred {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&d.state);
        set_readonly_at(fd, Path::new(""), false, AT_EMPTY_PATH)?;
    }
    Ok(deferred)
}

/// Device nodes a branch gets in its `/dev`: they hold no state and reach nothing of the
/// host's (name, major, minor).
const DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Covers `/dev` with a `/dev` of the branch's own: the [`DEVICES`], a devpts instance of
/// its own (its terminals, unreachable from the host's and other branches'; `/dev/ptmx`
/// leads there), a private `/dev/shm`, and the usual links to /proc/self/fd. Nothing else
/// of the host's devices (terminals, consoles, kvm, loop devices) is reachable.
fn private_dev() -> Result<()> {
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    let dev = Path::new("/dev");
    mount(
        Some("tmpfs"),
        dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=64k"),
    )
    .map_err(sys("mounting a private /dev".into()))?;
    let io = |what: &Path| {
        let what = what.display().to_string();
        move |e: std::io::Error| Error::Sandbox(format!("{what}: {e}"))
    };
    for (name, major, minor) in DEVICES {
        let p = dev.join(name);
        mknod(
            &p,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(*major, *minor),
        )
        .map_err(sys(format!("mknod {}", p.display())))?;
        // (mknod applies the umask.)
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .map_err(io(&p))?;
    }
    let pts = dev.join("pts");
    std::fs::create_dir(&pts).map_err(io(&pts))?;
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5,max=256"),
    )
    .map_err(sys("mounting the branch's own devpts".into()))?;
    for (link, to) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let p = dev.join(link);
        std::os::unix::fs::symlink(to, &p).map_err(io(&p))?;
    }
    let shm = dev.join("shm");
    std::fs::create_dir(&shm).map_err(io(&shm))?;
    mount(
        Some("tmpfs"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )
    .map_err(sys("mounting a private /dev/shm".into()))
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
