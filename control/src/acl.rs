//! Security groups, compiled per port: the allow rules of the port's groups, by direction,
//! with each rule's remote end resolved to prefixes (a remote group becomes its members'
//! addresses and allowed pairs). OpenStack's semantics: a port without groups has no ACL
//! (everything passes, as before security groups existed); a port with groups allows, in each
//! direction, only what one of its rules allows, plus the replies of allowed connections
//! (conntrack, in the datapath). IPv6 rules are ignored: the model has no IPv6 addresses.

use crate::model::{Direction, EtherType, Ipv4Net, LogicalPort, NbDocument};
use std::net::Ipv4Addr;

/// One allow rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AclRule {
    /// The group and rule it came from, for `trace`.
    pub id: String,
    /// IP protocol; `None` = any.
    pub proto: Option<u8>,
    /// TCP/UDP destination port range, inclusive; `None` = any.
    pub ports: Option<(u16, u16)>,
    /// The remote end (the source of ingress traffic, the destination of egress traffic)
    /// must be in one of these.
    pub remote: Vec<Ipv4Net>,
}

const ANY: Ipv4Net = Ipv4Net {
    addr: Ipv4Addr::UNSPECIFIED,
    len: 0,
};

impl AclRule {
    /// Whether the rule allows a packet of `proto` to destination port `dport` (TCP/UDP)
    /// whose remote end is `remote`.
    pub fn allows(&self, proto: u8, dport: u16, remote: Ipv4Addr) -> bool {
        self.proto.is_none_or(|p| p == proto)
            && self.ports.is_none_or(|(a, b)| (a..=b).contains(&dport))
            && self.remote.iter().any(|n| n.contains(remote))
    }

    /// The rule reads the destination port.
    pub fn reads_port(&self) -> bool {
        self.ports.is_some()
    }

    /// The rule reads the remote address (it is not "from anywhere").
    pub fn reads_remote(&self) -> bool {
        !self.remote.contains(&ANY)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct PortAcl {
    pub ingress: Vec<AclRule>,
    pub egress: Vec<AclRule>,
}

impl PortAcl {
    /// The ACL of `p`; `None` when the port has no security groups.
    pub fn of(p: &LogicalPort, doc: &NbDocument) -> Option<PortAcl> {
        if p.security_groups.is_empty() {
            return None;
        }
        let mut acl = PortAcl::default();
        for g in &p.security_groups {
            let Some(sg) = doc.security_groups.get(g) else {
                continue;
            };
            for r in sg.rules.iter().filter(|r| r.ethertype == EtherType::IPv4) {
                let Ok(proto) = r.protocol_number() else {
                    continue;
                };
                let remote = match (&r.remote_prefix, &r.remote_group) {
                    (Some(net), _) => vec![*net],
                    (None, Some(group)) => members(doc, group),
                    (None, None) => vec![ANY],
                };
                let rule = AclRule {
                    id: format!("{g}/{}", r.id),
                    proto,
                    ports: match (r.port_min, r.port_max) {
                        (None, None) => None,
                        (a, b) => Some((a.unwrap_or(0), b.unwrap_or(u16::MAX))),
                    },
                    remote,
                };
                match r.direction {
                    Direction::Ingress => acl.ingress.push(rule),
                    Direction::Egress => acl.egress.push(rule),
                }
            }
        }
        Some(acl)
    }

    pub fn rules(&self, d: Direction) -> &[AclRule] {
        match d {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// The addresses of the ports in `group`: fixed IPs and allowed address pairs.
fn members(doc: &NbDocument, group: &str) -> Vec<Ipv4Net> {
    let mut v: Vec<Ipv4Net> = doc
        .ports
        .values()
        .filter(|p| p.security_groups.iter().any(|g| g == group))
        .flat_map(|p| {
            p.ips
                .iter()
                .map(|ip| Ipv4Net { addr: *ip, len: 32 })
                .chain(p.allowed_address_pairs.iter().map(|a| a.ip))
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{SecurityGroup, SgRule};

    fn port(name: &str, ip: &str, groups: &[&str]) -> LogicalPort {
        LogicalPort {
            name: name.into(),
            switch: "ls".into(),
            mac: "0a:00:00:00:00:01".parse().unwrap(),
            ips: vec![ip.parse().unwrap()],
            port_key: 1,
            chassis: None,
            iface: None,
            security_groups: groups.iter().map(|g| g.to_string()).collect(),
            port_security: true,
            allowed_address_pairs: vec![],
            version: 0,
        }
    }

    fn rule(id: &str, dir: Direction, proto: Option<&str>, ports: Option<(u16, u16)>) -> SgRule {
        SgRule {
            id: id.into(),
            direction: dir,
            ethertype: EtherType::IPv4,
            protocol: proto.map(str::to_string),
            port_min: ports.map(|p| p.0),
            port_max: ports.map(|p| p.1),
            remote_prefix: None,
            remote_group: None,
        }
    }

    #[test]
    fn rules_by_direction_with_prefixes_and_groups() {
        let mut d = NbDocument::default();
        let mut web = rule("http", Direction::Ingress, Some("tcp"), Some((80, 80)));
        web.remote_prefix = Some("192.0.2.0/24".parse().unwrap());
        let mut peers = rule("peers", Direction::Ingress, None, None);
        peers.remote_group = Some("app".into());
        d.security_groups.insert(
            "web".into(),
            SecurityGroup {
                name: "web".into(),
                tenant: "t".into(),
                rules: vec![web, peers, rule("out", Direction::Egress, None, None)],
                version: 0,
            },
        );
        d.security_groups.insert(
            "app".into(),
            SecurityGroup {
                name: "app".into(),
                tenant: "t".into(),
                rules: vec![],
                version: 0,
            },
        );
        d.ports.insert("a".into(), port("a", "10.0.0.1", &["web"]));
        d.ports.insert("b".into(), port("b", "10.0.0.2", &["app"]));
        d.ports.insert("c".into(), port("c", "10.0.0.3", &[]));
        let acl = PortAcl::of(&d.ports["a"], &d).unwrap();
        let allowed = |proto, dport, from: &str| {
            acl.ingress
                .iter()
                .any(|r| r.allows(proto, dport, from.parse().unwrap()))
        };
        assert!(allowed(6, 80, "192.0.2.9"));
        assert!(!allowed(6, 81, "192.0.2.9"));
        assert!(!allowed(17, 80, "192.0.2.9"));
        assert!(!allowed(6, 80, "198.51.100.1"));
        // Anything from a member of "app", nothing from a non-member.
        assert!(allowed(17, 53, "10.0.0.2"));
        assert!(!allowed(17, 53, "10.0.0.3"));
        assert!(acl
            .egress
            .iter()
            .all(|r| !r.reads_remote() && !r.reads_port()));
        // No groups, no ACL; a group without rules denies everything.
        assert!(PortAcl::of(&d.ports["c"], &d).is_none());
        let b = PortAcl::of(&d.ports["b"], &d).unwrap();
        assert!(b.ingress.is_empty() && b.egress.is_empty());
    }
}
