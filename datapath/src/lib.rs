//! geneflow datapath: the Geneve codec (`wire`) and the sans-IO userspace pipeline
//! (`pipeline`), and the I/O around them: the BPF loader and its maps (`loader`), AF_XDP sockets
//! (`xsk`), the slow-path forwarder (`forwarder`), interface and neighbour facts (`netdev`),
//! counters (`metrics`, `exporter`), the local control socket (`ctl`), the configuration file
//! (`config`) and the pinned state that outlives a process (`persist`). `geneflowd` wires them
//! to the control-plane thread. For the DPDK backend (feature `dpdk`, being built): the DPDK
//! wrapper (`dpdk`), the userspace megaflow cache (`flowcache`), a megaflow's action run in
//! userspace (`flowexec`), the underlay neighbour table of an uplink no kernel sees
//! (`userneigh`) and the engine that joins them with the pipeline (`userpath`).
pub mod arpasked;
pub mod config;
pub mod ctl;
#[cfg(feature = "dpdk")]
pub mod dpdk;
pub mod exporter;
pub mod flowcache;
pub mod flowexec;
pub mod forwarder;
pub mod garp;
pub mod generations;
pub mod loader;
pub mod metrics;
pub mod napt;
pub mod netdev;
pub(crate) mod pending;
pub mod persist;
pub mod pipeline;
pub mod ratelimit;
pub mod userct;
pub mod usernat;
pub mod userneigh;
pub mod userpath;
pub mod wire;
pub mod xsk;

/// The XDP object built by build.rs from ebpf/xdp.
pub const XDP_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/geneflow-xdp"));
