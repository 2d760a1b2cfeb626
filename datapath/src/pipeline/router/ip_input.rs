//! Router IP input: packets for the router itself (an echo request to any of its addresses is
//! answered; anything else is dropped, counted) and packets whose TTL runs out here (ICMP time
//! exceeded, so traceroute shows the router hop).

use super::super::{icmp, AnswerKind, Decision, DropReason, Output, Run};
use etherparse::Ipv4HeaderSlice;
use geneflow_control::compiler::{CompiledRouterPort, Router};

pub(in super::super) fn run(
    r: &mut Run,
    router: &Router,
    in_port: &CompiledRouterPort,
    ip: &Ipv4HeaderSlice,
    out: &mut Vec<Output>,
    buf: &mut Vec<u8>,
) -> Result<Option<Decision>, DropReason> {
    // Every later decision depends on the exact destination.
    r.mask.ip_dst = u32::MAX;
    let dst = ip.destination_addr();
    if router.port_owning(dst).is_some() {
        return icmp::echo_reply(r, dst, in_port, ip, out, buf).map(Some);
    }
    if ip.ttl() <= 1 {
        r.note("ip input", || format!("ttl {} expires here", ip.ttl()));
        return icmp::error(r, AnswerKind::IcmpTimeExceeded, in_port, ip, out, buf).map(Some);
    }
    r.note("ip input", || {
        format!("not for the router, ttl {}: routed", ip.ttl())
    });
    Ok(None)
}
