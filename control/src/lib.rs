//! geneflow control plane: the NB model (`model`), NB backends (`nb`), the flow compiler
//! (`compiler`) and the control-plane thread that feeds compiled pipelines to the datapath
//! (`agent`), and the ZeroMQ publisher service of NB changes (`publisher`). Everything here
//! is testable without a kernel.
pub mod acl;
pub mod agent;
pub mod compiler;
pub mod dhcp;
pub mod kv;
pub mod model;
pub mod nat;
pub mod nb;
pub mod port_security;
pub mod publisher;
pub mod router;
pub mod validate;

#[cfg(test)]
mod tests_model;
