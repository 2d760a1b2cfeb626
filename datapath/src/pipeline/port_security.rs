//! Port security: a port may send only from its own MAC and addresses, and receive only what
//! is addressed to it. This is where it runs on ingress (from the VM) and egress (delivery);
//! enforcement lands with security groups (issue 10): today every address is allowed, which is
//! what the trace says.

use super::{DropReason, Run};
use geneflow_control::compiler::Datapath;

/// Logical switch ingress: checks the source of a frame from a VM port.
pub(super) fn ingress(r: &mut Run, _dp: &Datapath, _port: u16) -> Result<(), DropReason> {
    r.note("port security (in)", || "not enforced yet: allowed".into());
    Ok(())
}

/// Logical switch egress: checks the destination before delivery to a VM port.
pub(super) fn egress(r: &mut Run, _dp: &Datapath, _port: u16) -> Result<(), DropReason> {
    r.note("port security (out)", || "not enforced yet: allowed".into());
    Ok(())
}
