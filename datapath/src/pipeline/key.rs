//! The megaflow key of a frame, built exactly as the XDP program builds it, and its human
//! readable form.

use etherparse::{EtherType, Ethernet2Header};
use geneflow_abi::{act, arp, flag, FlowAction, FlowKey};
use geneflow_control::model::Mac;
use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr};
use std::net::Ipv4Addr;

/// Builds the L2-L4 part of the flow key exactly as the XDP program does (ARP keyed as
/// `geneflow_abi::arp` describes).
pub fn extract_key(frame: &[u8], in_ifindex: u32) -> Option<FlowKey> {
    let (eth, rest) = Ethernet2Header::from_slice(frame).ok()?;
    let mut k = FlowKey::zeroed();
    k.in_ifindex = in_ifindex;
    k.eth_dst = eth.destination;
    k.eth_src = eth.source;
    k.eth_type = eth.ether_type.0.to_be();
    if eth.ether_type == EtherType::ARP {
        // The fast path reads the 28 bytes of an Ethernet/IPv4 ARP payload; smoltcp checks
        // the same fields (hardware 1, protocol IPv4, lengths 6/4, enough bytes).
        let repr = ArpPacket::new_checked(rest)
            .ok()
            .and_then(|p| ArpRepr::parse(&p).ok());
        if let Some(ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr: sha,
            source_protocol_addr: spa,
            target_protocol_addr: tpa,
            ..
        }) = repr
        {
            let op = match operation {
                ArpOperation::Request => arp::OP_REQUEST,
                ArpOperation::Reply => arp::OP_REPLY,
                _ => return Some(k),
            };
            k.ip_src = u32::from_ne_bytes(spa.octets());
            k.ip_dst = u32::from_ne_bytes(tpa.octets());
            k.ip_proto = op
                | if spa == tpa { arp::GRATUITOUS } else { 0 }
                | if sha.0 != eth.source {
                    arp::SHA_MISMATCH
                } else {
                    0
                };
        }
        return Some(k);
    }
    if eth.ether_type != EtherType::IPV4 || rest.len() < 20 {
        return Some(k);
    }
    let vihl = rest[0];
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return Some(k);
    }
    let proto = rest[9];
    let frag = u16::from_be_bytes([rest[6], rest[7]]);
    k.ip_proto = proto;
    k.ip_src = u32::from_ne_bytes([rest[12], rest[13], rest[14], rest[15]]);
    k.ip_dst = u32::from_ne_bytes([rest[16], rest[17], rest[18], rest[19]]);
    if (proto == 6 || proto == 17) && frag & 0x1fff == 0 && rest.len() >= ihl + 4 {
        k.l4_src = u16::from_ne_bytes([rest[ihl], rest[ihl + 1]]);
        k.l4_dst = u16::from_ne_bytes([rest[ihl + 2], rest[ihl + 3]]);
    }
    // TCP flags, for conntrack only (`pad` is in no mask), as XDP keys them.
    if proto == 6 && frag & 0x1fff == 0 {
        if let Some(&flags) = rest.get(ihl + 13) {
            k.pad = flags;
        }
    }
    Some(k)
}

/// An IPv4 address stored in network byte order in a key field.
pub fn key_ip(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v.to_ne_bytes())
}

/// One megaflow as `geneflowctl flows` shows it: its match and action, its datapath and
/// generation, whether it is stale, its hits and (where known) its age.
pub fn flow_json(
    (key, mask, a): (&FlowKey, &FlowKey, &FlowAction),
    (stale, hits, age_s): (bool, u64, Option<f64>),
    ifname: &dyn Fn(u32) -> String,
) -> serde_json::Value {
    serde_json::json!({
        "match": describe_match(key, mask),
        "mask_id": key.mask_id,
        "action": describe_action(a, ifname, true),
        "datapath": a.dp_key,
        "generation": a.generation,
        "stale": stale,
        "hits": hits,
        "age_s": age_s,
    })
}

/// A megaflow's match, human readable: only the fields its mask consults.
pub fn describe_match(k: &FlowKey, mask: &FlowKey) -> String {
    let mut f = Vec::new();
    if mask.in_ifindex != 0 {
        f.push(format!("in_ifindex={}", k.in_ifindex));
    }
    if mask.tun_vni != 0 {
        f.push(format!("tun_vni={}", k.tun_vni));
    }
    if mask.tun_out_port != 0 {
        f.push(format!("tun_egress_key={}", k.tun_out_port));
    }
    if mask.eth_dst != [0; 6] {
        f.push(format!("eth_dst={}", Mac(k.eth_dst)));
    }
    if mask.eth_src != [0; 6] {
        f.push(format!("eth_src={}", Mac(k.eth_src)));
    }
    if mask.eth_type != 0 {
        f.push(format!("eth_type=0x{:04x}", u16::from_be(k.eth_type)));
    }
    let arp = k.eth_type == 0x0806u16.to_be();
    if mask.ip_src != 0 {
        let n = if arp { "arp_spa" } else { "ip_src" };
        f.push(format!("{n}={}", masked_ip(k.ip_src, mask.ip_src)));
    }
    if mask.ip_dst != 0 {
        let n = if arp { "arp_tpa" } else { "ip_dst" };
        f.push(format!("{n}={}", masked_ip(k.ip_dst, mask.ip_dst)));
    }
    if mask.ip_proto != 0 {
        let n = if arp { "arp_op" } else { "ip_proto" };
        f.push(format!("{n}={}", k.ip_proto));
    }
    if mask.l4_src != 0 {
        f.push(format!("l4_src={}", u16::from_be(k.l4_src)));
    }
    if mask.l4_dst != 0 {
        f.push(format!("l4_dst={}", u16::from_be(k.l4_dst)));
    }
    if mask.ct_state != 0 {
        let s = k.ct_state;
        let name = if s & geneflow_abi::ct::RELATED != 0 {
            "rel"
        } else if s & geneflow_abi::ct::EST == 0 {
            if s & geneflow_abi::ct::NEW != 0 {
                "new"
            } else {
                "untracked"
            }
        } else if s & geneflow_abi::ct::REPLY != 0 {
            "est+rpl"
        } else {
            "est"
        };
        f.push(format!("ct_state={name}"));
    }
    f.join(",")
}

/// A megaflow's action, human readable. `installed` adds what only an entry in the fast path
/// carries: the tunnel destination and whether its underlay next hop is cached.
pub fn describe_action(a: &FlowAction, ifname: &dyn Fn(u32) -> String, installed: bool) -> String {
    let kind = match a.kind {
        act::OUTPUT => format!("output({})", ifname(a.out_ifindex)),
        act::ENCAP if installed => format!(
            "encap_geneve(dst={},vni={},ovn=0x{:08x}{}),redirect({})",
            key_ip(a.encap_dst),
            a.vni,
            a.ovn_opt,
            if a.flags & flag::NH_CACHED != 0 {
                ",nh_cached"
            } else {
                ""
            },
            ifname(a.out_ifindex)
        ),
        act::ENCAP => format!(
            "encap_geneve(vni={},ovn=0x{:08x}),redirect({})",
            a.vni,
            a.ovn_opt,
            ifname(a.out_ifindex)
        ),
        act::DECAP_OUTPUT => format!("decap,output({})", ifname(a.out_ifindex)),
        act::DROP => format!("drop(reason {})", a.drop_reason),
        act::PASS => "pass".to_string(),
        act::ARP_REPLY => format!("arp_reply({}),tx", Mac(a.set_smac)),
        act::UNNAPT => "unsnat(nat table),route,output(by the table)".to_string(),
        k => format!("kind {k}"),
    };
    let kind = if a.vlan != 0 {
        format!("push_vlan({}),{kind}", a.vlan & 0x0fff)
    } else {
        kind
    };
    let mut nat = String::new();
    if a.flags & flag::SNAT != 0 {
        nat.push_str(&format!("ip_src:={},", key_ip(a.nat_src)));
    }
    if a.flags & flag::DNAT != 0 {
        nat.push_str(&format!("ip_dst:={},", key_ip(a.nat_dst)));
    }
    if a.flags & flag::NAPT != 0 {
        nat.push_str("snat(chassis address, nat table),");
    }
    if a.flags & flag::ROUTE != 0 {
        format!(
            "route(eth_src={},eth_dst={},dec_ttl),{nat}{kind}",
            Mac(a.set_smac),
            Mac(a.set_dmac)
        )
    } else {
        format!("{nat}{kind}")
    }
}

fn masked_ip(v: u32, m: u32) -> String {
    let len = u32::from_be(m).leading_ones();
    if len == 32 {
        key_ip(v).to_string()
    } else {
        format!("{}/{len}", key_ip(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: &[u8] = include_bytes!("../../../tests/fixtures/geneve/frame_ovn_csum.bin");

    #[test]
    fn key_extraction_matches_layout() {
        let k = extract_key(&FRAME[58..], 3).unwrap();
        assert_eq!(k.eth_type, 0x0800u16.to_be());
        assert_eq!(k.ip_src, u32::from_ne_bytes([10, 0, 0, 1]));
        assert_eq!(k.l4_dst, 5678u16.to_be());
        assert_eq!(k.ip_proto, 17);
    }

    fn arp_frame(op: u16, spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[0x0a, 0, 0, 0, 0, 1, 0x08, 0x06]);
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
        f.extend_from_slice(&op.to_be_bytes());
        f.extend_from_slice(&[0x0a, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&spa);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&tpa);
        f
    }

    #[test]
    fn arp_is_keyed_like_ovs() {
        let k = extract_key(&arp_frame(1, [10, 0, 0, 1], [10, 0, 0, 2]), 1).unwrap();
        assert_eq!(k.ip_proto, arp::OP_REQUEST);
        assert_eq!(key_ip(k.ip_dst), Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(key_ip(k.ip_src), Ipv4Addr::new(10, 0, 0, 1));
        let g = extract_key(&arp_frame(1, [10, 0, 0, 1], [10, 0, 0, 1]), 1).unwrap();
        assert_eq!(g.ip_proto, arp::OP_REQUEST | arp::GRATUITOUS);
        // Unknown opcode, wrong lengths, truncated: ip_proto stays 0 (malformed).
        assert_eq!(
            extract_key(&arp_frame(7, [1; 4], [2; 4]), 1)
                .unwrap()
                .ip_proto,
            0
        );
        let mut bad = arp_frame(1, [1; 4], [2; 4]);
        bad[18] = 8;
        assert_eq!(extract_key(&bad, 1).unwrap().ip_proto, 0);
        let short = arp_frame(1, [1; 4], [2; 4]);
        assert_eq!(extract_key(&short[..41], 1).unwrap().ip_proto, 0);
    }
}
