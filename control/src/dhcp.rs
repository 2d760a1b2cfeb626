//! DHCP as the NB configures it (Dragonflow's `dhcp_app`, OVN's `put_dhcp_opts`): for a port
//! bound to this chassis whose fixed IP lies in a subnet with `--dhcp`, the compiler builds the
//! lease the local responder (`datapath` pipeline stage `dhcp`) hands out: the address, the
//! server identity and every option already encoded, so answering costs no work beyond copying.
//!
//! Per-subnet `--dhcp-option key=value` keys (OVN's names where OVN has one):
//!
//! | key | option | value |
//! |---|---|---|
//! | `lease_time` | 51 | seconds (default 43200) |
//! | `T1`, `T2` | 58, 59 | seconds (renewal, rebinding) |
//! | `mtu` | 26 | bytes, 68..=9000 (default: the switch MTU, capped by the uplink) |
//! | `domain_name` | 15 | a DNS name |
//! | `ntp_server` | 42 | IPv4 addresses, comma separated |
//! | `server_id` | 54 | the server's IPv4 address (default: the gateway) |
//! | `tftp_server` | 66 | a name or address |
//! | `bootfile_name` | 67 | a file name |
//!
//! Always sent: subnet mask (1), router (3, the gateway) and DNS servers (6, `--dns`) when set,
//! and classless static routes (121, RFC 3442) when the subnet has host routes: then they carry
//! the default route too, since a client that gets option 121 ignores option 3.

use crate::model::{HostRoute, Ipv4Net, LogicalPort, Mac, ModelError, NbDocument, Subnet};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// Lease time when the subnet sets none (OVN's usual 12 hours).
pub const DEFAULT_LEASE: u32 = 43_200;

/// DHCP option codes (RFC 2132, 3442).
pub mod opt {
    pub const SUBNET_MASK: u8 = 1;
    pub const ROUTER: u8 = 3;
    pub const DNS: u8 = 6;
    pub const DOMAIN_NAME: u8 = 15;
    pub const MTU: u8 = 26;
    pub const NTP: u8 = 42;
    pub const LEASE_TIME: u8 = 51;
    pub const SERVER_ID: u8 = 54;
    pub const T1: u8 = 58;
    pub const T2: u8 = 59;
    pub const TFTP_SERVER: u8 = 66;
    pub const BOOTFILE: u8 = 67;
    pub const CLASSLESS_ROUTES: u8 = 121;
}

/// What the responder gives one port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DhcpLease {
    pub ip: Ipv4Addr,
    pub subnet: Ipv4Net,
    /// The server identifier (option 54), and the MAC the answers come from.
    pub server_id: Ipv4Addr,
    pub server_mac: Mac,
    pub lease_time: u32,
    /// The interface MTU to offer, before the datapath caps it to what the uplink carries.
    pub mtu: u32,
    /// Every other option, encoded, in the order they are sent.
    pub options: Vec<(u8, Vec<u8>)>,
}

/// The MAC the responder of a switch answers from when its server identifier is no router
/// port's address: locally administered, derived from the switch's tunnel key.
pub fn server_mac(tunnel_key: u32) -> Mac {
    let k = tunnel_key.to_be_bytes();
    Mac([0x0a, 0xfd, k[0], k[1], k[2], k[3]])
}

/// Checks a subnet's `--dhcp-option` keys and values.
pub fn check_options(s: &Subnet) -> Result<(), ModelError> {
    encode_options(&s.dhcp_options).map(|_| ())
}

/// Checks the subnet's host routes: networks, next hops inside the subnet.
pub fn check_host_routes(s: &Subnet) -> Result<(), ModelError> {
    for r in &s.host_routes {
        if !r.prefix.is_network() {
            return Err(ModelError::BadCidr(r.prefix.to_string()));
        }
        if !s.cidr.contains(r.nexthop) {
            return Err(ModelError::Invalid(format!(
                "host route {} via {}: the next hop is outside {}",
                r.prefix, r.nexthop, s.cidr
            )));
        }
    }
    Ok(())
}

struct Extra {
    lease_time: Option<u32>,
    mtu: Option<u32>,
    server_id: Option<Ipv4Addr>,
    options: Vec<(u8, Vec<u8>)>,
}

fn bad(key: &str, value: &str, why: &str) -> ModelError {
    ModelError::Invalid(format!("DHCP option {key}={value:?}: {why}"))
}

fn seconds(key: &str, v: &str) -> Result<u32, ModelError> {
    v.parse::<u32>()
        .ok()
        .filter(|s| *s > 0)
        .ok_or_else(|| bad(key, v, "want seconds (a positive integer)"))
}

fn text(key: &str, v: &str) -> Result<Vec<u8>, ModelError> {
    if v.is_empty() || v.len() > 255 || !v.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad(key, v, "want 1-255 printable characters"));
    }
    Ok(v.as_bytes().to_vec())
}

fn encode_options(opts: &BTreeMap<String, String>) -> Result<Extra, ModelError> {
    let mut e = Extra {
        lease_time: None,
        mtu: None,
        server_id: None,
        options: Vec::new(),
    };
    for (k, v) in opts {
        match k.as_str() {
            "lease_time" => e.lease_time = Some(seconds(k, v)?),
            "T1" => e
                .options
                .push((opt::T1, seconds(k, v)?.to_be_bytes().to_vec())),
            "T2" => e
                .options
                .push((opt::T2, seconds(k, v)?.to_be_bytes().to_vec())),
            "mtu" => {
                let m = v
                    .parse::<u32>()
                    .ok()
                    .filter(|m| (68..=9000).contains(m))
                    .ok_or_else(|| bad(k, v, "want 68..=9000"))?;
                e.mtu = Some(m);
            }
            "domain_name" => {
                let ok = !v.is_empty()
                    && v.len() <= 253
                    && v.split('.').all(|l| {
                        !l.is_empty()
                            && l.len() <= 63
                            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    });
                if !ok {
                    return Err(bad(k, v, "want a DNS name"));
                }
                e.options.push((opt::DOMAIN_NAME, v.as_bytes().to_vec()));
            }
            "ntp_server" => {
                let mut data = Vec::new();
                for a in v.split(',') {
                    let ip: Ipv4Addr = a
                        .trim()
                        .parse()
                        .map_err(|_| bad(k, v, "want IPv4 addresses, comma separated"))?;
                    data.extend_from_slice(&ip.octets());
                }
                if data.len() > 252 {
                    return Err(bad(k, v, "at most 63 addresses"));
                }
                e.options.push((opt::NTP, data));
            }
            "server_id" => {
                e.server_id = Some(v.parse().map_err(|_| bad(k, v, "want an IPv4 address"))?)
            }
            "tftp_server" => e.options.push((opt::TFTP_SERVER, text(k, v)?)),
            "bootfile_name" => e.options.push((opt::BOOTFILE, text(k, v)?)),
            _ => {
                return Err(ModelError::Invalid(format!(
                    "unknown DHCP option {k:?} (known: lease_time, T1, T2, mtu, domain_name, \
                     ntp_server, server_id, tftp_server, bootfile_name)"
                )))
            }
        }
    }
    Ok(e)
}

/// RFC 3442 encoding of classless routes: prefix length, the significant octets of the
/// destination, the router.
pub fn encode_classless(routes: &[HostRoute]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in routes {
        out.push(r.prefix.len);
        let n = (r.prefix.len as usize).div_ceil(8);
        out.extend_from_slice(&r.prefix.network().octets()[..n]);
        out.extend_from_slice(&r.nexthop.octets());
    }
    out
}

/// The lease for `lp` (on switch `tunnel_key`, MTU `mtu`): its first fixed IP that lies in a
/// subnet of its switch with DHCP on. `None` when there is none: its DHCP is then switched
/// like any broadcast (a tenant may run its own server).
pub fn lease_for(
    doc: &NbDocument,
    lp: &LogicalPort,
    tunnel_key: u32,
    mtu: u32,
) -> Option<DhcpLease> {
    let (ip, s) = lp.ips.iter().find_map(|ip| {
        doc.subnets
            .values()
            .find(|s| s.switch == lp.switch && s.dhcp && s.cidr.contains(*ip))
            .map(|s| (*ip, s))
    })?;
    // Validation refused bad options already; an agent holding an older record skips it.
    let extra = encode_options(&s.dhcp_options).ok()?;
    let server_id = extra
        .server_id
        .or(s.gateway)
        .unwrap_or_else(|| Ipv4Addr::from(u32::from(s.cidr.network()) + 1));
    let server_mac = doc
        .router_ports
        .values()
        .find(|rp| rp.switch.as_deref() == Some(s.switch.as_str()) && rp.network.addr == server_id)
        .map(|rp| rp.mac)
        .unwrap_or_else(|| server_mac(tunnel_key));
    let mut options = vec![(opt::SUBNET_MASK, s.cidr.mask().to_be_bytes().to_vec())];
    if let Some(g) = s.gateway {
        options.push((opt::ROUTER, g.octets().to_vec()));
    }
    if !s.dns.is_empty() {
        options.push((opt::DNS, s.dns.iter().flat_map(|a| a.octets()).collect()));
    }
    if !s.host_routes.is_empty() {
        let mut routes = s.host_routes.clone();
        if let Some(g) = s.gateway {
            if !routes.iter().any(|r| r.prefix.len == 0) {
                routes.push(HostRoute {
                    prefix: Ipv4Net {
                        addr: Ipv4Addr::UNSPECIFIED,
                        len: 0,
                    },
                    nexthop: g,
                });
            }
        }
        options.push((opt::CLASSLESS_ROUTES, encode_classless(&routes)));
    }
    options.extend(extra.options);
    Some(DhcpLease {
        ip,
        subnet: s.cidr,
        server_id,
        server_mac,
        lease_time: extra.lease_time.unwrap_or(DEFAULT_LEASE),
        mtu: extra.mtu.unwrap_or(mtu),
        options,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(p: &str, nh: &str) -> HostRoute {
        HostRoute {
            prefix: p.parse().unwrap(),
            nexthop: nh.parse().unwrap(),
        }
    }

    #[test]
    fn classless_routes_follow_rfc3442() {
        // The RFC's own examples: 10.17.0.0/16 -> 16.10.17, 10.27.129.0/24 -> 24.10.27.129,
        // 10.229.0.128/25 -> 25.10.229.0.128, default -> 0.
        let b = encode_classless(&[
            route("10.17.0.0/16", "10.0.0.1"),
            route("10.27.129.0/24", "10.0.0.1"),
            route("10.229.0.128/25", "10.0.0.1"),
            route("0.0.0.0/0", "10.0.0.254"),
        ]);
        assert_eq!(
            b,
            vec![
                16, 10, 17, 10, 0, 0, 1, //
                24, 10, 27, 129, 10, 0, 0, 1, //
                25, 10, 229, 0, 128, 10, 0, 0, 1, //
                0, 10, 0, 0, 254
            ]
        );
    }

    #[test]
    fn options_are_checked_and_encoded() {
        let mut o = BTreeMap::new();
        o.insert("lease_time".to_string(), "600".to_string());
        o.insert("domain_name".to_string(), "tenant.example".to_string());
        o.insert("ntp_server".to_string(), "10.0.0.5, 10.0.0.6".to_string());
        let e = encode_options(&o).unwrap();
        assert_eq!(e.lease_time, Some(600));
        assert!(e
            .options
            .contains(&(opt::DOMAIN_NAME, b"tenant.example".to_vec())));
        assert!(e
            .options
            .contains(&(opt::NTP, vec![10, 0, 0, 5, 10, 0, 0, 6])));
        for (k, v) in [
            ("lease_time", "0"),
            ("lease_time", "x"),
            ("mtu", "40"),
            ("domain_name", "a..b"),
            ("ntp_server", "10.0.0.300"),
            ("server_id", "nope"),
            ("colour", "blue"),
        ] {
            let o = BTreeMap::from([(k.to_string(), v.to_string())]);
            let e = encode_options(&o)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(k), "{k}={v}: {e}");
        }
    }
}
