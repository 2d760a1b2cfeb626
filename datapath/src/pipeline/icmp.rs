//! ICMP the router sends itself (slow path, rate limited per source by the forwarder): echo
//! replies for its own addresses and the errors a router owes (time exceeded, network/host
//! unreachable, fragmentation needed with the overlay's MTU for path MTU discovery).

use super::{AnswerKind, Decision, DropReason, Output, Run};
use etherparse::{icmpv4, IcmpEchoHeader, Icmpv4Slice, Icmpv4Type, Ipv4HeaderSlice, PacketBuilder};
use geneflow_control::compiler::CompiledRouterPort;

/// ICMP types that are errors: never answered with another error (RFC 1122 3.2.2).
fn is_error(t: u8) -> bool {
    matches!(t, 3 | 4 | 5 | 11 | 12)
}

fn sent(r: &Run, kind: AnswerKind, to: std::net::Ipv4Addr, out: &mut Vec<Output>) -> Decision {
    out.push(r.back_out());
    r.answered(kind, to)
}

/// An ICMP error about the IPv4 packet `ip` (header at `r.frame[14..]`), from router port
/// `from` back to the sender. Carries the offending header and 8 bytes of its payload.
pub(super) fn error(
    r: &mut Run,
    kind: AnswerKind,
    from: &CompiledRouterPort,
    ip: &Ipv4HeaderSlice,
    out: &mut Vec<Output>,
    buf: &mut Vec<u8>,
) -> Result<Decision, DropReason> {
    let t = match kind {
        AnswerKind::IcmpTimeExceeded => {
            Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit)
        }
        AnswerKind::IcmpNetUnreachable => {
            Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Network)
        }
        AnswerKind::IcmpHostUnreachable => {
            Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Host)
        }
        AnswerKind::IcmpFragNeeded => {
            // The largest IPv4 packet the overlay carries: the inner frame less its Ethernet.
            let mtu = (r.t.max_inner_len() - 14) as u16;
            Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::FragmentationNeeded {
                next_hop_mtu: mtu,
            })
        }
        AnswerKind::ArpReply
        | AnswerKind::ArpRequest
        | AnswerKind::IcmpEchoReply
        | AnswerKind::Dhcp => return Err(DropReason::Malformed),
    };
    let hdr = ip.slice();
    let body = &r.frame[14 + hdr.len()..];
    if ip.protocol() == etherparse::IpNumber::ICMP && body.first().is_some_and(|t| is_error(*t)) {
        r.note("icmp", || {
            "no ICMP error about an ICMP error: dropped".into()
        });
        return Err(DropReason::NoRoute);
    }
    if ip.fragments_offset().value() != 0 {
        r.note("icmp", || {
            "no ICMP error about a non-first fragment: dropped".into()
        });
        return Err(DropReason::NoRoute);
    }
    let quoted = &r.frame[14..14 + hdr.len() + body.len().min(8)];
    let src_mac: [u8; 6] = r.frame[6..12]
        .try_into()
        .map_err(|_| DropReason::Malformed)?;
    buf.clear();
    PacketBuilder::ethernet2(from.mac.0, src_mac)
        .ipv4(from.ip().octets(), ip.source(), 64)
        .icmpv4(t)
        .write(buf, quoted)
        .map_err(|_| DropReason::Malformed)?;
    r.note("icmp", || {
        format!("{kind:?} from {} to {}", from.ip(), ip.source_addr())
    });
    Ok(sent(r, kind, ip.source_addr(), out))
}

/// The echo reply to an echo request for one of the router's addresses (`owned`).
pub(super) fn echo_reply(
    r: &mut Run,
    owned: std::net::Ipv4Addr,
    via: &CompiledRouterPort,
    ip: &Ipv4HeaderSlice,
    out: &mut Vec<Output>,
    buf: &mut Vec<u8>,
) -> Result<Decision, DropReason> {
    let body = &r.frame[14 + ip.slice().len()..14 + usize::from(ip.total_len())];
    let echo = (ip.protocol() == etherparse::IpNumber::ICMP && !ip.is_fragmenting_payload())
        .then(|| Icmpv4Slice::from_slice(body).ok())
        .flatten();
    let Some(Icmpv4Type::EchoRequest(IcmpEchoHeader { id, seq })) =
        echo.as_ref().map(|e| e.icmp_type())
    else {
        r.note("ip input", || {
            format!("for the router ({owned}) but not an echo request: dropped")
        });
        return Err(DropReason::ToRouter);
    };
    let payload = echo.as_ref().map(|e| e.payload()).unwrap_or(&[]);
    let src_mac: [u8; 6] = r.frame[6..12]
        .try_into()
        .map_err(|_| DropReason::Malformed)?;
    buf.clear();
    PacketBuilder::ethernet2(via.mac.0, src_mac)
        .ipv4(owned.octets(), ip.source(), 64)
        .icmpv4_echo_reply(id, seq)
        .write(buf, payload)
        .map_err(|_| DropReason::Malformed)?;
    r.note("ip input", || {
        format!("echo request for the router's {owned}: echo reply")
    });
    Ok(sent(r, AnswerKind::IcmpEchoReply, ip.source_addr(), out))
}
