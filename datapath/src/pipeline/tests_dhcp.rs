//! Unit tests of the DHCP responder. Chassis "a" hosts p1 (10.0.0.5, ifindex 10) on ls (VNI
//! 100), whose subnet 10.0.0.0/24 has DHCP, gateway 10.0.0.1 (router port 0a:..:fe), DNS,
//! a domain name and a host route; p2 (192.168.9.9, ifindex 11) is on no DHCP subnet. Answers
//! are decoded with smoltcp's DHCP parser and etherparse.

use super::*;
use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use geneflow_abi::ctr;
use geneflow_control::compiler::compile;
use geneflow_control::model::*;
use smoltcp::wire::{DhcpMessageType, DhcpPacket, DhcpRepr, EthernetAddress, Ipv4Address};
use std::collections::BTreeMap;

const VNI: u32 = 100;
const P1: [u8; 6] = [0x0a, 0, 0, 0, 0, 1];
const P2: [u8; 6] = [0x0a, 0, 0, 0, 0, 2];
const GW_MAC: [u8; 6] = [0x0a, 0, 0, 0, 0, 0xfe];

fn doc() -> NbDocument {
    let mut d = NbDocument::default();
    test_nb::chassis_ab(&mut d);
    test_nb::switch(&mut d, "ls", VNI);
    d.ports.insert(
        "p1".into(),
        test_nb::port("p1", "ls", 1, P1, &["10.0.0.5"], "a"),
    );
    d.ports.insert(
        "p2".into(),
        test_nb::port("p2", "ls", 2, P2, &["192.168.9.9"], "a"),
    );
    d.subnets.insert(
        "sn".into(),
        Subnet {
            name: "sn".into(),
            switch: "ls".into(),
            cidr: "10.0.0.0/24".parse().unwrap(),
            gateway: Some("10.0.0.1".parse().unwrap()),
            dhcp: true,
            dhcp_options: BTreeMap::from([
                ("domain_name".to_string(), "t.example".to_string()),
                ("lease_time".to_string(), "3600".to_string()),
            ]),
            dns: vec!["10.0.0.2".parse().unwrap(), "9.9.9.9".parse().unwrap()],
            host_routes: vec![HostRoute {
                prefix: "172.16.0.0/12".parse().unwrap(),
                nexthop: "10.0.0.10".parse().unwrap(),
            }],
            version: 0,
        },
    );
    d.subnets.insert(
        "plain".into(),
        Subnet {
            name: "plain".into(),
            switch: "ls".into(),
            cidr: "192.168.9.0/24".parse().unwrap(),
            gateway: None,
            dhcp: false,
            dhcp_options: BTreeMap::new(),
            dns: vec![],
            host_routes: vec![],
            version: 0,
        },
    );
    test_nb::router(&mut d, 500);
    test_nb::router_port(&mut d, "r-ls", GW_MAC, "10.0.0.1/24", "ls", 100);
    assert!(d.check().is_ok(), "{:?}", d.check());
    d
}

fn tables_of(d: &NbDocument) -> Tables {
    Tables::new(Arc::new(compile(d, "a")), 2, 1500, true, |n| match n {
        "vp-p1" => Some(10),
        "vp-p2" => Some(11),
        _ => None,
    })
}

/// A client message from `mac`, `src`:68 to `dst`:67, built by smoltcp's emitter.
fn client(mac: [u8; 6], src: [u8; 4], dst: [u8; 4], f: impl FnOnce(&mut DhcpRepr)) -> Vec<u8> {
    let mut repr = DhcpRepr {
        message_type: DhcpMessageType::Discover,
        transaction_id: 0x1234_5678,
        secs: 0,
        client_hardware_address: EthernetAddress(mac),
        client_ip: Ipv4Address::UNSPECIFIED,
        your_ip: Ipv4Address::UNSPECIFIED,
        server_ip: Ipv4Address::UNSPECIFIED,
        router: None,
        subnet_mask: None,
        relay_agent_ip: Ipv4Address::UNSPECIFIED,
        broadcast: false,
        requested_ip: None,
        client_identifier: Some(EthernetAddress(mac)),
        server_identifier: None,
        parameter_request_list: Some(&[1, 3, 6, 15, 26, 121]),
        dns_servers: None,
        max_size: None,
        lease_duration: None,
        renew_duration: None,
        rebind_duration: None,
        additional_options: &[],
    };
    f(&mut repr);
    let mut payload = vec![0u8; repr.buffer_len()];
    repr.emit(&mut DhcpPacket::new_unchecked(&mut payload[..]))
        .unwrap();
    udp_frame(mac, src, dst, (68, 67), &payload)
}

fn udp_frame(mac: [u8; 6], src: [u8; 4], dst: [u8; 4], ports: (u16, u16), p: &[u8]) -> Vec<u8> {
    let dst_mac = if dst == [255; 4] { [0xff; 6] } else { GW_MAC };
    let mut f = Vec::new();
    PacketBuilder::ethernet2(mac, dst_mac)
        .ipv4(src, dst, 64)
        .udp(ports.0, ports.1)
        .write(&mut f, p)
        .unwrap();
    f
}

struct Answered {
    frame: Vec<u8>,
    outputs: Vec<Output>,
    decision: Decision,
}

fn run(t: &Tables, frame: &[u8], in_ifindex: u32) -> Result<Answered, DropReason> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let d = t.process(frame, in_ifindex, &mut out, &mut buf)?;
    Ok(Answered {
        frame: buf,
        outputs: out,
        decision: d,
    })
}

/// The answer's IPv4 destination and its DHCP message, decoded independently.
fn decode(a: &Answered) -> (Ipv4Address, Vec<u8>) {
    assert!(a.decision.rewritten);
    assert_eq!(a.outputs, vec![Output::Local { ifindex: 10 }]);
    assert_eq!(a.decision.answer.map(|x| x.kind), Some(AnswerKind::Dhcp));
    assert!(
        a.decision.megaflow.is_none(),
        "a DHCP answer is never cached"
    );
    let p = SlicedPacket::from_ethernet(&a.frame).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
        panic!("not IPv4")
    };
    let Some(TransportSlice::Udp(udp)) = p.transport else {
        panic!("not UDP")
    };
    assert_eq!((udp.source_port(), udp.destination_port()), (67, 68));
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum(), "IPv4 checksum");
    // The UDP checksum verifies over the pseudo header.
    let sum = udp
        .to_header()
        .calc_checksum_ipv4(&ip.header().to_header(), udp.payload())
        .unwrap();
    assert_eq!(sum, udp.checksum());
    assert_eq!(&a.frame[..6], &P1, "to the client's MAC");
    assert_eq!(&a.frame[6..12], &GW_MAC, "from the gateway's MAC");
    (ip.header().destination_addr(), udp.payload().to_vec())
}

fn options(payload: &[u8]) -> BTreeMap<u8, Vec<u8>> {
    let p = DhcpPacket::new_checked(payload).unwrap();
    p.options().map(|o| (o.kind, o.data.to_vec())).collect()
}

#[test]
fn discover_gets_an_offer_with_every_option() {
    let t = tables_of(&doc());
    let f = client(P1, [0; 4], [255; 4], |_| {});
    let a = run(&t, &f, 10).unwrap();
    let (to, payload) = decode(&a);
    assert_eq!(
        to,
        Ipv4Address::new(10, 0, 0, 5),
        "unicast to the offered address"
    );
    let p = DhcpPacket::new_checked(&payload[..]).unwrap();
    let r = DhcpRepr::parse(&p).unwrap();
    assert_eq!(r.message_type, DhcpMessageType::Offer);
    assert_eq!(r.transaction_id, 0x1234_5678);
    assert_eq!(r.your_ip, Ipv4Address::new(10, 0, 0, 5));
    assert_eq!(r.server_identifier, Some(Ipv4Address::new(10, 0, 0, 1)));
    assert_eq!(r.subnet_mask, Some(Ipv4Address::new(255, 255, 255, 0)));
    assert_eq!(r.router, Some(Ipv4Address::new(10, 0, 0, 1)));
    assert_eq!(r.lease_duration, Some(3600));
    assert_eq!(r.client_identifier, Some(EthernetAddress(P1)));
    let o = options(&payload);
    assert_eq!(o[&6], vec![10, 0, 0, 2, 9, 9, 9, 9]);
    assert_eq!(o[&15], b"t.example".to_vec());
    // 1500 underlay less 58 bytes of Geneve.
    assert_eq!(o[&26], 1442u16.to_be_bytes().to_vec());
    // The host route and the default route (option 121 replaces option 3).
    assert_eq!(o[&121], vec![12, 172, 16, 10, 0, 0, 10, 0, 10, 0, 0, 1]);
    assert!(payload.len() >= 300, "padded to BOOTP's minimum");
}

#[test]
fn requests_get_an_ack_for_the_port_address_and_a_nak_otherwise() {
    let t = tables_of(&doc());
    // Selecting: option 50 and the server identifier of the offer.
    let f = client(P1, [0; 4], [255; 4], |r| {
        r.message_type = DhcpMessageType::Request;
        r.requested_ip = Some(Ipv4Address::new(10, 0, 0, 5));
        r.server_identifier = Some(Ipv4Address::new(10, 0, 0, 1));
        r.broadcast = true;
    });
    let (to, payload) = decode(&run(&t, &f, 10).unwrap());
    assert_eq!(to, Ipv4Address::BROADCAST, "the client asked for broadcast");
    let p = DhcpPacket::new_checked(&payload[..]).unwrap();
    let r = DhcpRepr::parse(&p).unwrap();
    assert_eq!(r.message_type, DhcpMessageType::Ack);
    assert_eq!(r.your_ip, Ipv4Address::new(10, 0, 0, 5));
    // Renewing: unicast to the server, address in ciaddr; the answer goes to ciaddr.
    let f = client(P1, [10, 0, 0, 5], [10, 0, 0, 1], |r| {
        r.message_type = DhcpMessageType::Request;
        r.client_ip = Ipv4Address::new(10, 0, 0, 5);
    });
    let (to, payload) = decode(&run(&t, &f, 10).unwrap());
    assert_eq!(to, Ipv4Address::new(10, 0, 0, 5));
    let p = DhcpPacket::new_checked(&payload[..]).unwrap();
    assert_eq!(
        DhcpRepr::parse(&p).unwrap().message_type,
        DhcpMessageType::Ack
    );
    // Init-reboot with an address from elsewhere: NAK, broadcast, no address or lease.
    let f = client(P1, [0; 4], [255; 4], |r| {
        r.message_type = DhcpMessageType::Request;
        r.requested_ip = Some(Ipv4Address::new(10, 0, 0, 99));
    });
    let (to, payload) = decode(&run(&t, &f, 10).unwrap());
    assert_eq!(to, Ipv4Address::BROADCAST);
    let p = DhcpPacket::new_checked(&payload[..]).unwrap();
    let r = DhcpRepr::parse(&p).unwrap();
    assert_eq!(r.message_type, DhcpMessageType::Nak);
    assert_eq!(r.your_ip, Ipv4Address::UNSPECIFIED);
    assert_eq!(r.lease_duration, None);
    // A request for another server's offer is not ours.
    let f = client(P1, [0; 4], [255; 4], |r| {
        r.message_type = DhcpMessageType::Request;
        r.requested_ip = Some(Ipv4Address::new(10, 0, 0, 5));
        r.server_identifier = Some(Ipv4Address::new(10, 0, 0, 77));
    });
    let a = run(&t, &f, 10).unwrap();
    assert!(a.outputs.is_empty() && a.decision.answer.is_none());
}

#[test]
fn inform_gets_options_without_a_lease_and_release_is_taken() {
    let t = tables_of(&doc());
    let f = client(P1, [10, 0, 0, 5], [255; 4], |r| {
        r.message_type = DhcpMessageType::Inform;
        r.client_ip = Ipv4Address::new(10, 0, 0, 5);
    });
    let (to, payload) = decode(&run(&t, &f, 10).unwrap());
    assert_eq!(to, Ipv4Address::new(10, 0, 0, 5));
    let p = DhcpPacket::new_checked(&payload[..]).unwrap();
    let r = DhcpRepr::parse(&p).unwrap();
    assert_eq!(r.message_type, DhcpMessageType::Ack);
    assert_eq!(r.your_ip, Ipv4Address::UNSPECIFIED);
    assert_eq!(r.lease_duration, None, "RFC 2131 4.3.5: no lease time");
    assert!(r.dns_servers.is_some());
    for m in [DhcpMessageType::Release, DhcpMessageType::Decline] {
        let f = client(P1, [10, 0, 0, 5], [10, 0, 0, 1], |r| {
            r.message_type = m;
            r.client_ip = Ipv4Address::new(10, 0, 0, 5);
        });
        let a = run(&t, &f, 10).unwrap();
        assert!(a.outputs.is_empty(), "{m:?} is not answered");
        assert!(a.decision.megaflow.is_none());
    }
}

#[test]
fn the_options_fit_what_the_client_accepts() {
    let mut d = doc();
    // 60 NTP servers: 240 bytes, more than a 576-byte message leaves after the rest.
    let ntp: Vec<String> = (1..=60).map(|i| format!("10.0.1.{i}")).collect();
    d.subnets
        .get_mut("sn")
        .unwrap()
        .dhcp_options
        .insert("ntp_server".into(), ntp.join(","));
    let t = tables_of(&d);
    let (_, payload) = decode(&run(&t, &client(P1, [0; 4], [255; 4], |_| {}), 10).unwrap());
    assert!(payload.len() <= 576 - 28, "{} bytes", payload.len());
    assert!(
        options(&payload).contains_key(&26),
        "the MTU is always sent"
    );
    // A client that accepts more gets them all.
    let f = client(P1, [0; 4], [255; 4], |r| r.max_size = Some(1400));
    let (_, payload) = decode(&run(&t, &f, 10).unwrap());
    assert_eq!(options(&payload)[&42].len(), 240);
}

#[test]
fn malformed_requests_are_dropped_and_counted() {
    let t = tables_of(&doc());
    let good = client(P1, [0; 4], [255; 4], |_| {});
    let dhcp = 42;
    // Truncated inside the fixed header.
    let mut cases: Vec<(&str, Vec<u8>)> = vec![(
        "truncated",
        udp_frame(P1, [0; 4], [255; 4], (68, 67), &good[dhcp..dhcp + 100]),
    )];
    // hlen 7 (smoltcp accepts only Ethernet's 6).
    let mut p = good[dhcp..].to_vec();
    p[2] = 7;
    cases.push(("hlen", udp_frame(P1, [0; 4], [255; 4], (68, 67), &p)));
    // Wrong magic cookie.
    let mut p = good[dhcp..].to_vec();
    p[236] = 0;
    cases.push(("magic", udp_frame(P1, [0; 4], [255; 4], (68, 67), &p)));
    // An option whose length runs past the end (option overflow), and no message type.
    let mut p = good[dhcp..dhcp + 240].to_vec();
    p.extend_from_slice(&[53, 40, 1]);
    cases.push(("overflow", udp_frame(P1, [0; 4], [255; 4], (68, 67), &p)));
    // A server message sent to the server port.
    let offer = client(P1, [0; 4], [255; 4], |r| {
        r.message_type = DhcpMessageType::Offer
    });
    cases.push(("offer", offer));
    for (what, f) in cases {
        let e = run(&t, &f, 10).err();
        assert_eq!(e, Some(DropReason::DhcpMalformed), "{what}");
    }
    assert_eq!(
        DropReason::DhcpMalformed.counter(),
        ctr::DROP_DHCP_MALFORMED
    );
    assert!(!DropReason::DhcpMalformed.cacheable());
}

#[test]
fn a_vm_posing_as_a_server_is_dropped_and_a_port_without_dhcp_is_switched() {
    let t = tables_of(&doc());
    let offer = udp_frame(P1, [10, 0, 0, 5], [255; 4], (67, 68), &[0u8; 300]);
    assert_eq!(run(&t, &offer, 10).err(), Some(DropReason::DhcpServer));
    // p2's address is on no DHCP subnet: its DISCOVER is flooded like any broadcast.
    let f = client(P2, [0; 4], [255; 4], |_| {});
    let a = run(&t, &f, 11).unwrap();
    assert!(a.decision.answer.is_none());
    assert!(!a.decision.rewritten);
}

#[test]
fn without_a_gateway_the_server_answers_arp_from_its_own_mac() {
    let mut d = doc();
    d.router_ports.clear();
    d.routers.clear();
    let s = d.subnets.get_mut("sn").unwrap();
    s.gateway = None;
    s.host_routes.clear();
    let t = tables_of(&d);
    let f = client(P1, [0; 4], [255; 4], |_| {});
    let mut out = Vec::new();
    let mut buf = Vec::new();
    t.process(&f, 10, &mut out, &mut buf).unwrap();
    let server = geneflow_control::dhcp::server_mac(VNI);
    assert_eq!(&buf[6..12], &server.0);
    let p = SlicedPacket::from_ethernet(&buf).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
        panic!()
    };
    assert_eq!(ip.header().source_addr(), Ipv4Address::new(10, 0, 0, 1));
    let o = options(
        p.transport
            .map(|t| match t {
                TransportSlice::Udp(u) => u.payload(),
                _ => panic!(),
            })
            .unwrap(),
    );
    assert!(!o.contains_key(&3), "no router without a gateway");
    // The ARP responder answers for the server's address (a unicast renewal needs it).
    let dp = &t.pipeline.datapaths[&VNI];
    assert_eq!(dp.ips[&"10.0.0.1".parse().unwrap()].mac, server);
}
