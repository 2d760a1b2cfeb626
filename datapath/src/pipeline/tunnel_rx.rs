//! A frame from the underlay: validate the outer IPv4/UDP and the Geneve header and options,
//! find the logical datapath (VNI) and egress port (OVN option), then run the logical switch
//! egress stages (to-lport ACL, port security) and deliver. The sending chassis already ran the
//! ingress pipeline (and any router), so nothing here routes.

use super::{acl, extract_key, port_security, DropReason, Output, Run};
use crate::wire::geneve;
use etherparse::{EtherType, Ethernet2Header, IpNumber, Ipv4Header, UdpHeader};
use geneflow_abi::{act, FlowAction, DP_KEY_HOSTED, GENEVE_PORT};
use geneflow_control::compiler::PortLocation;
use geneflow_control::model::MC_FLOOD_KEY;
use std::net::Ipv4Addr;

/// What the outer headers of a frame from the underlay said.
pub(super) struct Outer {
    pub vni: u32,
    pub meta: geneve::OvnMetadata,
    /// Where the inner frame starts.
    pub inner_off: usize,
}

pub(super) fn run(r: &mut Run, out: &mut Vec<Output>) -> Result<super::Decision, DropReason> {
    let Outer {
        vni,
        meta,
        inner_off,
    } = outer(r)?;
    r.mask.in_ifindex = u32::MAX;
    r.mask.tun_vni = u32::MAX;
    let Some(dp) = r.t.pipeline.datapaths.get(&vni) else {
        // Negative cache: dropped in XDP until this chassis hosts the VNI.
        r.dp_key = Some(DP_KEY_HOSTED);
        r.note("tunnel rx", || {
            format!("VNI {} is no datapath of this chassis: dropped", vni)
        });
        return Err(DropReason::UnknownDatapath);
    };
    r.dp_key = Some(dp.tunnel_key);
    r.mask.tun_out_port = u16::MAX;
    if meta.egress > MC_FLOOD_KEY {
        r.note("tunnel rx", || {
            format!(
                "egress key {} is no multicast group of {}: dropped",
                meta.egress, dp.name
            )
        });
        return Err(DropReason::UnknownGroup);
    }
    if meta.egress == MC_FLOOD_KEY {
        // Multicast group: deliver to every local port of the switch. The sender already
        // replicated to each chassis, so nothing goes back out to the tunnel.
        for (p, iface) in dp.local_ports() {
            if p.key == meta.ingress {
                continue;
            }
            if let Some(ix) = r.t.ifindex(iface) {
                out.push(Output::Local { ifindex: ix });
            }
        }
        r.note("deliver", || {
            format!("multicast group: to {} local ports", out.len())
        });
        return Ok(r.decision(inner_off));
    }
    let port = dp.ports.get(&meta.egress).ok_or(DropReason::UnknownPort)?;
    let PortLocation::Local { iface } = &port.location else {
        return Err(DropReason::UnknownPort);
    };
    let ix = r.t.ifindex(iface).ok_or(DropReason::UnknownPort)?;
    acl::to_lport(r, dp, port.key)?;
    port_security::egress(r, dp, port.key)?;
    out.push(Output::Local { ifindex: ix });
    r.note("deliver", || {
        format!(
            "decapsulate, to logical port {} on interface {iface}",
            port.name
        )
    });
    let mut d = r.decision(inner_off);
    d.megaflow = Some(r.megaflow(r.with_commit(FlowAction {
        kind: act::DECAP_OUTPUT,
        out_ifindex: ix,
        dp_key: dp.tunnel_key,
        ..Default::default()
    })));
    Ok(d)
}

/// The outer checks of a frame from the underlay (IPv4/UDP to this chassis's tunnel address
/// from a chassis of the NB, lengths that describe the frame, a valid Geneve header with the
/// OVN option), and its key: the inner frame's, with the VNI and egress port key.
pub(super) fn outer(r: &mut Run) -> Result<Outer, DropReason> {
    let frame = r.frame;
    let (eth, rest) = Ethernet2Header::from_slice(frame).map_err(|_| DropReason::Malformed)?;
    if eth.ether_type != EtherType::IPV4 {
        return Err(DropReason::NotOverlay);
    }
    let (ip, _) = Ipv4Header::from_slice(rest).map_err(|_| DropReason::NotOverlay)?;
    if ip.protocol != IpNumber::UDP || ip.is_fragmenting_payload() {
        return Err(DropReason::NotOverlay);
    }
    if Some(Ipv4Addr::from(ip.destination)) != r.t.pipeline.encap_ip {
        return Err(DropReason::NotOverlay);
    }
    let udp_off = 14 + ip.header_len();
    let (udp, _) = UdpHeader::from_slice(&frame[udp_off..]).map_err(|_| DropReason::NotOverlay)?;
    if udp.destination_port != GENEVE_PORT {
        return Err(DropReason::NotOverlay);
    }
    // The outer lengths must describe this frame exactly: a shorter UDP length would hide
    // bytes from the checks, a longer one reads past the packet.
    if ip.total_len as usize + 14 != frame.len()
        || udp.length as usize + ip.header_len() != ip.total_len as usize
    {
        r.note("tunnel rx", || {
            format!(
                "outer lengths (IPv4 {}, UDP {}) disagree with the {}-byte frame: dropped",
                ip.total_len,
                udp.length,
                frame.len()
            )
        });
        return Err(DropReason::BadLength);
    }
    let src = Ipv4Addr::from(ip.source);
    if !r.t.pipeline.peer_ips.contains(&src) {
        r.note("tunnel rx", || {
            format!("outer source {src} is no chassis of the NB: dropped")
        });
        return Err(DropReason::UnknownSource);
    }
    let gnv_off = udp_off + 8;
    let pkt = geneve::Packet::new_checked(&frame[gnv_off..])?;
    let repr = geneve::Repr::parse(&pkt)?;
    if repr.protocol != geneve::PROTO_ETHERNET {
        return Err(DropReason::GeneveProtocol);
    }
    let meta = repr.ovn.ok_or(DropReason::GeneveNoMetadata)?;
    let inner_off = gnv_off + pkt.header_len();
    let mut key =
        extract_key(&frame[inner_off..], r.in_ifindex).ok_or(DropReason::GeneveTruncated)?;
    key.tun_vni = repr.vni;
    key.tun_out_port = meta.egress;
    key.ct_state = r.ct_state;
    r.key = key;
    r.note("tunnel rx", || {
        format!(
            "Geneve from {}: VNI {}, ingress key {}, egress key {}",
            Ipv4Addr::from(ip.source),
            repr.vni,
            meta.ingress,
            meta.egress
        )
    });
    Ok(Outer {
        vni: repr.vni,
        meta,
        inner_off,
    })
}
