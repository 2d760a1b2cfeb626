//! geneflowd's configuration file (TOML). Every key is also a flag (flags win). Unknown keys
//! and bad values are refused at start with one line naming the key.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use thiserror::Error;

pub const DEFAULT_PATH: &str = "/etc/geneflow/geneflowd.toml";
pub const KEYS: &[&str] = &[
    "chassis",
    "encap_ip",
    "uplink",
    "nb",
    "xdp_mode",
    "bind_mode",
    "forwarder_cores",
    "metrics_address",
    "ctl_socket",
    "udp_csum",
    "pin_dir",
    "provider",
    "dhcp_rate",
    "nb_reconcile_secs",
    "datapath",
    "dpdk_eal",
    "dpdk_ports",
    "dpdk_max_sleep_us",
    "dpdk_devargs",
];

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{path}: {msg}")]
    Bad { path: String, msg: String },
    #[error("{path}: {msg}")]
    Io { path: String, msg: String },
}

/// What a config file sets (everything optional; flags and defaults fill the rest).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileConfig {
    pub chassis: Option<String>,
    pub encap_ip: Option<Ipv4Addr>,
    pub uplink: Option<String>,
    pub nb: Option<String>,
    pub xdp_mode: Option<String>,
    pub bind_mode: Option<String>,
    pub forwarder_cores: Option<Vec<usize>>,
    pub metrics_address: Option<SocketAddr>,
    pub ctl_socket: Option<PathBuf>,
    pub udp_csum: Option<bool>,
    pub pin_dir: Option<PathBuf>,
    /// Provider networks: (physnet, interface).
    pub provider: Option<Vec<(String, String)>>,
    /// DHCP answers per second per port (bursts as large).
    pub dhcp_rate: Option<u32>,
    /// Seconds between reconciliations with the NB (0 = never).
    pub nb_reconcile_secs: Option<u32>,
    /// "xdp" or "dpdk".
    pub datapath: Option<String>,
    /// The DPDK EAL's arguments, and the VM ports' interfaces it serves.
    pub dpdk_eal: Option<Vec<String>>,
    pub dpdk_ports: Option<Vec<String>>,
    pub dpdk_max_sleep_us: Option<u32>,
    /// Ports that are DPDK devices: (port name, PCI address or vdev string).
    pub dpdk_devargs: Option<Vec<(String, String)>>,
}

/// Parses a `PHYSNET=IFACE` mapping (flag or config entry).
pub fn parse_provider(s: &str) -> Result<(String, String), String> {
    let (net, iface) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: want PHYSNET=IFACE"))?;
    geneflow_control::model::check_name(net).map_err(|e| format!("{s:?}: physnet: {e}"))?;
    geneflow_control::model::check_ifname(iface).map_err(|e| format!("{s:?}: interface: {e}"))?;
    Ok((net.to_string(), iface.to_string()))
}

/// Parses a `NAME=DEVARGS` mapping (flag or config entry): the port NAME is the DPDK device
/// DEVARGS (a PCI address or a vdev string, DPDK's syntax, checked when the EAL starts).
pub fn parse_devargs(s: &str) -> Result<(String, String), String> {
    let (name, args) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: want NAME=DEVARGS"))?;
    if name.contains(',') {
        return Err(format!("{s:?}: want NAME=DEVARGS (a port name first)"));
    }
    geneflow_control::model::check_ifname(name).map_err(|e| format!("{s:?}: port name: {e}"))?;
    if args.is_empty() || args.contains(char::is_whitespace) {
        return Err(format!(
            "{s:?}: want a PCI address or a vdev string after the name"
        ));
    }
    Ok((name.to_string(), args.to_string()))
}

fn bad(path: &str, msg: String) -> ConfigError {
    ConfigError::Bad {
        path: path.to_string(),
        msg,
    }
}

/// Reads `path`. A missing file is an error only when `explicit` (given with --config).
pub fn load(path: &Path, explicit: bool) -> Result<FileConfig, ConfigError> {
    let p = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&p, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            Ok(FileConfig::default())
        }
        Err(e) => Err(ConfigError::Io {
            path: p,
            msg: e.to_string(),
        }),
    }
}

pub fn parse(path: &str, text: &str) -> Result<FileConfig, ConfigError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
            .unwrap_or(0);
        bad(
            path,
            format!("line {line}: {}", e.message().replace('\n', " ")),
        )
    })?;
    let mut c = FileConfig::default();
    for (k, v) in &table {
        let want = |what: &str| bad(path, format!("key `{k}`: expected {what}, got {v}"));
        match k.as_str() {
            "chassis" | "uplink" | "nb" => {
                let s = v.as_str().ok_or_else(|| want("a string"))?.to_string();
                if s.is_empty() {
                    return Err(want("a non-empty string"));
                }
                match k.as_str() {
                    "chassis" => {
                        geneflow_control::model::check_name(&s)
                            .map_err(|e| bad(path, format!("key `chassis`: {e}")))?;
                        c.chassis = Some(s)
                    }
                    "uplink" => {
                        geneflow_control::model::check_ifname(&s)
                            .map_err(|e| bad(path, format!("key `uplink`: {e}")))?;
                        c.uplink = Some(s)
                    }
                    _ => {
                        geneflow_control::nb::open(&s)
                            .map_err(|e| bad(path, format!("key `nb`: {e}")))?;
                        c.nb = Some(s)
                    }
                }
            }
            "encap_ip" => {
                let s = v.as_str().ok_or_else(|| want("an IPv4 address string"))?;
                c.encap_ip = Some(s.parse().map_err(|_| want("an IPv4 address"))?);
            }
            "xdp_mode" => {
                let s = v.as_str().ok_or_else(|| want("\"native\" or \"skb\""))?;
                if !matches!(s, "native" | "skb") {
                    return Err(want("\"native\" or \"skb\""));
                }
                c.xdp_mode = Some(s.to_string());
            }
            "bind_mode" => {
                let s = v
                    .as_str()
                    .ok_or_else(|| want("\"copy\" or \"zero-copy\""))?;
                if !matches!(s, "copy" | "zero-copy") {
                    return Err(want("\"copy\" or \"zero-copy\""));
                }
                c.bind_mode = Some(s.to_string());
            }
            "forwarder_cores" => {
                let a = v
                    .as_array()
                    .ok_or_else(|| want("an array of core numbers"))?;
                let n = std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1);
                let mut cores = Vec::new();
                for x in a {
                    let i = x
                        .as_integer()
                        .filter(|i| *i >= 0 && (*i as usize) < n)
                        .ok_or_else(|| want(&format!("core numbers below {n}")))?;
                    cores.push(i as usize);
                }
                if cores.is_empty() {
                    return Err(want("at least one core"));
                }
                c.forwarder_cores = Some(cores);
            }
            "metrics_address" => {
                let s = v.as_str().ok_or_else(|| want("\"address:port\""))?;
                c.metrics_address = Some(s.parse().map_err(|_| want("\"address:port\""))?);
            }
            "ctl_socket" | "pin_dir" => {
                let s = v.as_str().ok_or_else(|| want("a path"))?;
                if !s.starts_with('/') {
                    return Err(want("an absolute path"));
                }
                if k == "pin_dir" {
                    c.pin_dir = Some(PathBuf::from(s));
                } else {
                    c.ctl_socket = Some(PathBuf::from(s));
                }
            }
            "udp_csum" => {
                c.udp_csum = Some(v.as_bool().ok_or_else(|| want("true or false"))?);
            }
            "dhcp_rate" => {
                let n = v
                    .as_integer()
                    .filter(|n| (1..=10_000_000).contains(n))
                    .ok_or_else(|| want("answers per second, 1 to 10000000"))?;
                c.dhcp_rate = Some(n as u32);
            }
            "datapath" => {
                let s = v.as_str().ok_or_else(|| want("\"xdp\" or \"dpdk\""))?;
                if !matches!(s, "xdp" | "dpdk") {
                    return Err(want("\"xdp\" or \"dpdk\""));
                }
                c.datapath = Some(s.to_string());
            }
            "dpdk_eal" | "dpdk_ports" => {
                let a = v.as_array().ok_or_else(|| want("an array of strings"))?;
                let mut out = Vec::new();
                for x in a {
                    let s = x.as_str().ok_or_else(|| want("an array of strings"))?;
                    if k == "dpdk_ports" {
                        geneflow_control::model::check_ifname(s)
                            .map_err(|e| bad(path, format!("key `dpdk_ports`: {e}")))?;
                    }
                    out.push(s.to_string());
                }
                if k == "dpdk_eal" {
                    c.dpdk_eal = Some(out);
                } else {
                    c.dpdk_ports = Some(out);
                }
            }
            "dpdk_devargs" => {
                let a = v
                    .as_array()
                    .ok_or_else(|| want("an array of \"NAME=DEVARGS\""))?;
                let mut out = Vec::new();
                for x in a {
                    let s = x
                        .as_str()
                        .ok_or_else(|| want("an array of \"NAME=DEVARGS\""))?;
                    out.push(
                        parse_devargs(s)
                            .map_err(|e| bad(path, format!("key `dpdk_devargs`: {e}")))?,
                    );
                }
                c.dpdk_devargs = Some(out);
            }
            "dpdk_max_sleep_us" => {
                let n = v
                    .as_integer()
                    .filter(|n| (0..=10_000).contains(n))
                    .ok_or_else(|| want("microseconds, 0 (never sleep under load) to 10000"))?;
                c.dpdk_max_sleep_us = Some(n as u32);
            }
            "nb_reconcile_secs" => {
                let n = v
                    .as_integer()
                    .filter(|n| (0..=86_400).contains(n))
                    .ok_or_else(|| want("seconds, 0 (never) to 86400"))?;
                c.nb_reconcile_secs = Some(n as u32);
            }
            "provider" => {
                let a = v
                    .as_array()
                    .ok_or_else(|| want("an array of \"PHYSNET=IFACE\" strings"))?;
                let mut maps = Vec::new();
                for x in a {
                    let s = x
                        .as_str()
                        .ok_or_else(|| want("an array of \"PHYSNET=IFACE\" strings"))?;
                    maps.push(
                        parse_provider(s).map_err(|e| bad(path, format!("key `provider`: {e}")))?,
                    );
                }
                c.provider = Some(maps);
            }
            other => {
                return Err(bad(
                    path,
                    format!("unknown key `{other}` (known: {})", KEYS.join(", ")),
                ))
            }
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_config_parses() {
        let c = parse(
            "x.toml",
            r#"
chassis = "ch1"
encap_ip = "198.18.0.1"
uplink = "eth1"
nb = "etcd://10.0.0.5:2379"
xdp_mode = "native"
bind_mode = "copy"
forwarder_cores = [0]
metrics_address = "127.0.0.1:9469"
ctl_socket = "/run/geneflow/geneflowd.sock"
udp_csum = true
pin_dir = "/sys/fs/bpf/geneflow/ch1"
provider = ["physnet1=eth2", "physnet2=eth3"]
dhcp_rate = 50
nb_reconcile_secs = 30
datapath = "dpdk"
dpdk_eal = ["-l", "0-1", "--no-huge"]
dpdk_ports = ["tap0", "tap1"]
dpdk_max_sleep_us = 100
dpdk_devargs = ["nic0=0000:03:00.0,txq_inline=128", "vm1=net_vhost0,iface=/run/vm1.sock"]
"#,
        )
        .unwrap();
        assert_eq!(c.chassis.as_deref(), Some("ch1"));
        assert_eq!(
            c.provider,
            Some(vec![
                ("physnet1".into(), "eth2".into()),
                ("physnet2".into(), "eth3".into())
            ])
        );
        assert_eq!(c.dhcp_rate, Some(50));
        assert_eq!(c.nb_reconcile_secs, Some(30));
        assert_eq!(c.forwarder_cores, Some(vec![0]));
        assert_eq!(c.metrics_address.unwrap().port(), 9469);
        assert_eq!(c.datapath.as_deref(), Some("dpdk"));
        assert_eq!(c.dpdk_eal.unwrap().len(), 3);
        assert_eq!(c.dpdk_ports, Some(vec!["tap0".into(), "tap1".into()]));
        assert_eq!(c.dpdk_max_sleep_us, Some(100));
        assert_eq!(
            c.dpdk_devargs,
            Some(vec![
                ("nic0".into(), "0000:03:00.0,txq_inline=128".into()),
                ("vm1".into(), "net_vhost0,iface=/run/vm1.sock".into())
            ])
        );
    }

    #[test]
    fn errors_name_the_key_on_one_line() {
        let cases = [
            ("chasis = \"x\"", "unknown key `chasis`"),
            ("xdp_mode = \"fast\"", "key `xdp_mode`"),
            ("bind_mode = 3", "key `bind_mode`"),
            ("encap_ip = \"1.2.3\"", "key `encap_ip`"),
            ("forwarder_cores = [99]", "key `forwarder_cores`"),
            ("metrics_address = \"nope\"", "key `metrics_address`"),
            ("udp_csum = \"yes\"", "key `udp_csum`"),
            ("pin_dir = \"bpf\"", "key `pin_dir`"),
            ("nb = \"ftp://x\"", "key `nb`"),
            ("nb_reconcile_secs = -1", "key `nb_reconcile_secs`"),
            ("uplink = \"a/b\"", "key `uplink`"),
            ("provider = \"physnet1=eth2\"", "key `provider`"),
            ("provider = [\"physnet1\"]", "key `provider`"),
            ("provider = [\"p/1=eth2\"]", "key `provider`"),
            ("dhcp_rate = 0", "key `dhcp_rate`"),
            ("datapath = \"ovs\"", "key `datapath`"),
            ("dpdk_eal = \"-l 0\"", "key `dpdk_eal`"),
            ("dpdk_ports = [\"a/b\"]", "key `dpdk_ports`"),
            ("dpdk_max_sleep_us = 20000", "key `dpdk_max_sleep_us`"),
            ("dpdk_devargs = [\"0000:03:00.0\"]", "want NAME=DEVARGS"),
            ("dpdk_devargs = [\"nic0=\"]", "key `dpdk_devargs`"),
            (
                "dpdk_devargs = [\"net_tap0,iface=t0\"]",
                "a port name first",
            ),
            ("dpdk_devargs = \"nic0=x\"", "key `dpdk_devargs`"),
            ("chassis = \"ch1\"\nchassis = \"ch2\"", "line 2"),
        ];
        for (text, want) in cases {
            let e = parse("/etc/g.toml", text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(e.starts_with("/etc/g.toml: "), "{e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }
}
