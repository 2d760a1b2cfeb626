//! The header rewrites a router makes, byte for byte as the XDP program makes them
//! (`flag::ROUTE`), and the address classes a router refuses.

use geneflow_control::model::Mac;
use std::net::Ipv4Addr;

/// An address no router forwards from or to: this network, loopback, link-local, multicast,
/// reserved and broadcast (the fast path checks the same list on the source; destinations are
/// checked by the slow path, which installs no entry for them).
pub fn martian(a: Ipv4Addr) -> bool {
    let a = u32::from(a);
    let top = a >> 24;
    top == 0 || top == 127 || top >= 224 || a >> 16 == 0xa9fe
}

/// Sets the Ethernet addresses of `frame`.
pub fn set_eth(frame: &mut [u8], src: [u8; 6], dst: [u8; 6]) {
    frame[0..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
}

/// TTL - 1 in the IPv4 header `ip` with the checksum updated incrementally (RFC 1624, as
/// Linux's `ip_decrease_ttl`): the TTL/protocol word drops by 0x0100, so the checksum grows by
/// 0x0100 with end-around carry. The caller checked TTL > 1.
pub fn dec_ttl(ip: &mut [u8]) {
    ip[8] -= 1;
    let c = u32::from(u16::from_be_bytes([ip[10], ip[11]])) + 0x0100;
    let c = c + u32::from(c >= 0xffff);
    ip[10..12].copy_from_slice(&(c as u16).to_be_bytes());
}

/// One-to-one NAT of the IPv4 packet in `frame` (20-byte header, checked by the router): the
/// same rewrite as the XDP program's `flag::SNAT`/`flag::DNAT`, checksums updated
/// incrementally with the same function.
pub fn nat(frame: &mut [u8], src: Option<Ipv4Addr>, dst: Option<Ipv4Addr>) {
    let rd = |f: &[u8], o: usize| u32::from_ne_bytes([f[o], f[o + 1], f[o + 2], f[o + 3]]);
    let rd16 = |f: &[u8], o: usize| u16::from_ne_bytes([f[o], f[o + 1]]);
    let proto = frame[23];
    let first = u16::from_be_bytes([frame[20], frame[21]]) & 0x1fff == 0;
    let l4 = match proto {
        6 if first => Some(34 + 16),
        17 if first => Some(34 + 6),
        _ => None,
    }
    .filter(|o| o + 2 <= frame.len());
    let udp_none = proto == 17 && l4.is_some_and(|o| rd16(frame, o) == 0);
    for (at, new) in [(26usize, src), (30usize, dst)] {
        let Some(new) = new else { continue };
        let (old, new) = (rd(frame, at), u32::from_ne_bytes(new.octets()));
        frame[at..at + 4].copy_from_slice(&new.to_ne_bytes());
        let c = geneflow_abi::csum_replace4(rd16(frame, 24), old, new);
        frame[24..26].copy_from_slice(&c.to_ne_bytes());
        if let (Some(o), false) = (l4, udp_none) {
            let mut c = geneflow_abi::csum_replace4(rd16(frame, o), old, new);
            if proto == 17 && c == 0 {
                c = 0xffff;
            }
            frame[o..o + 2].copy_from_slice(&c.to_ne_bytes());
        }
    }
}

/// The default-SNAT tuple of the IPv4 packet in `frame` (20-byte header): protocol, and the
/// ports, or for ICMP the echo id on the VM's side (`(id, 0)` for an echo request, `(0, id)`
/// for an echo reply), as `geneflow_abi::nat` keys them; `None` for anything else.
pub fn napt_ports(frame: &[u8], out: bool) -> Option<(u8, u16, u16)> {
    let proto = *frame.get(23)?;
    let first = u16::from_be_bytes([*frame.get(20)?, *frame.get(21)?]) & 0x1fff == 0;
    // The whole L4 header `napt` rewrites must be there (TCP: up to its checksum).
    let need = match proto {
        6 => 34 + 20,
        _ => 34 + 8,
    };
    if frame.len() < need || !first {
        return None;
    }
    let rd = |o: usize| u16::from_ne_bytes([frame[o], frame[o + 1]]);
    match proto {
        6 | 17 => Some((proto, rd(34), rd(36))),
        1 => match (out, frame[34]) {
            (true, 8) => Some((1, rd(38), 0)),
            (false, 0) => Some((1, 0, rd(38))),
            _ => None,
        },
        _ => None,
    }
}

/// Default SNAT rewrite, as the XDP program's: the source (`out`) or destination address and
/// port (ICMP: the echo id) := `addr`/`port` (network order), IPv4 and L4 checksums updated
/// incrementally (a zero UDP checksum stays zero).
pub fn napt(frame: &mut [u8], out: bool, addr: u32, port: u16) -> Option<()> {
    let rd16 = |f: &[u8], o: usize| u16::from_ne_bytes([f[o], f[o + 1]]);
    let proto = frame[23];
    let (addr_at, port_at, csum_at) = match (proto, out) {
        (1, _) => (if out { 26 } else { 30 }, 38, 36),
        (6, true) => (26, 34, 50),
        (6, false) => (30, 36, 50),
        (_, true) => (26, 34, 40),
        (_, false) => (30, 36, 40),
    };
    if frame.len() < (port_at + 2).max(csum_at + 2) {
        return None;
    }
    let old_addr = u32::from_ne_bytes([
        frame[addr_at],
        frame[addr_at + 1],
        frame[addr_at + 2],
        frame[addr_at + 3],
    ]);
    let old_port = rd16(frame, port_at);
    let ipc = geneflow_abi::csum_replace4(rd16(frame, 24), old_addr, addr);
    frame[24..26].copy_from_slice(&ipc.to_ne_bytes());
    frame[addr_at..addr_at + 4].copy_from_slice(&addr.to_ne_bytes());
    frame[port_at..port_at + 2].copy_from_slice(&port.to_ne_bytes());
    let c = rd16(frame, csum_at);
    if proto == 17 && c == 0 {
        return Some(());
    }
    let mut c = if proto == 1 {
        c
    } else {
        geneflow_abi::csum_replace4(c, old_addr, addr)
    };
    c = geneflow_abi::csum_replace2(c, old_port, port);
    if proto == 17 && c == 0 {
        c = 0xffff;
    }
    frame[csum_at..csum_at + 2].copy_from_slice(&c.to_ne_bytes());
    Some(())
}

/// An Ethernet/IPv4 ARP frame into `buf`: a request from `sha`/`spa` for `tpa`, broadcast, or,
/// with `gratuitous`, the announcement that `spa` is at `sha` (a request for itself).
pub fn arp_frame(buf: &mut Vec<u8>, sha: Mac, spa: Ipv4Addr, tpa: Ipv4Addr, gratuitous: bool) {
    use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr, EthernetAddress};
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(sha.0),
        source_protocol_addr: spa,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: if gratuitous { spa } else { tpa },
    };
    buf.clear();
    buf.extend_from_slice(&[0xff; 6]);
    buf.extend_from_slice(&sha.0);
    buf.extend_from_slice(&[0x08, 0x06]);
    buf.resize(14 + repr.buffer_len(), 0);
    repr.emit(&mut ArpPacket::new_unchecked(&mut buf[14..]));
}

/// `frame` with the 802.1Q tag of `vlan` (`VLAN_PRESENT | vid`) after its MACs, into `buf`;
/// its length, or `None` if it does not fit.
pub fn push_vlan(buf: &mut [u8], frame: &[u8], vlan: u16) -> Option<usize> {
    let len = frame.len() + 4;
    if frame.len() < 12 || len > buf.len() {
        return None;
    }
    buf[..12].copy_from_slice(&frame[..12]);
    buf[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
    buf[14..16].copy_from_slice(&(vlan & 0x0fff).to_be_bytes());
    buf[16..len].copy_from_slice(&frame[12..]);
    Some(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{IpNumber, Ipv4Header};

    #[test]
    fn incremental_ttl_matches_a_full_checksum() {
        for ttl in 2..=255u8 {
            for seed in [0u8, 1, 0x7f, 0xfe, 0xff] {
                let mut h = Ipv4Header::new(
                    100 + u16::from(seed),
                    ttl,
                    IpNumber::UDP,
                    [10, seed, 0, 1],
                    [10, 1, seed, 2],
                )
                .unwrap();
                h.identification = u16::from(seed) * 257;
                h.header_checksum = h.calc_header_checksum();
                let mut b = h.to_bytes();
                dec_ttl(&mut b);
                let (back, _) = Ipv4Header::from_slice(&b).unwrap();
                assert_eq!(back.time_to_live, ttl - 1);
                assert_eq!(
                    back.header_checksum,
                    back.calc_header_checksum(),
                    "ttl {ttl}"
                );
            }
        }
    }

    /// Incremental NAT checksums equal full recomputations (etherparse) for TCP, UDP, UDP
    /// without checksum, ICMP and a non-first fragment.
    #[test]
    fn incremental_nat_matches_full_checksums() {
        use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
        let (s, d) = ([10, 0, 0, 5], [172, 24, 4, 100]);
        let payload = [0xa5u8; 37];
        let build = |kind: u8| {
            let b = PacketBuilder::ethernet2([2; 6], [4; 6]).ipv4(s, d, 64);
            let mut f = Vec::new();
            match kind {
                0 => b.tcp(40000, 80, 7, 1000).write(&mut f, &payload).unwrap(),
                1 | 2 => b.udp(40000, 53).write(&mut f, &payload).unwrap(),
                _ => b.icmpv4_echo_request(9, 1).write(&mut f, &payload).unwrap(),
            }
            if kind == 2 {
                f[40] = 0;
                f[41] = 0;
            }
            f
        };
        let fip: Ipv4Addr = "172.24.4.51".parse().unwrap();
        let fixed: Ipv4Addr = "10.0.0.77".parse().unwrap();
        for kind in 0..4u8 {
            let mut f = build(kind);
            nat(&mut f, Some(fip), Some(fixed));
            let p = SlicedPacket::from_ethernet(&f).unwrap();
            let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
                panic!()
            };
            let h = ip.header().to_header();
            assert_eq!(h.source, fip.octets());
            assert_eq!(h.destination, fixed.octets());
            assert_eq!(h.header_checksum, h.calc_header_checksum(), "kind {kind}");
            match p.transport.unwrap() {
                TransportSlice::Tcp(t) => assert_eq!(
                    t.checksum(),
                    t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap()
                ),
                TransportSlice::Udp(u) if kind == 2 => assert_eq!(u.checksum(), 0),
                TransportSlice::Udp(u) => assert_eq!(
                    u.checksum(),
                    u.to_header().calc_checksum_ipv4(&h, u.payload()).unwrap()
                ),
                TransportSlice::Icmpv4(i) => {
                    let mut c = i.header();
                    c.update_checksum(i.payload());
                    assert_eq!(i.checksum(), c.checksum)
                }
                _ => panic!(),
            }
        }
        // A non-first fragment: no L4 header to touch, only IPv4's checksum.
        let mut f = build(1);
        f[20] = 0x00;
        f[21] = 0x10;
        let mut h = Ipv4Header::from_slice(&f[14..]).unwrap().0;
        h.header_checksum = h.calc_header_checksum();
        f[24..26].copy_from_slice(&h.header_checksum.to_be_bytes());
        let udp_before = f[34..42].to_vec();
        nat(&mut f, Some(fip), None);
        assert_eq!(&f[34..42], &udp_before[..]);
        let h = Ipv4Header::from_slice(&f[14..]).unwrap().0;
        assert_eq!(h.header_checksum, h.calc_header_checksum());
    }

    /// Default SNAT rewrites (address and port, or ICMP echo id) keep every checksum right,
    /// both ways, and `napt_ports` keys them as `geneflow_abi::nat` says.
    #[test]
    fn napt_rewrites_match_full_checksums() {
        use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
        let payload = [0x5au8; 21];
        for (kind, out) in [
            (0u8, true),
            (0, false),
            (1, true),
            (1, false),
            (2, true),
            (3, false),
        ] {
            let (s, d) = if out {
                ([10, 0, 0, 3], [172, 24, 4, 100])
            } else {
                ([172, 24, 4, 100], [172, 24, 4, 61])
            };
            let b = PacketBuilder::ethernet2([2; 6], [4; 6]).ipv4(s, d, 64);
            let mut f = Vec::new();
            match kind {
                0 => b.tcp(40000, 5201, 1, 100).write(&mut f, &payload).unwrap(),
                1 => b.udp(40000, 53).write(&mut f, &payload).unwrap(),
                2 => b
                    .icmpv4_echo_request(0x1234, 1)
                    .write(&mut f, &payload)
                    .unwrap(),
                _ => b
                    .icmpv4_echo_reply(0x4321, 1)
                    .write(&mut f, &payload)
                    .unwrap(),
            }
            let (proto, sp, dp) = napt_ports(&f, out).unwrap();
            match kind {
                2 => assert_eq!((proto, sp, dp), (1, 0x1234u16.to_be(), 0)),
                3 => assert_eq!((proto, sp, dp), (1, 0, 0x4321u16.to_be())),
                _ => assert_eq!(sp, 40000u16.to_be()),
            }
            let new_addr = u32::from_ne_bytes([192, 0, 2, 9]);
            let new_port = 61000u16.to_be();
            napt(&mut f, out, new_addr, new_port).unwrap();
            let p = SlicedPacket::from_ethernet(&f).unwrap();
            let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
                panic!()
            };
            let h = ip.header().to_header();
            assert_eq!(h.header_checksum, h.calc_header_checksum());
            assert_eq!(if out { h.source } else { h.destination }, [192, 0, 2, 9]);
            match p.transport.unwrap() {
                TransportSlice::Tcp(t) => {
                    let port = if out {
                        t.source_port()
                    } else {
                        t.destination_port()
                    };
                    assert_eq!(port, 61000);
                    let want = t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap();
                    assert_eq!(t.checksum(), want);
                }
                TransportSlice::Udp(u) => {
                    let port = if out {
                        u.source_port()
                    } else {
                        u.destination_port()
                    };
                    assert_eq!(port, 61000);
                    let want = u.to_header().calc_checksum_ipv4(&h, u.payload()).unwrap();
                    assert_eq!(u.checksum(), want);
                }
                TransportSlice::Icmpv4(i) => {
                    assert_eq!(u16::from_be_bytes([f[38], f[39]]), 61000);
                    let mut c = i.header();
                    c.update_checksum(i.payload());
                    assert_eq!(i.checksum(), c.checksum);
                }
                _ => panic!(),
            }
        }
    }

    #[test]
    fn martians() {
        for a in [
            "0.1.2.3",
            "127.0.0.1",
            "169.254.1.1",
            "224.0.0.5",
            "255.255.255.255",
        ] {
            assert!(martian(a.parse().unwrap()), "{a}");
        }
        for a in ["10.0.0.1", "172.24.4.1", "192.0.2.1", "223.255.255.254"] {
            assert!(!martian(a.parse().unwrap()), "{a}");
        }
    }
}
