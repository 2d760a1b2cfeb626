//! geneflow orchestration library: the namespace testbed shared by `cargo xtask demo` and the
//! end-to-end tests.
pub mod bench;
pub mod testbed;
pub mod testbed_l3;
pub mod testbed_routed;
