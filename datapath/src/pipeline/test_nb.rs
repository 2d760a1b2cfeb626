//! NB records for the pipeline's unit tests: the two chassis every test uses, switches and
//! ports with the defaults that do not matter to a test.

use geneflow_control::model::{
    Chassis, LogicalPort, LogicalRouter, LogicalSwitch, Mac, NbDocument, RouterPort,
};

/// Chassis "a" (198.18.0.1, the one under test) and "b" (198.18.0.2).
pub(super) fn chassis_ab(d: &mut NbDocument) {
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
}

/// Switch `name` with tunnel key `key`, tenant "t".
pub(super) fn switch(d: &mut NbDocument, name: &str, key: u32) {
    d.switches
        .insert(name.into(), LogicalSwitch::overlay(name, key, "t"));
}

/// Port `name` of `switch` (key, MAC, addresses) bound to `chassis` as interface vp-<name>,
/// with port security on, no groups, no pairs.
pub(super) fn port(
    name: &str,
    switch: &str,
    key: u16,
    mac: [u8; 6],
    ips: &[&str],
    chassis: &str,
) -> LogicalPort {
    LogicalPort {
        name: name.into(),
        switch: switch.into(),
        mac: Mac(mac),
        ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
        port_key: key,
        chassis: Some(chassis.into()),
        iface: Some(format!("vp-{name}")),
        security_groups: vec![],
        port_security: true,
        allowed_address_pairs: vec![],
        version: 0,
    }
}

/// Router "r" with tunnel key `key`, tenant "t".
pub(super) fn router(d: &mut NbDocument, key: u32) {
    d.routers.insert(
        "r".into(),
        LogicalRouter {
            name: "r".into(),
            tunnel_key: key,
            tenant: "t".into(),
            version: 0,
        },
    );
}

/// Port `name` of router "r" on `switch`: MAC, address/prefix, port key.
pub(super) fn router_port(
    d: &mut NbDocument,
    name: &str,
    mac: [u8; 6],
    network: &str,
    switch: &str,
    key: u16,
) {
    d.router_ports.insert(
        name.into(),
        RouterPort {
            name: name.into(),
            router: "r".into(),
            mac: Mac(mac),
            network: network.parse().unwrap(),
            switch: Some(switch.into()),
            peer_tenant: None,
            port_key: key,
            version: 0,
        },
    );
}
