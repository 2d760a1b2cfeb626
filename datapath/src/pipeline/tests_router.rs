//! Unit tests of the router stages and the ARP responder.
//!
//! Chassis "a" (198.18.0.1) hosts p1 (ls1, 10.1.0.5, ifindex 10) and p3 (ls2, 10.2.0.7,
//! ifindex 11); chassis "b" (198.18.0.2) hosts p2 (ls2, 10.2.0.6) and p4 (ls1, 10.1.0.8).
//! Router r joins ls1 (10.1.0.1/24) and ls2 (10.2.0.1/24); static route 10.9.0.0/16 via p3.

use super::*;
use crate::wire::geneve::OvnMetadata;
use etherparse::{
    icmpv4, IcmpEchoHeader, Icmpv4Type, Ipv4Header, PacketBuilder, SlicedPacket, TransportSlice,
};
use geneflow_abi::{act, arp, flag};
use geneflow_control::compiler::compile;
use geneflow_control::model::*;

const UPLINK: u32 = 2;
const R1: [u8; 6] = [0x0a, 0xff, 0, 0, 0, 1];
const R2: [u8; 6] = [0x0a, 0xff, 0, 0, 0, 2];
const P1: [u8; 6] = [0x0a, 0, 0, 0, 0, 1];
const P2: [u8; 6] = [0x0a, 0, 0, 0, 0, 2];
const P3: [u8; 6] = [0x0a, 0, 0, 0, 0, 3];
const P4: [u8; 6] = [0x0a, 0, 0, 0, 0, 4];

fn doc() -> NbDocument {
    let mut d = NbDocument::default();
    test_nb::chassis_ab(&mut d);
    for (n, k, cidr) in [("ls1", 10, "10.1.0.0/24"), ("ls2", 20, "10.2.0.0/24")] {
        test_nb::switch(&mut d, n, k);
        d.subnets.insert(
            n.into(),
            Subnet {
                name: n.into(),
                switch: n.into(),
                cidr: cidr.parse().unwrap(),
                gateway: None,
                dhcp: false,
                dhcp_options: Default::default(),
                dns: vec![],
                host_routes: vec![],
                version: 0,
            },
        );
    }
    for (n, sw, k, mac, ip, c) in [
        ("p1", "ls1", 1, P1, "10.1.0.5", "a"),
        ("p2", "ls2", 2, P2, "10.2.0.6", "b"),
        ("p3", "ls2", 3, P3, "10.2.0.7", "a"),
        ("p4", "ls1", 4, P4, "10.1.0.8", "b"),
    ] {
        d.ports
            .insert(n.into(), test_nb::port(n, sw, k, mac, &[ip], c));
    }
    test_nb::router(&mut d, 5);
    for (n, mac, net, sw) in [
        ("r-ls1", R1, "10.1.0.1/24", "ls1"),
        ("r-ls2", R2, "10.2.0.1/24", "ls2"),
    ] {
        test_nb::router_port(&mut d, n, mac, net, sw, 100);
    }
    let r = Route::new(
        "r",
        "10.9.0.0/16".parse().unwrap(),
        "10.2.0.7".parse().unwrap(),
    );
    d.routes.insert(r.name.clone(), r);
    d
}

fn tables_of(d: &NbDocument) -> Tables {
    assert!(d.check().is_ok(), "{:?}", d.check());
    Tables::new(Arc::new(compile(d, "a")), UPLINK, 1500, true, |n| match n {
        "vp-p1" => Some(10),
        "vp-p3" => Some(11),
        _ => None,
    })
}

pub(super) fn tables() -> Tables {
    tables_of(&doc())
}

pub(super) fn udp(
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    payload: usize,
) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(P1, dst_mac)
        .ipv4(src, dst, ttl)
        .udp(40000, 9)
        .write(&mut f, &vec![0u8; payload])
        .unwrap();
    f
}

fn run(t: &Tables, f: &[u8], in_if: u32) -> (Result<Decision, DropReason>, Vec<Output>, Vec<u8>) {
    let (mut out, mut buf) = (Vec::new(), Vec::new());
    let d = t.process(f, in_if, &mut out, &mut buf);
    (d, out, buf)
}

/// Parses a generated ICMP answer: (source, destination, type).
fn icmp_of(buf: &[u8]) -> (std::net::Ipv4Addr, std::net::Ipv4Addr, Icmpv4Type) {
    let p = SlicedPacket::from_ethernet(buf).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
        panic!("not IPv4")
    };
    let h = ip.header();
    assert_eq!(h.to_header().calc_header_checksum(), h.header_checksum());
    let Some(TransportSlice::Icmpv4(i)) = p.transport else {
        panic!("not ICMP")
    };
    (h.source_addr(), h.destination_addr(), i.icmp_type())
}

#[test]
fn routed_across_chassis_leaves_routed_in_the_destination_vni() {
    let t = tables();
    let f = udp(R1, [10, 1, 0, 5], [10, 2, 0, 6], 64, 18);
    let (d, out, buf) = run(&t, &f, 10);
    let d = d.unwrap();
    assert_eq!(
        out,
        vec![Output::Tunnel {
            remote: "198.18.0.2".parse().unwrap(),
            vni: 20,
            meta: OvnMetadata {
                ingress: 100,
                egress: 2
            }
        }]
    );
    assert!(d.rewritten);
    // The routed copy: router port MAC -> p2's MAC, TTL 63, checksum still right.
    assert_eq!(&buf[0..6], &P2);
    assert_eq!(&buf[6..12], &R2);
    let (ip, _) = Ipv4Header::from_slice(&buf[14..]).unwrap();
    assert_eq!(ip.time_to_live, 63);
    assert_eq!(ip.header_checksum, ip.calc_header_checksum());
    assert_eq!(&buf[34..], &f[34..]);
    let m = d.megaflow.unwrap();
    assert_eq!(m.action.kind, act::ENCAP);
    assert_ne!(m.action.flags & flag::ROUTE, 0);
    assert_eq!((m.action.set_smac, m.action.set_dmac), (R2, P2));
    assert_eq!((m.action.vni, m.action.ovn_opt), (20, 0x0064_0002));
    // Wide: in-port, router MAC, IPv4, the exact destination and the source port security
    // checked; not the L4 ports.
    assert_eq!(m.mask.ip_dst, u32::MAX);
    assert_eq!(m.mask.eth_dst, [0xff; 6]);
    assert_eq!(m.mask.eth_type, u16::MAX);
    assert_eq!((m.mask.ip_src, m.mask.eth_src), (u32::MAX, [0xff; 6]));
    assert_eq!((m.mask.l4_src, m.mask.l4_dst), (0, 0));
    // The entry belongs to the switch the packet entered.
    assert_eq!(m.action.dp_key, 10);
}

#[test]
fn routed_on_one_chassis_and_by_static_route() {
    let t = tables();
    for dst in [[10, 2, 0, 7], [10, 9, 3, 4]] {
        let (d, out, buf) = run(&t, &udp(R1, [10, 1, 0, 5], dst, 64, 18), 10);
        let m = d.unwrap().megaflow.unwrap();
        assert_eq!(out, vec![Output::Local { ifindex: 11 }], "{dst:?}");
        assert_eq!((m.action.kind, m.action.out_ifindex), (act::OUTPUT, 11));
        assert_eq!(&buf[0..12], &[P3, R2].concat());
    }
}

#[test]
fn router_answers_pings_to_any_of_its_addresses() {
    let t = tables();
    for gw in [[10, 1, 0, 1], [10, 2, 0, 1]] {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(P1, R1)
            .ipv4([10, 1, 0, 5], gw, 64)
            .icmpv4_echo_request(7, 3)
            .write(&mut f, b"ping!")
            .unwrap();
        let (d, out, buf) = run(&t, &f, 10);
        let d = d.unwrap();
        assert_eq!(out, vec![Output::Local { ifindex: 10 }]);
        assert!(d.megaflow.is_none());
        assert_eq!(d.answer.unwrap().kind, AnswerKind::IcmpEchoReply);
        let (s, dst, ty) = icmp_of(&buf);
        assert_eq!((s.octets(), dst.octets()), (gw, [10, 1, 0, 5]));
        assert_eq!(ty, Icmpv4Type::EchoReply(IcmpEchoHeader { id: 7, seq: 3 }));
        assert_eq!((&buf[0..6], &buf[6..12]), (&P1[..], &R1[..]));
        assert!(buf.ends_with(b"ping!"));
    }
    // Anything else for the router is dropped, counted.
    let (d, _, _) = run(&t, &udp(R1, [10, 1, 0, 5], [10, 1, 0, 1], 64, 8), 10);
    assert_eq!(d, Err(DropReason::ToRouter));
}

#[test]
fn router_errors_ttl_no_route_unknown_host_and_pmtu() {
    let t = tables();
    let cases = [
        (
            udp(R1, [10, 1, 0, 5], [10, 2, 0, 6], 1, 18),
            AnswerKind::IcmpTimeExceeded,
            Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit),
        ),
        (
            udp(R1, [10, 1, 0, 5], [192, 0, 2, 1], 64, 18),
            AnswerKind::IcmpNetUnreachable,
            Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Network),
        ),
        (
            udp(R1, [10, 1, 0, 5], [10, 2, 0, 99], 64, 18),
            AnswerKind::IcmpHostUnreachable,
            Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Host),
        ),
        (
            // 1500-byte IP packet with DF (etherparse sets it) to a remote VM.
            udp(R1, [10, 1, 0, 5], [10, 2, 0, 6], 64, 1472),
            AnswerKind::IcmpFragNeeded,
            Icmpv4Type::DestinationUnreachable(
                icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1442 },
            ),
        ),
    ];
    for (f, kind, ty) in cases {
        let (d, out, buf) = run(&t, &f, 10);
        let d = d.unwrap();
        assert_eq!(d.answer.map(|a| a.kind), Some(kind));
        assert!(d.megaflow.is_none());
        assert_eq!(out, vec![Output::Local { ifindex: 10 }]);
        let (s, dst, got) = icmp_of(&buf);
        assert_eq!(got, ty, "{kind:?}");
        assert_eq!((s.octets(), dst.octets()), ([10, 1, 0, 1], [10, 1, 0, 5]));
        // The offending header and 8 bytes of its payload are quoted.
        assert!(buf.ends_with(&f[14..42]), "{kind:?}");
    }
    // Big without DF: dropped, counted. Big to a VM on this chassis: no overlay, routed.
    let mut big = udp(R1, [10, 1, 0, 5], [10, 2, 0, 6], 64, 1472);
    big[20] = 0;
    let c = Ipv4Header::from_slice(&big[14..])
        .unwrap()
        .0
        .calc_header_checksum();
    big[24..26].copy_from_slice(&c.to_be_bytes());
    assert_eq!(run(&t, &big, 10).0, Err(DropReason::TooBig));
    let local = udp(R1, [10, 1, 0, 5], [10, 2, 0, 7], 64, 1472);
    assert!(run(&t, &local, 10).0.unwrap().megaflow.is_some());
}

#[test]
fn router_refuses_bad_packets_with_a_reason() {
    // p1 without port security (an appliance): what the router itself refuses, with sources
    // port security would have stopped first.
    let mut d = doc();
    d.ports.get_mut("p1").unwrap().port_security = false;
    let t = tables_of(&d);
    let good = udp(R1, [10, 1, 0, 5], [10, 2, 0, 6], 64, 18);
    let mut bad_csum = good.clone();
    bad_csum[24] ^= 0xff;
    let mut options = good.clone();
    options[14] = 0x46;
    let cases = [
        (bad_csum, DropReason::IpChecksum),
        (options, DropReason::IpOptions),
        (
            udp(R1, [127, 0, 0, 1], [10, 2, 0, 6], 64, 18),
            DropReason::Martian,
        ),
        (
            udp(R1, [10, 1, 0, 5], [255, 255, 255, 255], 64, 18),
            DropReason::Martian,
        ),
        (
            udp(R1, [10, 1, 0, 5], [224, 0, 0, 5], 64, 18),
            DropReason::Martian,
        ),
        (good[..30].to_vec(), DropReason::Malformed),
    ];
    // A total length shorter than the header, on an echo request to the router (whose reply
    // would slice the payload by it), with a valid checksum.
    let mut short = Vec::new();
    PacketBuilder::ethernet2(P1, R1)
        .ipv4([10, 1, 0, 5], [10, 1, 0, 1], 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut short, b"x")
        .unwrap();
    short[16..18].copy_from_slice(&10u16.to_be_bytes());
    short[24..26].copy_from_slice(&[0, 0]);
    // etherparse's owned parser refuses such a header: checksum it by hand.
    let c = ip_csum(&short[14..34]);
    short[24..26].copy_from_slice(&c.to_be_bytes());
    let cases = cases.into_iter().chain([(short, DropReason::Malformed)]);
    for (f, want) in cases {
        assert_eq!(run(&t, &f, 10).0, Err(want));
    }
    let mut v6 = good.clone();
    v6[12..14].copy_from_slice(&[0x86, 0xdd]);
    assert_eq!(run(&t, &v6, 10).0, Err(DropReason::NotRoutable));
    // An ICMP error is never answered with another (TTL 1 here).
    let mut f = Vec::new();
    PacketBuilder::ethernet2(P1, R1)
        .ipv4([10, 1, 0, 5], [10, 2, 0, 6], 1)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            icmpv4::DestUnreachableHeader::Port,
        ))
        .write(&mut f, &[0; 28])
        .unwrap();
    assert!(run(&t, &f, 10).0.is_err());
}

/// The IPv4 header checksum of `h` (its checksum field zeroed), computed by hand.
fn ip_csum(h: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for w in h.chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn arp(sha: [u8; 6], spa: [u8; 4], tpa: [u8; 4], op: u8) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&sha);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, op]);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&tpa);
    f
}

#[test]
fn arp_responder_answers_for_known_addresses_on_the_switch() {
    let t = tables();
    for (tpa, owner) in [([10, 1, 0, 1], R1), ([10, 1, 0, 8], P4)] {
        let f = arp(P1, [10, 1, 0, 5], tpa, 1);
        let (d, out, buf) = run(&t, &f, 10);
        let d = d.unwrap();
        assert_eq!(out, vec![Output::Local { ifindex: 10 }]);
        assert_eq!(d.answer.unwrap().kind, AnswerKind::ArpReply);
        // The reply, byte for byte as the fast path writes it.
        let mut want = P1.to_vec();
        want.extend_from_slice(&owner);
        want.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 2]);
        want.extend_from_slice(&owner);
        want.extend_from_slice(&tpa);
        want.extend_from_slice(&P1);
        want.extend_from_slice(&[10, 1, 0, 5]);
        assert_eq!(buf, want);
        let m = d.megaflow.unwrap();
        assert_eq!((m.action.kind, m.action.set_smac), (act::ARP_REPLY, owner));
        assert_eq!(m.mask.eth_dst, [0; 6], "requests to any destination MAC");
        assert_eq!((m.mask.ip_dst, m.mask.ip_proto), (u32::MAX, u8::MAX));
        assert_eq!(m.key.ip_proto, arp::OP_REQUEST);
    }
    // Not answered, switched (flooded): unknown address, another switch's address, gratuitous
    // ARP, a reply. The owner's own probe is not answered either.
    for f in [
        arp(P1, [10, 1, 0, 5], [10, 1, 0, 99], 1),
        arp(P1, [10, 1, 0, 5], [10, 2, 0, 6], 1),
        arp(P1, [10, 1, 0, 5], [10, 1, 0, 5], 1),
        arp(P1, [10, 1, 0, 5], [10, 1, 0, 8], 2),
        arp(P1, [0, 0, 0, 0], [10, 1, 0, 5], 1),
    ] {
        let (d, out, _) = run(&t, &f, 10);
        let d = d.unwrap();
        assert!(d.answer.is_none());
        assert!(
            out.iter().any(|o| matches!(o, Output::Tunnel { .. })),
            "{f:?}"
        );
    }
    let mut bad = arp(P1, [10, 1, 0, 5], [10, 1, 0, 1], 1);
    bad[18] = 8;
    assert_eq!(run(&t, &bad, 10).0, Err(DropReason::MalformedArp));
}

#[test]
fn trace_walks_the_router_stages() {
    let t = tables();
    let f = udp(R1, [10, 1, 0, 5], [10, 2, 0, 6], 64, 18);
    let tr = t.trace(&f, (10, 0), &|i| format!("if{i}"));
    let text = tr.stages.join("\n");
    for stage in [
        "port security (in)",
        "acl (from-lport)",
        "l2 lookup",
        "router admission",
        "ip input",
        "dnat",
        "routing",
        "next hop",
        "snat",
        "rewrite",
        "output",
        "megaflow: match in_ifindex=10,eth_dst=0a:ff:00:00:00:01,eth_src=0a:00:00:00:00:01,eth_type=0x0800,ip_src=10.1.0.5,ip_dst=10.2.0.6",
    ] {
        assert!(text.contains(stage), "{stage} missing in:\n{text}");
    }
}

#[test]
fn a_change_behind_the_router_moves_the_source_switch_fingerprint() {
    let base = tables().fingerprints([2; 6]);
    let mut d = doc();
    d.ports.get_mut("p2").unwrap().mac = Mac([0x0a, 0, 0, 0, 0, 0x22]);
    let moved = tables_of(&d).fingerprints([2; 6]);
    assert_ne!(base[&10], moved[&10], "ls1 routes into ls2");
    let mut d = doc();
    d.routes.clear();
    assert_ne!(tables_of(&d).fingerprints([2; 6])[&10], base[&10]);
}

#[test]
fn mangled_routed_and_arp_frames_never_panic() {
    // The switching sweep (tests.rs) has no router: this one starts from frames that reach the
    // router stages, the ICMP answers and the ARP responder.
    let t = tables();
    let mut echo = Vec::new();
    PacketBuilder::ethernet2(P1, R1)
        .ipv4([10, 1, 0, 5], [10, 1, 0, 1], 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut echo, b"0123456789")
        .unwrap();
    let bases = [
        echo,
        udp(R1, [10, 1, 0, 5], [10, 2, 0, 6], 64, 18),
        udp(R1, [10, 1, 0, 5], [10, 2, 0, 6], 1, 18),
        arp(P1, [10, 1, 0, 5], [10, 1, 0, 1], 1),
    ];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for base in bases {
        assert!(run(&t, &base, 10).0.is_ok());
        for len in 0..=base.len() {
            let _ = run(&t, &base[..len], 10);
        }
        for _ in 0..20_000 {
            let mut f = base.clone();
            // Mutate the IP/ARP headers mostly: that is where the router reads.
            for _ in 0..1 + rnd() % 3 {
                let i = 12 + (rnd() as usize) % (f.len() - 12).min(32);
                f[i] = rnd() as u8;
            }
            // Most mutations would stop at the header checksum: keep it valid half the time,
            // so they reach the stages behind it.
            if rnd() % 2 == 0 && f[12..14] == [8, 0] && f.len() >= 34 {
                f[24..26].copy_from_slice(&[0, 0]);
                let c = ip_csum(&f[14..34]);
                f[24..26].copy_from_slice(&c.to_be_bytes());
            }
            if let Err(r) = run(&t, &f, 10).0 {
                assert!(r.counter() < geneflow_abi::ctr::COUNT, "{r:?}");
            }
        }
    }
}
