//! Unit tests of the ACL stages and their conntrack decisions.
//!
//! Chassis "a" (198.18.0.1) hosts p1 (10.0.0.1, ifindex 10, group "web": TCP 80 in from
//! 192.0.2.0/24, anything out) and p2 (10.0.0.2, ifindex 11, no group) on ls (VNI 100);
//! chassis "b" (198.18.0.2) hosts p3 (10.0.0.3).

use super::*;
use etherparse::PacketBuilder;
use geneflow_abi::{act, ct, flag};
use geneflow_control::compiler::compile;
use geneflow_control::model::*;

const UPLINK: u32 = 2;
const VNI: u32 = 100;
const P1: [u8; 6] = [0x0a, 0, 0, 0, 0, 1];
const P2: [u8; 6] = [0x0a, 0, 0, 0, 0, 2];
const P3: [u8; 6] = [0x0a, 0, 0, 0, 0, 3];

fn tables() -> Tables {
    let mut d = NbDocument::default();
    test_nb::chassis_ab(&mut d);
    test_nb::switch(&mut d, "ls", VNI);
    let rule =
        |id: &str, dir, proto: Option<&str>, ports: Option<u16>, remote: Option<&str>| SgRule {
            id: id.into(),
            direction: dir,
            ethertype: EtherType::IPv4,
            protocol: proto.map(str::to_string),
            port_min: ports,
            port_max: ports,
            remote_prefix: remote.map(|r| r.parse().unwrap()),
            remote_group: None,
        };
    d.security_groups.insert(
        "web".into(),
        SecurityGroup {
            name: "web".into(),
            tenant: "t".into(),
            rules: vec![
                rule(
                    "http",
                    Direction::Ingress,
                    Some("tcp"),
                    Some(80),
                    Some("192.0.2.0/24"),
                ),
                rule("out", Direction::Egress, None, None, None),
            ],
            version: 0,
        },
    );
    for (n, k, mac, ip, c, groups) in [
        ("p1", 1, P1, "10.0.0.1", "a", vec!["web".to_string()]),
        ("p2", 2, P2, "10.0.0.2", "a", vec![]),
        ("p3", 3, P3, "10.0.0.3", "b", vec![]),
    ] {
        let mut p = test_nb::port(n, "ls", k, mac, &[ip], c);
        p.security_groups = groups;
        p.port_security = false;
        d.ports.insert(n.into(), p);
    }
    assert!(d.check().is_ok(), "{:?}", d.check());
    let p = compile(&d, "a");
    assert!(p.has_acl());
    Tables::new(Arc::new(p), UPLINK, 1500, true, |n| match n {
        "vp-p1" => Some(10),
        "vp-p2" => Some(11),
        _ => None,
    })
}

fn tcp(src_mac: [u8; 6], dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, 64)
        .tcp(40000, dport, 1, 1000)
        .write(&mut f, &[])
        .unwrap();
    f
}

#[allow(clippy::result_large_err)]
fn verdict(t: &Tables, frame: &[u8], ifindex: u32, ct_state: u8) -> Result<Decision, Dropped> {
    let (mut out, mut buf) = (Vec::new(), Vec::new());
    t.process_dropping(frame, ifindex, (ct_state, 0), &mut out, &mut buf)
}

#[test]
fn egress_of_a_port_with_groups_commits_new_connections() {
    let t = tables();
    // p1 -> p2 (local, no group): p1's egress allows; committed in ls's zone.
    let d = verdict(
        &t,
        &tcp(P1, P2, [10, 0, 0, 1], [10, 0, 0, 2], 22),
        10,
        ct::NEW,
    )
    .unwrap();
    assert_eq!(d.ct_commit, [VNI, 0]);
    let m = d.megaflow.unwrap();
    assert_ne!(m.action.flags & flag::CT_COMMIT, 0);
    assert_eq!(m.action.ct_zones, [VNI, 0]);
    // The entry matches new connections only: established ones get their own, without commit.
    assert_eq!((m.key.ct_state, m.mask.ct_state), (ct::NEW, u8::MAX));
    let d = verdict(
        &t,
        &tcp(P1, P2, [10, 0, 0, 1], [10, 0, 0, 2], 22),
        10,
        ct::EST,
    )
    .unwrap();
    assert_eq!(d.ct_commit, [0, 0]);
    assert_eq!(d.megaflow.unwrap().action.flags & flag::CT_COMMIT, 0);
}

#[test]
fn ingress_rules_on_the_receiving_chassis_and_replies() {
    let t = tables();
    // From p3 (remote) to p1: only TCP 80 from 192.0.2.0/24 gets in.
    let geneve = |inner: &[u8]| {
        let p = EncapParams {
            src_mac: [2, 0, 0, 0, 0, 2],
            dst_mac: [2, 0, 0, 0, 0, 1],
            src_ip: "198.18.0.2".parse().unwrap(),
            dst_ip: "198.18.0.1".parse().unwrap(),
            sport: 49152,
            vni: VNI,
            meta: crate::wire::geneve::OvnMetadata {
                ingress: 3,
                egress: 1,
            },
            udp_csum: false,
        };
        let mut buf = vec![0u8; 256];
        let n = emit_encap(&mut buf, inner, &p).unwrap();
        buf.truncate(n);
        buf
    };
    let refused = verdict(
        &t,
        &geneve(&tcp(P3, P1, [10, 0, 0, 3], [10, 0, 0, 1], 80)),
        UPLINK,
        ct::NEW,
    )
    .unwrap_err();
    assert_eq!(refused.reason, DropReason::Acl);
    let m = refused.megaflow.unwrap();
    assert_eq!(m.action.drop_reason, geneflow_abi::ctr::DROP_ACL);
    // The verdict read the state, the protocol, the port and the remote address.
    assert_eq!(
        (
            m.mask.ct_state,
            m.mask.ip_proto,
            m.mask.l4_dst,
            m.mask.ip_src
        ),
        (u8::MAX, u8::MAX, u16::MAX, u32::MAX)
    );
    let ok = verdict(
        &t,
        &geneve(&tcp(P3, P1, [192, 0, 2, 9], [10, 0, 0, 1], 80)),
        UPLINK,
        ct::NEW,
    )
    .unwrap();
    assert_eq!(ok.ct_commit, [VNI, 0]);
    assert_eq!(ok.megaflow.unwrap().action.kind, act::DECAP_OUTPUT);
    // A reply of p1's own connection passes whatever the rules.
    let reply = verdict(
        &t,
        &geneve(&tcp(P3, P1, [10, 0, 0, 3], [10, 0, 0, 1], 5555)),
        UPLINK,
        ct::EST | ct::REPLY,
    )
    .unwrap();
    assert_eq!(reply.ct_commit, [0, 0]);
    // Local delivery checks the receiver's ingress rules too: p2 -> p1 port 80 is refused.
    assert_eq!(
        verdict(
            &t,
            &tcp(P2, P1, [10, 0, 0, 2], [10, 0, 0, 1], 80),
            11,
            ct::NEW
        )
        .unwrap_err()
        .reason,
        DropReason::Acl
    );
    // Ports without groups are not filtered: p2 -> p3.
    assert!(verdict(
        &t,
        &tcp(P2, P3, [10, 0, 0, 2], [10, 0, 0, 3], 9),
        11,
        ct::NEW
    )
    .is_ok());
}

#[test]
fn icmp_errors_related_to_a_connection_pass_the_others_are_new() {
    let t = tables();
    // p2 -> p1 port unreachable (an ICMP error; p1's ingress rules allow no ICMP).
    let mut err = Vec::new();
    PacketBuilder::ethernet2(P2, P1)
        .ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Port,
        ))
        .write(
            &mut err,
            &tcp(P1, P2, [10, 0, 0, 1], [10, 0, 0, 2], 22)[14..42],
        )
        .unwrap();
    // XDP found the quoted connection: related, allowed without the rules, nothing committed.
    let d = verdict(&t, &err, 11, ct::RELATED).unwrap();
    assert_eq!(d.ct_commit, [0, 0]);
    let m = d.megaflow.unwrap();
    assert_eq!((m.key.ct_state, m.mask.ct_state), (ct::RELATED, u8::MAX));
    assert!(crate::pipeline::describe_match(&m.key, &m.mask).contains("ct_state=rel"));
    // It did not: a new ICMP flow, refused by p1's rules.
    let e = verdict(&t, &err, 11, ct::NEW).unwrap_err();
    assert_eq!(e.reason, DropReason::Acl);
}
