//! Next-hop resolution, proactive: the next hop's MAC and logical port come from the NB (the
//! destination switch's address table), never from ARP on the overlay.

use super::super::{DropReason, Run};
use etherparse::Ipv4HeaderSlice;
use geneflow_control::compiler::{
    CompiledPort, CompiledRoute, CompiledRouterPort, Datapath, Router,
};

pub(in super::super) struct Hop<'a> {
    pub dp: &'a Datapath,
    pub port: &'a CompiledPort,
    pub out: &'a CompiledRouterPort,
}

pub(in super::super) fn run<'a>(
    r: &mut Run<'a>,
    router: &'a Router,
    route: &'a CompiledRoute,
    ip: &Ipv4HeaderSlice,
) -> Result<Option<Hop<'a>>, DropReason> {
    let out = &router.ports[route.port];
    let nh = route.nexthop.unwrap_or(ip.destination_addr());
    let dp =
        r.t.pipeline
            .datapaths
            .get(&out.switch)
            .ok_or(DropReason::NoRoute)?;
    let Some(owner) = dp.ips.get(&nh) else {
        r.note("next hop", || {
            format!(
                "{nh} is not a known address on switch {}: ICMP host unreachable",
                dp.name
            )
        });
        return Ok(None);
    };
    let Some(port) = dp.ports.get(&owner.key) else {
        r.note("next hop", || {
            format!("{nh} is a router port: chained routers are not followed, dropped")
        });
        return Err(DropReason::NoRoute);
    };
    r.note("next hop", || {
        format!(
            "{nh} is {} ({}) on switch {} (tunnel key {})",
            port.name, port.mac, dp.name, dp.tunnel_key
        )
    });
    Ok(Some(Hop { dp, port, out }))
}
