//! Unit tests of the NB model and its validation.

use crate::model::*;
use std::collections::{BTreeMap, BTreeSet};

fn doc() -> NbDocument {
    let mut d = NbDocument::default();
    d.chassis.insert(
        "ch1".into(),
        Chassis {
            name: "ch1".into(),
            encap_ip: "198.18.0.1".parse().unwrap(),
            external_ip: None,
            version: 0,
        },
    );
    d.switches.insert(
        "ls1".into(),
        LogicalSwitch {
            name: "ls1".into(),
            tunnel_key: 7,
            mtu: DEFAULT_MTU,
            tenant: "t1".into(),
            provider: None,
            vlan: None,
            version: 0,
        },
    );
    for (n, k, m) in [
        ("p1", 1, "0a:00:00:00:00:01"),
        ("p2", 2, "0a:00:00:00:00:02"),
    ] {
        d.ports.insert(n.into(), port(n, "ls1", k, m));
    }
    d
}

pub(crate) fn port(n: &str, sw: &str, k: u16, m: &str) -> LogicalPort {
    LogicalPort {
        name: n.into(),
        switch: sw.into(),
        mac: m.parse().unwrap(),
        ips: vec![],
        port_key: k,
        chassis: Some("ch1".into()),
        iface: Some(format!("vp-{n}")),
        security_groups: vec![],
        port_security: true,
        allowed_address_pairs: vec![],
        version: 0,
    }
}

#[test]
fn mac_and_cidr_parse() {
    let m: Mac = "0A:00:00:00:00:ff".parse().unwrap();
    assert_eq!(m.to_string(), "0a:00:00:00:00:ff");
    assert!("0a:00:00:00:00".parse::<Mac>().is_err());
    let n: Ipv4Net = "10.1.0.0/16".parse().unwrap();
    assert!(n.is_network() && n.contains("10.1.2.3".parse().unwrap()));
    assert!("10.1.0.0/33".parse::<Ipv4Net>().is_err());
    assert!(!"10.1.0.1/16".parse::<Ipv4Net>().unwrap().is_network());
}

#[test]
fn valid_document_passes() {
    assert_eq!(doc().check(), Ok(()));
}

#[test]
fn bad_records_are_skipped_not_fatal() {
    let mut d = doc();
    d.ports.get_mut("p2").unwrap().port_key = 1; // duplicate key in ls1
    d.ports
        .insert("p3".into(), port("p3", "nope", 3, "0a:00:00:00:00:03"));
    let v = d.validated();
    assert_eq!(v.doc.ports.len(), 1);
    assert_eq!(v.rejected.len(), 2);
    assert!(v.rejected.iter().any(|r| r.contains("already used")));
    assert!(v.rejected.iter().any(|r| r.contains("does not exist")));
}

#[test]
fn incumbent_port_keeps_its_key_against_a_later_bad_record() {
    let mut d = doc();
    // "a-evil" sorts before "p1" and claims p1's key.
    d.ports.insert(
        "a-evil".into(),
        port("a-evil", "ls1", 1, "0a:00:00:00:00:09"),
    );
    assert!(!d.validated().doc.ports.contains_key("p1"));
    let inc = BTreeSet::from(["p1".to_string(), "p2".to_string()]);
    let v = d.validated_preferring(false, &inc);
    assert!(v.doc.ports.contains_key("p1"));
    assert!(!v.doc.ports.contains_key("a-evil"));
}

#[test]
fn ranges_and_cidrs_are_enforced() {
    let mut d = doc();
    d.switches.get_mut("ls1").unwrap().tunnel_key = 1 << 24;
    assert!(d.check().unwrap_err().contains("tunnel key"));
    let mut d = doc();
    d.ports.get_mut("p1").unwrap().port_key = 40000;
    assert!(d.check().unwrap_err().contains("port key"));
    let mut d = doc();
    d.subnets.insert(
        "s".into(),
        Subnet {
            name: "s".into(),
            switch: "ls1".into(),
            cidr: "10.0.0.1/24".parse().unwrap(),
            gateway: None,
            dhcp: false,
            dhcp_options: BTreeMap::new(),
            dns: vec![],
            host_routes: vec![],
            version: 0,
        },
    );
    assert!(d.check().unwrap_err().contains("bad CIDR"));
}

#[test]
fn router_tunnel_keys_share_the_switch_space() {
    let mut d = doc();
    d.routers.insert(
        "r".into(),
        LogicalRouter {
            name: "r".into(),
            tunnel_key: 7,
            tenant: "t1".into(),
            version: 0,
        },
    );
    assert!(d.check().unwrap_err().contains("tunnel key 7 already used"));
}

#[test]
fn security_group_rules_are_checked() {
    let mut d = doc();
    d.security_groups.insert(
        "web".into(),
        SecurityGroup {
            name: "web".into(),
            tenant: "t1".into(),
            rules: vec![SgRule {
                id: "r1".into(),
                direction: Direction::Ingress,
                ethertype: EtherType::IPv4,
                protocol: Some("icmp".into()),
                port_min: Some(80),
                port_max: Some(80),
                remote_prefix: None,
                remote_group: None,
            }],
            version: 0,
        },
    );
    assert!(d.check().unwrap_err().contains("needs protocol tcp or udp"));
    d.ports.get_mut("p1").unwrap().security_groups = vec!["nope".into()];
    let v = d.validated_with(true);
    assert!(v
        .rejected
        .iter()
        .any(|r| r.contains("security group \"nope\"")));
    // An agent that does not hold the group still keeps the port.
    assert!(d.validated().doc.ports.contains_key("p1"));
}

#[test]
fn provider_vlans_and_nat_addresses_are_checked() {
    let mut d = doc();
    // A VLAN needs a provider network, and an id in 1-4094.
    d.switches.get_mut("ls1").unwrap().vlan = Some(100);
    assert!(d.check().unwrap_err().contains("needs a provider network"));
    d.switches.get_mut("ls1").unwrap().provider = Some("physnet1".into());
    d.switches.get_mut("ls1").unwrap().vlan = Some(4095);
    assert!(d.check().unwrap_err().contains("outside 1-4094"));
    d.switches.get_mut("ls1").unwrap().vlan = Some(100);
    assert!(d.check().is_ok(), "{:?}", d.check());
    // Two chassis may not share an external (SNAT) address.
    let mut c2 = d.chassis["ch1"].clone();
    c2.name = "ch2".into();
    c2.encap_ip = "198.18.0.2".parse().unwrap();
    c2.external_ip = Some("172.24.4.61".parse().unwrap());
    d.chassis.get_mut("ch1").unwrap().external_ip = c2.external_ip;
    d.chassis.insert("ch2".into(), c2);
    assert!(d.check().unwrap_err().contains("already used by chassis"));
    d.chassis.get_mut("ch2").unwrap().external_ip = None;
    // A floating IP may not be a chassis' SNAT address.
    d.routers.insert(
        "r".into(),
        LogicalRouter {
            name: "r".into(),
            tunnel_key: 500,
            tenant: "t1".into(),
            version: 0,
        },
    );
    d.ports.get_mut("p1").unwrap().ips = vec!["10.0.0.5".parse().unwrap()];
    d.floating_ips.insert(
        "f".into(),
        FloatingIp {
            name: "f".into(),
            external_ip: "172.24.4.61".parse().unwrap(),
            port: "p1".into(),
            router: "r".into(),
            version: 0,
        },
    );
    let e = d.check().unwrap_err();
    assert!(e.contains("SNAT address"), "{e}");
}
