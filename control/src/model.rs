//! The northbound model: typed records and their validation. A document is what a backend
//! stores; records are validated on write (by geneflowctl, strictly) and again on read (by the
//! agent, which skips a bad record with a log line instead of rejecting the whole document).
//! Every record carries a version, bumped by each write that changes it, so that an agent can
//! ignore a stale update delivered out of order.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
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

pub(crate) fn default_tenant() -> String {
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

    pub(crate) fn validate(&self) -> Result<(), ModelError> {
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

pub(crate) fn check_unicast_mac(m: &Mac) -> Result<(), ModelError> {
    if m.is_multicast() || *m == Mac::default() {
        return Err(ModelError::BadMac(m.to_string()));
    }
    Ok(())
}

pub(crate) fn check_host_ip(ip: &Ipv4Addr) -> Result<(), ModelError> {
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
    /// An overlay switch (no provider network) with the default MTU, version 0.
    pub fn overlay(name: &str, tunnel_key: u32, tenant: &str) -> LogicalSwitch {
        LogicalSwitch {
            name: name.into(),
            tunnel_key,
            mtu: DEFAULT_MTU,
            tenant: tenant.into(),
            provider: None,
            vlan: None,
            version: 0,
        }
    }

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

pub use crate::validate::Validated;
