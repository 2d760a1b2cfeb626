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
    // cargo-fuzz builds with `--cfg fuzzing`. Its targets run the codecs and the pipeline and
    // never load the XDP program, so they get an empty object instead of a second BPF build
    // (about a minute of CPU in CI's fuzz build). Loading it would fail with an ELF error.
    if std::env::var_os("CARGO_CFG_FUZZING").is_some() {
        let out = std::env::var("OUT_DIR").context("OUT_DIR")?;
        std::fs::write(std::path::Path::new(&out).join("geneflow-xdp"), [])?;
        return Ok(());
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "geneflow-xdp",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
