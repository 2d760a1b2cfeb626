//! Unit tests of provider networks, floating IPs and default SNAT.
//!
//! Chassis "a" hosts p1 (10.0.0.5, ifindex 10, floating IP 172.24.4.51) and p3 (10.0.0.7,
//! ifindex 12, none) on ls (VNI 100); chassis "b" hosts p2 (10.0.0.6, floating IP .52).
//! Router r joins ls (10.0.0.1/24) and the provider switch ext (VNI 900, physnet1 on
//! ifindex 20 here; gateway port 172.24.4.10/24), default route via 172.24.4.1, which chassis
//! a has learned at `UPSTREAM_MAC`.

use super::*;
use etherparse::{PacketBuilder, SlicedPacket};
use geneflow_abi::{act, flag};
use geneflow_control::compiler::compile;
use geneflow_control::model::*;
use geneflow_control::nat::fip_mac;

const PHY: u32 = 20;
const GW_IN: [u8; 6] = [0x0a, 0xff, 0, 0, 0, 1];
const GW_OUT: [u8; 6] = [0x0a, 0xff, 0, 0, 0, 2];
const P1: [u8; 6] = [0x0a, 0, 0, 0, 0, 1];
const P3: [u8; 6] = [0x0a, 0, 0, 0, 0, 3];
const UPSTREAM_MAC: [u8; 6] = [0x0e, 0, 0, 0, 0, 0x99];
const OUTSIDE: [u8; 4] = [172, 24, 4, 100];

fn doc(external_ip: Option<&str>) -> NbDocument {
    let mut d = NbDocument::default();
    test_nb::chassis_ab(&mut d);
    d.chassis.get_mut("a").unwrap().external_ip = external_ip.map(|a| a.parse().unwrap());
    test_nb::switch(&mut d, "ls", 100);
    test_nb::switch(&mut d, "ext", 900);
    d.switches.get_mut("ext").unwrap().provider = Some("physnet1".into());
    for (n, k, mac, ip, c) in [
        ("p1", 1, P1, "10.0.0.5", "a"),
        ("p2", 2, [0x0a, 0, 0, 0, 0, 2], "10.0.0.6", "b"),
        ("p3", 3, P3, "10.0.0.7", "a"),
    ] {
        d.ports
            .insert(n.into(), test_nb::port(n, "ls", k, mac, &[ip], c));
    }
    test_nb::router(&mut d, 500);
    for (n, mac, net, sw, k) in [
        ("r-ls", GW_IN, "10.0.0.1/24", "ls", 100),
        ("r-gw", GW_OUT, "172.24.4.10/24", "ext", 101),
    ] {
        test_nb::router_port(&mut d, n, mac, net, sw, k);
    }
    let r = Route::new(
        "r",
        "0.0.0.0/0".parse().unwrap(),
        "172.24.4.1".parse().unwrap(),
    );
    d.routes.insert(r.name.clone(), r);
    for (n, ip, port) in [("f1", "172.24.4.51", "p1"), ("f2", "172.24.4.52", "p2")] {
        d.floating_ips.insert(
            n.into(),
            FloatingIp {
                name: n.into(),
                external_ip: ip.parse().unwrap(),
                port: port.into(),
                router: "r".into(),
                version: 0,
            },
        );
    }
    assert!(d.check().is_ok(), "{:?}", d.check());
    d
}

fn tables(d: &NbDocument, learned: bool) -> Tables {
    let mut t = Tables::new(Arc::new(compile(d, "a")), 2, 1500, true, |n| match n {
        "vp-p1" => Some(10),
        "vp-p3" => Some(12),
        _ => None,
    })
    .with_providers(&HashMap::from([("physnet1".to_string(), PHY)]), &[]);
    if learned {
        t.learn(900, "172.24.4.1".parse().unwrap(), UPSTREAM_MAC, true);
    }
    t
}

fn icmp(src_mac: [u8; 6], dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, 64)
        .icmpv4_echo_request(7, 1)
        .write(&mut f, &[1, 2, 3, 4])
        .unwrap();
    f
}

/// An ARP request from the upstream router (172.24.4.1) for `tpa`, broadcast.
fn arp(tpa: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&UPSTREAM_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&UPSTREAM_MAC);
    f.extend_from_slice(&[172, 24, 4, 1]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&tpa);
    f
}

fn ips(frame: &[u8]) -> (Ipv4Addr, Ipv4Addr, bool) {
    let p = SlicedPacket::from_ethernet(frame).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
        panic!("not IPv4")
    };
    let h = ip.header().to_header();
    (
        ip.header().source_addr(),
        ip.header().destination_addr(),
        h.header_checksum == h.calc_header_checksum(),
    )
}

#[test]
fn the_outside_reaches_a_floating_ip_bound_here_only() {
    let t = tables(&doc(None), true);
    let (mut out, mut buf) = (Vec::new(), Vec::new());
    let f = icmp(
        UPSTREAM_MAC,
        fip_mac("172.24.4.51".parse().unwrap()).0,
        OUTSIDE,
        [172, 24, 4, 51],
    );
    let d = t.process(&f, PHY, &mut out, &mut buf).unwrap();
    assert_eq!(out, vec![Output::Local { ifindex: 10 }]);
    let a = d.megaflow.unwrap().action;
    assert_eq!(
        a.flags & (flag::ROUTE | flag::DNAT),
        flag::ROUTE | flag::DNAT
    );
    assert_eq!(a.nat_dst, u32::from_ne_bytes([10, 0, 0, 5]));
    assert_eq!((a.set_smac, a.set_dmac, a.out_ifindex), (GW_IN, P1, 10));
    assert_eq!(
        ips(&buf),
        (Ipv4Addr::from(OUTSIDE), "10.0.0.5".parse().unwrap(), true)
    );
    // p2's floating IP is bound on chassis b: not let in here, whatever the MAC says.
    let f = icmp(
        UPSTREAM_MAC,
        fip_mac("172.24.4.52".parse().unwrap()).0,
        OUTSIDE,
        [172, 24, 4, 52],
    );
    assert_eq!(
        t.process(&f, PHY, &mut out, &mut buf).err(),
        Some(DropReason::NoDestination)
    );
    // vm1's MAC with p2's address: the router refuses to translate it.
    let f = icmp(
        UPSTREAM_MAC,
        fip_mac("172.24.4.51".parse().unwrap()).0,
        OUTSIDE,
        [172, 24, 4, 52],
    );
    assert_eq!(
        t.process(&f, PHY, &mut out, &mut buf).err(),
        Some(DropReason::NoNat)
    );
}

#[test]
fn a_vm_leaves_with_its_floating_ip_or_the_chassis_address() {
    let d0 = doc(None);
    let t = tables(&d0, true);
    let (mut out, mut buf) = (Vec::new(), Vec::new());
    let f = icmp(P1, GW_IN, [10, 0, 0, 5], [8, 8, 8, 8]);
    let d = t.process(&f, 10, &mut out, &mut buf).unwrap();
    assert_eq!(
        out,
        vec![Output::Provider {
            ifindex: PHY,
            vlan: 0
        }]
    );
    let a = d.megaflow.unwrap().action;
    assert_eq!(
        a.flags & (flag::ROUTE | flag::SNAT),
        flag::ROUTE | flag::SNAT
    );
    assert_eq!(a.nat_src, u32::from_ne_bytes([172, 24, 4, 51]));
    assert_eq!(a.set_smac, fip_mac("172.24.4.51".parse().unwrap()).0);
    assert_eq!(a.set_dmac, UPSTREAM_MAC);
    assert_eq!(
        ips(&buf),
        (
            "172.24.4.51".parse().unwrap(),
            "8.8.8.8".parse().unwrap(),
            true
        )
    );
    // p3 has no floating IP: without a chassis address it cannot leave...
    let f = icmp(P3, GW_IN, [10, 0, 0, 7], [8, 8, 8, 8]);
    assert_eq!(
        t.process(&f, 12, &mut out, &mut buf).err(),
        Some(DropReason::NoNat)
    );
    // ... with one it leaves by default SNAT, which the forwarder carries out.
    let t = tables(&doc(Some("172.24.4.61")), true);
    let d = t.process(&f, 12, &mut out, &mut buf).unwrap();
    let m = d.megaflow.unwrap().action;
    assert_ne!(m.flags & flag::NAPT, 0);
    assert_eq!(m.set_smac, fip_mac("172.24.4.61".parse().unwrap()).0);
    assert_eq!(
        d.napt,
        Some(Napt::Out {
            external: "172.24.4.61".parse().unwrap(),
            ifindex: 12,
            smac: GW_IN,
            dmac: P3,
        })
    );
    // Replies to the chassis address go back by the NAT table (in XDP after the first).
    let f = icmp(
        UPSTREAM_MAC,
        fip_mac("172.24.4.61".parse().unwrap()).0,
        [8, 8, 8, 8],
        [172, 24, 4, 61],
    );
    let d = t.process(&f, PHY, &mut out, &mut buf).unwrap();
    assert_eq!(d.napt, Some(Napt::In));
    assert_eq!(d.megaflow.unwrap().action.kind, act::UNNAPT);
}

#[test]
fn an_unknown_next_hop_is_asked_for_from_the_floating_ip() {
    let t = tables(&doc(None), false);
    let (mut out, mut buf) = (Vec::new(), Vec::new());
    let f = icmp(P1, GW_IN, [10, 0, 0, 5], [8, 8, 8, 8]);
    let d = t.process(&f, 10, &mut out, &mut buf).unwrap();
    assert_eq!(
        out,
        vec![Output::Provider {
            ifindex: PHY,
            vlan: 0
        }]
    );
    assert_eq!(d.answer.map(|a| a.kind), Some(AnswerKind::ArpRequest));
    assert!(d.megaflow.is_none());
    let fip = fip_mac("172.24.4.51".parse().unwrap());
    assert_eq!(&buf[0..6], &[0xff; 6]);
    assert_eq!(&buf[6..12], &fip.0);
    assert_eq!(&buf[28..32], &[172, 24, 4, 51], "sender: the floating IP");
    assert_eq!(&buf[38..42], &[172, 24, 4, 1], "target: the next hop");
}

#[test]
fn arp_on_the_provider_network_is_answered_for_local_floating_ips_and_teaches() {
    let t = tables(&doc(None), false);
    let (mut out, mut buf) = (Vec::new(), Vec::new());
    let d = t
        .process(&arp([172, 24, 4, 51]), PHY, &mut out, &mut buf)
        .unwrap();
    assert_eq!(d.answer.map(|a| a.kind), Some(AnswerKind::ArpReply));
    assert_eq!(d.megaflow.unwrap().action.kind, act::ARP_REPLY);
    assert_eq!(&buf[6..12], &fip_mac("172.24.4.51".parse().unwrap()).0);
    assert_eq!(
        d.learn,
        Some(Learn {
            dp: 900,
            ip: "172.24.4.1".parse().unwrap(),
            mac: UPSTREAM_MAC,
            solicited: false,
        })
    );
    // A request for the gateway port's address is not answered here: it teaches nothing (a
    // host could spray them from every address of the subnet).
    let d = t
        .process(&arp([172, 24, 4, 10]), PHY, &mut out, &mut buf)
        .unwrap();
    assert!(d.learn.is_none());
    // A reply to one of this chassis' addresses is a candidate, kept only if it was asked.
    let mut rep = arp([172, 24, 4, 51]);
    rep[21] = 2;
    rep[28..32].copy_from_slice(&[172, 24, 4, 77]);
    let d = t.process(&rep, PHY, &mut out, &mut buf).unwrap();
    assert_eq!(
        d.learn.map(|l| (l.ip, l.solicited)),
        Some(("172.24.4.77".parse().unwrap(), true))
    );
    // p2's floating IP is chassis b's to answer, and its asker none of this chassis'
    // business: nothing answered, nothing learned (a host spraying ARP cannot grow the table).
    let d = t
        .process(&arp([172, 24, 4, 52]), PHY, &mut out, &mut buf)
        .unwrap();
    assert!(d.answer.is_none());
    assert!(d.learn.is_none());
    // A sender outside the gateway's subnet is not learned either, even asking for ours.
    let mut f = arp([172, 24, 4, 51]);
    f[28..32].copy_from_slice(&[192, 0, 2, 1]);
    let d = t.process(&f, PHY, &mut out, &mut buf).unwrap();
    assert!(d.learn.is_none());
}

#[test]
fn hairpin_translates_both_addresses() {
    let t = tables(&doc(None), true);
    let (mut out, mut buf) = (Vec::new(), Vec::new());
    let f = icmp(P1, GW_IN, [10, 0, 0, 5], [172, 24, 4, 52]);
    let d = t.process(&f, 10, &mut out, &mut buf).unwrap();
    assert!(
        matches!(out[..], [Output::Tunnel { vni: 100, .. }]),
        "{out:?}"
    );
    let a = d.megaflow.unwrap().action;
    assert_eq!(a.flags & (flag::SNAT | flag::DNAT), flag::SNAT | flag::DNAT);
    assert_eq!(
        ips(&buf),
        (
            "172.24.4.51".parse().unwrap(),
            "10.0.0.6".parse().unwrap(),
            true
        )
    );
    // Without a floating IP of its own a VM cannot reach one (its peer could not answer).
    let f = icmp(P3, GW_IN, [10, 0, 0, 7], [172, 24, 4, 52]);
    assert_eq!(
        t.process(&f, 12, &mut out, &mut buf).err(),
        Some(DropReason::NoNat)
    );
}

#[test]
fn a_vlan_provider_network_is_entered_and_left_tagged() {
    let mut d = doc(None);
    d.switches.get_mut("ext").unwrap().vlan = Some(100);
    assert!(d.check().is_ok());
    let t = tables(&d, true);
    let tag = geneflow_abi::VLAN_PRESENT | 100;
    let (mut out, mut buf) = (Vec::new(), Vec::new());
    let fip = fip_mac("172.24.4.51".parse().unwrap()).0;
    let f = icmp(UPSTREAM_MAC, fip, OUTSIDE, [172, 24, 4, 51]);
    // Tagged 100 (XDP took the tag off and says so): in.
    let d1 = t
        .process_dropping(&f, PHY, (0, tag), &mut out, &mut buf)
        .unwrap();
    assert_eq!(out, vec![Output::Local { ifindex: 10 }]);
    let m = d1.megaflow.unwrap();
    assert_eq!((m.key.tun_out_port, m.mask.tun_out_port), (tag, u16::MAX));
    // Untagged, or on another VLAN: no switch of this chassis is there.
    for other in [0, geneflow_abi::VLAN_PRESENT | 200] {
        let e = t.process_dropping(&f, PHY, (0, other), &mut out, &mut buf);
        assert_eq!(e.err().map(|d| d.reason), Some(DropReason::UnknownDatapath));
    }
    // Out: tagged, in the slow path's output and the megaflow.
    let f = icmp(P1, GW_IN, [10, 0, 0, 5], [8, 8, 8, 8]);
    let d2 = t.process(&f, 10, &mut out, &mut buf).unwrap();
    assert_eq!(
        out,
        vec![Output::Provider {
            ifindex: PHY,
            vlan: tag
        }]
    );
    assert_eq!(d2.megaflow.unwrap().action.vlan, tag);
    // And an ARP answer goes back on the VLAN it came on.
    let arp = arp([172, 24, 4, 51]);
    let d3 = t
        .process_dropping(&arp, PHY, (0, tag), &mut out, &mut buf)
        .unwrap();
    assert_eq!(
        out,
        vec![Output::Provider {
            ifindex: PHY,
            vlan: tag
        }]
    );
    assert_eq!(d3.megaflow.unwrap().action.vlan, tag);
}

#[test]
fn a_vm_cannot_pick_a_vlan_and_short_frames_are_not_translated() {
    let t = tables(&doc(None), true);
    let (mut out, mut buf) = (Vec::new(), Vec::new());
    // An 802.1Q frame from a VM (it would land on VLAN 20 of the physical network).
    let mut f = icmp(P1, GW_IN, [10, 0, 0, 5], [8, 8, 8, 8]);
    f.splice(12..12, [0x81, 0x00, 0x00, 20]);
    let e = t
        .process_dropping(&f, 10, (0, 0), &mut out, &mut buf)
        .unwrap_err();
    assert_eq!(e.reason, DropReason::VlanTagged);
    assert!(e.megaflow.is_some(), "dropped in XDP after the first");
    // A UDP frame cut after its ports has no checksum to fix: not translatable.
    let mut u = Vec::new();
    PacketBuilder::ethernet2(P3, GW_IN)
        .ipv4([10, 0, 0, 7], [8, 8, 8, 8], 64)
        .udp(40000, 53)
        .write(&mut u, &[])
        .unwrap();
    assert!(super::rewrite::napt_ports(&u[..38], true).is_none());
    assert!(super::rewrite::napt_ports(&u, true).is_some());
}

#[test]
fn icmp_errors_go_back_on_the_vlan_they_came_from() {
    let mut d = doc(None);
    d.switches.get_mut("ext").unwrap().vlan = Some(100);
    let t = tables(&d, true);
    let tag = geneflow_abi::VLAN_PRESENT | 100;
    let (mut out, mut buf) = (Vec::new(), Vec::new());
    // A traceroute probe (TTL 1) from the outside to a floating IP: time exceeded, tagged.
    let mut f = Vec::new();
    PacketBuilder::ethernet2(UPSTREAM_MAC, fip_mac("172.24.4.51".parse().unwrap()).0)
        .ipv4(OUTSIDE, [172, 24, 4, 51], 1)
        .udp(40000, 33434)
        .write(&mut f, &[0; 8])
        .unwrap();
    let d = t
        .process_dropping(&f, PHY, (0, tag), &mut out, &mut buf)
        .unwrap();
    assert_eq!(d.answer.map(|a| a.kind), Some(AnswerKind::IcmpTimeExceeded));
    assert_eq!(
        out,
        vec![Output::Provider {
            ifindex: PHY,
            vlan: tag
        }]
    );
}

#[test]
fn only_an_asked_answer_moves_a_neighbour_and_asked_ones_always_find_room() {
    let mut t = tables(&doc(None), false);
    let gw: Ipv4Addr = "172.24.4.1".parse().unwrap();
    // Learned from a request this chassis answered.
    assert!(t.learns(900, gw, UPSTREAM_MAC, false));
    assert!(t.learn(900, gw, UPSTREAM_MAC, false));
    // Someone announcing another MAC for it is not believed; an answer to our request is.
    // `learns` (read only, so shared tables are copied only before a change) says the
    // same: the unasked announcement changes nothing, the same MAC asked for marks the
    // entry asked, another MAC asked for replaces it.
    assert!(!t.learns(900, gw, [0x0e, 0, 0, 0, 0, 0x66], false));
    assert!(!t.learns(900, gw, UPSTREAM_MAC, false));
    assert!(t.learns(900, gw, UPSTREAM_MAC, true));
    assert!(t.learns(900, gw, [0x0e, 0, 0, 0, 0, 0x77], true));
    assert!(!t.learn(900, gw, [0x0e, 0, 0, 0, 0, 0x66], false));
    assert_eq!(t.ext_neigh()[&(900, gw)].0, UPSTREAM_MAC);
    assert!(t.learn(900, gw, [0x0e, 0, 0, 0, 0, 0x77], true));
    // Unasked entries fill three quarters of the table at most; asked ones take their place.
    let n = super::MAX_EXT_NEIGH;
    for i in 0..n as u32 {
        t.learn(900, Ipv4Addr::from(0x0a00_0000 + i), UPSTREAM_MAC, false);
    }
    let unasked = t.ext_neigh().values().filter(|v| !v.1).count();
    assert_eq!(unasked, n * 3 / 4);
    for i in 0..n as u32 {
        t.learn(900, Ipv4Addr::from(0x0b00_0000 + i), UPSTREAM_MAC, true);
    }
    assert_eq!(t.ext_neigh().len(), n);
    assert!(
        t.ext_neigh().contains_key(&(900, gw)),
        "an asked next hop was evicted"
    );
    assert!(t.ext_neigh().values().all(|v| v.1));
}

#[test]
fn a_floating_ip_is_announced_once_and_again_after_a_failed_send() {
    let t = tables(&doc(None), true);
    let mut a = crate::garp::FipAnnouncer::default();
    let due = a.due(&t);
    // f1 is bound here (p1 on chassis a), f2 is not.
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].ip, "172.24.4.51".parse::<Ipv4Addr>().unwrap());
    assert_eq!(due[0].ifindex, PHY);
    let arp = &due[0].frame;
    assert_eq!(arp[..6], [0xff; 6]);
    assert_eq!(arp[28..32], [172, 24, 4, 51]);
    assert_eq!(arp[38..42], [172, 24, 4, 51]);
    assert!(!a.owed());
    // Announced: not again for the same tables.
    assert!(a.due(&t).is_empty());
    // A send that failed (a full queue) is owed, and offered again.
    let mut a = crate::garp::FipAnnouncer::default();
    let due = a.due(&t);
    a.unsent(&due[0]);
    assert!(a.owed());
    let again = a.due(&t);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].frame, due[0].frame);
    assert!(!a.owed());
    assert!(a.due(&t).is_empty());
}
