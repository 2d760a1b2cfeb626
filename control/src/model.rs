//! The northbound model: typed records and their validation. A document is what a backend
//! stores; records are validated on write (by geneflowctl, strictly) and again on read (by the
//! agent, which skips a bad record with a log line instead of rejecting the whole document).
//! Every record carries a version, bumped by each write that changes it, so that an agent can
//! ignore a stale update delivered out of order.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;
use thiserror::Error;

/// Largest logical datapath tunnel key (24-bit VNI).
pub const MAX_TUNNEL_KEY: u32 = (1 << 24) - 1;
/// Largest unicast logical port key (15 bits; the OVN option's ingress field is 15 bits).
pub const MAX_PORT_KEY: u16 = (1 << 15) - 1;
/// Egress key of the "flood" multicast group (OVN: 32768 and up are multicast groups).
pub const MC_FLOOD_KEY: u16 = 32768;
pub const DEFAULT_TENANT: &str = "default";
pub const DEFAULT_MTU: u32 = 1442;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ModelError {
    #[error("bad MAC address {0:?} (want xx:xx:xx:xx:xx:xx, unicast)")]
    BadMac(String),
    #[error("bad IPv4 address {0:?}")]
    BadIp(String),
    #[error("bad CIDR {0:?} (want a.b.c.d/len with no host bits set)")]
    BadCidr(String),
    #[error("tunnel key {0} out of range 1..={MAX_TUNNEL_KEY}")]
    TunnelKeyRange(u32),
    #[error("port key {0} out of range 1..={MAX_PORT_KEY}")]
    PortKeyRange(u32),
    #[error("MTU {0} out of range 576..=9000")]
    MtuRange(u32),
    #[error("{kind} {name:?} already exists")]
    Duplicate { kind: &'static str, name: String },
    #[error("{kind} {name:?} does not exist")]
    Unknown { kind: &'static str, name: String },
    #[error("tunnel key {key} already used by {other:?}")]
    DuplicateTunnelKey { key: u32, other: String },
    #[error("port key {key} already used by port {other:?} in switch {switch:?}")]
    DuplicatePortKey {
        key: u16,
        other: String,
        switch: String,
    },
    #[error("MAC {mac} already used by port {other:?} in switch {switch:?}")]
    DuplicateMac {
        mac: Mac,
        other: String,
        switch: String,
    },
    #[error("name must be 1-64 characters of [A-Za-z0-9_.-], got {0:?}")]
    BadName(String),
    #[error("interface name must be 1-15 characters without '/' or spaces, got {0:?}")]
    BadIfName(String),
    #[error("{0}")]
    Invalid(String),
}

/// An Ethernet address, serialised as "xx:xx:xx:xx:xx:xx".
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Mac {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        let mut out = [0u8; 6];
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(ModelError::BadMac(s.to_string()));
        }
        for (o, p) in out.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(ModelError::BadMac(s.to_string()));
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| ModelError::BadMac(s.to_string()))?;
        }
        Ok(Mac(out))
    }
}

macro_rules! serde_via_str {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_string())
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_via_str!(Mac);

/// An IPv4 address with a prefix length ("10.0.0.1/24"). As a network (subnet CIDR, route
/// prefix) it must have no host bits set; as an interface address (router port) it may.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Ipv4Net {
    pub fn mask(&self) -> u32 {
        if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - self.len as u32)
        }
    }
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }
    pub fn is_network(&self) -> bool {
        self.network() == self.addr
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Ipv4Net {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        let bad = || ModelError::BadCidr(s.to_string());
        let (a, l) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let len: u8 = l.parse().map_err(|_| bad())?;
        if len > 32 {
            return Err(bad());
        }
        Ok(Ipv4Net { addr, len })
    }
}
serde_via_str!(Ipv4Net);

fn default_tenant() -> String {
    DEFAULT_TENANT.to_string()
}
fn default_mtu() -> u32 {
    DEFAULT_MTU
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chassis {
    pub name: String,
    pub encap_ip: Ipv4Addr,
    /// The chassis' address on the provider networks for default SNAT: VMs without a
    /// floating IP reach the outside through it (Dragonflow-style distributed SNAT).
    #[serde(default)]
    pub external_ip: Option<Ipv4Addr>,
    #[serde(default)]
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogicalSwitch {
    pub name: String,
    pub tunnel_key: u32,
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// Tenant (distribution topic): agents hold only the tenants they serve.
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// A provider (physical) network instead of an overlay: the physnet name each chassis maps
    /// to a local interface (`geneflowd --provider NAME=IFACE`). Its traffic is never
    /// tunnelled.
    #[serde(default)]
    pub provider: Option<String>,
    /// On a provider network: the 802.1Q VLAN id its frames carry (none: untagged, flat).
    #[serde(default)]
    pub vlan: Option<u16>,
    #[serde(default)]
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subnet {
    pub name: String,
    pub switch: String,
    pub cidr: Ipv4Net,
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    #[serde(default)]
    pub dhcp: bool,
    #[serde(default)]
    pub dhcp_options: BTreeMap<String, String>,
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    /// Routes DHCP hands out (option 121), like Neutron's subnet host routes.
    #[serde(default)]
    pub host_routes: Vec<HostRoute>,
    #[serde(default)]
    pub version: u64,
}

/// A route a subnet's DHCP gives its VMs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostRoute {
    pub prefix: Ipv4Net,
    pub nexthop: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddressPair {
    pub ip: Ipv4Net,
    #[serde(default)]
    pub mac: Option<Mac>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogicalPort {
    pub name: String,
    pub switch: String,
    pub mac: Mac,
    #[serde(default)]
    pub ips: Vec<Ipv4Addr>,
    pub port_key: u16,
    /// Chassis the port is bound to (where its VM runs), if any.
    #[serde(default)]
    pub chassis: Option<String>,
    /// Local interface name on that chassis.
    #[serde(default)]
    pub iface: Option<String>,
    #[serde(default)]
    pub security_groups: Vec<String>,
    #[serde(default = "default_true")]
    pub port_security: bool,
    #[serde(default)]
    pub allowed_address_pairs: Vec<AddressPair>,
    #[serde(default)]
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogicalRouter {
    pub name: String,
    pub tunnel_key: u32,
    #[serde(default = "default_tenant")]
    pub tenant: String,
    #[serde(default)]
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterPort {
    pub name: String,
    pub router: String,
    pub mac: Mac,
    /// Interface address and prefix, e.g. 10.0.0.1/24.
    pub network: Ipv4Net,
    /// The switch this router port attaches to.
    #[serde(default)]
    pub switch: Option<String>,
    /// Tenant of that switch, recorded at write time so an agent can follow the router into
    /// it without holding other tenants' switches.
    #[serde(default)]
    pub peer_tenant: Option<String>,
    pub port_key: u16,
    #[serde(default)]
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// "<router>:<prefix>" (routes are identified by router and prefix).
    pub name: String,
    pub router: String,
    pub prefix: Ipv4Net,
    pub nexthop: Ipv4Addr,
    #[serde(default)]
    pub version: u64,
}

impl Route {
    /// A static route of `router`, named by `Route::id` (version 0: the store sets it).
    pub fn new(router: &str, prefix: Ipv4Net, nexthop: Ipv4Addr) -> Route {
        Route {
            name: Route::id(router, &prefix),
            router: router.to_string(),
            prefix,
            nexthop,
            version: 0,
        }
    }

    pub fn id(router: &str, prefix: &Ipv4Net) -> String {
        format!("{router}:{prefix}").replace('/', "_")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EtherType {
    IPv4,
    IPv6,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SgRule {
    pub id: String,
    pub direction: Direction,
    pub ethertype: EtherType,
    /// "tcp", "udp", "icmp" or an IP protocol number; none = any.
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub port_min: Option<u16>,
    #[serde(default)]
    pub port_max: Option<u16>,
    #[serde(default)]
    pub remote_prefix: Option<Ipv4Net>,
    #[serde(default)]
    pub remote_group: Option<String>,
}

impl SgRule {
    pub fn protocol_number(&self) -> Result<Option<u8>, ModelError> {
        match self.protocol.as_deref() {
            None => Ok(None),
            Some("tcp") => Ok(Some(6)),
            Some("udp") => Ok(Some(17)),
            Some("icmp") => Ok(Some(1)),
            Some(n) => n
                .parse::<u8>()
                .map(Some)
                .map_err(|_| ModelError::Invalid(format!("rule {}: bad protocol {n:?}", self.id))),
        }
    }

    fn validate(&self) -> Result<(), ModelError> {
        check_name(&self.id)?;
        let proto = self.protocol_number()?;
        let ports = self.port_min.is_some() || self.port_max.is_some();
        if ports && !matches!(proto, Some(6) | Some(17)) {
            return Err(ModelError::Invalid(format!(
                "rule {}: a port range needs protocol tcp or udp",
                self.id
            )));
        }
        if let (Some(a), Some(b)) = (self.port_min, self.port_max) {
            if a > b {
                return Err(ModelError::Invalid(format!(
                    "rule {}: port range {a}-{b} is empty",
                    self.id
                )));
            }
        }
        if self.remote_prefix.is_some() && self.remote_group.is_some() {
            return Err(ModelError::Invalid(format!(
                "rule {}: remote prefix and remote group are exclusive",
                self.id
            )));
        }
        if let Some(p) = &self.remote_prefix {
            if !p.is_network() {
                return Err(ModelError::BadCidr(p.to_string()));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroup {
    pub name: String,
    #[serde(default = "default_tenant")]
    pub tenant: String,
    #[serde(default)]
    pub rules: Vec<SgRule>,
    #[serde(default)]
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FloatingIp {
    pub name: String,
    pub external_ip: Ipv4Addr,
    /// The fixed (logical) port the external address maps to.
    pub port: String,
    pub router: String,
    #[serde(default)]
    pub version: u64,
}

/// One NB document: every table, plus a version bumped by each write.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbDocument {
    #[serde(default)]
    pub version: u64,
    #[serde(default)]
    pub chassis: BTreeMap<String, Chassis>,
    #[serde(default)]
    pub switches: BTreeMap<String, LogicalSwitch>,
    #[serde(default)]
    pub subnets: BTreeMap<String, Subnet>,
    #[serde(default)]
    pub ports: BTreeMap<String, LogicalPort>,
    #[serde(default)]
    pub routers: BTreeMap<String, LogicalRouter>,
    #[serde(default)]
    pub router_ports: BTreeMap<String, RouterPort>,
    #[serde(default)]
    pub routes: BTreeMap<String, Route>,
    #[serde(default)]
    pub security_groups: BTreeMap<String, SecurityGroup>,
    #[serde(default)]
    pub floating_ips: BTreeMap<String, FloatingIp>,
}

pub fn check_name(name: &str) -> Result<(), ModelError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ModelError::BadName(name.to_string()))
    }
}

pub fn check_ifname(name: &str) -> Result<(), ModelError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && !name.contains('/')
        && !name.chars().any(|c| c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(ModelError::BadIfName(name.to_string()))
    }
}

fn check_unicast_mac(m: &Mac) -> Result<(), ModelError> {
    if m.is_multicast() || *m == Mac::default() {
        return Err(ModelError::BadMac(m.to_string()));
    }
    Ok(())
}

fn check_host_ip(ip: &Ipv4Addr) -> Result<(), ModelError> {
    if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() {
        return Err(ModelError::BadIp(ip.to_string()));
    }
    Ok(())
}

impl Chassis {
    pub fn validate(&self) -> Result<(), ModelError> {
        check_name(&self.name)?;
        check_host_ip(&self.encap_ip)?;
        if let Some(ip) = &self.external_ip {
            check_host_ip(ip)?;
        }
        Ok(())
    }
}

impl LogicalSwitch {
    pub fn validate(&self) -> Result<(), ModelError> {
        check_name(&self.name)?;
        check_name(&self.tenant)?;
        if let Some(p) = &self.provider {
            check_name(p)?;
        }
        match (self.vlan, &self.provider) {
            (Some(v), _) if !(1..=4094).contains(&v) => {
                return Err(ModelError::Invalid(format!(
                    "VLAN id {v} is outside 1-4094"
                )))
            }
            (Some(_), None) => {
                return Err(ModelError::Invalid(
                    "a VLAN id needs a provider network (--provider)".into(),
                ))
            }
            _ => {}
        }
        if self.tunnel_key == 0 || self.tunnel_key > MAX_TUNNEL_KEY {
            return Err(ModelError::TunnelKeyRange(self.tunnel_key));
        }
        if !(576..=9000).contains(&self.mtu) {
            return Err(ModelError::MtuRange(self.mtu));
        }
        Ok(())
    }
}

impl LogicalPort {
    /// Checks the record on its own (references are checked against a document).
    pub fn validate(&self) -> Result<(), ModelError> {
        check_name(&self.name)?;
        check_unicast_mac(&self.mac)?;
        if self.port_key == 0 || self.port_key > MAX_PORT_KEY {
            return Err(ModelError::PortKeyRange(self.port_key as u32));
        }
        if let Some(i) = &self.iface {
            check_ifname(i)?;
        }
        for ip in &self.ips {
            check_host_ip(ip)?;
        }
        for p in &self.allowed_address_pairs {
            if let Some(m) = &p.mac {
                check_unicast_mac(m)?;
            }
        }
        Ok(())
    }
}

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
        for (k, c) in &self.chassis {
            keep!(chassis, "chassis", k, c, c.validate());
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
