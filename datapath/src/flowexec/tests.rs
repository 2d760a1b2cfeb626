//! Tests of `flowexec`: each action run on a frame, the result checked by etherparse.

use super::*;
use etherparse::{NetSlice, SlicedPacket, TransportSlice};

const HEADROOM: usize = 128;

/// A UDP/IPv4 frame from 10.0.0.1 to 10.0.1.2 with a 32-byte payload, TTL 64.
fn inner() -> Vec<u8> {
    inner_ttl(64)
}

fn inner_ttl(ttl: u8) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([0x0a, 0, 0, 0, 0, 1], [0x0a, 0, 0, 0, 0xff, 1])
        .ipv4([10, 0, 0, 1], [10, 0, 1, 2], ttl)
        .udp(4000, 5000);
    let mut out = Vec::new();
    b.write(&mut out, &[0x42; 32]).unwrap();
    out
}

/// Runs `a` on a copy of `data` with headroom: the verdict and the frame after.
fn run(data: &[u8], a: &FlowAction) -> (Verdict, Vec<u8>) {
    run_at(data, 0, a)
}

thread_local! {
    /// The conntrack commits `run_at` saw.
    static COMMITS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Counts commits; knows no translation.
struct Counting;

impl State for Counting {
    fn commit(&mut self) {
        COMMITS.with(|c| c.set(c.get() + 1))
    }

    fn napt_out(&mut self, _: &[u8]) -> Option<NatEntry> {
        None
    }

    fn napt_in(&mut self, _: &[u8]) -> Option<NatEntry> {
        None
    }
}

/// `run` of a frame whose inner frame starts at `inner`.
fn run_at(data: &[u8], inner: usize, a: &FlowAction) -> (Verdict, Vec<u8>) {
    let key = crate::pipeline::key::extract_key(data, 3).unwrap();
    let mut buf = Vec::new();
    let (start, end) = framed(data, &mut buf);
    let mut f = Frame {
        buf: &mut buf,
        start,
        end,
    };
    let v = execute(&mut f, &key, inner, a, &mut Counting);
    (v, f.bytes().to_vec())
}

fn framed(data: &[u8], buf: &mut Vec<u8>) -> (usize, usize) {
    buf.clear();
    buf.resize(HEADROOM, 0);
    buf.extend_from_slice(data);
    buf.resize(HEADROOM + data.len() + 64, 0);
    (HEADROOM, HEADROOM + data.len())
}

fn encap_action() -> FlowAction {
    FlowAction {
        kind: act::ENCAP,
        out_ifindex: 2,
        out_slot: 1,
        flags: flag::NH_CACHED | flag::UDP_CSUM,
        encap_src: u32::from_ne_bytes([198, 18, 0, 1]),
        encap_dst: u32::from_ne_bytes([198, 18, 0, 2]),
        vni: 1000,
        ovn_opt: (3 << 16) | 4,
        max_inner_len: 1500,
        nh_dmac: [2, 0, 0, 0, 0, 2],
        nh_smac: [2, 0, 0, 0, 0, 1],
        ..Default::default()
    }
}

#[test]
fn encap_writes_headers_an_independent_decoder_accepts() {
    let frame = inner();
    let key = crate::pipeline::key::extract_key(&frame, 3).unwrap();
    let (v, out) = run(&frame, &encap_action());
    assert_eq!(
        v,
        Verdict::Output {
            ifindex: 2,
            out_slot: 1
        }
    );
    assert_eq!(out.len(), frame.len() + ENCAP_OVERHEAD as usize);
    let p = SlicedPacket::from_ethernet(&out).unwrap();
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        panic!("no IPv4")
    };
    let h = ip.header();
    assert_eq!(h.source(), [198, 18, 0, 1]);
    assert_eq!(h.destination(), [198, 18, 0, 2]);
    assert!(h.dont_fragment());
    assert_eq!(h.to_header().calc_header_checksum(), h.header_checksum());
    let Some(TransportSlice::Udp(udp)) = &p.transport else {
        panic!("no UDP")
    };
    assert_eq!(udp.destination_port(), GENEVE_PORT);
    assert_eq!(udp.source_port(), udp_source_port(flow_hash(&key)));
    let want = udp
        .to_header()
        .calc_checksum_ipv4(&h.to_header(), udp.payload())
        .unwrap();
    assert_eq!(udp.checksum(), want);
    // The same bytes as the slow path's encapsulation of the same frame.
    let mut slow = vec![0u8; 2048];
    let n = crate::pipeline::encap::emit_encap(
        &mut slow,
        &frame,
        &crate::pipeline::encap::EncapParams {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src_ip: Ipv4Addr::new(198, 18, 0, 1),
            dst_ip: Ipv4Addr::new(198, 18, 0, 2),
            sport: udp_source_port(flow_hash(&key)),
            vni: 1000,
            meta: OvnMetadata::from_value((3 << 16) | 4),
            udp_csum: true,
        },
    )
    .unwrap();
    assert_eq!(&slow[..n], &out[..]);
}

#[test]
fn decap_leaves_the_inner_frame() {
    let frame = inner();
    let (_, encapped) = run(&frame, &encap_action());
    let a = FlowAction {
        kind: act::DECAP_OUTPUT,
        out_ifindex: 5,
        out_slot: 3,
        ..Default::default()
    };
    let (v, out) = run_at(&encapped, ENCAP_OVERHEAD as usize, &a);
    assert_eq!(
        v,
        Verdict::Output {
            ifindex: 5,
            out_slot: 3
        }
    );
    assert_eq!(out, frame);
    // An inner offset past the frame is malformed, not a panic.
    assert_eq!(
        run_at(&encapped, 5000, &a).0,
        Verdict::Drop(ctr::DROP_MALFORMED)
    );
}

#[test]
fn a_routed_frame_gets_new_macs_and_ttl_with_a_good_checksum() {
    let frame = inner();
    let a = FlowAction {
        kind: act::OUTPUT,
        flags: flag::ROUTE,
        out_ifindex: 4,
        set_smac: [0x0a, 0, 0, 0, 0xff, 2],
        set_dmac: [0x0a, 0, 0, 0, 1, 2],
        ..Default::default()
    };
    let (v, out) = run(&frame, &a);
    assert!(matches!(v, Verdict::Output { .. }));
    let p = SlicedPacket::from_ethernet(&out).unwrap();
    let Some(etherparse::LinkSlice::Ethernet2(eth)) = &p.link else {
        panic!()
    };
    assert_eq!(eth.destination(), [0x0a, 0, 0, 0, 1, 2]);
    assert_eq!(eth.source(), [0x0a, 0, 0, 0, 0xff, 2]);
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        panic!()
    };
    assert_eq!(ip.header().ttl(), 63);
    assert_eq!(
        ip.header().to_header().calc_header_checksum(),
        ip.header().header_checksum()
    );
    // TTL 1: the slow path answers; a bad checksum, options and martians are dropped.
    assert_eq!(run(&inner_ttl(1), &a).0, Verdict::SlowPath);
    let mut bad = frame.clone();
    bad[24] ^= 1;
    assert_eq!(run(&bad, &a).0, Verdict::Drop(ctr::DROP_IP_CSUM));
    let mut bad = frame.clone();
    bad[14] = 0x46;
    assert_eq!(run(&bad, &a).0, Verdict::Drop(ctr::DROP_IP_OPTIONS));
    let mut bad = frame;
    bad[26] = 127;
    bad[24..26].copy_from_slice(&[0, 0]);
    let c = checksum(&bad[14..34]);
    bad[24..26].copy_from_slice(&c.to_be_bytes());
    assert_eq!(run(&bad, &a).0, Verdict::Drop(ctr::DROP_MARTIAN));
}

#[test]
fn a_floating_ip_is_translated_with_good_checksums() {
    let tcp = {
        let b = etherparse::PacketBuilder::ethernet2([0x0a, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 9])
            .ipv4([203, 0, 113, 7], [172, 24, 4, 100], 64)
            .tcp(40000, 80, 1, 1000);
        let mut out = Vec::new();
        b.write(&mut out, &[0x17; 20]).unwrap();
        out
    };
    let mut nocsum = inner();
    nocsum[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
    for (frame, snat) in [(tcp, false), (inner(), true), (nocsum, true)] {
        let a = FlowAction {
            kind: act::OUTPUT,
            flags: flag::ROUTE | if snat { flag::SNAT } else { flag::DNAT },
            out_ifindex: 4,
            nat_src: u32::from_ne_bytes([172, 24, 4, 101]),
            nat_dst: u32::from_ne_bytes([10, 0, 0, 5]),
            ..Default::default()
        };
        let (v, out) = run(&frame, &a);
        assert!(matches!(v, Verdict::Output { .. }));
        let p = SlicedPacket::from_ethernet(&out).unwrap();
        let Some(NetSlice::Ipv4(ip)) = &p.net else {
            panic!()
        };
        let h = ip.header().to_header();
        assert_eq!(h.calc_header_checksum(), h.header_checksum);
        if snat {
            assert_eq!(h.source, [172, 24, 4, 101]);
        } else {
            assert_eq!(h.destination, [10, 0, 0, 5]);
        }
        match &p.transport {
            Some(etherparse::TransportSlice::Tcp(t)) => {
                let want = t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap();
                assert_eq!(t.checksum(), want);
            }
            // No checksum stays none.
            Some(etherparse::TransportSlice::Udp(u)) if frame[40..42] == [0, 0] => {
                assert_eq!(u.checksum(), 0);
            }
            Some(etherparse::TransportSlice::Udp(u)) => {
                let want = u.to_header().calc_checksum_ipv4(&h, u.payload()).unwrap();
                assert_eq!(u.checksum(), want);
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn an_arp_request_becomes_the_reply_sent_back() {
    use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr, EthernetFrame};
    let vm = geneflow_control::model::Mac([0x0a, 0, 0, 0, 0, 1]);
    let mut req = Vec::new();
    crate::pipeline::rewrite::arp_frame(
        &mut req,
        vm,
        Ipv4Addr::new(10, 0, 0, 1),
        Ipv4Addr::new(10, 0, 0, 3),
        false,
    );
    let owner = [0x0a, 0, 0, 0, 0, 3];
    let a = FlowAction {
        kind: act::ARP_REPLY,
        set_smac: owner,
        out_ifindex: 5,
        ..Default::default()
    };
    let (v, out) = run(&req, &a);
    assert_eq!(
        v,
        Verdict::Output {
            ifindex: 5,
            out_slot: 0
        }
    );
    let eth = EthernetFrame::new_checked(&out[..]).unwrap();
    assert_eq!(eth.dst_addr().0, vm.0);
    assert_eq!(eth.src_addr().0, owner);
    let repr = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).unwrap()).unwrap();
    let ArpRepr::EthernetIpv4 {
        operation,
        source_hardware_addr,
        source_protocol_addr,
        target_hardware_addr,
        target_protocol_addr,
    } = repr
    else {
        panic!()
    };
    assert_eq!(operation, ArpOperation::Reply);
    assert_eq!(source_hardware_addr.0, owner);
    assert_eq!(source_protocol_addr, Ipv4Addr::new(10, 0, 0, 3));
    assert_eq!(target_hardware_addr.0, vm.0);
    assert_eq!(target_protocol_addr, Ipv4Addr::new(10, 0, 0, 1));
    // On a provider VLAN: tagged; a truncated request: dropped.
    let tagged = FlowAction {
        vlan: 0x1000 | 7,
        ..a
    };
    assert_eq!(&run(&req, &tagged).1[12..16], &[0x81, 0, 0, 7]);
    assert_eq!(
        run(&req[..40], &a).0,
        Verdict::Drop(ctr::DROP_MALFORMED_ARP)
    );
}

#[test]
fn vlan_tags_too_big_frames_and_commits() {
    let frame = inner();
    let a = FlowAction {
        kind: act::OUTPUT,
        out_ifindex: 7,
        vlan: 0x1000 | 42,
        ..Default::default()
    };
    let (v, out) = run(&frame, &a);
    assert!(matches!(v, Verdict::Output { .. }));
    assert_eq!(&out[12..16], &[0x81, 0x00, 0x00, 42]);
    assert_eq!(&out[16..], &frame[12..]);
    assert_eq!(&out[..12], &frame[..12]);
    let mut small = encap_action();
    small.max_inner_len = 60;
    let mut uncached = encap_action();
    uncached.flags = 0;
    let drop = FlowAction {
        kind: act::DROP,
        drop_reason: ctr::DROP_ACL,
        ..Default::default()
    };
    for (a, want) in [
        (small, Verdict::Drop(ctr::DROP_TOO_BIG)),
        (uncached, Verdict::SlowPath),
        (drop, Verdict::Drop(ctr::DROP_ACL)),
    ] {
        let (v, out) = run(&frame, &a);
        assert_eq!(v, want);
        // Nothing moved for the verdicts that leave the frame alone.
        assert_eq!(out, frame);
    }
    // A commit runs with the action, but not for a frame the router's checks stop.
    let mut ct = encap_action();
    ct.flags |= flag::CT_COMMIT;
    COMMITS.with(|c| c.set(0));
    assert!(matches!(run(&frame, &ct).0, Verdict::Output { .. }));
    assert_eq!(COMMITS.with(|c| c.get()), 1);
    ct.flags |= flag::ROUTE;
    assert_eq!(run(&inner_ttl(1), &ct).0, Verdict::SlowPath);
    assert_eq!(COMMITS.with(|c| c.get()), 1);
}
