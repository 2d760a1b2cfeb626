//! The northbound model: typed records and their validation. A document is what a backend
//! stores; records are validated on write (by geneflowctl) and again on read (by the agent,
//! which skips a bad record with a log line instead of rejecting the whole document).

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

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ModelError {
    #[error("bad MAC address {0:?} (want xx:xx:xx:xx:xx:xx, unicast)")]
    BadMac(String),
    #[error("bad IPv4 address {0:?}")]
    BadIp(String),
    #[error("tunnel key {0} out of range 1..={MAX_TUNNEL_KEY}")]
    TunnelKeyRange(u32),
    #[error("port key {0} out of range 1..={MAX_PORT_KEY}")]
    PortKeyRange(u32),
    #[error("{kind} {name:?} already exists")]
    Duplicate { kind: &'static str, name: String },
    #[error("{kind} {name:?} does not exist")]
    Unknown { kind: &'static str, name: String },
    #[error("tunnel key {key} already used by switch {other:?}")]
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

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chassis {
    pub name: String,
    pub encap_ip: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogicalSwitch {
    pub name: String,
    pub tunnel_key: u32,
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
    pub ports: BTreeMap<String, LogicalPort>,
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

impl Chassis {
    pub fn validate(&self) -> Result<(), ModelError> {
        check_name(&self.name)?;
        if self.encap_ip.is_unspecified()
            || self.encap_ip.is_multicast()
            || self.encap_ip.is_broadcast()
        {
            return Err(ModelError::BadIp(self.encap_ip.to_string()));
        }
        Ok(())
    }
}

impl LogicalSwitch {
    pub fn validate(&self) -> Result<(), ModelError> {
        check_name(&self.name)?;
        if self.tunnel_key == 0 || self.tunnel_key > MAX_TUNNEL_KEY {
            return Err(ModelError::TunnelKeyRange(self.tunnel_key));
        }
        Ok(())
    }
}

impl LogicalPort {
    /// Checks the record on its own (references are checked against a document).
    pub fn validate(&self) -> Result<(), ModelError> {
        check_name(&self.name)?;
        if self.mac.is_multicast() || self.mac == Mac::default() {
            return Err(ModelError::BadMac(self.mac.to_string()));
        }
        if self.port_key == 0 || self.port_key > MAX_PORT_KEY {
            return Err(ModelError::PortKeyRange(self.port_key as u32));
        }
        if let Some(i) = &self.iface {
            check_ifname(i)?;
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

impl NbDocument {
    /// Validates every record and its references. Bad records are dropped from the result
    /// (and reported), so one bad record never takes the rest of the topology down.
    pub fn validated(&self) -> Validated {
        let mut out = Validated::default();
        out.doc.version = self.version;
        for (k, c) in &self.chassis {
            match c
                .validate()
                .and_then(|_| key_matches("chassis", k, &c.name))
            {
                Ok(()) => {
                    out.doc.chassis.insert(k.clone(), c.clone());
                }
                Err(e) => out.rejected.push(format!("chassis {k:?}: {e}")),
            }
        }
        let mut tkeys: BTreeMap<u32, String> = BTreeMap::new();
        for (k, s) in &self.switches {
            let r = s
                .validate()
                .and_then(|_| key_matches("switch", k, &s.name))
                .and_then(|_| match tkeys.get(&s.tunnel_key) {
                    Some(o) => Err(ModelError::DuplicateTunnelKey {
                        key: s.tunnel_key,
                        other: o.clone(),
                    }),
                    None => Ok(()),
                });
            match r {
                Ok(()) => {
                    tkeys.insert(s.tunnel_key, s.name.clone());
                    out.doc.switches.insert(k.clone(), s.clone());
                }
                Err(e) => out.rejected.push(format!("switch {k:?}: {e}")),
            }
        }
        let mut pkeys: BTreeMap<(String, u16), String> = BTreeMap::new();
        let mut macs: BTreeMap<(String, Mac), String> = BTreeMap::new();
        for (k, p) in &self.ports {
            let r = p
                .validate()
                .and_then(|_| key_matches("port", k, &p.name))
                .and_then(|_| {
                    if !out.doc.switches.contains_key(&p.switch) {
                        return Err(ModelError::Unknown {
                            kind: "switch",
                            name: p.switch.clone(),
                        });
                    }
                    if let Some(c) = &p.chassis {
                        if !out.doc.chassis.contains_key(c) {
                            return Err(ModelError::Unknown {
                                kind: "chassis",
                                name: c.clone(),
                            });
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
            match r {
                Ok(()) => {
                    pkeys.insert((p.switch.clone(), p.port_key), p.name.clone());
                    macs.insert((p.switch.clone(), p.mac), p.name.clone());
                    out.doc.ports.insert(k.clone(), p.clone());
                }
                Err(e) => out.rejected.push(format!("port {k:?}: {e}")),
            }
        }
        out
    }

    /// Strict check used on write: the whole document must be valid.
    pub fn check(&self) -> Result<(), String> {
        let v = self.validated();
        match v.rejected.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn key_matches(kind: &'static str, key: &str, name: &str) -> Result<(), ModelError> {
    if key == name {
        Ok(())
    } else {
        Err(ModelError::Unknown {
            kind,
            name: format!("{name} (stored under key {key})"),
        })
    }
}

/// Ports bound to a chassis, by switch: used to compute which chassis host a switch.
pub fn chassis_hosting(doc: &NbDocument, switch: &str) -> BTreeSet<String> {
    doc.ports
        .values()
        .filter(|p| p.switch == switch)
        .filter_map(|p| p.chassis.clone())
        .collect()
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
            },
        );
        d.switches.insert(
            "ls1".into(),
            LogicalSwitch {
                name: "ls1".into(),
                tunnel_key: 7,
            },
        );
        for (n, k, m) in [
            ("p1", 1, "0a:00:00:00:00:01"),
            ("p2", 2, "0a:00:00:00:00:02"),
        ] {
            d.ports.insert(
                n.into(),
                LogicalPort {
                    name: n.into(),
                    switch: "ls1".into(),
                    mac: m.parse().unwrap(),
                    ips: vec![],
                    port_key: k,
                    chassis: Some("ch1".into()),
                    iface: Some(format!("vp-{n}")),
                },
            );
        }
        d
    }

    #[test]
    fn mac_parse_and_display() {
        let m: Mac = "0A:00:00:00:00:ff".parse().unwrap();
        assert_eq!(m.to_string(), "0a:00:00:00:00:ff");
        assert!("0a:00:00:00:00".parse::<Mac>().is_err());
        assert!("0a:00:00:00:00:zz".parse::<Mac>().is_err());
    }

    #[test]
    fn valid_document_passes() {
        assert_eq!(doc().check(), Ok(()));
    }

    #[test]
    fn bad_records_are_skipped_not_fatal() {
        let mut d = doc();
        d.ports.get_mut("p2").unwrap().port_key = 1; // duplicate key in ls1
        d.ports.insert(
            "p3".into(),
            LogicalPort {
                name: "p3".into(),
                switch: "nope".into(),
                mac: "0a:00:00:00:00:03".parse().unwrap(),
                ips: vec![],
                port_key: 3,
                chassis: None,
                iface: None,
            },
        );
        let v = d.validated();
        assert_eq!(v.doc.ports.len(), 1);
        assert_eq!(v.rejected.len(), 2);
        assert!(v.rejected.iter().any(|r| r.contains("already used")));
        assert!(v.rejected.iter().any(|r| r.contains("does not exist")));
    }

    #[test]
    fn ranges_are_enforced() {
        let mut d = doc();
        d.switches.get_mut("ls1").unwrap().tunnel_key = 1 << 24;
        assert!(d.check().unwrap_err().contains("tunnel key"));
        let mut d = doc();
        d.ports.get_mut("p1").unwrap().port_key = 40000;
        assert!(d.check().unwrap_err().contains("port key"));
    }
}
