//! Builds the XDP program (ebpf/xdp) for the BPF target with aya-build, so that a plain
//! `cargo build` on stable produces the whole datapath. The object lands in OUT_DIR and is
//! embedded with include_bytes!.
use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest)
        .parent()
        .ok_or_else(|| anyhow!("datapath has no parent directory"))?
        .join("ebpf/xdp");
    let root = root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    println!("cargo:rerun-if-changed={root}/../abi/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "geneflow-xdp",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
