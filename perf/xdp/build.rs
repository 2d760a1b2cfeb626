// Rebuild the eBPF object when the linker changes (it is not a cargo dependency).
fn main() {
    if let Ok(p) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", p.display());
    }
}
