//! Finds DPDK with pkg-config (Debian's libdpdk-dev, 22.11), compiles the shim with its flags
//! and generates the bindings of what `shim/shim.h` includes, restricted to what geneflow
//! uses (EAL, ethdev, mbuf, mempool).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=shim/shim.h");
    println!("cargo:rerun-if-changed=shim/shim.c");
    let dpdk = pkg_config::Config::new()
        .atleast_version("22.11")
        .probe("libdpdk")
        .unwrap_or_else(|e| {
            panic!("DPDK not found ({e}); install libdpdk-dev (cargo xtask setup does), or build without the `dpdk` feature")
        });
    // pkg-config's --cflags also carry `-include rte_config.h` and -march: take them whole.
    let cflags = pkg_config::get_variable("libdpdk", "cflags").ok();
    let raw = std::process::Command::new("pkg-config")
        .args(["--cflags", "libdpdk"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|_| cflags.unwrap_or_default());
    let flags: Vec<String> = raw.split_whitespace().map(str::to_string).collect();

    let mut cc = cc::Build::new();
    cc.file("shim/shim.c").warnings(false);
    let mut it = flags.iter();
    while let Some(f) = it.next() {
        if f == "-include" {
            if let Some(h) = it.next() {
                cc.flag("-include").flag(h);
            }
        } else {
            cc.flag(f);
        }
    }
    cc.compile("gfdpdkshim");

    let mut b = bindgen::Builder::default()
        .header("shim/shim.h")
        .clang_args(&flags)
        .allowlist_function("rte_eal_.*|rte_eth_.*|rte_pktmbuf_.*|rte_mempool_.*|rte_strerror|rte_version|rte_socket_id|rte_lcore_id|gf_.*")
        .allowlist_var("RTE_ETH_.*|RTE_MBUF_.*|RTE_PKTMBUF_.*|RTE_MAX_ETHPORTS|SOCKET_ID_ANY")
        .allowlist_type("rte_eth_conf|rte_eth_stats|rte_ether_addr|rte_eth_dev_info")
        .opaque_type("rte_mbuf|rte_mempool")
        .derive_default(true)
        .layout_tests(false)
        .generate_comments(false);
    for p in &dpdk.include_paths {
        b = b.clang_arg(format!("-I{}", p.display()));
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    b.generate()
        .expect("bindgen on DPDK's headers")
        .write_to_file(out.join("bindings.rs"))
        .expect("writing the bindings");
}
