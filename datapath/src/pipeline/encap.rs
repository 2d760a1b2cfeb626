//! Geneve encapsulation as the slow path emits it (the XDP program writes the same bytes; a
//! unit test holds both to scapy's).

use crate::wire::geneve::{self, OvnMetadata};
use etherparse::{EtherType, Ethernet2Header, IpNumber, Ipv4Header, UdpHeader};
use geneflow_abi::{udp_source_port, ENCAP_OVERHEAD, GENEVE_PORT};
use std::net::Ipv4Addr;

/// Outer header fields of one encapsulation.
#[derive(Debug, Clone, Copy)]
pub struct EncapParams {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    pub sport: u16,
    pub vni: u32,
    pub meta: OvnMetadata,
    pub udp_csum: bool,
}

impl EncapParams {
    pub fn sport_for(hash: u32) -> u16 {
        udp_source_port(hash)
    }
}

/// Writes `inner` encapsulated in Ethernet/IPv4/UDP/Geneve(+OVN option) into `buf` and returns
/// the frame length, or `None` if `buf` is too small.
pub fn emit_encap(buf: &mut [u8], inner: &[u8], p: &EncapParams) -> Option<usize> {
    let total = inner.len() + ENCAP_OVERHEAD as usize;
    if buf.len() < total {
        return None;
    }
    let opt = p.meta.to_option_bytes();
    let repr = geneve::Repr {
        oam: false,
        critical: true,
        protocol: geneve::PROTO_ETHERNET,
        vni: p.vni,
        options: &opt,
        ovn: Some(p.meta),
    };
    let gnv_len = repr.buffer_len();
    repr.emit(&mut geneve::Packet::new_unchecked(
        &mut buf[42..42 + gnv_len],
    ));
    buf[42 + gnv_len..total].copy_from_slice(inner);
    let udp_payload_len = total - 42;
    let mut ip = Ipv4Header::new(
        (udp_payload_len + 8) as u16,
        64,
        IpNumber::UDP,
        p.src_ip.octets(),
        p.dst_ip.octets(),
    )
    .ok()?;
    ip.dont_fragment = true;
    ip.header_checksum = ip.calc_header_checksum();
    let mut udp = UdpHeader {
        source_port: p.sport,
        destination_port: GENEVE_PORT,
        length: (udp_payload_len + 8) as u16,
        checksum: 0,
    };
    if p.udp_csum {
        udp.checksum = udp.calc_checksum_ipv4(&ip, &buf[42..total]).ok()?;
    }
    let eth = Ethernet2Header {
        source: p.src_mac,
        destination: p.dst_mac,
        ether_type: EtherType::IPV4,
    };
    buf[0..14].copy_from_slice(&eth.to_bytes());
    buf[14..34].copy_from_slice(&ip.to_bytes());
    buf[34..42].copy_from_slice(&udp.to_bytes());
    Some(total)
}
