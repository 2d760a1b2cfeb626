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
use super::rewrite::{dec_ttl, set_eth};
use super::{icmp, AnswerKind, Decision, DropReason, Output, Run};
use geneflow_control::compiler::{Datapath, PortLocation, RouterAttach};

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
    dnat::run(r, router)?;
    let Some(route) = routing::run(r, router, &ip) else {
        return icmp::error(r, AnswerKind::IcmpNetUnreachable, in_port, &ip, out, buf);
    };
    let Some(hop) = next_hop::run(r, router, route, &ip)? else {
        return icmp::error(r, AnswerKind::IcmpHostUnreachable, in_port, &ip, out, buf);
    };
    snat::run(r, router)?;
    let (len, max) = (r.frame.len(), r.t.max_inner_len());
    if matches!(hop.port.location, PortLocation::Remote { .. }) && len as u32 > max {
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
    set_eth(buf, hop.out.mac.0, hop.port.mac.0);
    dec_ttl(&mut buf[14..34]);
    r.note("rewrite", || {
        format!(
            "eth src {} dst {}, ttl {} -> {}",
            hop.out.mac,
            hop.port.mac,
            ip.ttl(),
            ip.ttl() - 1
        )
    });
    let routed = Routed {
        smac: hop.out.mac,
        dmac: hop.port.mac,
    };
    let mut d = output::to_port(r, hop.dp, hop.out.key, hop.port, out, Some(routed))?;
    d.rewritten = true;
    // The entry is keyed on the ingress switch's port: it belongs to that switch's generation
    // (whose fingerprint covers the router and the switches behind it).
    if let Some(m) = d.megaflow.as_mut() {
        m.action.dp_key = dp_in.tunnel_key;
    }
    Ok(d)
}
