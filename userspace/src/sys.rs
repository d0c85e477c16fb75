//! Start-up checks of what this host can do (root, BTF, tracefs), and mounting tracefs when
//! it is not mounted. Real deployments run on many kernels: detect, never assume.

use std::path::Path;

use crate::error::{Error, Result};

/// Where the kernel's BTF lives.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// Where tracefs is expected.
pub const TRACEFS: &str = "/sys/kernel/tracing";

/// Checks everything `forkscope trace` needs before it touches anything.
pub fn preflight() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::NotRoot);
    }
    if !Path::new(VMLINUX_BTF).exists() {
        return Err(Error::NoBtf);
    }
    ensure_tracefs()?;
    Ok(())
}

/// Where the BPF filesystem is expected.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Mounts the BPF filesystem on /sys/fs/bpf when it is not there (pins live on it).
pub fn ensure_bpffs() -> Result<()> {
    const BPF_FS_MAGIC: u64 = 0xcafe_4a11;
    let mounted = nix::sys::statfs::statfs(BPFFS)
        .map(|s| s.filesystem_type().0 as u64 == BPF_FS_MAGIC)
        .unwrap_or(false);
    if mounted {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| Error::State(format!("mounting the BPF filesystem on {BPFFS}: {e}")))
}

/// Mounts tracefs on /sys/kernel/tracing when its events are not visible (aya attaches
/// tracepoints by reading their ids there).
pub fn ensure_tracefs() -> Result<()> {
    if Path::new(TRACEFS).join("events").exists() {
        return Ok(());
    }
    nix::mount::mount(
        Some("tracefs"),
        TRACEFS,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| Error::NoTracefs(e.into()))
}

/// In a container with a cgroup namespace of its own (Kubernetes on cgroup v2) but the
/// host's pid namespace, joins the host's cgroup namespace (pid 1's): the cgroups the daemon
/// makes, and the processes it moves into them, must be the host's. Elsewhere (the same
/// namespace as pid 1) it does nothing. Call it before any other thread starts.
pub fn join_host_cgroup_namespace() {
    let own = std::fs::read_link("/proc/self/ns/cgroup");
    let host = std::fs::read_link("/proc/1/ns/cgroup");
    let (Ok(own), Ok(host)) = (own, host) else {
        return;
    };
    if own == host {
        return;
    }
    let joined = std::fs::File::open("/proc/1/ns/cgroup").and_then(|f| {
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWCGROUP).map_err(std::io::Error::from)
    });
    match joined {
        Ok(()) => log::info!("joined the host's cgroup namespace ({})", host.display()),
        Err(e) => log::warn!(
            "running in a cgroup namespace of its own ({}), and joining the host's failed: {e}; branches may fail to start",
            own.display()
        ),
    }
}
