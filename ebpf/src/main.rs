//! forkscope's eBPF programs.
//!
//! Every tracing program first asks [`cgroup::tracked`] whether the current task belongs to a cgroup
//! the controller registered (or one of its descendants) and returns at once if not. Events go
//! to userspace through one ring buffer ([`maps::EVENTS`]); losses are counted in
//! [`maps::STATS`]. One module per hook family:
//! - [`syscall_exit`]: the one program on the raw `sys_exit` tracepoint, which tail-calls
//!   the family program of the syscall (the next four) for tasks traced with per-write detail;
//! - [`fd_write`]: data written through a descriptor (files and sockets);
//! - [`fd_op`]: other descriptor operations (ftruncate, fchmod, shared mmap, reflink, fchdir);
//! - [`path_op`]: operations naming paths (open, rename, unlink, mkdir, chmod, link, ...);
//! - [`net`]: connect and the send family;
//! - [`process`]: fork, exec, exit;
//! - [`pages`]: write page faults, deduplicated per (cgroup, process, page);
//! - [`sock`]: the branches' network policies (cgroup socket-address hooks: deny, buffer);
//! - [`write_run`]: runs of writes to one file or socket, merged into one record;
//! - [`egress`]: bytes sent per destination by branches traced without per-write detail
//!   (a cgroup_skb program: no syscall program runs for them).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Atomic read-modify-write operations (write_run.rs): the bpf target's core has no atomic
// types with them, the intrinsics compile to BPF atomic instructions.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod cgroup;
#[cfg(target_arch = "bpf")]
mod config;
#[cfg(target_arch = "bpf")]
mod egress;
#[cfg(target_arch = "bpf")]
mod emit;
#[cfg(target_arch = "bpf")]
mod fd_op;
#[cfg(target_arch = "bpf")]
mod fd_write;
#[cfg(target_arch = "bpf")]
mod kernel;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod net;
#[cfg(target_arch = "bpf")]
mod pages;
#[cfg(target_arch = "bpf")]
mod path_op;
#[cfg(target_arch = "bpf")]
mod process;
#[cfg(target_arch = "bpf")]
mod sock;
#[cfg(target_arch = "bpf")]
mod syscall_exit;
#[cfg(target_arch = "bpf")]
mod write_run;

#[cfg(all(target_arch = "bpf", not(test)))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic (no unwinding, no
    // aborts exist in eBPF), so this is never executed.
    unsafe { core::hint::unreachable_unchecked() }
}

/// The crate only means something for the bpf target; on the host it is an empty binary so
/// `cargo clippy --workspace` and `cargo test --workspace` pass over it.
#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
