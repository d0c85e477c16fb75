//! Process lifecycle: a new process (not a new thread) from `sched_process_fork`, `exec` with
//! the file executed, and the exit of a process's last thread with its exit status.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel_str_bytes},
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use forkscope_common::{EventHeader, EventKind, KernelOffsets, ProcEvent};

use crate::{
    cgroup, config,
    emit::{count_event, count_lost, header},
    kernel::{current_task, read},
    maps::EVENTS,
};

/// Reserves and fills a ProcEvent; `filename` fills its filename field.
#[inline(always)]
fn emit(hdr: EventHeader, child_pid: u32, exit_code: u32, filename: impl FnOnce(&mut [u8; 512])) {
    let Some(mut entry) = EVENTS.reserve::<ProcEvent>(0) else {
        count_lost();
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points to a reserved record of size_of::<ProcEvent>(); every field is
    // written before submit.
    unsafe {
        (*e).hdr = hdr;
        (*e).child_pid = child_pid;
        (*e).exit_code = exit_code;
        (*e).filename[0] = 0;
        filename(&mut (*e).filename);
    }
    entry.submit(crate::emit::wakeup_flags_reserved(size_of::<ProcEvent>()));
    count_event();
}

/// raw_tracepoint/sched_process_fork: args (struct task_struct *parent, *child).
#[raw_tracepoint]
pub fn process_fork(ctx: RawTracePointContext) -> i32 {
    let _ = try_fork(&ctx);
    0
}

fn try_fork(ctx: &RawTracePointContext) -> Option<()> {
    let cg = cgroup::tracked()?;
    let o = config::ready_offsets()?;
    let child: u64 = ctx.arg(1);
    let pid = read::<i32>(child, o.task_pid)?;
    let tgid = read::<i32>(child, o.task_tgid)?;
    if pid != tgid {
        return None; // a new thread, not a new process
    }
    emit(
        header(EventKind::ProcFork, EventHeader::NO_SYSCALL, cg),
        tgid as u32,
        0,
        |_| {},
    );
    Some(())
}

/// tracepoint/sched/sched_process_exec: `__data_loc char[] filename` at offset 8.
#[tracepoint]
pub fn process_exec(ctx: TracePointContext) -> u32 {
    let _ = try_exec(&ctx);
    0
}

fn try_exec(ctx: &TracePointContext) -> Option<()> {
    // A thread other than the leader that execs takes the leader's id: the slot of its old
    // id is freed (offset 16: old_pid), before the cgroup check like at exit.
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: offset 16 of sched_process_exec is `pid_t old_pid`.
    if let Ok(old) = unsafe { ctx.read_at::<u32>(16) }
        && old != pid_tgid as u32
    {
        crate::write_run::release((pid_tgid & !0xffff_ffff) | old as u64);
    }
    let cg = cgroup::tracked()?;
    // SAFETY: offset 8 is the filename's __data_loc (u32: length << 16 | offset).
    let loc: u32 = unsafe { ctx.read_at(8) }.ok()?;
    let src = ctx.as_ptr() as u64 + (loc & 0xffff) as u64;
    emit(
        header(EventKind::ProcExec, EventHeader::NO_SYSCALL, cg),
        0,
        0,
        |buf| {
            // SAFETY: reads a NUL-terminated string from the tracepoint record into `buf`.
            if unsafe { bpf_probe_read_kernel_str_bytes(src as *const u8, buf) }.is_err() {
                buf[0] = 0;
            }
        },
    );
    Some(())
}

/// tracepoint/sched/sched_process_exit: fires for every exiting thread.
#[tracepoint]
pub fn process_exit(ctx: TracePointContext) -> u32 {
    let _ = try_exit(&ctx);
    0
}

fn try_exit(ctx: &TracePointContext) -> Option<()> {
    // Before the cgroup check: a thread of a cgroup no longer traced still frees its slot.
    crate::write_run::release(bpf_get_current_pid_tgid());
    let cg = cgroup::tracked()?;
    let o = config::ready_offsets()?;
    let last_thread = if o.tp_exit_group_dead != KernelOffsets::ABSENT {
        // SAFETY: the offset was read from this tracepoint's format file.
        unsafe { ctx.read_at::<u8>(o.tp_exit_group_dead as usize) }.ok()? != 0
    } else {
        let pid_tgid = bpf_get_current_pid_tgid();
        (pid_tgid >> 32) as u32 == pid_tgid as u32
    };
    if !last_thread {
        return None;
    }
    let code = read::<u32>(current_task(), o.task_exit_code).unwrap_or(0);
    emit(
        header(EventKind::ProcExit, EventHeader::NO_SYSCALL, cg),
        0,
        code,
        |_| {},
    );
    Some(())
}
