//! The seccomp filter every process of a branch runs under, installed by the branch's init
//! before it starts anything (children inherit it, across fork and exec).
//!
//! Refused with EPERM: what could change the branch's mounts or namespaces (mount and the new
//! mount API, umount2, pivot_root, chroot, setns, unshare, clone with namespace flags), blind or
//! bypass the tracer (bpf, perf_event_open, io_uring, whose operations make no syscalls), or
//! touch the kernel itself (modules, kexec, reboot, swap, keyrings). `clone3` answers ENOSYS so
//! glibc falls back to `clone`, whose flags a filter can inspect (clone3 passes them in
//! memory). ptrace stays allowed: only the branch's own processes are visible to it.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::error::{Error, Result};

/// Syscalls refused outright.
const REFUSED: &[libc::c_long] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_setns,
    libc::SYS_unshare,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_keyctl,
    // Copying another process's descriptors (a deferring branch's init holds its seccomp
    // listener).
    libc::SYS_pidfd_getfd,
];

/// clone(2) flags that would create namespaces.
const NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWTIME as u64,
];

fn filter_err(e: impl std::fmt::Display) -> Error {
    Error::Sandbox(format!("building the seccomp filter: {e}"))
}

fn compile(rules: BTreeMap<i64, Vec<SeccompRule>>, errno: i32) -> Result<BpfProgram> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        TargetArch::x86_64,
    )
    .map_err(filter_err)?;
    filter.try_into().map_err(filter_err)
}

/// The two filters: EPERM for the refused syscalls and namespace clones, ENOSYS for clone3.
pub fn programs() -> Result<Vec<BpfProgram>> {
    let mut refused: BTreeMap<i64, Vec<SeccompRule>> =
        REFUSED.iter().map(|nr| (*nr, Vec::new())).collect();
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|flag| {
            let cond = SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(*flag),
                *flag,
            )
            .map_err(filter_err)?;
            SeccompRule::new(vec![cond]).map_err(filter_err)
        })
        .collect::<Result<Vec<_>>>()?;
    refused.insert(libc::SYS_clone, clone_rules);
    let clone3: BTreeMap<i64, Vec<SeccompRule>> = [(libc::SYS_clone3, Vec::new())].into();
    Ok(vec![
        compile(refused, libc::EPERM)?,
        compile(clone3, libc::ENOSYS)?,
    ])
}

/// Installs the filters on the calling thread (and sets no_new_privs, which they require).
pub fn install() -> Result<()> {
    for p in programs()? {
        seccompiler::apply_filter(&p)
            .map_err(|e| Error::Sandbox(format!("installing the seccomp filter: {e}")))?;
    }
    Ok(())
}
