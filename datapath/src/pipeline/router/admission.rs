//! Router admission: only a well-formed IPv4 packet addressed to the router port's MAC enters
//! (the L2 lookup matched that MAC). Refused, counted: other ethertypes, IP options, a bad
//! header checksum, martian source or destination addresses.

use super::super::rewrite::martian;
use super::super::{DropReason, Run};
use etherparse::{EtherType, Ipv4HeaderSlice};
use geneflow_control::compiler::{CompiledRouterPort, Router};

pub(in super::super) fn run<'a>(
    r: &mut Run<'a>,
    router: &Router,
    in_port: &CompiledRouterPort,
) -> Result<Ipv4HeaderSlice<'a>, DropReason> {
    let frame = r.frame;
    if r.key.eth_type != EtherType::IPV4.0.to_be() {
        let et = u16::from_be(r.key.eth_type);
        r.note("router admission", || {
            format!(
                "ethertype 0x{et:04x} to router {} is not routed: dropped",
                router.name
            )
        });
        return Err(DropReason::NotRoutable);
    }
    let ip = Ipv4HeaderSlice::from_slice(&frame[14..]).map_err(|_| DropReason::Malformed)?;
    if ip.ihl() != 5 {
        return Err(DropReason::IpOptions);
    }
    // etherparse does not hold the total length to the header's: a total shorter than the
    // header, or longer than the frame, is malformed.
    let total = usize::from(ip.total_len());
    if total < ip.slice().len() || total + 14 > frame.len() {
        return Err(DropReason::Malformed);
    }
    if ip.to_header().calc_header_checksum() != ip.header_checksum() {
        r.note("router admission", || {
            "bad IPv4 header checksum: dropped".into()
        });
        return Err(DropReason::IpChecksum);
    }
    if martian(ip.source_addr()) || martian(ip.destination_addr()) {
        r.note("router admission", || {
            format!(
                "martian address ({} -> {}): dropped",
                ip.source_addr(),
                ip.destination_addr()
            )
        });
        return Err(DropReason::Martian);
    }
    r.note("router admission", || {
        format!(
            "into router {} (tunnel key {}) by port {} ({})",
            router.name, router.tunnel_key, in_port.name, in_port.network
        )
    });
    Ok(ip)
}
