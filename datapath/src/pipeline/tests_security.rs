//! Unit tests of port security and of the underlay checks of a received Geneve frame.
//!
//! Chassis "a" (198.18.0.1) hosts p1 (10.0.0.1, ifindex 10, allowed pair 10.9.0.0/24) and p2
//! (10.0.0.2, ifindex 11, port security off) on ls (VNI 100); chassis "b" (198.18.0.2) hosts
//! p3 (10.0.0.3).

use super::*;
use crate::wire::geneve::OvnMetadata;
use etherparse::PacketBuilder;
use geneflow_abi::{act, arp, ctr, DP_KEY_HOSTED};
use geneflow_control::compiler::compile;
use geneflow_control::model::*;

const UPLINK: u32 = 2;
const VNI: u32 = 100;
const P1: [u8; 6] = [0x0a, 0, 0, 0, 0, 1];
const P2: [u8; 6] = [0x0a, 0, 0, 0, 0, 2];
const P3: [u8; 6] = [0x0a, 0, 0, 0, 0, 3];
const FORGED: [u8; 6] = [0x0a, 0, 0, 0, 0, 0x66];

fn tables() -> Tables {
    let mut d = NbDocument::default();
    test_nb::chassis_ab(&mut d);
    test_nb::switch(&mut d, "ls", VNI);
    for (n, k, mac, ip, c, sec) in [
        ("p1", 1, P1, "10.0.0.1", "a", true),
        ("p2", 2, P2, "10.0.0.2", "a", false),
        ("p3", 3, P3, "10.0.0.3", "b", true),
    ] {
        let mut p = test_nb::port(n, "ls", k, mac, &[ip], c);
        p.port_security = sec;
        if n == "p1" {
            p.allowed_address_pairs = vec![AddressPair {
                ip: "10.9.0.0/24".parse().unwrap(),
                mac: None,
            }];
        }
        d.ports.insert(n.into(), p);
    }
    assert!(d.check().is_ok(), "{:?}", d.check());
    Tables::new(
        Arc::new(compile(&d, "a")),
        UPLINK,
        1500,
        true,
        |n| match n {
            "vp-p1" => Some(10),
            "vp-p2" => Some(11),
            _ => None,
        },
    )
}

fn udp(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    ports: (u16, u16),
) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, 64)
        .udp(ports.0, ports.1)
        .write(&mut f, &[0u8; 16])
        .unwrap();
    f
}

/// An Ethernet/IPv4 ARP request from `eth_src` with sender `sha`/`spa` for `tpa`.
fn arp(eth_src: [u8; 6], sha: [u8; 6], spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&eth_src);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&tpa);
    f
}

#[allow(clippy::result_large_err)]
fn verdict(t: &Tables, frame: &[u8], ifindex: u32) -> Result<Decision, Dropped> {
    let (mut out, mut buf) = (Vec::new(), Vec::new());
    t.process_dropping(frame, ifindex, (0, 0), &mut out, &mut buf)
}

/// Asserts a drop for `reason` that XDP repeats: a drop megaflow of datapath `dp_key`
/// counting the same reason.
fn assert_cached_drop(r: Result<Decision, Dropped>, reason: DropReason, dp_key: u32) -> Megaflow {
    let d = r.expect_err("forwarded");
    assert_eq!(d.reason, reason);
    let m = d.megaflow.expect("no drop megaflow");
    assert_eq!(m.action.kind, act::DROP);
    assert_eq!(m.action.drop_reason, reason.counter());
    assert_eq!(m.action.dp_key, dp_key);
    m
}

#[test]
fn own_addresses_and_allowed_pairs_pass() {
    let t = tables();
    for src in [[10, 0, 0, 1], [10, 9, 0, 77]] {
        let d = verdict(&t, &udp(P1, P3, src, [10, 0, 0, 3], (1, 2)), 10).unwrap();
        let m = d.megaflow.unwrap();
        assert_eq!(m.mask.eth_src, [0xff; 6]);
        assert_eq!(
            m.mask.ip_src,
            u32::MAX,
            "the source address is part of the match"
        );
    }
}

#[test]
fn forged_sources_are_dropped_by_reason() {
    let t = tables();
    let m = assert_cached_drop(
        verdict(
            &t,
            &udp(FORGED, P3, [10, 0, 0, 1], [10, 0, 0, 3], (1, 2)),
            10,
        ),
        DropReason::SpoofedMac,
        VNI,
    );
    assert_eq!(m.key.eth_src, FORGED);
    assert_eq!(m.action.drop_reason, ctr::DROP_SPOOFED_MAC);
    let m = assert_cached_drop(
        verdict(&t, &udp(P1, P3, [10, 0, 0, 3], [10, 0, 0, 3], (1, 2)), 10),
        DropReason::SpoofedIp,
        VNI,
    );
    // Only the fields consulted: the destination does not matter to this verdict.
    assert_eq!(m.mask.eth_dst, [0; 6]);
    assert_eq!(m.mask.ip_dst, 0);
    // A pair's prefix does not extend past itself.
    assert_cached_drop(
        verdict(&t, &udp(P1, P3, [10, 9, 1, 1], [10, 0, 0, 3], (1, 2)), 10),
        DropReason::SpoofedIp,
        VNI,
    );
    let mut v6 = udp(P1, P3, [10, 0, 0, 1], [10, 0, 0, 3], (1, 2));
    v6[12..14].copy_from_slice(&[0x86, 0xdd]);
    assert_cached_drop(verdict(&t, &v6, 10), DropReason::Ipv6NotAllowed, VNI);
}

#[test]
fn arp_must_be_the_ports_own() {
    let t = tables();
    // Sender MAC differs from the Ethernet source.
    assert_cached_drop(
        verdict(&t, &arp(P1, FORGED, [10, 0, 0, 1], [10, 0, 0, 3]), 10),
        DropReason::SpoofedArp,
        VNI,
    );
    // Sender address that is not the port's (ARP cache poisoning of 10.0.0.3).
    assert_cached_drop(
        verdict(&t, &arp(P1, P1, [10, 0, 0, 3], [10, 0, 0, 2]), 10),
        DropReason::SpoofedArp,
        VNI,
    );
    // Its own request, and an address probe from 0.0.0.0, go on (answered or switched).
    assert!(verdict(&t, &arp(P1, P1, [10, 0, 0, 1], [10, 0, 0, 3]), 10).is_ok());
    assert!(verdict(&t, &arp(P1, P1, [0, 0, 0, 0], [10, 0, 0, 1]), 10).is_ok());
    // The key marks the mismatch the same way the XDP program does.
    let k = extract_key(&arp(P1, FORGED, [10, 0, 0, 1], [10, 0, 0, 3]), 10).unwrap();
    assert_eq!(k.ip_proto, arp::OP_REQUEST | arp::SHA_MISMATCH);
}

#[test]
fn dhcp_client_broadcast_passes_and_port_security_can_be_off() {
    let t = tables();
    let discover = udp(P1, [0xff; 6], [0, 0, 0, 0], [255, 255, 255, 255], (68, 67));
    assert!(verdict(&t, &discover, 10).is_ok());
    // Not DHCP from 0.0.0.0: dropped.
    let other = udp(P1, [0xff; 6], [0, 0, 0, 0], [255, 255, 255, 255], (68, 53));
    assert_cached_drop(verdict(&t, &other, 10), DropReason::SpoofedIp, VNI);
    // p2 has port security off: any source.
    assert!(verdict(
        &t,
        &udp(FORGED, P3, [192, 0, 2, 1], [10, 0, 0, 3], (1, 2)),
        11
    )
    .is_ok());
}

/// A Geneve frame from `outer_src` to chassis "a" carrying a frame for p1.
fn geneve(outer_src: &str, vni: u32, egress: u16) -> Vec<u8> {
    let inner = udp(P3, P1, [10, 0, 0, 3], [10, 0, 0, 1], (1, 2));
    let p = EncapParams {
        src_mac: [2, 0, 0, 0, 0, 2],
        dst_mac: [2, 0, 0, 0, 0, 1],
        src_ip: outer_src.parse().unwrap(),
        dst_ip: "198.18.0.1".parse().unwrap(),
        sport: 49152,
        vni,
        meta: OvnMetadata { ingress: 3, egress },
        udp_csum: false,
    };
    let mut buf = vec![0u8; 256];
    let n = emit_encap(&mut buf, &inner, &p).unwrap();
    buf.truncate(n);
    buf
}

#[test]
fn underlay_frames_are_checked_before_delivery() {
    let t = tables();
    assert!(verdict(&t, &geneve("198.18.0.2", VNI, 1), UPLINK).is_ok());
    // Not a chassis of the NB.
    let e = verdict(&t, &geneve("198.18.0.77", VNI, 1), UPLINK).unwrap_err();
    assert_eq!(e.reason, DropReason::UnknownSource);
    // Lengths that disagree with the frame: UDP longer, UDP shorter, IPv4 shorter.
    let good = geneve("198.18.0.2", VNI, 1);
    for (off, delta) in [(38usize, 1i32), (38, -1), (16, -1)] {
        let mut f = good.clone();
        let v = u16::from_be_bytes([f[off], f[off + 1]]) as i32 + delta;
        f[off..off + 2].copy_from_slice(&(v as u16).to_be_bytes());
        let e = verdict(&t, &f, UPLINK).unwrap_err();
        assert_eq!(e.reason, DropReason::BadLength, "offset {off} {delta:+}");
        assert!(e.megaflow.is_none(), "a length is not in the key");
    }
    // A multicast egress key that is no group: dropped, not flooded.
    assert_cached_drop(
        verdict(&t, &geneve("198.18.0.2", VNI, MC_FLOOD_KEY + 5), UPLINK),
        DropReason::UnknownGroup,
        VNI,
    );
    // The flood group itself is delivered.
    assert!(verdict(&t, &geneve("198.18.0.2", VNI, MC_FLOOD_KEY), UPLINK).is_ok());
    // An unknown VNI: negative cache in the "hosted datapaths" generation slot.
    let m = assert_cached_drop(
        verdict(&t, &geneve("198.18.0.2", 999, 1), UPLINK),
        DropReason::UnknownDatapath,
        DP_KEY_HOSTED,
    );
    assert_eq!(m.mask.tun_vni, u32::MAX);
    assert_eq!(m.mask.tun_out_port, 0);
    // An unknown port key of a hosted datapath.
    assert_cached_drop(
        verdict(&t, &geneve("198.18.0.2", VNI, 77), UPLINK),
        DropReason::UnknownPort,
        VNI,
    );
}
