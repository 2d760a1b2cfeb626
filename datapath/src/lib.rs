//! geneflow datapath: the Geneve codec (`wire`), the sans-IO userspace pipeline (`pipeline`),
//! and the I/O around them: the BPF loader and map access (`loader`), AF_XDP sockets and the
//! slow-path forwarder (`forwarder`), counters (`metrics`), the local control socket (`ctl`).
pub mod pipeline;
pub mod wire;

/// The XDP object built by build.rs from ebpf/xdp.
pub const XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/geneflow-xdp"));
