//! DHCP: requests from a VM are answered by its own chassis in the slow path (issue 11). Until
//! the responder lands they are switched like any broadcast, which is what the trace says.

use super::{DropReason, Run};
use geneflow_control::compiler::Datapath;

pub(super) fn run(r: &mut Run, _dp: &Datapath, _port: u16) -> Result<(), DropReason> {
    if r.tracing() {
        // Only the trace looks at it: the real responder will add the fields it reads to the
        // megaflow mask itself.
        let dhcp = r.key.eth_type == 0x0800u16.to_be()
            && r.key.ip_proto == 17
            && r.key.l4_dst == 67u16.to_be();
        r.note("dhcp", || {
            if dhcp {
                "DHCP request: no local responder yet, switched as usual".into()
            } else {
                "not DHCP".into()
            }
        });
    }
    Ok(())
}
