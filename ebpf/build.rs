//! Rebuild the eBPF object when bpf-linker changes (it is the linker for the bpfel target).
fn main() {
    let bpf_linker = which::which("bpf-linker").unwrap_or_else(|e| {
        panic!("bpf-linker not found ({e}): run scripts/setup, which builds it against LLVM 22")
    });
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
