//! The kernel structure offsets userspace found in BTF, as a read-only global it sets at load.

use forkscope_common::KernelOffsets;

/// Filled in by userspace (`EbpfLoader::set_global`); all zero in the object file.
#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets {
    task_files: 0,
    task_exit_code: 0,
    task_pid: 0,
    task_tgid: 0,
    files_fdt: 0,
    fdt_max_fds: 0,
    fdt_fd: 0,
    file_inode: 0,
    file_pos: 0,
    file_flags: 0,
    file_private_data: 0,
    inode_mode: 0,
    inode_ino: 0,
    inode_sb: 0,
    sb_dev: 0,
    socket_sk: 0,
    sk_family: 0,
    sk_daddr: 0,
    sk_dport: 0,
    sk_v6_daddr: 0,
    task_thread_status: 0,
    task_cgroups: 0,
    css_set_dfl_cgrp: 0,
    cgroup_kn: 0,
    kernfs_node_id: 0,
    tp_exit_group_dead: 0,
    ready: 0,
};

/// The offsets, read through a volatile load so the compiler cannot fold the zeros above.
#[inline(always)]
pub fn offsets() -> KernelOffsets {
    // SAFETY: OFFSETS is a valid, aligned static; volatile only stops constant folding.
    unsafe { core::ptr::read_volatile(&raw const OFFSETS) }
}

/// The offsets, once userspace has filled them in (`None` before: the programs do nothing).
#[inline(always)]
pub fn ready_offsets() -> Option<KernelOffsets> {
    let o = offsets();
    (o.ready != 0).then_some(o)
}
