//! Reads of kernel memory: the current syscall's arguments, the file behind a descriptor, a
//! socket's destination, a task's ids. Offsets come from [`crate::config::offsets`].

use aya_ebpf::helpers::{
    bpf_get_current_task, bpf_get_current_task_btf, bpf_probe_read_kernel,
    bpf_probe_read_kernel_buf, bpf_probe_read_user, bpf_task_pt_regs,
};
use forkscope_common::{KernelOffsets, event::file_type};

use crate::{emit::count_read_error, maps::SCRATCH};

/// Slots of x86_64 `struct pt_regs` (u64 each): r15 r14 r13 r12 bp bx r11 r10 r9 r8 ax cx dx
/// si di. The layout is the kernel's user ABI for x86_64.
const REG_R10: usize = 7;
const REG_R9: usize = 8;
const REG_R8: usize = 9;
const REG_DX: usize = 12;
const REG_SI: usize = 13;
const REG_DI: usize = 14;

/// A syscall a traced task is returning from.
pub struct SysExit {
    /// The task's cgroup id.
    pub cgroup: u64,
    /// The syscall number.
    pub nr: u32,
    /// Its result.
    pub ret: i64,
    /// Its six arguments.
    pub args: [u64; 6],
}

/// Where every `sys_exit_*` program starts: the syscall the current task returns from, or
/// `None` when the task is not traced with per-write detail.
#[inline(always)]
pub fn sys_exit(ctx: &aya_ebpf::programs::TracePointContext) -> Option<SysExit> {
    let cgroup = crate::cgroup::tracked_as(forkscope_common::keys::TRACED)?;
    // SAFETY: `__syscall_nr` (offset 8, int) and `ret` (offset 16, long) of every sys_exit_*
    // record, read straight from the context (the verifier checks the offsets; no helper).
    let (nr, ret) = unsafe {
        let rec = aya_ebpf::EbpfContext::as_ptr(ctx) as *const u8;
        (
            core::ptr::read_volatile(rec.add(8).cast::<i32>()) as u32,
            core::ptr::read_volatile(rec.add(16).cast::<i64>()),
        )
    };
    Some(SysExit {
        cgroup,
        nr,
        ret,
        args: syscall_args()?,
    })
}

/// The six arguments of the syscall the current task is returning from. At syscall exit the
/// saved user registers still hold the arguments (only `ax` carries the result).
#[inline(always)]
pub fn syscall_args() -> Option<[u64; 6]> {
    // SAFETY: helpers valid in tracing programs; bpf_task_pt_regs returns the current task's
    // saved user registers as a BTF pointer (`struct pt_regs`), whose fields the verifier
    // lets the program load directly (as fault-safe loads, no helper call).
    unsafe {
        let task = bpf_get_current_task_btf();
        let regs = bpf_task_pt_regs(task) as *const u64;
        if regs.is_null() {
            return None;
        }
        let reg = |slot: usize| core::ptr::read_volatile(regs.add(slot));
        Some([
            reg(REG_DI),
            reg(REG_SI),
            reg(REG_DX),
            reg(REG_R10),
            reg(REG_R8),
            reg(REG_R9),
        ])
    }
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

/// Bytes of `struct fdtable` read at once (max_fds and fd are its first fields).
pub const FDT_CHUNK: usize = 16;
/// Bytes of `struct file` read at once (private_data, f_inode, f_flags, f_pos on 6.x).
pub const FILE_CHUNK: usize = 128;
/// Bytes of `struct inode` read at once (i_mode, i_sb, i_ino on 6.x).
pub const INODE_CHUNK: usize = 80;

/// Per-CPU buffers for chunked reads of kernel structures (see [`read_chunk`]).
#[repr(C)]
pub struct Scratch {
    pub fdt: [u8; FDT_CHUNK],
    pub file: [u8; FILE_CHUNK],
    pub inode: [u8; INODE_CHUNK],
}

/// The `struct file *` behind descriptor `fd` of the current task, or 0.
#[inline(always)]
pub fn fd_file(o: &KernelOffsets, fd: i64) -> u64 {
    if !(0..=0x7fff_ffff).contains(&fd) {
        return 0;
    }
    let Some(files) = read::<u64>(current_task(), o.task_files) else {
        return 0;
    };
    let Some(fdt) = read::<u64>(files, o.files_fdt) else {
        return 0;
    };
    let Some(chunk) = read_chunk(fdt, |s| &mut s.fdt) else {
        return 0;
    };
    let Some(max) = field::<u32, FDT_CHUNK>(chunk, fdt, o.fdt_max_fds) else {
        return 0;
    };
    if fd as u64 >= max as u64 {
        return 0;
    }
    let Some(array) = field::<u64, FDT_CHUNK>(chunk, fdt, o.fdt_fd) else {
        return 0;
    };
    read::<u64>(array, (fd as u32) * 8).unwrap_or(0)
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

/// The position and the inode number of `file`: all a write that continues a run needs
/// (two reads; the inode number tells a reused `struct file` apart).
#[inline(always)]
pub fn file_pos_ino(o: &KernelOffsets, file: u64) -> (i64, u64) {
    let Some(f) = read_chunk(file, |s| &mut s.file) else {
        return (-1, 0);
    };
    let pos = field::<i64, FILE_CHUNK>(f, file, o.file_pos).unwrap_or(-1);
    let ino = field::<u64, FILE_CHUNK>(f, file, o.file_inode)
        .and_then(|inode| read::<u64>(inode, o.inode_ino))
        .unwrap_or(0);
    (pos, ino)
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
