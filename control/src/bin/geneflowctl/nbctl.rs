//! `geneflowctl nb ...`: edits and shows the northbound database, in the style of ovn-nbctl.

use crate::nbargs::NbCmd;
use anyhow::Result;
use geneflow_control::model::{
    AddressPair, Chassis, Direction, EtherType, FloatingIp, HostRoute, Ipv4Net, LogicalPort,
    LogicalRouter, LogicalSwitch, Mac, ModelError, Route, RouterPort, SecurityGroup, SgRule,
    Subnet,
};
use geneflow_control::nb;
use std::collections::BTreeMap;

fn dup(kind: &'static str, name: &str) -> String {
    ModelError::Duplicate {
        kind,
        name: name.to_string(),
    }
    .to_string()
}

fn unknown(kind: &'static str, name: &str) -> String {
    ModelError::Unknown {
        kind,
        name: name.to_string(),
    }
    .to_string()
}

fn net(s: &str) -> Result<Ipv4Net, String> {
    s.parse::<Ipv4Net>().map_err(|e| e.to_string())
}

/// `CIDR[,MAC]` arguments as address pairs.
fn address_pairs(args: &[String]) -> Result<Vec<AddressPair>, String> {
    args.iter()
        .map(|p| {
            let (ip, mac) = match p.split_once(',') {
                Some((i, m)) => (i, Some(m.parse().map_err(|e: ModelError| e.to_string())?)),
                None => (p.as_str(), None),
            };
            Ok(AddressPair { ip: net(ip)?, mac })
        })
        .collect()
}

macro_rules! del {
    ($d:ident . $table:ident, $kind:expr, $name:expr) => {
        $d.$table
            .remove(&$name)
            .map(|_| ())
            .ok_or_else(|| unknown($kind, &$name))
    };
}

pub(crate) fn nb(db: &str, cmd: NbCmd) -> Result<()> {
    let mut store = nb::open(db)?;
    if let NbCmd::Show { format } = &cmd {
        return super::nbshow::show(&nb::load(&mut *store)?, format);
    }
    nb::update(&mut *store, move |d| edit(d, cmd))?;
    Ok(())
}

fn edit(d: &mut geneflow_control::model::NbDocument, cmd: NbCmd) -> Result<(), String> {
    match cmd {
        NbCmd::Show { .. } => Ok(()),
        NbCmd::ChassisSetExternalIp { name, external_ip } => {
            let c = d
                .chassis
                .get_mut(&name)
                .ok_or_else(|| unknown("chassis", &name))?;
            c.external_ip = external_ip;
            c.validate().map_err(|e| e.to_string())
        }
        NbCmd::ChassisAdd {
            name,
            encap_ip,
            external_ip,
        } => {
            if d.chassis.contains_key(&name) {
                return Err(dup("chassis", &name));
            }
            let c = Chassis {
                name: name.clone(),
                encap_ip,
                external_ip,
                version: 0,
            };
            c.validate().map_err(|e| e.to_string())?;
            d.chassis.insert(name, c);
            Ok(())
        }
        NbCmd::ChassisDel { name } => {
            del!(d.chassis, "chassis", name)?;
            if let Some(p) = d
                .ports
                .values()
                .find(|p| p.chassis.as_deref() == Some(&name))
            {
                return Err(format!("chassis {name:?} still hosts port {:?}", p.name));
            }
            Ok(())
        }
        NbCmd::LsAdd {
            name,
            key,
            mtu,
            tenant,
            provider,
            vlan,
        } => {
            if d.switches.contains_key(&name) {
                return Err(dup("switch", &name));
            }
            let s = LogicalSwitch {
                name: name.clone(),
                tunnel_key: key,
                mtu,
                tenant,
                provider,
                vlan,
                version: 0,
            };
            s.validate().map_err(|e| e.to_string())?;
            d.switches.insert(name, s);
            Ok(())
        }
        NbCmd::LsDel { name } => {
            del!(d.switches, "switch", name)?;
            if let Some(p) = d.ports.values().find(|p| p.switch == name) {
                return Err(format!("switch {name:?} still has port {:?}", p.name));
            }
            d.subnets.retain(|_, s| s.switch != name);
            Ok(())
        }
        NbCmd::SubnetAdd {
            switch,
            name,
            cidr,
            gateway,
            dhcp,
            dhcp_options,
            dns,
            host_routes,
        } => {
            if d.subnets.contains_key(&name) {
                return Err(dup("subnet", &name));
            }
            if !d.switches.contains_key(&switch) {
                return Err(unknown("switch", &switch));
            }
            let mut opts = BTreeMap::new();
            for o in dhcp_options {
                let (k, v) = o
                    .split_once('=')
                    .ok_or_else(|| format!("DHCP option {o:?}: want key=value"))?;
                opts.insert(k.to_string(), v.to_string());
            }
            let mut routes = Vec::new();
            for r in host_routes {
                let bad = || format!("host route {r:?}: want PREFIX,NEXTHOP");
                let (p, nh) = r.split_once(',').ok_or_else(bad)?;
                routes.push(HostRoute {
                    prefix: net(p.trim())?,
                    nexthop: nh.trim().parse().map_err(|_| bad())?,
                });
            }
            d.subnets.insert(
                name.clone(),
                Subnet {
                    name,
                    switch,
                    cidr: net(&cidr)?,
                    gateway,
                    dhcp,
                    dhcp_options: opts,
                    dns,
                    host_routes: routes,
                    version: 0,
                },
            );
            Ok(())
        }
        NbCmd::SubnetDel { name } => del!(d.subnets, "subnet", name),
        NbCmd::LspAdd {
            switch,
            name,
            mac,
            ips,
            key,
            security_groups,
            no_port_security,
            allowed_pairs,
        } => {
            let mac: Mac = mac.parse().map_err(|e: ModelError| e.to_string())?;
            let port_key = u16::try_from(key)
                .ok()
                .filter(|k| *k >= 1 && *k <= geneflow_control::model::MAX_PORT_KEY)
                .ok_or(ModelError::PortKeyRange(key).to_string())?;
            if d.ports.contains_key(&name) {
                return Err(dup("port", &name));
            }
            if !d.switches.contains_key(&switch) {
                return Err(unknown("switch", &switch));
            }
            let pairs = address_pairs(&allowed_pairs)?;
            let p = LogicalPort {
                name: name.clone(),
                switch,
                mac,
                ips,
                port_key,
                chassis: None,
                iface: None,
                security_groups,
                port_security: !no_port_security,
                allowed_address_pairs: pairs,
                version: 0,
            };
            p.validate().map_err(|e| e.to_string())?;
            d.ports.insert(name, p);
            Ok(())
        }
        NbCmd::LspSetPortSecurity {
            name,
            off,
            allowed_pairs,
        } => {
            let pairs = address_pairs(&allowed_pairs)?;
            let p = d
                .ports
                .get_mut(&name)
                .ok_or_else(|| unknown("port", &name))?;
            p.port_security = !off;
            p.allowed_address_pairs = pairs;
            Ok(())
        }
        NbCmd::LspSetSg { name, groups } => {
            let p = d
                .ports
                .get_mut(&name)
                .ok_or_else(|| unknown("port", &name))?;
            p.security_groups = groups;
            Ok(())
        }
        NbCmd::LspBind {
            name,
            chassis,
            iface,
        } => {
            if !d.chassis.contains_key(&chassis) {
                return Err(unknown("chassis", &chassis));
            }
            geneflow_control::model::check_ifname(&iface).map_err(|e| e.to_string())?;
            let p = d
                .ports
                .get_mut(&name)
                .ok_or_else(|| unknown("port", &name))?;
            p.chassis = Some(chassis);
            p.iface = Some(iface);
            Ok(())
        }
        NbCmd::LspUnbind { name } => {
            let p = d
                .ports
                .get_mut(&name)
                .ok_or_else(|| unknown("port", &name))?;
            p.chassis = None;
            p.iface = None;
            Ok(())
        }
        NbCmd::LspDel { name } => {
            del!(d.ports, "port", name)?;
            if let Some(f) = d.floating_ips.values().find(|f| f.port == name) {
                return Err(format!(
                    "port {name:?} is the fixed port of floating IP {:?}",
                    f.name
                ));
            }
            Ok(())
        }
        NbCmd::LrAdd { name, key, tenant } => {
            if d.routers.contains_key(&name) {
                return Err(dup("router", &name));
            }
            d.routers.insert(
                name.clone(),
                LogicalRouter {
                    name,
                    tunnel_key: key,
                    tenant,
                    version: 0,
                },
            );
            Ok(())
        }
        NbCmd::LrDel { name } => {
            del!(d.routers, "router", name)?;
            d.router_ports.retain(|_, p| p.router != name);
            d.routes.retain(|_, r| r.router != name);
            if let Some(f) = d.floating_ips.values().find(|f| f.router == name) {
                return Err(format!(
                    "router {name:?} still carries floating IP {:?}",
                    f.name
                ));
            }
            Ok(())
        }
        NbCmd::LrpAdd {
            router,
            name,
            mac,
            network,
            key,
            switch,
        } => {
            if d.router_ports.contains_key(&name) {
                return Err(dup("router port", &name));
            }
            if !d.routers.contains_key(&router) {
                return Err(unknown("router", &router));
            }
            let peer_tenant = match &switch {
                Some(sw) => Some(
                    d.switch_tenant(sw)
                        .ok_or_else(|| unknown("switch", sw))?
                        .to_string(),
                ),
                None => None,
            };
            let port_key =
                u16::try_from(key).map_err(|_| ModelError::PortKeyRange(key).to_string())?;
            d.router_ports.insert(
                name.clone(),
                RouterPort {
                    name,
                    router,
                    mac: mac.parse().map_err(|e: ModelError| e.to_string())?,
                    network: net(&network)?,
                    switch,
                    peer_tenant,
                    port_key,
                    version: 0,
                },
            );
            Ok(())
        }
        NbCmd::LrpDel { name } => del!(d.router_ports, "router port", name),
        NbCmd::LrRouteAdd {
            router,
            prefix,
            nexthop,
        } => {
            let r = Route::new(&router, net(&prefix)?, nexthop);
            if d.routes.contains_key(&r.name) {
                return Err(dup("route", &format!("{router} {}", r.prefix)));
            }
            d.routes.insert(r.name.clone(), r);
            Ok(())
        }
        NbCmd::LrRouteDel { router, prefix } => {
            let id = Route::id(&router, &net(&prefix)?);
            d.routes
                .remove(&id)
                .map(|_| ())
                .ok_or_else(|| unknown("route", &format!("{router} {prefix}")))
        }
        NbCmd::SgAdd { name, tenant } => {
            if d.security_groups.contains_key(&name) {
                return Err(dup("security group", &name));
            }
            d.security_groups.insert(
                name.clone(),
                SecurityGroup {
                    name,
                    tenant,
                    rules: vec![],
                    version: 0,
                },
            );
            Ok(())
        }
        NbCmd::SgDel { name } => {
            del!(d.security_groups, "security group", name)?;
            if let Some(p) = d.ports.values().find(|p| p.security_groups.contains(&name)) {
                return Err(format!(
                    "security group {name:?} is used by port {:?}",
                    p.name
                ));
            }
            Ok(())
        }
        NbCmd::SgRuleAdd {
            group,
            id,
            direction,
            ethertype,
            protocol,
            ports,
            remote_prefix,
            remote_group,
        } => {
            let (port_min, port_max) = match ports {
                None => (None, None),
                Some(p) => {
                    let (a, b) = p.split_once('-').unwrap_or((&p, &p));
                    let parse = |x: &str| {
                        x.parse::<u16>()
                            .map_err(|_| format!("bad port range {p:?}"))
                    };
                    (Some(parse(a)?), Some(parse(b)?))
                }
            };
            let rule = SgRule {
                id: id.clone(),
                direction: if direction == "ingress" {
                    Direction::Ingress
                } else {
                    Direction::Egress
                },
                ethertype: if ethertype == "IPv6" {
                    EtherType::IPv6
                } else {
                    EtherType::IPv4
                },
                protocol,
                port_min,
                port_max,
                remote_prefix: remote_prefix.as_deref().map(net).transpose()?,
                remote_group,
            };
            let g = d
                .security_groups
                .get_mut(&group)
                .ok_or_else(|| unknown("security group", &group))?;
            if g.rules.iter().any(|r| r.id == id) {
                return Err(dup("rule", &id));
            }
            g.rules.push(rule);
            Ok(())
        }
        NbCmd::SgRuleDel { group, id } => {
            let g = d
                .security_groups
                .get_mut(&group)
                .ok_or_else(|| unknown("security group", &group))?;
            let before = g.rules.len();
            g.rules.retain(|r| r.id != id);
            if g.rules.len() == before {
                return Err(unknown("rule", &id));
            }
            Ok(())
        }
        NbCmd::FipAdd {
            name,
            external_ip,
            port,
            router,
        } => {
            if d.floating_ips.contains_key(&name) {
                return Err(dup("floating IP", &name));
            }
            d.floating_ips.insert(
                name.clone(),
                FloatingIp {
                    name,
                    external_ip,
                    port,
                    router,
                    version: 0,
                },
            );
            Ok(())
        }
        NbCmd::FipDel { name } => del!(d.floating_ips, "floating IP", name),
    }
}
