//! The logical router, distributed: it runs on the chassis of the sending VM, so a routed packet
//! leaves that chassis already routed (TTL decremented, source MAC = the router port, destination
//! MAC = the destination VM's, known from the NB: no ARP on the overlay) in the destination
//! switch's VNI with its egress port key, as OVN does. Stages: admission -> ip_input -> dnat ->
//! routing -> next_hop -> snat -> output into the next switch. One router hop per packet: a
//! next hop that is itself a router port is not followed (counted `drop_no_route`).

mod admission;
mod dnat;
mod ip_input;
mod next_hop;
mod routing;
mod snat;

use super::output::{self, Routed};
use super::rewrite::{arp_frame, dec_ttl, nat, set_eth};
use super::{icmp, AnswerKind, Decision, DropReason, Output, Run};
use geneflow_abi::{act, flag, FlowAction};
use geneflow_control::compiler::{Datapath, PortLocation, RouterAttach};
use geneflow_control::model::Mac;
use next_hop::Hop;
use std::net::Ipv4Addr;

pub(super) fn run<'a>(
    r: &mut Run<'a>,
    dp_in: &Datapath,
    att: RouterAttach,
    out: &mut Vec<Output>,
    buf: &mut Vec<u8>,
) -> Result<Decision, DropReason> {
    let t = r.t;
    let router = t
        .pipeline
        .routers
        .get(&att.router)
        .ok_or(DropReason::NoRoute)?;
    let in_port = router
        .ports
        .iter()
        .find(|p| p.switch == dp_in.tunnel_key && p.key == att.port_key)
        .ok_or(DropReason::NoRoute)?;
    let ip = admission::run(r, router, in_port)?;
    if let Some(d) = ip_input::run(r, router, in_port, &ip, out, buf)? {
        return Ok(d);
    }
    let dst = dnat::run(r, router, in_port, &ip)?;
    let Some(route) = routing::run(r, router, dst) else {
        return icmp::error(r, AnswerKind::IcmpNetUnreachable, in_port, &ip, out, buf);
    };
    let Some(hop) = next_hop::run(r, router, route, dst)? else {
        return icmp::error(r, AnswerKind::IcmpHostUnreachable, in_port, &ip, out, buf);
    };
    let out_port = match &hop {
        Hop::Port { out: p, .. }
        | Hop::External { out: p, .. }
        | Hop::Unresolved { out: p, .. } => *p,
    };
    let fip_mac = snat::run(r, router, in_port, out_port, ip.source_addr())?;
    let (dp, smac, dmac, port) = match hop {
        Hop::Port { dp, port, out: p } => (dp, p.mac, port.mac, Some(port)),
        Hop::External { dp, mac, out: p } => (dp, fip_mac.unwrap_or(p.mac), mac, None),
        Hop::Unresolved { dp, nh, out: p } => {
            let (sha, spa) = match (fip_mac, r.nat_src.or(r.napt)) {
                (Some(m), Some(a)) => (m, a),
                _ => (p.mac, p.ip()),
            };
            return arp_request(r, dp.tunnel_key, (sha, spa), nh, out, buf);
        }
    };
    let (len, max) = (r.frame.len(), r.t.max_inner_len());
    let tunnelled = port.is_some_and(|p| matches!(p.location, PortLocation::Remote { .. }))
        && dp.provider.is_none();
    if tunnelled && len as u32 > max {
        if ip.dont_fragment() {
            r.note("mtu", || {
                format!("{len} bytes with DF exceed the {max} the overlay carries")
            });
            return icmp::error(r, AnswerKind::IcmpFragNeeded, in_port, &ip, out, buf);
        }
        r.note("mtu", || {
            "too big for the overlay, DF clear: dropped".into()
        });
        return Err(DropReason::TooBig);
    }
    // The routed copy the slow path sends; the fast path repeats the same rewrite.
    buf.clear();
    buf.extend_from_slice(r.frame);
    set_eth(buf, smac.0, dmac.0);
    dec_ttl(&mut buf[14..34]);
    if r.nat_src.is_some() || r.nat_dst.is_some() {
        nat(buf, r.nat_src, r.nat_dst);
    }
    let (ns, nd) = (r.nat_src, r.nat_dst);
    r.note("rewrite", || {
        format!(
            "eth src {smac} dst {dmac}, ttl {} -> {}{}{}",
            ip.ttl(),
            ip.ttl() - 1,
            ns.map(|a| format!(", ip src := {a}")).unwrap_or_default(),
            nd.map(|a| format!(", ip dst := {a}")).unwrap_or_default(),
        )
    });
    let routed = Routed { smac, dmac };
    let mut d = match port {
        Some(port) => output::to_port(r, dp, out_port.key, port, out, Some(routed))?,
        None => {
            let o =
                r.t.provider_output(dp.tunnel_key)
                    .ok_or(DropReason::NoDestination)?;
            let Output::Provider { ifindex: ix, vlan } = o else {
                return Err(DropReason::NoDestination);
            };
            out.push(o);
            r.note("output", || {
                format!("to the physical network of switch {}", dp.name)
            });
            let mut a = FlowAction {
                kind: act::OUTPUT,
                out_ifindex: ix,
                dp_key: dp.tunnel_key,
                flags: flag::ROUTE,
                set_smac: smac.0,
                set_dmac: dmac.0,
                vlan,
                ..Default::default()
            };
            a = r.with_commit(a);
            let mut d = r.decision(0);
            d.megaflow = Some(r.megaflow(a));
            d
        }
    };
    d.rewritten = true;
    // The entry is keyed on the ingress switch's port: it belongs to that switch's generation
    // (whose fingerprint covers the router and the switches behind it).
    if let Some(m) = d.megaflow.as_mut() {
        m.action.dp_key = dp_in.tunnel_key;
        if let Some(a) = r.nat_src {
            m.action.flags |= flag::SNAT;
            m.action.nat_src = u32::from_ne_bytes(a.octets());
        }
        if let Some(a) = r.nat_dst {
            m.action.flags |= flag::DNAT;
            m.action.nat_dst = u32::from_ne_bytes(a.octets());
        }
        if r.napt.is_some() {
            m.action.flags |= flag::NAPT;
        }
    }
    if let Some(external) = r.napt {
        d.napt = Some(super::Napt::Out {
            external,
            ifindex: r.in_ifindex,
            smac: in_port.mac.0,
            dmac: r.key.eth_src,
        });
    }
    Ok(d)
}

/// Asks the provider network of switch `dp_key` who has `nh`, from `sender` (MAC, address);
/// the packet that needed it is dropped. Rate limited per target by the forwarder.
fn arp_request(
    r: &mut Run,
    dp_key: u32,
    sender: (Mac, Ipv4Addr),
    nh: Ipv4Addr,
    out: &mut Vec<Output>,
    buf: &mut Vec<u8>,
) -> Result<Decision, DropReason> {
    let o =
        r.t.provider_output(dp_key)
            .ok_or(DropReason::NoDestination)?;
    arp_frame(buf, sender.0, sender.1, nh, false);
    out.push(o);
    Ok(r.answered(AnswerKind::ArpRequest, nh))
}
