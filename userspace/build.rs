//! Builds the eBPF crate (`ebpf/`) for the bpfel target with the nightly toolchain and puts the
//! object in OUT_DIR, where `bpf::object` includes it.
use aya_build::{Package, Toolchain};

fn main() -> aya_build::Result<()> {
    let ebpf = Package {
        name: "forkscope-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf"),
        ..Default::default()
    };
    println!("cargo:rerun-if-changed=../common/src");
    aya_build::build_ebpf([ebpf], Toolchain::Nightly)
}
