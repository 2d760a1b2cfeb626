//! Router DNAT: a packet to a floating IP of the router goes on to its fixed IP, whether it
//! came from the physical network (only the chassis hosting the port lets it in, see
//! `provider`) or from inside the tenant (hairpin: a VM reaching another's floating IP).
//! Stateless and one-to-one, like OVN's distributed `dnat_and_snat`.

use super::super::{DropReason, Run};
use etherparse::Ipv4HeaderSlice;
use geneflow_control::compiler::{CompiledRouterPort, Router};
use std::net::Ipv4Addr;

/// The destination routing uses: translated when it is a floating IP.
pub(in super::super) fn run(
    r: &mut Run,
    router: &Router,
    in_port: &CompiledRouterPort,
    ip: &Ipv4HeaderSlice,
) -> Result<Ipv4Addr, DropReason> {
    let dst = ip.destination_addr();
    let from_outside = router.gateway.map(|g| &router.ports[g]) == Some(in_port);
    match router.fip_external(dst) {
        Some(f) if from_outside && !f.local => {
            r.note("dnat", || {
                format!("floating IP {dst} is not bound here: dropped")
            });
            Err(DropReason::NoNat)
        }
        Some(f) => {
            r.nat_dst = Some(f.logical_ip);
            r.note("dnat", || {
                format!(
                    "floating IP {dst} -> fixed IP {} (port {})",
                    f.logical_ip, f.port
                )
            });
            Ok(f.logical_ip)
        }
        None if from_outside => {
            r.note("dnat", || {
                format!("{dst} is no floating IP of the router: dropped")
            });
            Err(DropReason::NoNat)
        }
        None => {
            r.note("dnat", || "no floating IP applies".into());
            Ok(dst)
        }
    }
}
