//! The flow compiler: turns the validated NB document into the immutable pipeline one chassis
//! needs (its local ports, and for every logical switch it hosts, where each MAC lives and which
//! remote chassis to replicate floods to), plus the logical routers attached to those switches
//! and the switches those routers reach (a routed packet is delivered into them). Nothing else
//! is compiled: the chassis never holds state for tenants it does not serve.

use crate::acl::PortAcl;
use crate::dhcp::DhcpLease;
use crate::model::{Mac, NbDocument};
use crate::port_security::PortSecurity;
pub use crate::router::{CompiledRoute, CompiledRouterPort, Router};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

/// Where a logical port lives, seen from this chassis.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PortLocation {
    /// Bound here, on this interface.
    Local { iface: String },
    /// Bound on another chassis, reached through a Geneve tunnel to its encap IP.
    Remote { chassis: String, encap_ip: Ipv4Addr },
    /// Not bound anywhere (or bound to a chassis without a usable record): unreachable.
    Unbound,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CompiledPort {
    pub name: String,
    pub mac: Mac,
    pub key: u16,
    pub location: PortLocation,
    /// What the port may send from; `None` with port security off.
    pub security: Option<PortSecurity>,
    /// Its security groups' rules, for a port bound here; `None` without groups (no ACL).
    pub acl: Option<PortAcl>,
    /// What the local DHCP responder gives it, for a port bound here with a fixed IP in a
    /// subnet with DHCP on.
    pub dhcp: Option<Arc<DhcpLease>>,
}

/// Who owns an IPv4 address on a switch (a logical port's fixed IP or a router port's
/// address): what the ARP responder answers and where a router delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpOwner {
    pub mac: Mac,
    pub key: u16,
}

/// A router port attached to a switch, found by its MAC in the switch's L2 lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RouterAttach {
    /// Tunnel key of the router.
    pub router: u32,
    /// The router port's key on this switch.
    pub port_key: u16,
}

/// One logical switch as this chassis sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Datapath {
    pub name: String,
    pub tunnel_key: u32,
    /// Ports by key.
    pub ports: BTreeMap<u16, CompiledPort>,
    /// L2 table: MAC -> port key.
    pub macs: BTreeMap<Mac, u16>,
    /// Remote chassis hosting at least one port of this switch (flood targets).
    pub remote_chassis: BTreeSet<(String, Ipv4Addr)>,
    /// IPv4 address -> owner (logical ports and router ports of this switch).
    pub ips: BTreeMap<Ipv4Addr, IpOwner>,
    /// Router ports on this switch by MAC (only routers this chassis compiled).
    pub router_ports: BTreeMap<Mac, RouterAttach>,
    /// A provider network's physnet name: the switch is bridged to a local interface and
    /// never tunnelled.
    pub provider: Option<String>,
    /// Its VLAN id, if tagged.
    pub vlan: Option<u16>,
}

impl Datapath {
    pub fn local_ports(&self) -> impl Iterator<Item = (&CompiledPort, &str)> {
        self.ports.values().filter_map(|p| match &p.location {
            PortLocation::Local { iface } => Some((p, iface.as_str())),
            _ => None,
        })
    }
}

/// A local port binding: what the datapath attaches to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalBinding {
    pub port: String,
    pub iface: String,
    pub mac: Mac,
    pub key: u16,
    pub tunnel_key: u32,
}

/// Per zone (datapath tunnel key), the ACLs of its ports (port key, ACL).
pub type AclsByZone = BTreeMap<u32, Vec<(u16, crate::acl::PortAcl)>>;

/// The zones whose security groups differ between `old` and `new`: their connections must be
/// checked again.
pub fn changed_acl_zones(old: &AclsByZone, new: &AclsByZone) -> Vec<u32> {
    let empty = Vec::new();
    let mut zones: Vec<u32> = old
        .keys()
        .chain(new.keys())
        .copied()
        .filter(|z| old.get(z).unwrap_or(&empty) != new.get(z).unwrap_or(&empty))
        .collect();
    zones.sort_unstable();
    zones.dedup();
    zones
}

/// The compiled pipeline for one chassis. Immutable once built; shared by `Arc`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pipeline {
    pub chassis: String,
    pub nb_version: u64,
    /// This chassis's encap IP, from its NB record.
    pub encap_ip: Option<Ipv4Addr>,
    /// This chassis's external address for default SNAT (its NB record), if any.
    pub external_ip: Option<Ipv4Addr>,
    /// Encap IPs of the other chassis in the NB: the only underlay sources this chassis
    /// accepts Geneve from.
    pub peer_ips: BTreeSet<Ipv4Addr>,
    /// Logical datapaths by tunnel key. Shared, so an incremental compile reuses untouched
    /// datapaths without copying them.
    pub datapaths: BTreeMap<u32, Arc<Datapath>>,
    /// Local bindings by interface name.
    pub bindings: BTreeMap<String, LocalBinding>,
    /// Logical routers attached to a hosted switch, by tunnel key.
    pub routers: BTreeMap<u32, Arc<Router>>,
    /// NB records that validate but cannot be used as they are (e.g. a static route whose next
    /// hop is on none of its router's subnets), for the agent to log.
    pub problems: Vec<String>,
}

impl Pipeline {
    /// This pipeline with the tunnel address the agent's configuration gives (`--encap-ip`)
    /// in place of the NB's, so that everything built from it (megaflows, the slow path's
    /// encapsulation, the uplink's ARP) uses the one address; copied only where they differ.
    pub fn with_encap_ip(self: Arc<Self>, ip: Option<Ipv4Addr>) -> Arc<Self> {
        match ip {
            Some(ip) if self.encap_ip != Some(ip) => {
                let mut p = (*self).clone();
                p.encap_ip = Some(ip);
                Arc::new(p)
            }
            _ => self,
        }
    }

    /// Some port bound here has security groups: conntrack runs for this chassis's traffic.
    pub fn has_acl(&self) -> bool {
        self.datapaths
            .values()
            .any(|d| d.ports.values().any(|p| p.acl.is_some()))
    }

    /// The ACLs of each zone (datapath), to tell which zones' groups changed
    /// (`changed_acl_zones`).
    pub fn acls_by_zone(&self) -> AclsByZone {
        self.datapaths
            .iter()
            .map(|(k, d)| {
                let acls = d
                    .ports
                    .values()
                    .filter_map(|p| p.acl.clone().map(|a| (p.key, a)))
                    .collect();
                (*k, acls)
            })
            .collect()
    }

    /// Tunnel keys of the datapaths that differ between `self` (old) and `new`, including
    /// added and removed ones: exactly the datapaths whose fast-path entries must go stale.
    pub fn changed_datapaths(&self, new: &Pipeline) -> Vec<u32> {
        let mut out = Vec::new();
        for (k, d) in &new.datapaths {
            match self.datapaths.get(k) {
                Some(o) if Arc::ptr_eq(o, d) || o == d => {}
                _ => out.push(*k),
            }
        }
        for k in self.datapaths.keys() {
            if !new.datapaths.contains_key(k) {
                out.push(*k);
            }
        }
        // A routed megaflow belongs to the switch its packets entered: a router change, or a
        // change of any switch that router reaches, changes the switches attached to it.
        let touched: BTreeSet<u32> = out.iter().copied().collect();
        for (k, r) in new.routers.iter().chain(self.routers.iter()) {
            let moved = new.routers.get(k) != self.routers.get(k)
                || r.ports.iter().any(|p| touched.contains(&p.switch));
            if moved {
                out.extend(r.ports.iter().map(|p| p.switch));
            }
        }
        out.retain(|k| new.datapaths.contains_key(k) || self.datapaths.contains_key(k));
        out.sort_unstable();
        out.dedup();
        // The encap IP is part of every tunnel action, the external one of every default-SNAT
        // entry.
        if self.encap_ip != new.encap_ip || self.external_ip != new.external_ip {
            out.extend(new.datapaths.keys().copied());
            out.sort_unstable();
            out.dedup();
        }
        out
    }
}

/// Compiles `doc` (already validated) for `chassis`, from scratch.
pub fn compile(doc: &NbDocument, chassis: &str) -> Pipeline {
    let mut c = Compiler::new(chassis);
    c.update(doc, None);
    c.pipeline().clone()
}

/// Incremental compiler: keeps the last pipeline and recompiles only the logical datapaths a
/// change touches.
pub struct Compiler {
    current: Pipeline,
}

impl Compiler {
    pub fn new(chassis: &str) -> Compiler {
        Compiler {
            current: Pipeline {
                chassis: chassis.to_string(),
                ..Default::default()
            },
        }
    }

    pub fn pipeline(&self) -> &Pipeline {
        &self.current
    }

    /// Recompiles the switches named in `dirty` (all when `None`) and drops the ones this
    /// chassis no longer hosts. Returns the tunnel keys whose datapath changed.
    pub fn update(&mut self, doc: &NbDocument, dirty: Option<&BTreeSet<String>>) -> Vec<u32> {
        let chassis = self.current.chassis.clone();
        let old = std::mem::take(&mut self.current);
        let mut p = Pipeline {
            chassis: chassis.clone(),
            nb_version: doc.version,
            encap_ip: doc.chassis.get(&chassis).map(|c| c.encap_ip),
            external_ip: doc.chassis.get(&chassis).and_then(|c| c.external_ip),
            peer_ips: doc
                .chassis
                .values()
                .filter(|c| c.name != chassis)
                .map(|c| c.encap_ip)
                .collect(),
            ..Default::default()
        };
        // Switches this chassis hosts: those with a port bound here that has an interface.
        let mut by_switch: BTreeMap<&str, Vec<&crate::model::LogicalPort>> = BTreeMap::new();
        for lp in doc.ports.values() {
            by_switch.entry(lp.switch.as_str()).or_default().push(lp);
        }
        let hosted: BTreeSet<&str> = doc
            .ports
            .values()
            .filter(|lp| lp.chassis.as_deref() == Some(chassis.as_str()) && lp.iface.is_some())
            .map(|lp| lp.switch.as_str())
            .collect();
        // Routers attached to a hosted switch, and the switches they reach.
        let routers: BTreeSet<&str> = doc
            .router_ports
            .values()
            .filter(|rp| rp.switch.as_deref().is_some_and(|s| hosted.contains(s)))
            .map(|rp| rp.router.as_str())
            .collect();
        let reached: BTreeSet<&str> = doc
            .router_ports
            .values()
            .filter(|rp| routers.contains(rp.router.as_str()))
            .filter_map(|rp| rp.switch.as_deref())
            .collect();
        let all_dirty = dirty.is_none() || old.encap_ip != p.encap_ip;
        for sw in doc.switches.values() {
            if !hosted.contains(sw.name.as_str()) && !reached.contains(sw.name.as_str()) {
                continue;
            }
            let reuse = !all_dirty
                && !dirty.is_some_and(|d| d.contains(&sw.name))
                && old
                    .datapaths
                    .get(&sw.tunnel_key)
                    .is_some_and(|d| d.name == sw.name);
            let dp = if reuse {
                old.datapaths[&sw.tunnel_key].clone()
            } else {
                Arc::new(compile_datapath(
                    doc,
                    &chassis,
                    sw,
                    by_switch
                        .get(sw.name.as_str())
                        .map(Vec::as_slice)
                        .unwrap_or(&[]),
                    &routers,
                ))
            };
            for (cp, iface) in dp.local_ports() {
                p.bindings.insert(
                    iface.to_string(),
                    LocalBinding {
                        port: cp.name.clone(),
                        iface: iface.to_string(),
                        mac: cp.mac,
                        key: cp.key,
                        tunnel_key: dp.tunnel_key,
                    },
                );
            }
            p.datapaths.insert(sw.tunnel_key, dp);
        }
        // Routers are small: always recompiled, compared by value.
        let compiled: BTreeSet<u32> = p.datapaths.keys().copied().collect();
        let switch_key = |name: &str| {
            doc.switches
                .get(name)
                .map(|s| s.tunnel_key)
                .filter(|k| compiled.contains(k))
        };
        for name in &routers {
            if let Some(r) =
                crate::router::compile_router(doc, name, &chassis, &switch_key, &mut p.problems)
            {
                let r = match old.routers.get(&r.tunnel_key) {
                    Some(o) if **o == r => o.clone(),
                    _ => Arc::new(r),
                };
                p.routers.insert(r.tunnel_key, r);
            }
        }
        let changed = old.changed_datapaths(&p);
        self.current = p;
        changed
    }
}

fn compile_datapath(
    doc: &NbDocument,
    chassis: &str,
    sw: &crate::model::LogicalSwitch,
    ports: &[&crate::model::LogicalPort],
    routers: &BTreeSet<&str>,
) -> Datapath {
    let mut dp = Datapath {
        name: sw.name.clone(),
        tunnel_key: sw.tunnel_key,
        ports: BTreeMap::new(),
        macs: BTreeMap::new(),
        remote_chassis: BTreeSet::new(),
        ips: BTreeMap::new(),
        router_ports: BTreeMap::new(),
        provider: sw.provider.clone(),
        vlan: sw.vlan,
    };
    for rp in doc.router_ports.values() {
        if rp.switch.as_deref() != Some(sw.name.as_str()) {
            continue;
        }
        dp.ips.insert(
            rp.network.addr,
            IpOwner {
                mac: rp.mac,
                key: rp.port_key,
            },
        );
        if let (true, Some(r)) = (
            routers.contains(rp.router.as_str()),
            doc.routers.get(&rp.router),
        ) {
            dp.router_ports.insert(
                rp.mac,
                RouterAttach {
                    router: r.tunnel_key,
                    port_key: rp.port_key,
                },
            );
        }
    }
    let mut servers = Vec::new();
    for lp in ports {
        let location = match (&lp.chassis, &lp.iface) {
            (Some(c), Some(i)) if c == chassis => PortLocation::Local { iface: i.clone() },
            (Some(c), _) if c != chassis => match doc.chassis.get(c) {
                Some(rc) => {
                    dp.remote_chassis.insert((c.clone(), rc.encap_ip));
                    PortLocation::Remote {
                        chassis: c.clone(),
                        encap_ip: rc.encap_ip,
                    }
                }
                None => PortLocation::Unbound,
            },
            _ => PortLocation::Unbound,
        };
        dp.macs.insert(lp.mac, lp.port_key);
        for ip in &lp.ips {
            dp.ips.entry(*ip).or_insert(IpOwner {
                mac: lp.mac,
                key: lp.port_key,
            });
        }
        let local = matches!(location, PortLocation::Local { .. });
        let dhcp = local
            .then(|| crate::dhcp::lease_for(doc, lp, sw.tunnel_key, sw.mtu))
            .flatten();
        if let Some(l) = &dhcp {
            servers.push((l.server_id, l.server_mac));
        }
        dp.ports.insert(
            lp.port_key,
            CompiledPort {
                name: lp.name.clone(),
                mac: lp.mac,
                key: lp.port_key,
                security: PortSecurity::of(lp),
                acl: if local { PortAcl::of(lp, doc) } else { None },
                dhcp: dhcp.map(Arc::new),
                location,
            },
        );
    }
    // DHCP renewals go unicast to the server identifier: the ARP responder answers for it
    // (a router port's address is in the table already; a port's own address wins).
    for (ip, mac) in servers {
        dp.ips.entry(ip).or_insert(IpOwner { mac, key: 0 });
    }
    dp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Chassis, LogicalPort, LogicalSwitch, DEFAULT_MTU};

    fn topo() -> NbDocument {
        let mut d = NbDocument::default();
        for (n, ip) in [("a", "198.18.0.1"), ("b", "198.18.0.2")] {
            d.chassis.insert(
                n.into(),
                Chassis {
                    name: n.into(),
                    encap_ip: ip.parse().unwrap(),
                    external_ip: None,
                    version: 0,
                },
            );
        }
        for (n, k) in [("ls1", 10), ("ls2", 20)] {
            d.switches.insert(
                n.into(),
                LogicalSwitch {
                    name: n.into(),
                    tunnel_key: k,
                    mtu: DEFAULT_MTU,
                    tenant: format!("t-{n}"),
                    provider: None,
                    vlan: None,
                    version: 0,
                },
            );
        }
        let ports = [
            ("p1", "ls1", 1, "a"),
            ("p2", "ls1", 2, "b"),
            ("p3", "ls2", 1, "b"),
        ];
        for (i, (n, s, k, c)) in ports.into_iter().enumerate() {
            d.ports.insert(
                n.into(),
                LogicalPort {
                    name: n.into(),
                    switch: s.into(),
                    mac: Mac([0x0a, 0, 0, 0, 0, i as u8 + 1]),
                    ips: vec![],
                    port_key: k,
                    chassis: Some(c.into()),
                    iface: Some(format!("vp-{n}")),
                    security_groups: vec![],
                    port_security: true,
                    allowed_address_pairs: vec![],
                    version: 0,
                },
            );
        }
        d
    }

    #[test]
    fn compiles_only_hosted_switches() {
        let p = compile(&topo(), "a");
        assert_eq!(p.datapaths.keys().copied().collect::<Vec<_>>(), vec![10]);
        let dp = &p.datapaths[&10];
        assert_eq!(
            dp.ports[&2].location,
            PortLocation::Remote {
                chassis: "b".into(),
                encap_ip: "198.18.0.2".parse().unwrap()
            }
        );
        assert_eq!(dp.remote_chassis.len(), 1);
        assert_eq!(p.bindings["vp-p1"].key, 1);
        let pb = compile(&topo(), "b");
        assert_eq!(pb.datapaths.len(), 2);
        assert!(pb.datapaths[&10]
            .remote_chassis
            .iter()
            .any(|(c, _)| c == "a"));
    }

    #[test]
    fn change_set_is_per_datapath() {
        let d = topo();
        let old = compile(&d, "b");
        let mut d2 = d.clone();
        d2.ports.remove("p3");
        let new = compile(&d2, "b");
        assert_eq!(old.changed_datapaths(&new), vec![20]);
        let mut d3 = d.clone();
        d3.ports.get_mut("p1").unwrap().mac = Mac([0x0a, 0, 0, 0, 0, 0x99]);
        assert_eq!(old.changed_datapaths(&compile(&d3, "b")), vec![10]);
        assert!(old.changed_datapaths(&compile(&d, "b")).is_empty());
    }

    #[test]
    fn incremental_update_recompiles_only_dirty_switches() {
        let d = topo();
        let mut c = Compiler::new("b");
        assert_eq!(c.update(&d, None), vec![10, 20]);
        let mut d2 = d.clone();
        d2.ports.get_mut("p3").unwrap().mac = Mac([0x0a, 0, 0, 0, 0, 0x42]);
        // Told only ls1 is dirty, the compiler keeps ls2 as it was (proving it did not
        // recompile it); told the truth, it recompiles ls2 alone.
        assert!(c
            .update(&d2, Some(&BTreeSet::from(["ls1".to_string()])))
            .is_empty());
        assert_eq!(
            c.update(&d2, Some(&BTreeSet::from(["ls2".to_string()]))),
            vec![20]
        );
        assert_eq!(c.pipeline(), &compile(&d2, "b"));
    }
}
