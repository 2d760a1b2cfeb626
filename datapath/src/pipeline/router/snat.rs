//! Router SNAT: a packet leaving by the gateway port (to the physical network), or reaching
//! another VM's floating IP (hairpin), takes the floating IP of its source port as source and,
//! out of the gateway port, its MAC, so the physical network sees only floating IPs. A source
//! without a floating IP leaving by the gateway port takes this chassis' external address and
//! a port of it (default SNAT, `flag::NAPT`); without one it cannot leave (`drop_no_nat`), nor
//! can it reach a floating IP (hairpin). Packets from the physical network keep their source.

use super::super::{DropReason, Run};
use geneflow_control::compiler::{CompiledRouterPort, Router};
use geneflow_control::model::Mac;
use std::net::Ipv4Addr;

/// The source MAC to use out of the gateway port, when a floating IP applies.
pub(in super::super) fn run(
    r: &mut Run,
    router: &Router,
    in_port: &CompiledRouterPort,
    out_port: &CompiledRouterPort,
    src: Ipv4Addr,
) -> Result<Option<Mac>, DropReason> {
    let gateway = router.gateway.map(|g| &router.ports[g]);
    let (from_outside, to_outside) = (gateway == Some(in_port), gateway == Some(out_port));
    if from_outside || (!to_outside && r.nat_dst.is_none()) {
        r.note("snat", || "no source translation applies".into());
        return Ok(None);
    }
    r.mask.ip_src = u32::MAX;
    match router.local_fip_of(in_port.switch, src) {
        Some(f) => {
            r.nat_src = Some(f.external_ip);
            r.note("snat", || {
                format!("{src} -> floating IP {} ({})", f.external_ip, f.mac)
            });
            Ok(Some(f.mac))
        }
        None => match r.t.pipeline.external_ip {
            Some(ext) if to_outside => {
                r.napt = Some(ext);
                let mac = geneflow_control::nat::fip_mac(ext);
                r.note("snat", || {
                    format!("{src} has no floating IP: default SNAT to this chassis' {ext} ({mac})")
                });
                Ok(Some(mac))
            }
            _ => {
                r.note("snat", || {
                    format!("{src} has no floating IP, and no SNAT address applies: dropped")
                });
                Err(DropReason::NoNat)
            }
        },
    }
}
