//! Port security, compiled: the source addresses a logical port may send from. On by default
//! (`--no-port-security` turns it off per port), as in OpenStack and OVN: the port's MAC with
//! each of its fixed IPs, plus its allowed address pairs (a prefix, with the pair's MAC or the
//! port's). A port without any IPv4 address is restricted by MAC only (OVN's `port_security`
//! with a bare MAC). The datapath's `port_security` stage enforces it.

use crate::model::{Ipv4Net, LogicalPort, Mac};
use std::net::Ipv4Addr;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortSecurity {
    /// (source MAC, source prefix) pairs the port may use.
    allowed: Vec<(Mac, Ipv4Net)>,
    /// Source MACs the port may use.
    macs: Vec<Mac>,
}

impl PortSecurity {
    /// `None` when the port has port security off.
    pub fn of(p: &LogicalPort) -> Option<PortSecurity> {
        if !p.port_security {
            return None;
        }
        let mut allowed: Vec<(Mac, Ipv4Net)> = p
            .ips
            .iter()
            .map(|ip| (p.mac, Ipv4Net { addr: *ip, len: 32 }))
            .collect();
        let mut macs = vec![p.mac];
        for pair in &p.allowed_address_pairs {
            let mac = pair.mac.unwrap_or(p.mac);
            allowed.push((mac, pair.ip));
            if !macs.contains(&mac) {
                macs.push(mac);
            }
        }
        allowed.sort();
        allowed.dedup();
        Some(PortSecurity { allowed, macs })
    }

    /// Whether IPv4 and ARP sources are checked (the port has addresses or pairs); without,
    /// the port is checked on its MAC only.
    pub fn checks_ip(&self) -> bool {
        !self.allowed.is_empty()
    }

    /// The port may send from `mac`.
    pub fn mac_allowed(&self, mac: Mac) -> bool {
        self.macs.contains(&mac)
    }

    /// The port may send IPv4 from `ip` with source MAC `mac` (already `mac_allowed`).
    pub fn ip_allowed(&self, mac: Mac, ip: Ipv4Addr) -> bool {
        self.allowed.is_empty()
            || self
                .allowed
                .iter()
                .any(|(m, net)| *m == mac && net.contains(ip))
    }

    /// Human-readable form for `trace`.
    pub fn describe(&self) -> String {
        if self.allowed.is_empty() {
            return format!(
                "MAC {} (no IPv4 address: any IPv4 source)",
                self.macs
                    .iter()
                    .map(|m| m.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        self.allowed
            .iter()
            .map(|(m, n)| {
                if n.len == 32 {
                    format!("{m} {}", n.addr)
                } else {
                    format!("{m} {n}")
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AddressPair;

    fn port(ips: &[&str], pairs: Vec<AddressPair>, on: bool) -> LogicalPort {
        LogicalPort {
            name: "p".into(),
            switch: "ls".into(),
            mac: "0a:00:00:00:00:01".parse().unwrap(),
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            port_key: 1,
            chassis: None,
            iface: None,
            security_groups: vec![],
            port_security: on,
            allowed_address_pairs: pairs,
            version: 0,
        }
    }

    #[test]
    fn fixed_ips_and_pairs() {
        let other: Mac = "0a:00:00:00:00:99".parse().unwrap();
        let p = port(
            &["10.0.0.1"],
            vec![
                AddressPair {
                    ip: "10.9.0.0/24".parse().unwrap(),
                    mac: None,
                },
                AddressPair {
                    ip: "10.8.0.5/32".parse().unwrap(),
                    mac: Some(other),
                },
            ],
            true,
        );
        let s = PortSecurity::of(&p).unwrap();
        let own = p.mac;
        assert!(s.mac_allowed(own) && s.mac_allowed(other));
        assert!(!s.mac_allowed("0a:00:00:00:00:02".parse().unwrap()));
        assert!(s.ip_allowed(own, "10.0.0.1".parse().unwrap()));
        assert!(!s.ip_allowed(own, "10.0.0.2".parse().unwrap()));
        assert!(s.ip_allowed(own, "10.9.0.77".parse().unwrap()));
        assert!(s.ip_allowed(other, "10.8.0.5".parse().unwrap()));
        // A pair's address belongs with its own MAC only.
        assert!(!s.ip_allowed(other, "10.0.0.1".parse().unwrap()));
        assert!(!s.ip_allowed(own, "10.8.0.5".parse().unwrap()));
    }

    #[test]
    fn mac_only_without_addresses_and_off_when_disabled() {
        let s = PortSecurity::of(&port(&[], vec![], true)).unwrap();
        assert!(s.ip_allowed(
            "0a:00:00:00:00:01".parse().unwrap(),
            "192.0.2.1".parse().unwrap()
        ));
        assert!(PortSecurity::of(&port(&["10.0.0.1"], vec![], false)).is_none());
    }
}
