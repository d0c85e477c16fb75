//! The eBPF side as userspace sees it: the embedded object, kernel offsets from BTF, and
//! [`Probe`], which loads the programs, attaches them, registers cgroups and reads the maps.

mod demand_hooks;
pub mod egress_map;
pub mod offsets;
mod probe;
pub mod run_slots;

pub use demand_hooks::{HookSet, HooksState};
pub use probe::{DirtyPage, Probe, ProbeOptions, Stats, unpin};

/// Where pinned programs and maps live on the BPF filesystem.
pub const PIN_ROOT: &str = "/sys/fs/bpf/forkscope";

/// The layout of a pin set (which programs are pinned and where their links are): a
/// change to it changes [`object_id`], so a set of another layout is never adopted.
const PIN_LAYOUT: &[u8] =
    b"pins-3: links/, progs/, syscall-links/ (tp_btf), fault-links/ (raw_tp), SYSCALL_FAMILIES";

/// A short identity of the embedded object and the pin layout (FNV-1a of their bytes):
/// pins made by another build are never adopted.
pub fn object_id() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in PIN_LAYOUT.iter().chain(EBPF_OBJECT) {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The eBPF object built from `ebpf/` by build.rs (aya-build), embedded in the binary.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/forkscope-ebpf"));

/// Program names in the object.
pub const PROGRAMS: &[&str] = &[
    "syscall_exit",
    "sys_exit_fd_write",
    "sys_exit_fd_op",
    "sys_exit_path_op",
    "sys_exit_net",
    // (Names the kernel keeps apart: it keeps 15 characters of a program's name.)
    "process_fork",
    "process_exec",
    "process_exit",
    "page_fault",
    "connect4",
    "connect6",
    "sendmsg4",
    "sendmsg6",
    "egress",
];

/// The socket-address hooks (policy), attached to forkscope's parent cgroup.
pub const SOCK_PROGRAMS: &[&str] = &["connect4", "connect6", "sendmsg4", "sendmsg6"];

/// Map names in the object.
pub const MAPS: &[&str] = &[
    "EVENTS",
    "TRACKED_CGROUPS",
    "CGROUP_VERDICT",
    "DIRTY_PAGES",
    "PAGE_COUNTS",
    "EPOCHS",
    "STATS",
    "SCRATCH",
    "NET_POLICIES",
    "PROXY",
    "REDIRECTS",
    "NEXT_REDIRECT",
    "DEFER_PASSES",
    "WRITE_RUNS",
    "EGRESS",
    "TCP_SENT",
    "SYSCALL_FAMILIES",
    "SYSCALL_PASS",
];

/// Run time (ns) and run count of every loaded program named like one of forkscope's (the
/// kernel keeps 15 characters of a name; forkscope's are distinct within them), summed per
/// name: the kernel counts only while BPF stats are on (see [`enable_stats`]). Programs of
/// every forkscope daemon on the host are counted together, and so would be another tool's
/// programs of the same names.
pub fn program_stats() -> Vec<(String, u64, u64)> {
    let mut out: Vec<(String, u64, u64)> = PROGRAMS.iter().map(|p| (p.to_string(), 0, 0)).collect();
    for info in aya::programs::loaded_programs().flatten() {
        let Some(name) = info.name_as_str() else {
            continue;
        };
        if let Some(e) = out.iter_mut().find(|(p, _, _)| {
            !name.is_empty() && p.starts_with(name) && name.len() >= p.len().min(15)
        }) {
            e.1 += info.run_time().as_nanos() as u64;
            e.2 += info.run_count();
        }
    }
    out
}

/// Switches the kernel's BPF run-time statistics on for as long as the returned descriptor
/// is open.
pub fn enable_stats() -> Option<std::os::fd::OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The built object holds every program and map the loader expects (no root needed).
    #[test]
    fn object_has_every_program_and_map() {
        let obj = aya_obj::Object::parse(EBPF_OBJECT).expect("the embedded eBPF object parses");
        for p in PROGRAMS {
            assert!(
                obj.programs.contains_key(*p),
                "program {p} missing from the eBPF object"
            );
        }
        for m in MAPS {
            assert!(
                obj.maps.contains_key(*m),
                "map {m} missing from the eBPF object"
            );
        }
        assert_eq!(
            obj.programs.len(),
            PROGRAMS.len(),
            "unexpected extra programs"
        );
        assert!(
            obj.maps.contains_key(".rodata"),
            "OFFSETS global (.rodata) missing"
        );
    }
}
