//! Unit tests of the switching stages and the encap emitter (routing: `tests_router`).
use super::*;
use crate::wire::geneve::OvnMetadata;
use geneflow_abi::{act, ctr};
use geneflow_control::compiler::compile;
use geneflow_control::model::NbDocument;
use geneflow_control::model::MC_FLOOD_KEY;

const FRAME_CSUM: &[u8] = include_bytes!("../../../tests/fixtures/geneve/frame_ovn_csum.bin");
const FRAME_NOCSUM: &[u8] = include_bytes!("../../../tests/fixtures/geneve/frame_ovn_nocsum.bin");
const UPLINK: u32 = 2;

fn params(csum: bool) -> EncapParams {
    EncapParams {
        src_mac: [2, 0, 0xc6, 0x12, 0, 1],
        dst_mac: [2, 0, 0xc6, 0x12, 0, 2],
        src_ip: "198.18.0.1".parse().unwrap(),
        dst_ip: "198.18.0.2".parse().unwrap(),
        sport: 49152,
        vni: 0xabcd,
        meta: OvnMetadata {
            ingress: 5,
            egress: 7,
        },
        udp_csum: csum,
    }
}

#[test]
fn encap_is_byte_exact_with_scapy() {
    let inner = &FRAME_CSUM[58..];
    let mut buf = [0u8; 256];
    let n = emit_encap(&mut buf, inner, &params(true)).unwrap();
    assert_eq!(&buf[..n], FRAME_CSUM);
    let n = emit_encap(&mut buf, inner, &params(false)).unwrap();
    assert_eq!(&buf[..n], FRAME_NOCSUM);
    assert!(emit_encap(&mut buf[..100], inner, &params(true)).is_none());
}

/// Chassis "a" (198.18.0.1) hosts p1 (ifindex 10) and p2 (11) on ls (VNI 0xabcd);
/// chassis "b" hosts p7.
pub(super) fn tables() -> Tables {
    let mut d = NbDocument::default();
    test_nb::chassis_ab(&mut d);
    test_nb::switch(&mut d, "ls", 0xabcd);
    for (n, k, mac, c) in [
        ("p1", 5, [0x0a, 0, 0, 0, 0, 1], "a"),
        ("p2", 6, [0x0a, 0, 0, 0, 0, 3], "a"),
        ("p7", 7, [0x0a, 0, 0, 0, 0, 2], "b"),
    ] {
        d.ports
            .insert(n.into(), test_nb::port(n, "ls", k, mac, &[], c));
    }
    let p = Arc::new(compile(&d, "a"));
    Tables::new(p, UPLINK, 1500, true, |n| match n {
        "vp-p1" => Some(10),
        "vp-p2" => Some(11),
        _ => None,
    })
}

#[test]
fn fingerprints_move_only_with_what_megaflows_depend_on() {
    let t = tables();
    let mac = [2, 0, 0, 0, 0, 1];
    let base = t.fingerprints(mac);
    // One per datapath, and the set of hosted datapaths (slot 0).
    assert_eq!(base.keys().copied().collect::<Vec<_>>(), vec![0, 0xabcd]);
    // Recompiling the same NB, as a restarted agent does, gives the same fingerprints.
    assert_eq!(tables().fingerprints(mac), base);
    // Each input of the actions changes it: a port's interface, the uplink's MAC and MTU,
    // the checksum option, the encap IP.
    let reattached = Tables::new(t.pipeline.clone(), UPLINK, 1500, true, |n| match n {
        "vp-p1" => Some(12),
        "vp-p2" => Some(11),
        _ => None,
    });
    assert_ne!(reattached.fingerprints(mac), base);
    assert_ne!(t.fingerprints([2, 0, 0, 0, 0, 2]), base);
    let other_mtu = Tables::new(t.pipeline.clone(), UPLINK, 9000, true, |n| t.ifindex(n));
    assert_ne!(other_mtu.fingerprints(mac), base);
    let no_csum = Tables::new(t.pipeline.clone(), UPLINK, 1500, false, |n| t.ifindex(n));
    assert_ne!(no_csum.fingerprints(mac), base);
    let mut p = (*t.pipeline).clone();
    p.encap_ip = Some("198.18.0.9".parse().unwrap());
    let moved = Tables::new(Arc::new(p), UPLINK, 1500, true, |n| t.ifindex(n));
    assert_ne!(moved.fingerprints(mac), base);
}

#[test]
fn mangled_frames_never_panic_and_every_verdict_is_counted() {
    // Deterministic sweep standing in for a fuzzer: every truncation and random byte
    // mutations of a valid Geneve frame (uplink) and of its inner frame (VM port).
    let t = tables();
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // The uplink's Geneve frame, addressed to this chassis and its port p2 (key 6).
    let mut geneve = FRAME_CSUM.to_vec();
    readdress(&mut geneve);
    geneve[56..58].copy_from_slice(&6u16.to_be_bytes());
    for (base, in_if) in [(geneve, UPLINK), (FRAME_CSUM[58..].to_vec(), 10)] {
        // The sweep starts from frames the pipeline accepts.
        t.process(&base, in_if, &mut out, &mut buf).unwrap();
        for len in 0..=base.len() {
            let _ = t.process(&base[..len], in_if, &mut out, &mut buf);
        }
        for _ in 0..20_000 {
            let mut f = base.clone();
            for _ in 0..1 + rnd() % 4 {
                let i = (rnd() as usize) % f.len();
                f[i] = rnd() as u8;
            }
            let len = f.len() - (rnd() as usize % 8).min(f.len());
            match t.process(&f[..len], in_if, &mut out, &mut buf) {
                Ok(d) => assert!(d.payload_offset <= len),
                Err(r) => assert!(r.counter() < ctr::COUNT, "{r:?}"),
            }
        }
    }
}

fn inner_to(dst: [u8; 6]) -> Vec<u8> {
    let mut f = FRAME_CSUM[58..].to_vec();
    f[0..6].copy_from_slice(&dst);
    f
}

#[test]
fn local_to_remote_encaps_with_megaflow() {
    let t = tables();
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let d = t
        .process(&FRAME_CSUM[58..], 10, &mut out, &mut buf)
        .unwrap();
    assert_eq!(
        out,
        vec![Output::Tunnel {
            remote: "198.18.0.2".parse().unwrap(),
            vni: 0xabcd,
            meta: OvnMetadata {
                ingress: 5,
                egress: 7
            }
        }]
    );
    let m = d.megaflow.unwrap();
    assert_eq!(m.action.kind, act::ENCAP);
    assert_eq!(m.action.ovn_opt, 0x0005_0007);
    assert_eq!(m.action.out_ifindex, UPLINK);
    assert_eq!(m.action.max_inner_len, 1456);
    // The megaflow is wide: in-port, destination MAC, and the source MAC port security
    // checked (the port has no IPv4 address: not the source address).
    assert_eq!(m.key.ip_src, 0);
    assert_eq!(m.mask.eth_src, [0xff; 6]);
    assert_eq!(m.key.eth_dst, [0x0a, 0, 0, 0, 0, 2]);
    assert_eq!(m.key.in_ifindex, 10);
}

#[test]
fn local_to_local_outputs() {
    let t = tables();
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let d = t
        .process(&inner_to([0x0a, 0, 0, 0, 0, 3]), 10, &mut out, &mut buf)
        .unwrap();
    assert_eq!(out, vec![Output::Local { ifindex: 11 }]);
    assert_eq!(d.megaflow.unwrap().action.kind, act::OUTPUT);
}

#[test]
fn broadcast_floods_locally_and_replicates() {
    let t = tables();
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let d = t
        .process(&inner_to([0xff; 6]), 10, &mut out, &mut buf)
        .unwrap();
    assert!(d.megaflow.is_none());
    assert_eq!(out.len(), 2);
    assert!(out.contains(&Output::Local { ifindex: 11 }));
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Tunnel { meta, .. } if meta.egress == MC_FLOOD_KEY)));
}

#[test]
fn unknown_destination_and_port_drop() {
    let t = tables();
    let mut out = Vec::new();
    let mut buf = Vec::new();
    assert_eq!(
        t.process(&inner_to([0x0a, 0, 0, 0, 0, 0x99]), 10, &mut out, &mut buf),
        Err(DropReason::NoDestination)
    );
    assert_eq!(
        t.process(&FRAME_CSUM[58..], 99, &mut out, &mut buf),
        Err(DropReason::UnknownInPort)
    );
    assert_eq!(
        t.process(&[0u8; 5], 10, &mut out, &mut buf),
        Err(DropReason::Malformed)
    );
}

/// Turns the scapy frame (from a, 198.18.0.1, to b, 198.18.0.2) around: from b to a, as chassis
/// a receives it. Swapping the addresses keeps the header checksum valid.
fn readdress(f: &mut [u8]) {
    f[26..30].copy_from_slice(&[198, 18, 0, 2]);
    f[30..34].copy_from_slice(&[198, 18, 0, 1]);
}

#[test]
fn tunnel_to_local_decaps() {
    let t = tables();
    // The scapy frame is addressed to 198.18.0.2; chassis b's view receives it.
    let mut f = FRAME_CSUM.to_vec();
    // Re-address to a (198.18.0.1) and egress port p2 (key 6).
    readdress(&mut f);
    f[56..58].copy_from_slice(&6u16.to_be_bytes());
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let d = t.process(&f, UPLINK, &mut out, &mut buf).unwrap();
    assert_eq!(out, vec![Output::Local { ifindex: 11 }]);
    assert_eq!(d.payload_offset, 58);
    let m = d.megaflow.unwrap();
    assert_eq!(m.action.kind, act::DECAP_OUTPUT);
    assert_eq!((m.key.tun_vni, m.key.tun_out_port), (0xabcd, 6));
    // Unknown egress key and unknown VNI are counted drops.
    f[56..58].copy_from_slice(&77u16.to_be_bytes());
    assert_eq!(
        t.process(&f, UPLINK, &mut out, &mut buf),
        Err(DropReason::UnknownPort)
    );
    f[47] = 0x99;
    assert_eq!(
        t.process(&f, UPLINK, &mut out, &mut buf),
        Err(DropReason::UnknownDatapath)
    );
}

/// The userspace fast path's key is the pipeline's key, and the megaflow's key is it masked,
/// for a frame from a VM port and one from the tunnel; bad outer headers fail the same way.
#[test]
fn the_fast_key_is_the_key_the_pipeline_decided_on() {
    let t = tables();
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let mut tunnel = FRAME_CSUM.to_vec();
    readdress(&mut tunnel);
    tunnel[56..58].copy_from_slice(&6u16.to_be_bytes());
    for (f, in_if, inner) in [(&FRAME_CSUM[58..], 10, 0), (&tunnel[..], UPLINK, 58)] {
        let d = t.process(f, in_if, &mut out, &mut buf).unwrap();
        let (k, off) = t.fast_key(f, (in_if, 0)).unwrap().unwrap();
        assert_eq!(off, inner);
        assert_eq!(k, d.key, "in {in_if}");
        let m = d.megaflow.unwrap();
        assert_eq!(k.masked(&m.mask), m.key.masked(&m.mask));
    }
    let mut v1 = tunnel.clone();
    v1[42] |= 0x40;
    assert_eq!(t.fast_key(&v1, (UPLINK, 0)), Err(DropReason::GeneveVersion));
    assert_eq!(
        t.fast_key(&tunnel[..46], (UPLINK, 0)),
        Err(DropReason::BadLength)
    );
    assert_eq!(t.fast_key(&[0u8; 6], (10, 0)), Ok(None));
}

#[test]
fn malformed_tunnel_frames_map_to_reasons() {
    let t = tables();
    let mut base = FRAME_CSUM.to_vec();
    readdress(&mut base);
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let mut v1 = base.clone();
    v1[42] |= 0x40;
    assert_eq!(
        t.process(&v1, UPLINK, &mut out, &mut buf),
        Err(DropReason::GeneveVersion)
    );
    let mut crit = base.clone();
    crit[50..52].copy_from_slice(&0xffffu16.to_be_bytes());
    assert_eq!(
        t.process(&crit, UPLINK, &mut out, &mut buf),
        Err(DropReason::GeneveCriticalOpt)
    );
    let mut optlen = base.clone();
    optlen[53] = 3;
    assert_eq!(
        t.process(&optlen, UPLINK, &mut out, &mut buf),
        Err(DropReason::GeneveOptLen)
    );
    // Cut short, the frame no longer matches its outer lengths.
    assert_eq!(
        t.process(&base[..46], UPLINK, &mut out, &mut buf),
        Err(DropReason::BadLength)
    );
}
