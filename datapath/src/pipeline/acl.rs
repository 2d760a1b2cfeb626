//! ACLs: the security-group rules of a port, egress rules on the sending chassis (from-lport)
//! and ingress rules on the delivering one (to-lport), so no chassis trusts another's verdict
//! about its own VMs. The conntrack-backed rules land with issue 10; until then ports have no
//! enforced groups and everything is allowed, which is what the trace says.

use super::{DropReason, Run};
use geneflow_control::compiler::Datapath;

/// From-lport ACL (the sending VM's egress rules).
pub(super) fn from_lport(r: &mut Run, _dp: &Datapath, _port: u16) -> Result<(), DropReason> {
    r.note("acl (from-lport)", || {
        "no rules enforced yet: allowed".into()
    });
    Ok(())
}

/// To-lport ACL (the receiving VM's ingress rules).
pub(super) fn to_lport(r: &mut Run, _dp: &Datapath, _port: u16) -> Result<(), DropReason> {
    r.note("acl (to-lport)", || "no rules enforced yet: allowed".into());
    Ok(())
}
