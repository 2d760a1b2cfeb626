//! Tests of `userct`: states, the cache's epochs, expiry, eviction, ICMP errors, and that
//! lookups never wait for a writer.

use super::*;

fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> FlowKey {
    let mut k = FlowKey::zeroed();
    k.eth_type = 0x0800u16.to_be();
    k.ip_proto = 17;
    k.ip_src = u32::from_ne_bytes(src);
    k.ip_dst = u32::from_ne_bytes(dst);
    k.l4_src = sport.to_be();
    k.l4_dst = dport.to_be();
    k
}

fn committing(zone: u32) -> FlowAction {
    let mut a = FlowAction::default();
    a.flags |= flag::CT_COMMIT;
    a.ct_zones = [zone, 0];
    a
}

#[test]
fn new_then_established_both_ways_and_only_in_its_zone() {
    let t = ConnTable::new(1024);
    let mut c = CtCache::default();
    let mut k = udp([10, 0, 0, 1], [10, 0, 0, 2], 1000, 53);
    lookup(&t, &mut c, &mut k, 7, 0);
    assert_eq!(k.ct_state, ct::NEW);
    assert_eq!(commit(&t, &k, &committing(7), 0), 1);
    let mut k2 = k;
    lookup(&t, &mut c, &mut k2, 7, 1);
    assert_eq!(k2.ct_state, ct::EST);
    let mut r = udp([10, 0, 0, 2], [10, 0, 0, 1], 53, 1000);
    lookup(&t, &mut c, &mut r, 7, 2);
    assert_eq!(r.ct_state, ct::EST | ct::REPLY);
    // Another zone, another port pair: new.
    let mut other = k;
    lookup(&t, &mut c, &mut other, 8, 3);
    assert_eq!(other.ct_state, ct::NEW);
    let mut other = udp([10, 0, 0, 2], [10, 0, 0, 1], 54, 1000);
    lookup(&t, &mut c, &mut other, 7, 3);
    assert_eq!(other.ct_state, ct::NEW);
    // Not IPv4 TCP/UDP/ICMP: untracked.
    let mut arp = FlowKey::zeroed();
    lookup(&t, &mut c, &mut arp, 7, 3);
    assert_eq!(arp.ct_state, 0);
}

/// Port unreachable from 10.0.0.2, quoting 10.0.0.1:1000 -> 10.0.0.2:`dport` (`proto`).
fn port_unreachable(proto: u8, dport: u16) -> Vec<u8> {
    let mut f = vec![0u8; 14];
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let mut ip = vec![
        0x45, 0, 0, 56, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1,
    ];
    ip.extend_from_slice(&[3, 3, 0, 0, 0, 0, 0, 0]);
    ip.extend_from_slice(&[0x45, 0, 0, 28, 0, 0, 0, 0, 64, proto, 0, 0]);
    ip.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
    ip.extend_from_slice(&1000u16.to_be_bytes());
    ip.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&ip);
    f
}

#[test]
fn lookups_take_no_lock_while_a_writer_holds_the_shard() {
    let t = std::sync::Arc::new(ConnTable::new(1024));
    let mut k = udp([10, 0, 0, 1], [10, 0, 0, 2], 1000, 80);
    k.ip_proto = 6;
    commit(&t, &k, &committing(7), 0);
    let ck = ct_key(&k, 7).unwrap();
    // A writer (a commit, an expiry) holds the lock of the tuple's shard meanwhile.
    let _w = t.shard(&ck).write();
    let (tx, rx) = std::sync::mpsc::channel();
    let t2 = t.clone();
    std::thread::spawn(move || {
        let mut c = CtCache::default();
        let (mut est, mut new) = (k, udp([10, 0, 0, 9], [10, 0, 0, 2], 1, 53));
        // A FIN reaches the table (never the cache): refreshed and marked closing.
        est.pad = TCP_FIN;
        lookup(&t2, &mut c, &mut est, 7, 5 * NS);
        lookup(&t2, &mut c, &mut new, 7, 5 * NS);
        let related = icmp_error_related(&t2, &port_unreachable(6, 80), 0, 7);
        let _ = tx.send((est.ct_state, new.ct_state, related));
    });
    let got = rx.recv_timeout(std::time::Duration::from_secs(5));
    assert_eq!(
        got,
        Ok((ct::EST, ct::NEW, true)),
        "a lookup waited for the writer"
    );
    let e = t.entries()[0].1;
    assert_eq!((e.last_seen_ns, e.flags), (5 * NS, ct::CLOSING));
}

#[test]
fn the_cache_answers_within_an_epoch_and_a_deletion_ends_it() {
    let t = ConnTable::new(1024);
    let mut c = CtCache::default();
    let k = udp([10, 0, 0, 1], [10, 0, 0, 2], 1000, 53);
    commit(&t, &k, &committing(7), 0);
    for _ in 0..3 {
        let mut x = k;
        lookup(&t, &mut c, &mut x, 7, 0);
        assert_eq!(x.ct_state, ct::EST);
    }
    assert_eq!((c.hits, c.misses), (2, 1));
    // A flush of the zone: the cached tuple must not pass as established any more.
    assert_eq!(t.delete(|k, _| k.zone == 7), 1);
    let mut x = k;
    lookup(&t, &mut c, &mut x, 7, 0);
    assert_eq!(x.ct_state, ct::NEW);
}

#[test]
fn idle_entries_expire_by_protocol_and_closing_tcp_sooner() {
    let t = ConnTable::new(1024);
    let mut c = CtCache::default();
    let u = udp([10, 0, 0, 1], [10, 0, 0, 2], 1000, 53);
    commit(&t, &u, &committing(7), 0);
    let mut tcp = udp([10, 0, 0, 1], [10, 0, 0, 2], 1000, 80);
    tcp.ip_proto = 6;
    commit(&t, &tcp, &committing(7), 0);
    assert_eq!(t.expire(59 * NS), (0, 2));
    assert_eq!(t.expire(61 * NS), (1, 1));
    // A FIN seen: closing, gone 10 s later, although TCP idles for 6 hours.
    let mut fin = tcp;
    fin.pad = TCP_FIN;
    lookup(&t, &mut c, &mut fin, 7, 62 * NS);
    assert_eq!(fin.ct_state, ct::EST);
    assert_eq!(t.expire(71 * NS), (0, 1));
    assert_eq!(t.expire(73 * NS), (1, 0));
}

#[test]
fn a_full_table_evicts_the_least_recently_seen() {
    let t = ConnTable::new(SHARDS);
    assert_eq!(t.capacity(), SHARDS);
    for i in 0..4000u32 {
        let k = udp([10, 0, 0, 1], [10, 1, (i >> 8) as u8, i as u8], 1000, 53);
        commit(&t, &k, &committing(7), i as u64);
    }
    assert!(t.len() <= SHARDS);
    assert_eq!(
        t.evicted.load(Ordering::Relaxed) as usize,
        4000 - t.len(),
        "every entry that went was counted"
    );
    // The newest one stayed.
    let newest = udp([10, 0, 0, 1], [10, 1, 15, 159], 1000, 53);
    assert!(t.contains(&ct_key(&newest, 7).unwrap()));
}

#[test]
fn post_nat_zones_commit_the_translated_tuple() {
    let t = ConnTable::new(1024);
    let k = udp([203, 0, 113, 9], [172, 24, 4, 100], 1000, 80);
    let mut a = committing(7 | ct::POST_NAT);
    a.flags |= flag::DNAT;
    a.nat_dst = u32::from_ne_bytes([10, 0, 0, 5]);
    assert_eq!(commit(&t, &k, &a, 0), 1);
    let fixed = udp([203, 0, 113, 9], [10, 0, 0, 5], 1000, 80);
    assert!(t.contains(&ct_key(&fixed, 7).unwrap()));
    assert!(!t.contains(&ct_key(&k, 7).unwrap()));
}

#[test]
fn a_forged_header_length_is_no_error_and_no_panic() {
    let t = ConnTable::new(64);
    let mut f = vec![0u8; 14];
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    // IHL 60 in a 46-byte packet.
    let mut ip = vec![
        0x4f, 0, 0, 46, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1,
    ];
    ip.resize(46, 0);
    f.extend_from_slice(&ip);
    assert!(!icmp_error_related(&t, &f, 0, 7));
}

#[test]
fn icmp_errors_about_a_tracked_connection_are_related() {
    let t = ConnTable::new(1024);
    let k = udp([10, 0, 0, 1], [10, 0, 0, 2], 1000, 53);
    commit(&t, &k, &committing(7), 0);
    let f = port_unreachable(17, 53);
    assert!(icmp_error_related(&t, &f, 0, 7));
    assert!(!icmp_error_related(&t, &f, 0, 8));
    // An echo request is not an error; a truncated quote is not related.
    let mut echo = f.clone();
    echo[14 + 20] = 8;
    assert!(!icmp_error_related(&t, &echo, 0, 7));
    assert!(!icmp_error_related(&t, &f[..f.len() - 4], 0, 7));
}
