//! Validation of an NB document: every record checked on its own and against the records it
//! names; bad records are dropped and reported one line each, so one bad record never takes
//! the rest of the topology down.

use crate::model::*;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// What survives validation of a document: the good records, and one message per bad one.
#[derive(Debug, Default)]
pub struct Validated {
    pub doc: NbDocument,
    pub rejected: Vec<String>,
}

fn unknown(kind: &'static str, name: &str) -> ModelError {
    ModelError::Unknown {
        kind,
        name: name.to_string(),
    }
}

impl NbDocument {
    /// Validates every record and its references. Bad records are dropped from the result
    /// (and reported), so one bad record never takes the rest of the topology down.
    ///
    /// `strict` (writers) checks every reference. An agent holds only its tenants' records, so
    /// non-strict mode accepts references to records of tenants it does not hold (a router
    /// port's switch in another tenant, a security group it does not see).
    pub fn validated_with(&self, strict: bool) -> Validated {
        self.validated_preferring(strict, &BTreeSet::new())
    }

    /// As `validated_with`, but when two ports claim the same key or MAC, the one named in
    /// `incumbents` (accepted before) keeps it: a bad record written later never evicts a good
    /// port that is carrying traffic.
    pub fn validated_preferring(&self, strict: bool, incumbents: &BTreeSet<String>) -> Validated {
        let mut rejected = Vec::new();
        let mut doc = NbDocument {
            version: self.version,
            ..Default::default()
        };
        macro_rules! keep {
            ($table:ident, $kind:expr, $k:expr, $rec:expr, $check:expr) => {
                match $check.and_then(|_| key_matches($kind, $k, &$rec.name)) {
                    Ok(()) => {
                        doc.$table.insert($k.clone(), $rec.clone());
                    }
                    Err(e) => rejected.push(format!("{} {:?}: {e}", $kind, $k)),
                }
            };
        }
        // A chassis' external (default SNAT) address is its own: two chassis sharing one would
        // take each other's replies.
        // The later chassis (by name) loses only its external address, not its ports.
        let mut snat: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
        for (k, c) in &self.chassis {
            let mut c = c.clone();
            if let Some(ip) = c.external_ip {
                match snat.get(&ip) {
                    Some(o) => {
                        rejected.push(format!(
                            "chassis {k:?}: external IP {ip} already used by chassis {o:?}; not used"
                        ));
                        c.external_ip = None;
                    }
                    None => {
                        snat.insert(ip, c.name.clone());
                    }
                }
            }
            let res = c.validate();
            keep!(chassis, "chassis", k, &c, res);
        }
        let mut tkeys: BTreeMap<u32, String> = BTreeMap::new();
        for (k, s) in &self.switches {
            let r = s.validate().and_then(|_| match tkeys.get(&s.tunnel_key) {
                Some(o) => Err(ModelError::DuplicateTunnelKey {
                    key: s.tunnel_key,
                    other: format!("switch {o}"),
                }),
                None => Ok(()),
            });
            if r.is_ok() {
                tkeys.insert(s.tunnel_key, s.name.clone());
            }
            keep!(switches, "switch", k, s, r);
        }
        for (k, r) in &self.routers {
            let res = check_name(&r.name)
                .and_then(|_| check_name(&r.tenant))
                .and_then(|_| {
                    if r.tunnel_key == 0 || r.tunnel_key > MAX_TUNNEL_KEY {
                        return Err(ModelError::TunnelKeyRange(r.tunnel_key));
                    }
                    match tkeys.get(&r.tunnel_key) {
                        Some(o) => Err(ModelError::DuplicateTunnelKey {
                            key: r.tunnel_key,
                            other: o.clone(),
                        }),
                        None => Ok(()),
                    }
                });
            if res.is_ok() {
                tkeys.insert(r.tunnel_key, format!("router {}", r.name));
            }
            keep!(routers, "router", k, r, res);
        }
        for (k, sg) in &self.security_groups {
            let res = check_name(&sg.name)
                .and_then(|_| check_name(&sg.tenant))
                .and_then(|_| {
                    let mut ids = BTreeSet::new();
                    for r in &sg.rules {
                        r.validate()?;
                        if !ids.insert(r.id.clone()) {
                            return Err(ModelError::Duplicate {
                                kind: "rule",
                                name: r.id.clone(),
                            });
                        }
                        if strict {
                            if let Some(g) = &r.remote_group {
                                if !self.security_groups.contains_key(g) {
                                    return Err(unknown("security group", g));
                                }
                            }
                        }
                    }
                    Ok(())
                });
            keep!(security_groups, "security group", k, sg, res);
        }
        for (k, s) in &self.subnets {
            let res = check_name(&s.name).and_then(|_| {
                if !doc.switches.contains_key(&s.switch) {
                    return Err(unknown("switch", &s.switch));
                }
                if !s.cidr.is_network() {
                    return Err(ModelError::BadCidr(s.cidr.to_string()));
                }
                if let Some(g) = s.gateway {
                    if !s.cidr.contains(g) {
                        return Err(ModelError::Invalid(format!(
                            "gateway {g} is outside {}",
                            s.cidr
                        )));
                    }
                }
                crate::dhcp::check_options(s)?;
                crate::dhcp::check_host_routes(s)
            });
            keep!(subnets, "subnet", k, s, res);
        }
        // Port keys are shared by switch ports and router ports attached to the switch.
        let mut pkeys: BTreeMap<(String, u16), String> = BTreeMap::new();
        let mut macs: BTreeMap<(String, Mac), String> = BTreeMap::new();
        let ordered = self
            .ports
            .iter()
            .filter(|(k, _)| incumbents.contains(*k))
            .chain(self.ports.iter().filter(|(k, _)| !incumbents.contains(*k)));
        for (k, p) in ordered {
            let res = p.validate().and_then(|_| {
                if !doc.switches.contains_key(&p.switch) {
                    return Err(unknown("switch", &p.switch));
                }
                if let Some(c) = &p.chassis {
                    if !doc.chassis.contains_key(c) {
                        return Err(unknown("chassis", c));
                    }
                }
                for g in &p.security_groups {
                    if strict && !doc.security_groups.contains_key(g) {
                        return Err(unknown("security group", g));
                    }
                }
                let subnets: Vec<&Subnet> = doc
                    .subnets
                    .values()
                    .filter(|s| s.switch == p.switch)
                    .collect();
                for ip in &p.ips {
                    if !subnets.is_empty() && !subnets.iter().any(|s| s.cidr.contains(*ip)) {
                        return Err(ModelError::Invalid(format!(
                            "address {ip} is in no subnet of switch {:?}",
                            p.switch
                        )));
                    }
                }
                if let Some(o) = pkeys.get(&(p.switch.clone(), p.port_key)) {
                    return Err(ModelError::DuplicatePortKey {
                        key: p.port_key,
                        other: o.clone(),
                        switch: p.switch.clone(),
                    });
                }
                if let Some(o) = macs.get(&(p.switch.clone(), p.mac)) {
                    return Err(ModelError::DuplicateMac {
                        mac: p.mac,
                        other: o.clone(),
                        switch: p.switch.clone(),
                    });
                }
                Ok(())
            });
            if res.is_ok() {
                pkeys.insert((p.switch.clone(), p.port_key), p.name.clone());
                macs.insert((p.switch.clone(), p.mac), p.name.clone());
            }
            keep!(ports, "port", k, p, res);
        }
        for (k, rp) in &self.router_ports {
            let res = check_name(&rp.name)
                .and_then(|_| check_unicast_mac(&rp.mac))
                .and_then(|_| {
                    if rp.port_key == 0 || rp.port_key > MAX_PORT_KEY {
                        return Err(ModelError::PortKeyRange(rp.port_key as u32));
                    }
                    if !doc.routers.contains_key(&rp.router) {
                        return Err(unknown("router", &rp.router));
                    }
                    if let Some(sw) = &rp.switch {
                        if doc.switches.contains_key(sw) {
                            if let Some(o) = pkeys.get(&(sw.clone(), rp.port_key)) {
                                return Err(ModelError::DuplicatePortKey {
                                    key: rp.port_key,
                                    other: o.clone(),
                                    switch: sw.clone(),
                                });
                            }
                        } else if strict {
                            return Err(unknown("switch", sw));
                        }
                    }
                    Ok(())
                });
            if res.is_ok() {
                if let Some(sw) = &rp.switch {
                    pkeys.insert((sw.clone(), rp.port_key), rp.name.clone());
                }
            }
            keep!(router_ports, "router port", k, rp, res);
        }
        for (k, r) in &self.routes {
            let res = (|| {
                if !doc.routers.contains_key(&r.router) {
                    return Err(unknown("router", &r.router));
                }
                if !r.prefix.is_network() {
                    return Err(ModelError::BadCidr(r.prefix.to_string()));
                }
                check_host_ip(&r.nexthop)?;
                // On write the next hop must be on one of the router's subnets (an agent that
                // sees the route before its router port skips it until the port arrives).
                let on_link = doc
                    .router_ports
                    .values()
                    .any(|rp| rp.router == r.router && rp.network.contains(r.nexthop));
                if strict && !on_link {
                    return Err(ModelError::Invalid(format!(
                        "next hop {} is on none of router {:?}'s subnets",
                        r.nexthop, r.router
                    )));
                }
                Ok(())
            })();
            match res {
                Ok(()) => {
                    doc.routes.insert(k.clone(), r.clone());
                }
                Err(e) => rejected.push(format!("route {k:?}: {e}")),
            }
        }
        let mut ext: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
        for (k, f) in &self.floating_ips {
            let res = check_name(&f.name)
                .and_then(|_| check_host_ip(&f.external_ip))
                .and_then(|_| {
                    if !doc.routers.contains_key(&f.router) {
                        return Err(unknown("router", &f.router));
                    }
                    // Not a chassis' SNAT address (it would take every reply to it), not a
                    // router port's address.
                    if let Some(c) = snat.get(&f.external_ip) {
                        return Err(ModelError::Invalid(format!(
                            "external IP {} is chassis {c:?}'s SNAT address",
                            f.external_ip
                        )));
                    }
                    if let Some(rp) = doc
                        .router_ports
                        .values()
                        .find(|rp| rp.network.addr == f.external_ip)
                    {
                        return Err(ModelError::Invalid(format!(
                            "external IP {} is router port {:?}'s address",
                            f.external_ip, rp.name
                        )));
                    }
                    let Some(port) = doc.ports.get(&f.port) else {
                        return Err(unknown("port", &f.port));
                    };
                    // The router needs a gateway port: one on a provider network whose subnet
                    // holds the external address; and a port on the fixed port's switch.
                    let on = |rp: &&RouterPort, sw: &str| {
                        rp.router == f.router && rp.switch.as_deref() == Some(sw)
                    };
                    let gateway = doc.router_ports.values().any(|rp| {
                        rp.switch.as_deref().is_some_and(|sw| {
                            doc.switches.get(sw).is_some_and(|s| s.provider.is_some())
                                && on(&rp, sw)
                                && rp.network.contains(f.external_ip)
                        })
                    });
                    if !gateway {
                        return Err(ModelError::Invalid(format!(
                            "router {:?} has no port on a provider network holding {}",
                            f.router, f.external_ip
                        )));
                    }
                    if !doc.router_ports.values().any(|rp| on(&rp, &port.switch)) {
                        return Err(ModelError::Invalid(format!(
                            "router {:?} has no port on switch {:?} of port {:?}",
                            f.router, port.switch, f.port
                        )));
                    }
                    if port.ips.is_empty() {
                        return Err(ModelError::Invalid(format!(
                            "port {:?} has no fixed IP to map {} to",
                            f.port, f.external_ip
                        )));
                    }
                    if let Some(o) = ext.get(&f.external_ip) {
                        return Err(ModelError::Invalid(format!(
                            "external IP {} already used by floating IP {o:?}",
                            f.external_ip
                        )));
                    }
                    Ok(())
                });
            if res.is_ok() {
                ext.insert(f.external_ip, f.name.clone());
            }
            keep!(floating_ips, "floating IP", k, f, res);
        }
        Validated { doc, rejected }
    }

    /// Agent-side validation (see `validated_with`).
    pub fn validated(&self) -> Validated {
        self.validated_with(false)
    }

    /// Strict check used on write: the whole document must be valid.
    pub fn check(&self) -> Result<(), String> {
        let v = self.validated_with(true);
        match v.rejected.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The tenant a switch belongs to.
    pub fn switch_tenant(&self, switch: &str) -> Option<&str> {
        self.switches.get(switch).map(|s| s.tenant.as_str())
    }

    pub fn record_count(&self) -> BTreeMap<&'static str, usize> {
        BTreeMap::from([
            ("chassis", self.chassis.len()),
            ("switches", self.switches.len()),
            ("subnets", self.subnets.len()),
            ("ports", self.ports.len()),
            ("routers", self.routers.len()),
            ("router_ports", self.router_ports.len()),
            ("routes", self.routes.len()),
            ("security_groups", self.security_groups.len()),
            ("floating_ips", self.floating_ips.len()),
        ])
    }
}

fn key_matches(kind: &'static str, key: &str, name: &str) -> Result<(), ModelError> {
    if key == name {
        Ok(())
    } else {
        Err(ModelError::Invalid(format!(
            "{kind} {name:?} stored under key {key:?}"
        )))
    }
}
