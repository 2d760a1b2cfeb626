//! Compiled logical routers: the router ports a chassis routes between and a longest-prefix
//! routing table (connected subnets and static routes). Routing is distributed: every chassis
//! compiles the routers attached to the switches it hosts and routes its own VMs' traffic, so a
//! routed packet leaves the source chassis already routed (like OVN's distributed router and
//! Dragonflow's `l3_proactive`).

use crate::model::{Ipv4Net, Mac, NbDocument};
pub use crate::nat::CompiledFip;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// A router port as the datapath needs it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CompiledRouterPort {
    pub name: String,
    pub mac: Mac,
    /// Interface address with its prefix (e.g. 10.0.1.1/24).
    pub network: Ipv4Net,
    /// Tunnel key of the switch the port attaches to (routers without a switch are left out).
    pub switch: u32,
    /// The port's key on that switch: the logical ingress port of routed packets.
    pub key: u16,
}

impl CompiledRouterPort {
    pub fn ip(&self) -> Ipv4Addr {
        self.network.addr
    }
}

/// One entry of the routing table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CompiledRoute {
    pub prefix: Ipv4Net,
    /// Gateway for static routes; `None` for a connected subnet (the next hop is the
    /// destination itself).
    pub nexthop: Option<Ipv4Addr>,
    /// Index into `Router::ports` of the port the route leaves by.
    pub port: usize,
}

/// A logical router seen from one chassis.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Router {
    pub name: String,
    pub tunnel_key: u32,
    pub ports: Vec<CompiledRouterPort>,
    /// Longest prefix first; among equal prefixes connected routes first. The first match wins.
    pub routes: Vec<CompiledRoute>,
    /// Index into `ports` of the gateway port: the one on a provider network, if any.
    pub gateway: Option<usize>,
    /// Floating IPs whose port's switch this chassis compiled.
    pub fips: Vec<CompiledFip>,
}

impl Router {
    /// Longest-prefix match for `dst`.
    pub fn lookup(&self, dst: Ipv4Addr) -> Option<&CompiledRoute> {
        self.routes.iter().find(|r| r.prefix.contains(dst))
    }

    /// The router port that owns address `ip`, if any (packets to it are for the router).
    pub fn port_owning(&self, ip: Ipv4Addr) -> Option<&CompiledRouterPort> {
        self.ports.iter().find(|p| p.ip() == ip)
    }

    /// The floating IP bound here with external address `ip`.
    pub fn local_fip_external(&self, ip: Ipv4Addr) -> Option<&CompiledFip> {
        self.fips.iter().find(|f| f.local && f.external_ip == ip)
    }

    /// The floating IP of fixed address `ip` on switch `switch`, bound here.
    pub fn local_fip_of(&self, switch: u32, ip: Ipv4Addr) -> Option<&CompiledFip> {
        self.fips
            .iter()
            .find(|f| f.local && f.switch == switch && f.logical_ip == ip)
    }

    /// The floating IP with external address `ip`, wherever its port is.
    pub fn fip_external(&self, ip: Ipv4Addr) -> Option<&CompiledFip> {
        self.fips.iter().find(|f| f.external_ip == ip)
    }

    /// The port attached to switch `switch`.
    pub fn port_on(&self, switch: u32) -> Option<&CompiledRouterPort> {
        self.ports.iter().find(|p| p.switch == switch)
    }
}

/// Compiles router `name` of `doc`; `switch_key` maps a switch name to its tunnel key. Static
/// routes whose next hop is on none of the router's subnets cannot be used: they are left out
/// and described in `problems`.
pub fn compile_router(
    doc: &NbDocument,
    name: &str,
    chassis: &str,
    switch_key: &dyn Fn(&str) -> Option<u32>,
    problems: &mut Vec<String>,
) -> Option<Router> {
    let lr = doc.routers.get(name)?;
    let mut ports: Vec<CompiledRouterPort> = doc
        .router_ports
        .values()
        .filter(|rp| rp.router == lr.name)
        .filter_map(|rp| {
            Some(CompiledRouterPort {
                name: rp.name.clone(),
                mac: rp.mac,
                network: rp.network,
                switch: switch_key(rp.switch.as_deref()?)?,
                key: rp.port_key,
            })
        })
        .collect();
    ports.sort_by(|a, b| a.name.cmp(&b.name));
    let mut routes: Vec<CompiledRoute> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| CompiledRoute {
            prefix: Ipv4Net {
                addr: p.network.network(),
                len: p.network.len,
            },
            nexthop: None,
            port: i,
        })
        .collect();
    let statics: BTreeMap<&String, _> = doc
        .routes
        .iter()
        .filter(|(_, r)| r.router == lr.name)
        .collect();
    for (id, r) in statics {
        match ports.iter().position(|p| p.network.contains(r.nexthop)) {
            Some(i) => routes.push(CompiledRoute {
                prefix: r.prefix,
                nexthop: Some(r.nexthop),
                port: i,
            }),
            None => problems.push(format!(
                "route {id:?} of router {:?}: next hop {} is on none of the router's subnets; route not used",
                lr.name, r.nexthop
            )),
        }
    }
    // Stable: connected routes (pushed first) stay ahead of static ones of the same length.
    routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len));
    let gateway = ports.iter().position(|p| {
        doc.router_ports.get(&p.name).is_some_and(|rp| {
            rp.switch
                .as_deref()
                .and_then(|s| doc.switches.get(s))
                .is_some_and(|s| s.provider.is_some())
        })
    });
    let fips = match gateway {
        Some(_) => crate::nat::compile_fips(doc, &lr.name, chassis, switch_key),
        None => Vec::new(),
    };
    Some(Router {
        name: lr.name.clone(),
        tunnel_key: lr.tunnel_key,
        ports,
        routes,
        gateway,
        fips,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LogicalRouter, Route, RouterPort, DEFAULT_TENANT};

    fn doc() -> NbDocument {
        let mut d = NbDocument::default();
        d.routers.insert(
            "r".into(),
            LogicalRouter {
                name: "r".into(),
                tunnel_key: 9,
                tenant: DEFAULT_TENANT.into(),
                version: 0,
            },
        );
        for (n, net, sw, k) in [
            ("r-a", "10.1.0.1/24", "a", 100),
            ("r-b", "10.2.0.1/16", "b", 101),
        ] {
            d.router_ports.insert(
                n.into(),
                RouterPort {
                    name: n.into(),
                    router: "r".into(),
                    mac: Mac([2, 0, 0, 0, 0, k as u8]),
                    network: net.parse().unwrap(),
                    switch: Some(sw.into()),
                    peer_tenant: None,
                    port_key: k,
                    version: 0,
                },
            );
        }
        for (p, nh) in [("10.9.0.0/16", "10.1.0.7"), ("10.2.5.0/24", "10.1.0.8")] {
            let r = Route::new("r", p.parse().unwrap(), nh.parse().unwrap());
            d.routes.insert(r.name.clone(), r);
        }
        d
    }

    fn key(s: &str) -> Option<u32> {
        match s {
            "a" => Some(1),
            "b" => Some(2),
            _ => None,
        }
    }

    #[test]
    fn longest_prefix_wins_over_connected_and_static() {
        let mut problems = Vec::new();
        let r = compile_router(&doc(), "r", "c", &key, &mut problems).unwrap();
        assert!(problems.is_empty());
        let via = |ip: &str| {
            r.lookup(ip.parse().unwrap())
                .map(|x| (r.ports[x.port].name.clone(), x.nexthop))
        };
        assert_eq!(via("10.1.0.5"), Some(("r-a".into(), None)));
        assert_eq!(via("10.2.9.9"), Some(("r-b".into(), None)));
        // The /24 static route is longer than the connected /16.
        assert_eq!(
            via("10.2.5.9"),
            Some(("r-a".into(), Some("10.1.0.8".parse().unwrap())))
        );
        assert_eq!(
            via("10.9.1.1"),
            Some(("r-a".into(), Some("10.1.0.7".parse().unwrap())))
        );
        assert_eq!(via("192.0.2.1"), None);
        assert_eq!(r.port_owning("10.2.0.1".parse().unwrap()).unwrap().key, 101);
        assert_eq!(r.port_on(1).unwrap().name, "r-a");
    }

    #[test]
    fn unreachable_next_hop_is_reported_not_used() {
        let mut d = doc();
        let r = Route::new(
            "r",
            "0.0.0.0/0".parse().unwrap(),
            "192.0.2.1".parse().unwrap(),
        );
        d.routes.insert(r.name.clone(), r);
        let mut problems = Vec::new();
        let r = compile_router(&d, "r", "c", &key, &mut problems).unwrap();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(r.lookup("8.8.8.8".parse().unwrap()).is_none());
    }
}
