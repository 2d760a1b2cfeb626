//! Provider network ingress (OVN's localnet port): a plain Ethernet frame from this chassis'
//! interface on a physical network enters the provider switch bridged to it.
//!
//! - ARP: the sender is learned (OVN's MAC bindings: the next hops of traffic routed out to
//!   the network); a request for a floating IP bound here is answered with its MAC (in XDP
//!   after the first), a reply or gratuitous ARP is taken, other requests go to the local
//!   ports of the switch (a VM on the provider network answers for itself).
//! - To a floating IP's MAC (bound here): into its router through the gateway port, where
//!   DNAT maps it to the fixed IP.
//! - To a local port's MAC: delivered; broadcast: to the switch's local ports. Anything else
//!   is dropped: a chassis never forwards between the physical network and the overlay by
//!   MAC alone, and never floods the physical network's unknown unicast to its VMs.

use super::key::key_ip;
use super::{Decision, DropReason, Learn, Output, Run};
use etherparse::EtherType;
use geneflow_abi::{act, arp, FlowAction};
use geneflow_control::compiler::{PortLocation, RouterAttach};
use geneflow_control::model::Mac;

const STAGE: &str = "provider in";

pub(super) fn ingress(
    r: &mut Run,
    dp_key: u32,
    out: &mut Vec<Output>,
    buf: &mut Vec<u8>,
) -> Result<Decision, DropReason> {
    let t = r.t;
    r.key = super::extract_key(r.frame, r.in_ifindex).ok_or(DropReason::Malformed)?;
    r.key.ct_state = r.ct_state;
    // The VLAN the frame came on (XDP took the tag off), as XDP keys it.
    r.key.tun_out_port = r.vlan;
    r.mask.in_ifindex = u32::MAX;
    r.mask.tun_out_port = u16::MAX;
    let dp = t
        .pipeline
        .datapaths
        .get(&dp_key)
        .ok_or(DropReason::UnknownDatapath)?;
    r.dp_key = Some(dp.tunnel_key);
    r.note(STAGE, || {
        format!(
            "from the physical network {} (switch {}, tunnel key {})",
            dp.provider.as_deref().unwrap_or("?"),
            dp.name,
            dp.tunnel_key
        )
    });
    r.mask.eth_type = u16::MAX;
    if r.key.eth_type == EtherType::ARP.0.to_be() {
        return arp_in(r, dp_key, out, buf);
    }
    r.mask.eth_dst = [0xff; 6];
    let dst = Mac(r.key.eth_dst);
    // A floating IP bound here: into its router by the gateway port.
    let fip_router = t.pipeline.routers.values().find_map(|rt| {
        let gw = &rt.ports[rt.gateway?];
        (gw.switch == dp_key && rt.fips.iter().any(|f| f.local && f.mac == dst)).then_some(
            RouterAttach {
                router: rt.tunnel_key,
                port_key: gw.key,
            },
        )
    });
    if let Some(att) = fip_router {
        r.note(STAGE, || format!("{dst} is a floating IP bound here"));
        return super::router::run(r, dp, att, out, buf);
    }
    // This chassis' external address (default SNAT): replies go back by the NAT table.
    if let Some(ext) = t.pipeline.external_ip {
        if dst == geneflow_control::nat::fip_mac(ext) {
            r.mask.ip_dst = u32::MAX;
            if r.key.eth_type != EtherType::IPV4.0.to_be() || key_ip(r.key.ip_dst) != ext {
                r.note(STAGE, || {
                    format!("to this chassis' SNAT MAC but not to {ext}: dropped")
                });
                return Err(DropReason::NoNat);
            }
            r.note(STAGE, || {
                format!("to this chassis' SNAT address {ext}: back by the NAT table")
            });
            let mut d = r.decision(0);
            d.napt = Some(super::Napt::In);
            d.megaflow = Some(r.megaflow(FlowAction {
                kind: act::UNNAPT,
                dp_key,
                ..Default::default()
            }));
            return Ok(d);
        }
    }
    deliver(r, dp_key, out)
}

/// By destination MAC to the switch's ports bound here: broadcast to all of them, unicast to
/// its owner; anything else is dropped.
fn deliver(r: &mut Run, dp_key: u32, out: &mut Vec<Output>) -> Result<Decision, DropReason> {
    let t = r.t;
    let dp = t
        .pipeline
        .datapaths
        .get(&dp_key)
        .ok_or(DropReason::UnknownDatapath)?;
    r.mask.eth_dst = [0xff; 6];
    let dst = Mac(r.key.eth_dst);
    if dst.is_multicast() {
        for (_, iface) in dp.local_ports() {
            if let Some(ix) = t.ifindex(iface) {
                out.push(Output::Local { ifindex: ix });
            }
        }
        r.note(STAGE, || {
            format!("{dst}: to the switch's {} local ports", out.len())
        });
        return Ok(r.decision(0));
    }
    let local = dp
        .macs
        .get(&dst)
        .and_then(|k| dp.ports.get(k))
        .filter(|p| matches!(p.location, PortLocation::Local { .. }));
    match local {
        Some(p) => super::output::to_port(r, dp, 0, p, out, None),
        None => {
            r.note(STAGE, || format!("{dst} is no port bound here: dropped"));
            Err(DropReason::NoDestination)
        }
    }
}

fn arp_in(
    r: &mut Run,
    dp_key: u32,
    out: &mut Vec<Output>,
    buf: &mut Vec<u8>,
) -> Result<Decision, DropReason> {
    let t = r.t;
    r.mask.ip_proto = u8::MAX;
    r.mask.ip_dst = u32::MAX;
    let op = r.key.ip_proto;
    if op == 0 || op & arp::SHA_MISMATCH != 0 {
        r.note(STAGE, || "malformed or inconsistent ARP: dropped".into());
        return Err(DropReason::MalformedArp);
    }
    let (spa, tpa) = (key_ip(r.key.ip_src), key_ip(r.key.ip_dst));
    let sha = r.key.eth_src;
    // What is learned, from a subnet of a router's gateway port there: the sender of a
    // request this chassis answers (a host about to talk to a floating IP or the SNAT
    // address), a reply to one of its addresses (which the forwarder keeps only if it asked
    // that sender), and fresh news of a neighbour already known. Nothing else: a host
    // spraying ARP cannot grow the table or churn the megaflows.
    let answered = t.pipeline.external_ip == Some(tpa)
        || t.pipeline.routers.values().any(|rt| {
            rt.gateway.is_some_and(|g| {
                rt.ports[g].switch == dp_key
                    && rt.fips.iter().any(|f| f.local && f.external_ip == tpa)
            })
        });
    let to_us = answered
        || t.pipeline.routers.values().any(|rt| {
            rt.gateway
                .is_some_and(|g| rt.ports[g].switch == dp_key && rt.ports[g].ip() == tpa)
        });
    let reply = op & !arp::GRATUITOUS == arp::OP_REPLY;
    let on_subnet = t.pipeline.routers.values().any(|rt| {
        rt.gateway.is_some_and(|g| {
            let gw = &rt.ports[g];
            gw.switch == dp_key && gw.network.contains(spa)
        })
    });
    let known = t.ext_neigh().contains_key(&(dp_key, spa));
    let learn = (!spa.is_unspecified()
        && on_subnet
        && ((answered && op == arp::OP_REQUEST) || (reply && to_us) || known))
        .then_some(Learn {
            dp: dp_key,
            ip: spa,
            mac: sha,
            solicited: reply && to_us && !known,
        });
    let fip = t.pipeline.routers.values().find_map(|rt| {
        let gw = &rt.ports[rt.gateway?];
        (gw.switch == dp_key)
            .then(|| rt.local_fip_external(tpa))
            .flatten()
    });
    if op == arp::OP_REQUEST {
        if let Some(ext) = t.pipeline.external_ip.filter(|e| *e == tpa) {
            let mac = geneflow_control::nat::fip_mac(ext);
            let mut d = super::arp_responder::reply(r, mac, dp_key, out, buf)?;
            r.note(STAGE, || {
                format!("ARP for this chassis' SNAT address {tpa}: answered")
            });
            d.learn = learn;
            return Ok(d);
        }
        if let Some(f) = fip {
            let mut d = super::arp_responder::reply(r, f.mac, dp_key, out, buf)?;
            r.note(STAGE, || {
                format!("ARP for floating IP {tpa} (bound here): answered")
            });
            d.learn = learn;
            return Ok(d);
        }
    }
    // Anything else teaches, and goes on by its destination MAC like any frame (a request
    // to the switch's local ports, a reply to the VM that asked).
    r.note(STAGE, || {
        format!(
            "ARP {} from {spa} ({}): learned",
            if op & !arp::GRATUITOUS == arp::OP_REQUEST {
                "request"
            } else {
                "reply"
            },
            Mac(sha)
        )
    });
    // A reply to this chassis' own request (for a next hop) is for no port: taken.
    let mut d = match deliver(r, dp_key, out) {
        Ok(d) => d,
        Err(DropReason::NoDestination) => r.decision(0),
        Err(e) => return Err(e),
    };
    d.learn = learn;
    Ok(d)
}
