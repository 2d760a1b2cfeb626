//! The userspace datapath engine (`crate::userpath`) on the switching topology of `tests`:
//! first frames through the pipeline, the rest through the megaflow cache and the userspace
//! actions, with the same bytes on the wire.

use super::tests::tables;
use super::*;
use crate::flowcache::{FlowCache, GenerationTable, Generations};
use crate::userneigh::UnderlayNeigh;
use crate::userpath::{Tx, UserPath};
use geneflow_abi::ctr;
use geneflow_control::model::Mac;
use std::time::Instant;

const FRAME_CSUM: &[u8] = include_bytes!("../../../tests/fixtures/geneve/frame_ovn_csum.bin");
const UPLINK: u32 = 2;
const A_MAC: [u8; 6] = [2, 0, 0xc6, 0x12, 0, 1];
const B_MAC: [u8; 6] = [2, 0, 0xc6, 0x12, 0, 2];

#[derive(Default)]
struct Wire(Vec<(u32, Vec<u8>)>);

impl Tx for Wire {
    fn send(&mut self, ifindex: u32, frame: &[u8]) -> bool {
        self.0.push((ifindex, frame.to_vec()));
        true
    }
}

fn engine(t: &Tables) -> (GenerationTable, UserPath) {
    let gens = Arc::new(Generations::default());
    let mut table = GenerationTable::new(gens.clone());
    table.set_generations(&t.fingerprints(A_MAC)).unwrap();
    let mut neigh = UnderlayNeigh::new("198.18.0.1".parse().unwrap(), Mac(A_MAC));
    neigh.set_allowed(["198.18.0.2".parse().unwrap()]);
    let neigh = Arc::new(std::sync::Mutex::new(neigh));
    let ct = Arc::new(crate::userct::ConnTable::new(1024));
    let cfg = crate::userpath::PathConfig {
        ports: 1,
        uplink: (UPLINK, A_MAC),
        udp_csum: true,
        dhcp_rate: 20.0,
        threads: 1,
        events: None,
    };
    let shared = crate::userpath::PathShared {
        neigh,
        conntrack: ct,
        nat: Arc::new(crate::usernat::NatMap::new(1024)),
        published: Default::default(),
    };
    let path = UserPath::new(FlowCache::new(gens, 1000), shared, cfg);
    (table, path)
}

/// b's ARP reply to a's request.
fn reply_from_b() -> Vec<u8> {
    let mut f = Vec::new();
    crate::pipeline::rewrite::arp_frame(
        &mut f,
        Mac(B_MAC),
        "198.18.0.2".parse().unwrap(),
        "198.18.0.1".parse().unwrap(),
        false,
    );
    f[21] = 2;
    f
}

#[test]
fn a_flow_to_a_remote_port_leaves_the_pipeline_for_the_cache_with_the_same_bytes() {
    let t = tables();
    let (mut gens, mut p) = engine(&t);
    let now = Instant::now();
    let frame = &FRAME_CSUM[58..];
    // The first frame: b's MAC unknown, so the ARP request goes out and the frame waits.
    let mut w = Wire::default();
    p.receive(&t, frame, (10, 0), now, &mut w);
    p.flush_pending(now, &mut w);
    assert_eq!(w.0.len(), 1);
    assert_eq!((w.0[0].0, &w.0[0].1[12..14]), (UPLINK, &[0x08, 0x06][..]));
    assert_eq!(p.total(ctr::DROP_NO_NEIGH), 0);
    // b answers: the parked frame leaves, to b's MAC.
    p.receive(&t, &reply_from_b(), (UPLINK, 0), now, &mut Wire::default());
    let mut w = Wire::default();
    p.flush_pending(now, &mut w);
    let (ix, parked) = w.0.pop().expect("the parked frame");
    assert_eq!(ix, UPLINK);
    assert_eq!(&parked[..6], &B_MAC);
    // The next frame goes through the pipeline (the entry had no next hop): the same bytes.
    let mut w = Wire::default();
    p.receive(&t, frame, (10, 0), now, &mut w);
    assert_eq!(p.total(ctr::SLOW_RX), 2);
    let (ix, slow) = w.0.pop().expect("encapsulated");
    assert_eq!(ix, UPLINK);
    assert_eq!(slow, parked);
    // The third takes the cache: the same bytes.
    let mut w = Wire::default();
    p.receive(&t, frame, (10, 0), now, &mut w);
    assert_eq!(p.total(ctr::FAST_HIT), 1);
    assert_eq!(p.total(ctr::SLOW_RX), 2);
    assert_eq!(w.0, vec![(UPLINK, slow.clone())]);
    // The datapath changes: its entries go stale, the pipeline decides again.
    let mut fps = t.fingerprints(A_MAC);
    for v in fps.values_mut() {
        *v ^= 1;
    }
    gens.set_generations(&fps).unwrap();
    let mut w = Wire::default();
    p.receive(&t, frame, (10, 0), now, &mut w);
    assert_eq!(p.total(ctr::SLOW_RX), 3);
    assert_eq!(w.0, vec![(UPLINK, slow)]);
}

#[test]
fn tunnel_frames_are_decapsulated_and_bad_ones_dropped_with_xdps_reasons() {
    let t = tables();
    let (_, mut p) = engine(&t);
    let now = Instant::now();
    let mut f = FRAME_CSUM.to_vec();
    // From b (198.18.0.2) to a, egress port p2 (key 6).
    f[26..30].copy_from_slice(&[198, 18, 0, 2]);
    f[30..34].copy_from_slice(&[198, 18, 0, 1]);
    f[56..58].copy_from_slice(&6u16.to_be_bytes());
    for hit in [0, 1] {
        let mut w = Wire::default();
        p.receive(&t, &f, (UPLINK, 0), now, &mut w);
        assert_eq!(w.0, vec![(11, f[58..].to_vec())]);
        assert_eq!(p.total(ctr::FAST_HIT), hit);
    }
    let mut v1 = f.clone();
    v1[42] |= 0x40;
    p.receive(&t, &v1, (UPLINK, 0), now, &mut Wire::default());
    assert_eq!(p.total(ctr::DROP_GENEVE_VERSION), 1);
    p.receive(&t, &f[..46], (UPLINK, 0), now, &mut Wire::default());
    assert_eq!(p.total(ctr::DROP_BAD_LENGTH), 1);
    // An ARP request for a's tunnel address is answered from the uplink.
    let mut req = Vec::new();
    crate::pipeline::rewrite::arp_frame(
        &mut req,
        Mac(B_MAC),
        "198.18.0.2".parse().unwrap(),
        "198.18.0.1".parse().unwrap(),
        false,
    );
    let mut w = Wire::default();
    p.receive(&t, &req, (UPLINK, 0), now, &mut w);
    assert_eq!(w.0.len(), 1);
    assert_eq!(&w.0[0].1[..6], &B_MAC);
    assert_eq!(&w.0[0].1[6..12], &A_MAC);
    // One for another address on the underlay is not ours: no answer, and the neighbour
    // table's lock is not taken (it is held here meanwhile).
    let mut other = Vec::new();
    crate::pipeline::rewrite::arp_frame(
        &mut other,
        Mac(B_MAC),
        "198.18.0.2".parse().unwrap(),
        "198.18.0.9".parse().unwrap(),
        false,
    );
    let neigh = p.neigh.clone();
    let held = neigh.lock().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut w = Wire::default();
            p.receive(&t, &other, (UPLINK, 0), now, &mut w);
            let _ = tx.send(w.0.len());
        });
        let sent = rx.recv_timeout(std::time::Duration::from_secs(5));
        drop(held);
        assert_eq!(
            sent,
            Ok(0),
            "another host's ARP waited for the table's lock"
        );
    });
}

/// A routed flow on the userspace engine (the topology of `tests_router`: p1 on ls1,
/// ifindex 10, to p3 on ls2, ifindex 11): what the router's checks refuse on a cache hit is
/// a drop, not a hit, and TTL - 1 sets the checksum as XDP and Linux do.
#[test]
fn routed_hits_count_like_xdp_and_decrement_ttl_like_linux() {
    let t = super::tests_router::tables();
    let (_, mut p) = engine(&t);
    let now = Instant::now();
    let r1 = [0x0a, 0xff, 0, 0, 0, 1];
    // An IP id that makes the header checksum 0xfeff: + 0x0100 for TTL - 1 gives 0xffff,
    // which Linux's ip_decrease_ttl (and XDP) write as 0x0000.
    let mut f = super::tests_router::udp(r1, [10, 1, 0, 5], [10, 2, 0, 7], 64, 18);
    let id = (0..=u16::MAX)
        .find(|&id| {
            f[18..20].copy_from_slice(&id.to_be_bytes());
            f[24..26].copy_from_slice(&[0, 0]);
            let mut s: u32 = f[14..34]
                .chunks(2)
                .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
                .sum();
            while s > 0xffff {
                s = (s & 0xffff) + (s >> 16);
            }
            !(s as u16) == 0xfeff
        })
        .expect("an id");
    f[18..20].copy_from_slice(&id.to_be_bytes());
    f[24..26].copy_from_slice(&[0xfe, 0xff]);
    for hit in [0, 1] {
        let mut w = Wire::default();
        p.receive(&t, &f, (10, 0), now, &mut w);
        assert_eq!(p.total(ctr::FAST_HIT), hit);
        let (ix, out) = w.0.pop().expect("routed");
        assert_eq!(ix, 11);
        assert_eq!(out[22], 63);
        assert_eq!(out[24..26], [0, 0], "checksum after TTL - 1 (hit {hit})");
    }
    // A bad header checksum under the same megaflow: dropped with its reason, not a hit.
    let mut bad = f.clone();
    bad[24] ^= 0xff;
    let mut w = Wire::default();
    p.receive(&t, &bad, (10, 0), now, &mut w);
    assert!(w.0.is_empty());
    assert_eq!(p.total(ctr::DROP_IP_CSUM), 1);
    assert_eq!(p.total(ctr::FAST_HIT), 1);
}
