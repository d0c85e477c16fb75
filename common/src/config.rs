//! Kernel structure offsets, found by userspace in the running kernel's BTF and handed to the
//! eBPF programs as a read-only global, so the programs work on any kernel with BTF
//! (a hand-rolled CO-RE: aya's Rust programs cannot carry CO-RE relocations yet).

/// Byte offsets of the kernel structure fields the eBPF programs read with
/// `bpf_probe_read_kernel`. A value of [`KernelOffsets::ABSENT`] means the field does not
/// exist on this kernel; the programs then skip what needs it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `task_struct.files`
    pub task_files: u32,
    /// `task_struct.exit_code`
    pub task_exit_code: u32,
    /// `task_struct.pid`
    pub task_pid: u32,
    /// `task_struct.tgid`
    pub task_tgid: u32,
    /// `files_struct.fdt`
    pub files_fdt: u32,
    /// `fdtable.max_fds`
    pub fdt_max_fds: u32,
    /// `fdtable.fd`
    pub fdt_fd: u32,
    /// `file.f_inode`
    pub file_inode: u32,
    /// `file.f_pos`
    pub file_pos: u32,
    /// `file.f_flags`
    pub file_flags: u32,
    /// `file.private_data` (a `struct socket *` for socket files)
    pub file_private_data: u32,
    /// `inode.i_mode`
    pub inode_mode: u32,
    /// `inode.i_ino`
    pub inode_ino: u32,
    /// `inode.i_sb`
    pub inode_sb: u32,
    /// `super_block.s_dev`
    pub sb_dev: u32,
    /// `socket.sk`
    pub socket_sk: u32,
    /// `sock.__sk_common.skc_family`
    pub sk_family: u32,
    /// `sock.__sk_common.skc_daddr`
    pub sk_daddr: u32,
    /// `sock.__sk_common.skc_dport`
    pub sk_dport: u32,
    /// `sock.__sk_common.skc_v6_daddr`
    pub sk_v6_daddr: u32,
    /// `task_struct.thread_info.status` (holds `TS_COMPAT` during a 32-bit syscall), or
    /// ABSENT on kernels whose `thread_info` is not in the task.
    pub task_thread_status: u32,
    /// `task_struct.cgroups` (the task's `css_set`)
    pub task_cgroups: u32,
    /// `css_set.dfl_cgrp` (its cgroup on the unified hierarchy)
    pub css_set_dfl_cgrp: u32,
    /// `cgroup.kn`
    pub cgroup_kn: u32,
    /// `kernfs_node.id` (the cgroup id)
    pub kernfs_node_id: u32,
    /// Offset of `group_dead` in the `sched_process_exit` tracepoint record, or ABSENT on
    /// kernels whose record lacks it (the programs then report the thread-group leader's exit).
    pub tp_exit_group_dead: u32,
    /// Non-zero once userspace has filled the struct in; the programs do nothing until then.
    pub ready: u32,
}

impl KernelOffsets {
    /// Marks a field this kernel does not have.
    pub const ABSENT: u32 = u32::MAX;
}

crate::assert_size!(KernelOffsets, 108);
