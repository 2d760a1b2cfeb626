//! Unit tests of the neighbour table and the resolver's message handling.

use super::*;
use netlink_packet_core::NetlinkHeader;
use netlink_packet_route::route::RouteHeader;

const UL: u32 = 7;
const MAC_R: [u8; 6] = [2, 0, 0, 0, 0, 0xfe];
const MAC_R2: [u8; 6] = [2, 0, 0, 0, 0, 0xfd];

/// A message as the kernel sends it: serialized, then parsed back from the bytes.
fn wire(m: RouteNetlinkMessage) -> RouteNetlinkMessage {
    let mut nl = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(m));
    nl.finalize();
    let mut b = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut b);
    match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&b)
        .unwrap()
        .payload
    {
        NetlinkPayload::InnerMessage(i) => i,
        p => panic!("{p:?}"),
    }
}

fn neigh_msg(
    ix: u32,
    ip: Ipv4Addr,
    state: NeighbourState,
    mac: Option<[u8; 6]>,
) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.ifindex = ix;
    m.header.state = state;
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    if let Some(mac) = mac {
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    }
    match wire(RouteNetlinkMessage::NewNeighbour(m)) {
        RouteNetlinkMessage::NewNeighbour(m) => m,
        o => panic!("{o:?}"),
    }
}

fn route_msg(kind: RouteType, gw: Option<Ipv4Addr>, oif: u32) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet;
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.kind = kind;
    if let Some(g) = gw {
        m.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(g)));
    }
    m.attributes.push(RouteAttribute::Oif(oif));
    match wire(RouteNetlinkMessage::NewRoute(m)) {
        RouteNetlinkMessage::NewRoute(m) => m,
        o => panic!("{o:?}"),
    }
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

#[test]
fn parses_neighbour_entries() {
    let m = neigh_msg(
        UL,
        ip("198.18.1.254"),
        NeighbourState::Reachable,
        Some(MAC_R),
    );
    let (ix, a, e) = parse_neigh(&m).unwrap();
    assert_eq!((ix, a), (UL, ip("198.18.1.254")));
    assert_eq!(e.usable(), Some(MAC_R));
    assert!(e.needs_trigger(), "made managed");
    let m = neigh_msg(
        UL,
        ip("198.18.1.254"),
        NeighbourState::Permanent,
        Some(MAC_R),
    );
    let e = parse_neigh(&m).unwrap().2;
    assert_eq!(e.usable(), Some(MAC_R));
    assert!(!e.needs_trigger(), "a static entry is never touched");
    let m = neigh_msg(UL, ip("198.18.1.9"), NeighbourState::Incomplete, None);
    let (_, _, e) = parse_neigh(&m).unwrap();
    assert_eq!(e.usable(), None);
    assert!(e.needs_trigger());
    // A failed entry may still carry its old address: it is not used.
    let m = neigh_msg(UL, ip("198.18.1.9"), NeighbourState::Failed, Some(MAC_R));
    assert_eq!(parse_neigh(&m).unwrap().2.usable(), None);
    // STALE is usable, and made managed too.
    let m = neigh_msg(UL, ip("198.18.1.9"), NeighbourState::Stale, Some(MAC_R));
    let e = parse_neigh(&m).unwrap().2;
    assert_eq!(e.usable(), Some(MAC_R));
    assert!(e.needs_trigger());
    let mut m = neigh_msg(UL, ip("198.18.1.9"), NeighbourState::Stale, Some(MAC_R));
    m.attributes
        .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
    let e = parse_neigh(&m).unwrap().2;
    assert!(e.managed && !e.needs_trigger());
    let mut m6 = m.clone();
    m6.header.family = AddressFamily::Inet6;
    assert!(parse_neigh(&m6).is_none());
}

#[test]
fn parses_fib_answers() {
    let dst = ip("198.18.2.1");
    let gw = ip("198.18.1.254");
    assert_eq!(
        parse_route(&route_msg(RouteType::Unicast, Some(gw), UL), dst),
        Route::Via { nh: gw, oif: UL }
    );
    assert_eq!(
        parse_route(&route_msg(RouteType::Unicast, None, UL), dst),
        Route::Via { nh: dst, oif: UL }
    );
    assert!(matches!(
        parse_route(&route_msg(RouteType::Local, None, 1), dst),
        Route::Unusable(_)
    ));
    assert!(matches!(
        parse_route(&route_msg(RouteType::Unreachable, None, UL), dst),
        Route::Unusable(_)
    ));
}

#[test]
fn routed_remote_resolves_to_the_gateway_mac_and_changes_are_flagged() {
    let mut t = Table::new(UL);
    let (remote, gw) = (ip("198.18.2.1"), ip("198.18.1.254"));
    assert!(t.want(remote));
    assert!(t
        .set_route(remote, Route::Via { nh: gw, oif: UL })
        .is_some());
    assert!(t.publish().is_none(), "nothing resolved yet");
    let now = Instant::now();
    assert_eq!(t.due_triggers(now), vec![(remote, gw, UL)]);
    assert!(t.due_triggers(now).is_empty(), "rate-limited");
    // The kernel creates the managed entry, then resolves it.
    let inc = parse_neigh(&neigh_msg(UL, gw, NeighbourState::Incomplete, None)).unwrap();
    t.neigh_event(
        UL,
        gw,
        Some(NeighEntry {
            managed: true,
            ..inc.2
        }),
    );
    assert!(
        t.due_triggers(now + RETRIGGER).is_empty(),
        "the kernel handles managed entries"
    );
    let e = parse_neigh(&neigh_msg(UL, gw, NeighbourState::Reachable, Some(MAC_R))).unwrap();
    t.neigh_event(e.0, e.1, Some(e.2));
    let (snap, moved) = t.publish().unwrap();
    assert_eq!(snap.get(&remote), Some(&MAC_R));
    assert!(!moved, "a new resolution is not a change");
    // The same state again publishes nothing.
    t.neigh_event(e.0, e.1, Some(e.2));
    assert!(t.publish().is_none());
    // The router's MAC changes: flagged.
    t.neigh_event(
        UL,
        gw,
        Some(NeighEntry {
            mac: Some(MAC_R2),
            ..e.2
        }),
    );
    let (snap, moved) = t.publish().unwrap();
    assert_eq!(snap.get(&remote), Some(&MAC_R2));
    assert!(moved);
    // The entry goes away: flagged, and resolution is triggered again.
    t.neigh_event(UL, gw, None);
    let (snap, moved) = t.publish().unwrap();
    assert!(snap.is_empty() && moved);
    assert_eq!(t.due_triggers(now + RETRIGGER * 2), vec![(remote, gw, UL)]);
    // Entries of other interfaces are ignored.
    t.neigh_event(UL + 1, gw, Some(e.2));
    assert!(t.publish().is_none());
}

#[test]
fn routes_through_another_interface_are_not_used() {
    let mut t = Table::new(UL);
    let remote = ip("198.18.2.1");
    t.want(remote);
    t.set_route(
        remote,
        Route::Via {
            nh: remote,
            oif: UL + 1,
        },
    );
    assert!(matches!(t.describe(remote).0, Some(Route::Unusable(_))));
    assert!(t.due_triggers(Instant::now()).is_empty());
}

#[test]
fn a_route_change_moves_the_next_hop() {
    let mut t = Table::new(UL);
    let (remote, gw1, gw2) = (ip("198.18.2.1"), ip("198.18.1.254"), ip("198.18.1.253"));
    t.want(remote);
    for (g, m) in [(gw1, MAC_R), (gw2, MAC_R2)] {
        t.neigh_event(
            UL,
            g,
            Some(NeighEntry {
                state: 0x02,
                mac: Some(m),
                managed: true,
            }),
        );
    }
    t.set_route(remote, Route::Via { nh: gw1, oif: UL });
    assert!(!t.publish().unwrap().1);
    t.set_route(remote, Route::Via { nh: gw2, oif: UL });
    let (snap, moved) = t.publish().unwrap();
    assert_eq!(snap.get(&remote), Some(&MAC_R2));
    assert!(moved);
    // No longer followed: gone from the snapshot, but not a change megaflows must see.
    t.track(&HashSet::new());
    let (snap, moved) = t.publish().unwrap();
    assert!(snap.is_empty() && !moved);
}

#[test]
fn remotes_sharing_a_gateway_trigger_it_once() {
    let mut t = Table::new(UL);
    let gw = ip("198.18.1.254");
    let ips: HashSet<Ipv4Addr> = [ip("198.18.2.1"), ip("198.18.3.1")].into();
    assert_eq!(t.track(&ips).len(), 2);
    for r in &ips {
        t.set_route(*r, Route::Via { nh: gw, oif: UL });
    }
    assert_eq!(t.due_triggers(Instant::now()).len(), 1);
}
