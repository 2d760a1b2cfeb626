//! geneflow orchestration library: the namespace testbed shared by `cargo xtask demo` and the
//! end-to-end tests.
pub mod bench;
pub mod bpfstats;
pub mod fuzz;
pub mod testbed;
pub mod testbed_agent;
pub mod testbed_cleanup;
pub mod testbed_l3;
pub mod testbed_nb;
pub mod testbed_ovs;
pub mod testbed_ovs_dpdk;
pub mod testbed_provider;
pub mod testbed_routed;
pub mod testbed_traffic;
