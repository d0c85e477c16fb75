//! Finds the kernel structure offsets the eBPF programs need ([`KernelOffsets`]) in the
//! running kernel's BTF, so the same object works on every kernel with BTF.

use btf_rs::{Btf, Type};
use forkscope_common::KernelOffsets;

use crate::error::{Error, Result};

/// Reads /sys/kernel/btf/vmlinux and the sched_process_exit tracepoint format.
pub fn from_running_kernel() -> Result<KernelOffsets> {
    // Parsing from memory: btf-rs's file backend seeks before every read (~100k syscalls).
    let bytes = std::fs::read(crate::sys::VMLINUX_BTF)
        .map_err(|e| Error::Btf(format!("{}: {e}", crate::sys::VMLINUX_BTF)))?;
    let btf = Btf::from_bytes(&bytes).map_err(|e| Error::Btf(e.to_string()))?;
    let format = std::fs::read_to_string(format!(
        "{}/events/sched/sched_process_exit/format",
        crate::sys::TRACEFS
    ))
    .unwrap_or_default();
    from_btf(&btf, &format)
}

/// Resolves every offset in `btf`; `exit_format` is the text of the sched_process_exit format.
pub fn from_btf(btf: &Btf, exit_format: &str) -> Result<KernelOffsets> {
    let f = |s: &str, path: &[&str]| field_offset(btf, s, path);
    Ok(KernelOffsets {
        task_files: f("task_struct", &["files"])?,
        task_exit_code: f("task_struct", &["exit_code"])?,
        task_pid: f("task_struct", &["pid"])?,
        task_tgid: f("task_struct", &["tgid"])?,
        files_fdt: f("files_struct", &["fdt"])?,
        fdt_max_fds: f("fdtable", &["max_fds"])?,
        fdt_fd: f("fdtable", &["fd"])?,
        file_inode: f("file", &["f_inode"])?,
        file_pos: f("file", &["f_pos"])?,
        file_flags: f("file", &["f_flags"])?,
        file_private_data: f("file", &["private_data"])?,
        inode_mode: f("inode", &["i_mode"])?,
        inode_ino: f("inode", &["i_ino"])?,
        inode_sb: f("inode", &["i_sb"])?,
        sb_dev: f("super_block", &["s_dev"])?,
        socket_sk: f("socket", &["sk"])?,
        sk_family: f("sock", &["__sk_common", "skc_family"])?,
        sk_daddr: f("sock", &["__sk_common", "skc_daddr"])?,
        sk_dport: f("sock", &["__sk_common", "skc_dport"])?,
        sk_v6_daddr: f("sock", &["__sk_common", "skc_v6_daddr"]).unwrap_or(KernelOffsets::ABSENT),
        task_thread_status: f("task_struct", &["thread_info", "status"])
            .unwrap_or(KernelOffsets::ABSENT),
        task_cgroups: f("task_struct", &["cgroups"])?,
        css_set_dfl_cgrp: f("css_set", &["dfl_cgrp"])?,
        cgroup_kn: f("cgroup", &["kn"])?,
        kernfs_node_id: f("kernfs_node", &["id"])?,
        tp_exit_group_dead: tracepoint_field_offset(exit_format, "group_dead")
            .unwrap_or(KernelOffsets::ABSENT),
        ready: 1,
    })
}

/// Byte offset of `path` (a chain of member names, anonymous structs/unions searched through)
/// inside `struct name`.
pub fn field_offset(btf: &Btf, name: &str, path: &[&str]) -> Result<u32> {
    let missing = || Error::BtfMissing(format!("{name}.{}", path.join(".")));
    let mut ty = btf
        .resolve_types_by_name(name)
        .map_err(|_| missing())?
        .into_iter()
        .find(|t| matches!(t, Type::Struct(s) if !s.members.is_empty()))
        .ok_or_else(missing)?;
    let mut total = 0u32;
    for (i, field) in path.iter().enumerate() {
        let (bits, member_ty) = find_member(btf, &ty, field).ok_or_else(missing)?;
        total += bits / 8;
        if i + 1 < path.len() {
            ty = member_ty;
        }
    }
    Ok(total)
}

/// Finds member `field` of a struct/union, looking inside anonymous members; returns its bit
/// offset and its type (typedefs and qualifiers resolved).
fn find_member(btf: &Btf, ty: &Type, field: &str) -> Option<(u32, Type)> {
    let s = match ty {
        Type::Struct(s) | Type::Union(s) => s,
        _ => return None,
    };
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        let mty = resolve_alias(btf, btf.resolve_chained_type(m).ok()?);
        if name == field {
            return Some((m.bit_offset(), mty));
        }
        if name.is_empty()
            && let Some((inner, t)) = find_member(btf, &mty, field)
        {
            return Some((m.bit_offset() + inner, t));
        }
    }
    None
}

/// Follows typedefs, const, volatile and restrict down to the underlying type.
fn resolve_alias(btf: &Btf, mut ty: Type) -> Type {
    for _ in 0..16 {
        let next = match &ty {
            Type::Typedef(t) => btf.resolve_chained_type(t),
            Type::Const(t) => btf.resolve_chained_type(t),
            Type::Volatile(t) => btf.resolve_chained_type(t),
            Type::Restrict(t) => btf.resolve_chained_type(t),
            _ => return ty,
        };
        match next {
            Ok(n) => ty = n,
            Err(_) => return ty,
        }
    }
    ty
}

/// Offset of `field` in a tracepoint `format` file's text.
pub fn tracepoint_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let line = line.trim();
        let decl = line.strip_prefix("field:")?.split(';').next()?;
        let name = decl.split_whitespace().last()?.split('[').next()?;
        if name != field {
            return None;
        }
        let off = line.split("offset:").nth(1)?.split(';').next()?;
        off.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracepoint_offset_parsed_from_format_text() {
        let format = "name: sched_process_exit\nformat:\n\
            \tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
            \tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;\n\
            \tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;\n";
        assert_eq!(tracepoint_field_offset(format, "group_dead"), Some(32));
        assert_eq!(tracepoint_field_offset(format, "comm"), Some(8));
        assert_eq!(tracepoint_field_offset(format, "prio"), None);
    }

    /// On a host with BTF, every offset resolves and the ones with a fixed place in the kernel
    /// ABI have it (skipped, with the reason printed, where the kernel has no BTF).
    #[test]
    fn offsets_resolve_from_this_kernels_btf() {
        let Ok(btf) = Btf::from_file(crate::sys::VMLINUX_BTF) else {
            crate::say!(
                "skipped: this kernel has no BTF at {}",
                crate::sys::VMLINUX_BTF
            );
            return;
        };
        let o = from_btf(&btf, "").expect("all offsets resolve");
        assert_eq!(o.tp_exit_group_dead, KernelOffsets::ABSENT);
        // struct sock starts with struct sock_common, whose first member is the address pair.
        assert_eq!(o.sk_daddr, 0);
        assert!(o.sk_dport > o.sk_daddr && o.sk_family > o.sk_dport);
        assert!(o.fdt_fd > o.fdt_max_fds);
        // x86_64: thread_info leads task_struct (flags, syscall_work, then status).
        assert_eq!(o.task_thread_status, 16);
        assert_eq!(o.ready, 1);
    }
}
