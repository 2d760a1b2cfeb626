//! Next-hop resolution. Inside the overlay, proactive: the next hop's MAC and logical port come
//! from the NB (the destination switch's address table), never from ARP on the overlay. On a
//! provider network, from the neighbours learned from its ARP (`Tables::learn`); an unknown
//! one is asked for with an ARP request (the packet that needed it is dropped, as a host
//! drops what overflows its ARP queue).

use super::super::{DropReason, Run};
use geneflow_control::compiler::{
    CompiledPort, CompiledRoute, CompiledRouterPort, Datapath, Router,
};
use geneflow_control::model::Mac;
use std::net::Ipv4Addr;

pub(in super::super) enum Hop<'a> {
    /// A logical port (a VM, or a port of a provider network known to the NB).
    Port {
        dp: &'a Datapath,
        port: &'a CompiledPort,
        out: &'a CompiledRouterPort,
    },
    /// A host of a provider network at a learned MAC.
    External {
        dp: &'a Datapath,
        mac: Mac,
        out: &'a CompiledRouterPort,
    },
    /// A host of a provider network whose MAC is not known yet.
    Unresolved {
        dp: &'a Datapath,
        nh: Ipv4Addr,
        out: &'a CompiledRouterPort,
    },
}

pub(in super::super) fn run<'a>(
    r: &mut Run<'a>,
    router: &'a Router,
    route: &'a CompiledRoute,
    dst: Ipv4Addr,
) -> Result<Option<Hop<'a>>, DropReason> {
    let out = &router.ports[route.port];
    let nh = route.nexthop.unwrap_or(dst);
    let dp =
        r.t.pipeline
            .datapaths
            .get(&out.switch)
            .ok_or(DropReason::NoRoute)?;
    let Some(owner) = dp.ips.get(&nh) else {
        if dp.provider.is_some() {
            return Ok(Some(
                match r.t.ext_neigh().get(&(dp.tunnel_key, nh)).map(|n| n.0) {
                    Some(mac) => {
                        r.note("next hop", || {
                            format!(
                                "{nh} is at {} on the physical network {} (learned)",
                                Mac(mac),
                                dp.name
                            )
                        });
                        Hop::External {
                            dp,
                            mac: Mac(mac),
                            out,
                        }
                    }
                    None => {
                        r.note("next hop", || {
                            format!("{nh} not yet learned on {}: ARP request", dp.name)
                        });
                        Hop::Unresolved { dp, nh, out }
                    }
                },
            ));
        }
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
    Ok(Some(Hop::Port { dp, port, out }))
}
