//! Floating IPs as a chassis compiles them (Dragonflow's `dnat_app`, OVN's distributed
//! `dnat_and_snat`): a one-to-one mapping between an external address on a provider network
//! and a port's fixed IP, translated on the chassis that hosts the port. Only that chassis
//! answers ARP for the external address, from a MAC derived from it (`fip_mac`), so the
//! address follows the port when it moves (a gratuitous ARP teaches the physical network).

use crate::model::{Mac, NbDocument};
use std::net::Ipv4Addr;

/// One floating IP of a router.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CompiledFip {
    pub name: String,
    pub external_ip: Ipv4Addr,
    /// The MAC the external address answers from (`fip_mac`).
    pub mac: Mac,
    /// The port's fixed IP (its first).
    pub logical_ip: Ipv4Addr,
    pub port: String,
    /// Tunnel key of the fixed port's switch.
    pub switch: u32,
    /// The port is bound to this chassis: this chassis translates and answers for it.
    pub local: bool,
}

/// The MAC of a floating IP: locally administered, 0a:fe followed by the address, the same on
/// every chassis (the physical network only relearns which port it is behind).
pub fn fip_mac(ip: Ipv4Addr) -> Mac {
    let o = ip.octets();
    Mac([0x0a, 0xfe, o[0], o[1], o[2], o[3]])
}

/// The floating IPs of router `router` whose port's switch is compiled here (`switch_key`).
pub fn compile_fips(
    doc: &NbDocument,
    router: &str,
    chassis: &str,
    switch_key: &dyn Fn(&str) -> Option<u32>,
) -> Vec<CompiledFip> {
    let mut out: Vec<CompiledFip> = doc
        .floating_ips
        .values()
        .filter(|f| f.router == router)
        .filter_map(|f| {
            let p = doc.ports.get(&f.port)?;
            Some(CompiledFip {
                name: f.name.clone(),
                external_ip: f.external_ip,
                mac: fip_mac(f.external_ip),
                logical_ip: *p.ips.first()?,
                port: p.name.clone(),
                switch: switch_key(&p.switch)?,
                local: p.chassis.as_deref() == Some(chassis) && p.iface.is_some(),
            })
        })
        .collect();
    out.sort_by_key(|f| f.external_ip);
    out
}
