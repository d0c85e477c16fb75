//! The one program on the `sys_exit` tracepoint while some branch asks for per-write
//! detail (a BTF-typed raw tracepoint, `tp_btf`): it returns at once for a syscall no
//! family handles or a task that is not traced with detail (a cached per-cgroup verdict), and
//! otherwise tail-calls the syscall's family program ([`crate::fd_write`],
//! [`crate::fd_op`], [`crate::path_op`], [`crate::net`]) through
//! [`crate::maps::SYSCALL_FAMILIES`], handing it the cgroup, the thread's ids and its
//! descriptor table in [`crate::maps::SYSCALL_PASS`].
//!
//! A raw tracepoint runs the program straight from the tracepoint: no perf record is built
//! per syscall, as the `syscalls:sys_exit_*` tracepoints do for any program attached to
//! them; typed, it reads the saved registers with plain loads. The price: it runs for every
//! syscall of every task while attached, so its first tests (the syscall number, then the
//! verdict) are the cheapest forkscope has. Helper calls are what costs here (see
//! BENCHMARKS.md), so the path to a family program makes one: the typed current task, from
//! which the cgroup id and the rest are plain loads.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use forkscope_common::{keys::TRACED, syscalls::family_of};

use crate::{
    cgroup, config, kernel,
    maps::{SYSCALL_FAMILIES, SYSCALL_PASS},
};

#[btf_tracepoint(function = "sys_exit")]
pub fn syscall_exit(ctx: BtfTracePointContext) -> i32 {
    // Most syscalls (reads, stats, polls) belong to no family: the number, a plain load
    // from the saved registers, settles them before anything else.
    let Some(family) = kernel::syscall_nr(&ctx).and_then(family_of) else {
        return 0;
    };
    let Some(o) = config::ready_offsets() else {
        return 0;
    };
    let task = kernel::task_btf();
    let Some(cgroup) = cgroup::task_tracked_as(task, &o, TRACED) else {
        return 0;
    };
    if kernel::in_compat_syscall(task, &o) {
        return 0;
    }
    let Some(pass) = SYSCALL_PASS.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's slot of a live per-CPU array. The kernel runs BPF programs on the
    // syscall tracepoints with preemption disabled (as SCRATCH also needs), so nothing else
    // runs the dispatcher on this CPU before the tail-called family program has read it.
    unsafe { *pass = kernel::syscall_pass(task, cgroup, &o) };
    // SAFETY: a tail call with this program's own context; a missing entry just returns.
    unsafe { SYSCALL_FAMILIES.tail_call(&ctx, family as u32) };
    0
}
