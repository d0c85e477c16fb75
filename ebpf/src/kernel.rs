//! Reads of kernel memory: the current syscall's arguments, the file behind a descriptor, a
//! socket's destination, a task's ids. Offsets come from [`crate::config::offsets`].

use aya_ebpf::helpers::{
    bpf_get_current_task, bpf_get_current_task_btf, bpf_probe_read_kernel,
    bpf_probe_read_kernel_buf, bpf_probe_read_user,
};
use aya_ebpf::programs::BtfTracePointContext;
use forkscope_common::{KernelOffsets, event::file_type, syscalls::SyscallPass};

use crate::{
    emit::count_read_error,
    maps::{SCRATCH, SYSCALL_PASS},
};

/// Slots of x86_64 `struct pt_regs` (u64 each): r15 r14 r13 r12 bp bx r11 r10 r9 r8 ax cx dx
/// si di orig_ax. The layout is the kernel's user ABI for x86_64.
const REG_R10: usize = 7;
const REG_R9: usize = 8;
const REG_R8: usize = 9;
const REG_DX: usize = 12;
const REG_SI: usize = 13;
const REG_DI: usize = 14;
const REG_ORIG_AX: usize = 15;

/// `TS_COMPAT` in x86 `thread_info.status`: the task is in a 32-bit syscall, numbered in
/// the i386 table.
const TS_COMPAT: u32 = 0x0002;

/// A syscall a traced task is returning from.
#[derive(Clone, Copy)]
pub struct SysExit {
    /// The task's cgroup id.
    pub cgroup: u64,
    /// The task's `tgid << 32 | pid`.
    pub pid_tgid: u64,
    /// Its descriptor table (array address, slots), for [`SysExit::fd_file`].
    pub fds: (u64, u32),
    /// The syscall number.
    pub nr: u32,
    /// Its result.
    pub ret: i64,
    /// Its six arguments.
    pub args: [u64; 6],
}

/// Where every family program (tail-called by [`crate::syscall_exit`] on the `sys_exit`
/// tracepoint, whose arguments are `(struct pt_regs *regs, long ret)`) starts: the syscall
/// the current task returns from, with the cgroup the dispatcher found traced.
#[inline(always)]
pub fn sys_exit(ctx: &BtfTracePointContext) -> Option<SysExit> {
    let pass = SYSCALL_PASS.get_ptr(0)?;
    // SAFETY: this CPU's slot, written by the dispatcher just before the tail call.
    let pass = unsafe { *pass };
    let regs: *const u64 = ctx.arg(0);
    let ret: i64 = ctx.arg(1);
    // SAFETY: `regs` is the tracepoint's typed `struct pt_regs *`; the verifier turns these
    // loads into fault-safe ones (no helper call).
    let reg = |slot: usize| unsafe { core::ptr::read_volatile(regs.add(slot)) };
    Some(SysExit {
        cgroup: pass.cgroup,
        pid_tgid: pass.pid_tgid,
        fds: (pass.fd_array, pass.max_fds),
        nr: reg(REG_ORIG_AX) as u32,
        ret,
        args: [
            reg(REG_DI),
            reg(REG_SI),
            reg(REG_DX),
            reg(REG_R10),
            reg(REG_R8),
            reg(REG_R9),
        ],
    })
}

impl SysExit {
    /// The `struct file *` behind the task's descriptor `fd`, or 0 (one read: the
    /// dispatcher found the table).
    #[inline(always)]
    pub fn fd_file(&self, fd: i64) -> u64 {
        slot_file(self.fds, fd)
    }
}

/// The `struct file *` in slot `fd` of a descriptor table (array address, slots), or 0.
#[inline(always)]
fn slot_file((array, max): (u64, u32), fd: i64) -> u64 {
    if !(0..max as i64).contains(&fd) {
        return 0;
    }
    read::<u64>(array, (fd as u32) * 8).unwrap_or(0)
}

/// What the dispatcher hands a family program about the typed current task `task`: its
/// cgroup `cgroup` and what [`SysExit`] carries, read with plain loads.
#[inline(always)]
pub fn syscall_pass(task: *const u8, cgroup: u64, o: &KernelOffsets) -> SyscallPass {
    let (fd_array, max_fds) = fd_table(task, o).unwrap_or((0, 0));
    SyscallPass {
        cgroup,
        pid_tgid: task_pid_tgid(task, o),
        fd_array,
        max_fds,
        _pad: 0,
    }
}

/// `task`'s descriptor table: `files->fdt->fd` and `max_fds`, with plain loads.
#[inline(always)]
fn fd_table(task: *const u8, o: &KernelOffsets) -> Option<(u64, u32)> {
    let files = load_ptr(task, o.task_files)?;
    let fdt = load_ptr(files, o.files_fdt)?;
    // `struct file **`: the verifier gives a plain number for it, read through a helper.
    Some((load(fdt, o.fdt_fd), load(fdt, o.fdt_max_fds)))
}

/// The number (x86_64 table) of the syscall `ctx` (the `sys_exit` tracepoint) returns
/// from, or `None` when none is under way (-1) or it is an x32 one.
#[inline(always)]
pub fn syscall_nr(ctx: &BtfTracePointContext) -> Option<u32> {
    let regs: *const u64 = ctx.arg(0);
    // SAFETY: as in `sys_exit`.
    let nr = unsafe { core::ptr::read_volatile(regs.add(REG_ORIG_AX)) } as i64;
    (0..1024).contains(&nr).then_some(nr as u32)
}

/// The current task, typed (`struct task_struct *` as the verifier knows it from BTF): the
/// fields below are read from it with plain loads, which the verifier makes fault-safe,
/// instead of a helper call each (what costs most in a program on this path).
#[inline(always)]
pub fn task_btf() -> *const u8 {
    // SAFETY: helper without arguments.
    unsafe { bpf_get_current_task_btf() as *const u8 }
}

/// A field `T` at `off` of the typed kernel object `base`. `off` comes from the read-only
/// configuration, whose values the verifier knows, and it checks each access against the
/// kernel's BTF: a load at the offset of a pointer member gives a typed pointer again.
#[inline(always)]
fn load<T>(base: *const u8, off: u32) -> T {
    // SAFETY: `base` is a typed kernel pointer (see above): the verifier only accepts the
    // load if `off` is a member of that type, and turns it into a fault-safe load.
    unsafe { core::ptr::read_volatile(base.add(off as usize).cast::<T>()) }
}

/// A pointer member at `off` of the typed kernel object `base` (typed again), or `None`
/// when it is null.
#[inline(always)]
fn load_ptr(base: *const u8, off: u32) -> Option<*const u8> {
    let p: *const u8 = load(base, off);
    (!p.is_null()).then_some(p)
}

/// The id of `task`'s cgroup on the unified hierarchy (`task->cgroups->dfl_cgrp->kn->id`,
/// what `bpf_get_current_cgroup_id` returns), with plain loads.
#[inline(always)]
pub fn task_cgroup_id(task: *const u8, o: &KernelOffsets) -> Option<u64> {
    let css_set = load_ptr(task, o.task_cgroups)?;
    let cgroup = load_ptr(css_set, o.css_set_dfl_cgrp)?;
    let kn = load_ptr(cgroup, o.cgroup_kn)?;
    Some(load(kn, o.kernfs_node_id))
}

/// `task`'s ids as `bpf_get_current_pid_tgid` gives them (tgid << 32 | pid), with plain
/// loads.
#[inline(always)]
pub fn task_pid_tgid(task: *const u8, o: &KernelOffsets) -> u64 {
    let pid: i32 = load(task, o.task_pid);
    let tgid: i32 = load(task, o.task_tgid);
    ((tgid as u32 as u64) << 32) | pid as u32 as u64
}

/// Whether `task` (the typed current task) is in a 32-bit syscall (numbered in the i386
/// table, which forkscope does not trace: neither do the kernel's `syscalls:*`
/// tracepoints).
#[inline(always)]
pub fn in_compat_syscall(task: *const u8, o: &KernelOffsets) -> bool {
    if o.task_thread_status == KernelOffsets::ABSENT {
        return false;
    }
    load::<u32>(task, o.task_thread_status) & TS_COMPAT != 0
}

/// Reads a `T` at `base + off` in kernel memory.
#[inline(always)]
pub fn read<T>(base: u64, off: u32) -> Option<T> {
    if base == 0 || off == KernelOffsets::ABSENT {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address and fails cleanly on a bad one.
    match unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) } {
        Ok(v) => Some(v),
        Err(_) => {
            count_read_error();
            None
        }
    }
}

/// Reads a `T` from the current task's memory.
#[inline(always)]
pub fn read_user<T>(addr: u64) -> Option<T> {
    if addr == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_user checks the address and fails cleanly on a bad one.
    unsafe { bpf_probe_read_user(addr as *const T) }.ok()
}

/// The current task (`struct task_struct *`) as an address.
#[inline(always)]
pub fn current_task() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_get_current_task() }
}

/// Reads `N` bytes at `base` into the per-CPU scratch buffer `slot` in one helper call
/// (instead of one per field); the buffers live in a map because the eBPF stack is 512 bytes.
#[inline(always)]
fn read_chunk<const N: usize>(
    base: u64,
    slot: fn(&mut Scratch) -> &mut [u8; N],
) -> Option<&'static [u8; N]> {
    if base == 0 {
        return None;
    }
    let scratch = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: the per-CPU scratch value is only used by this CPU, and only while this program
    // runs (programs are not preempted); bpf_probe_read_kernel checks the source address.
    unsafe {
        let buf = slot(&mut *scratch);
        if bpf_probe_read_kernel_buf(base as *const u8, buf).is_err() {
            count_read_error();
            return None;
        }
        Some(&*(buf as *const [u8; N]))
    }
}

/// Field `T` at `off` of a structure whose first `N` bytes are in `chunk`; read from kernel
/// memory at `base + off` when the field lies beyond the chunk.
#[inline(always)]
fn field<T: Copy, const N: usize>(chunk: &[u8; N], base: u64, off: u32) -> Option<T> {
    if off == KernelOffsets::ABSENT {
        return None;
    }
    let off = off as usize;
    if off + core::mem::size_of::<T>() <= N {
        // SAFETY: the bounds are checked just above; T is plain data (integers, pointers as
        // u64, byte arrays) for which any bit pattern is valid.
        Some(unsafe { core::ptr::read_unaligned(chunk.as_ptr().add(off).cast::<T>()) })
    } else {
        read::<T>(base, off as u32)
    }
}

/// Bytes of `struct file` read at once (private_data, f_inode, f_flags, f_pos on 6.x).
pub const FILE_CHUNK: usize = 128;
/// Bytes of `struct inode` read at once (i_mode, i_sb, i_ino on 6.x).
pub const INODE_CHUNK: usize = 80;

/// Per-CPU buffers for chunked reads of kernel structures (see [`read_chunk`]).
#[repr(C)]
pub struct Scratch {
    pub file: [u8; FILE_CHUNK],
    pub inode: [u8; INODE_CHUNK],
}

/// What the eBPF programs need to know about an open file.
#[derive(Clone, Copy, Default)]
pub struct FileInfo {
    /// `i_mode >> 12` (see forkscope_common::event::file_type).
    pub ftype: u32,
    pub dev: u32,
    pub ino: u64,
    pub pos: i64,
    pub flags: u32,
    /// The `struct inode *` (0 when unknown).
    pub inode: u64,
}

/// Reads type, identity, position and flags of `file` (a `struct file *`; 0 gives defaults).
#[inline(always)]
pub fn file_info(o: &KernelOffsets, file: u64) -> FileInfo {
    let mut info = FileInfo::default();
    let Some(f) = read_chunk(file, |s| &mut s.file) else {
        return info;
    };
    info.pos = field::<i64, FILE_CHUNK>(f, file, o.file_pos).unwrap_or(-1);
    info.flags = field::<u32, FILE_CHUNK>(f, file, o.file_flags).unwrap_or(0);
    let Some(inode) = field::<u64, FILE_CHUNK>(f, file, o.file_inode) else {
        return info;
    };
    info.inode = inode;
    let Some(i) = read_chunk(inode, |s| &mut s.inode) else {
        return info;
    };
    info.ftype = field::<u16, INODE_CHUNK>(i, inode, o.inode_mode)
        .map_or(file_type::UNKNOWN, |m| (m as u32) >> 12);
    info.ino = field::<u64, INODE_CHUNK>(i, inode, o.inode_ino).unwrap_or(0);
    if let Some(sb) = field::<u64, INODE_CHUNK>(i, inode, o.inode_sb) {
        info.dev = read::<u32>(sb, o.sb_dev).unwrap_or(0);
    }
    info
}

/// The position of `file` and its `struct inode *`: all a write that continues a run needs
/// (one read: both lie in the first [`FILE_CHUNK`] bytes on 6.x).
#[inline(always)]
pub fn file_pos_inode(o: &KernelOffsets, file: u64) -> (i64, u64) {
    let Some(f) = read_chunk(file, |s| &mut s.file) else {
        return (-1, 0);
    };
    let pos = field::<i64, FILE_CHUNK>(f, file, o.file_pos).unwrap_or(-1);
    let inode = field::<u64, FILE_CHUNK>(f, file, o.file_inode).unwrap_or(0);
    (pos, inode)
}

/// The inode number of the `struct inode *` `inode` (0 when unreadable).
#[inline(always)]
pub fn inode_number(o: &KernelOffsets, inode: u64) -> u64 {
    read::<u64>(inode, o.inode_ino).unwrap_or(0)
}

/// A socket's peer: family, port (host order), address bytes.
#[derive(Clone, Copy, Default)]
pub struct Peer {
    pub family: u16,
    pub port: u16,
    pub addr: [u8; 16],
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// The connected peer of a socket file (`struct file *` whose type is SOCK).
#[inline(always)]
pub fn socket_peer(o: &KernelOffsets, file: u64) -> Peer {
    let mut peer = Peer::default();
    let Some(sock) = read::<u64>(file, o.file_private_data) else {
        return peer;
    };
    let Some(sk) = read::<u64>(sock, o.socket_sk) else {
        return peer;
    };
    peer.family = read::<u16>(sk, o.sk_family).unwrap_or(0);
    peer.port = u16::from_be(read::<u16>(sk, o.sk_dport).unwrap_or(0));
    if peer.family == AF_INET {
        if let Some(a) = read::<[u8; 4]>(sk, o.sk_daddr) {
            peer.addr[..4].copy_from_slice(&a);
        }
    } else if peer.family == AF_INET6
        && let Some(a) = read::<[u8; 16]>(sk, o.sk_v6_daddr)
    {
        peer.addr = a;
    }
    peer
}

/// Decodes a `struct sockaddr` in user memory (IPv4/IPv6; other families give the family only).
#[inline(always)]
pub fn user_sockaddr(addr: u64) -> Option<Peer> {
    let family = read_user::<u16>(addr)?;
    let mut peer = Peer {
        family,
        ..Peer::default()
    };
    if family == AF_INET {
        peer.port = u16::from_be(read_user::<u16>(addr + 2)?);
        let a = read_user::<[u8; 4]>(addr + 4)?;
        peer.addr[..4].copy_from_slice(&a);
    } else if family == AF_INET6 {
        peer.port = u16::from_be(read_user::<u16>(addr + 2)?);
        peer.addr = read_user::<[u8; 16]>(addr + 8)?;
    }
    Some(peer)
}
