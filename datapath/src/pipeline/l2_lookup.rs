//! L2 lookup: the destination MAC picks a logical port (local or on another chassis), a router
//! port, or, for broadcast and multicast, every port of the switch (ingress replication: one
//! copy per remote chassis hosting the switch, whose receivers flood locally).

use super::{DropReason, Output, Run};
use crate::wire::geneve::OvnMetadata;
use geneflow_control::compiler::{CompiledPort, Datapath, PortLocation, RouterAttach};
use geneflow_control::model::{Mac, MC_FLOOD_KEY};

pub(super) enum L2<'a> {
    /// The outputs are in the caller's vector; floods are never cached.
    Flooded,
    Port(&'a CompiledPort),
    Router(RouterAttach),
    /// A provider network's own host: out of its interface (an `Output::Provider`).
    Physical(Output),
}

pub(super) fn run<'a>(
    r: &mut Run,
    dp: &'a Datapath,
    in_key: u16,
    out: &mut Vec<Output>,
) -> Result<L2<'a>, DropReason> {
    let dst = Mac(r.key.eth_dst);
    r.mask.eth_dst = [0xff; 6];
    if dst.is_multicast() {
        for (p, iface) in dp.local_ports() {
            if p.key == in_key {
                continue;
            }
            if let Some(ix) = r.t.ifindex(iface) {
                out.push(Output::Local { ifindex: ix });
            }
        }
        // A provider network is bridged to its local interface, never tunnelled.
        if dp.provider.is_some() {
            if let Some(o) = r.t.provider_output(dp.tunnel_key) {
                out.push(o);
            }
            r.note("l2 lookup", || {
                format!("{dst} is broadcast/multicast: flood to the switch's other local ports and the physical network")
            });
            return Ok(L2::Flooded);
        }
        for (_, ip) in &dp.remote_chassis {
            out.push(Output::Tunnel {
                remote: *ip,
                vni: dp.tunnel_key,
                meta: OvnMetadata {
                    ingress: in_key,
                    egress: MC_FLOOD_KEY,
                },
            });
        }
        r.note("l2 lookup", || {
            format!("{dst} is broadcast/multicast: flood to the switch's other local ports and replicate to {} remote chassis", dp.remote_chassis.len())
        });
        return Ok(L2::Flooded);
    }
    if let Some(att) = dp.router_ports.get(&dst) {
        r.note("l2 lookup", || {
            format!(
                "{dst} is router port key {} of router (tunnel key {})",
                att.port_key, att.router
            )
        });
        return Ok(L2::Router(*att));
    }
    let Some(port) = dp.macs.get(&dst).and_then(|k| dp.ports.get(k)) else {
        // On a provider network an unknown MAC is the physical network's (its hosts and
        // routers are in no NB).
        if let Some(o) = dp
            .provider
            .as_ref()
            .and_then(|_| r.t.provider_output(dp.tunnel_key))
        {
            r.note("l2 lookup", || {
                format!(
                    "{dst} is not a port of {}: to the physical network",
                    dp.name
                )
            });
            return Ok(L2::Physical(o));
        }
        r.note("l2 lookup", || {
            format!("{dst} is not on logical switch {}: dropped", dp.name)
        });
        return Err(DropReason::NoDestination);
    };
    r.note("l2 lookup", || {
        let where_ = match &port.location {
            PortLocation::Local { iface } => format!("local, interface {iface}"),
            PortLocation::Remote { chassis, encap_ip } => {
                format!("remote, on chassis {chassis} ({encap_ip})")
            }
            PortLocation::Unbound => "unbound".to_string(),
        };
        format!(
            "{dst} -> egress logical port {} (key {}), {where_}",
            port.name, port.key
        )
    });
    Ok(L2::Port(port))
}
