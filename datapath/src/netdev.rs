//! Facts about the host's interfaces and neighbours that the datapath needs, read from the
//! kernel (sysfs, /proc, iproute2). Control-path only: nothing here runs per packet.

use serde_json::Value;
use std::collections::HashMap;
use std::ffi::CString;
use std::net::{Ipv4Addr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: FFI call with a valid NUL-terminated string.
    let ix = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (ix != 0).then_some(ix)
}

fn sysfs(name: &str, attr: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/class/net/{name}/{attr}"))
        .ok()
        .map(|s| s.trim().to_string())
}

pub fn mac(name: &str) -> Option<[u8; 6]> {
    let s = sysfs(name, "address")?;
    let m: geneflow_control::model::Mac = s.parse().ok()?;
    Some(m.0)
}

pub fn mtu(name: &str) -> Option<u32> {
    sysfs(name, "mtu")?.parse().ok()
}

/// `bpf_fib_lookup` refuses to resolve a next hop through an interface with IPv4 forwarding
/// off (BPF_FIB_LKUP_RET_FWD_DISABLED), so the uplink needs it on.
pub fn enable_forwarding(name: &str) -> std::io::Result<()> {
    let path = format!("/proc/sys/net/ipv4/conf/{name}/forwarding");
    if std::fs::read_to_string(&path)?.trim() != "1" {
        std::fs::write(&path, "1")?;
        info!(
            iface = name,
            "enabled IPv4 forwarding on the uplink (needed by bpf_fib_lookup)"
        );
    }
    Ok(())
}

/// A VM port belongs to the overlay: the chassis's own stack must not talk on it (IPv6 router
/// solicitations and MLD reports from the host would reach the VM).
pub fn silence_host_stack(name: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    if let Err(e) = std::fs::write(&path, "1") {
        debug!(iface = name, "cannot disable IPv6 on port: {e}");
    }
}

/// The underlay neighbour cache: next-hop MACs for remote chassis, from the kernel's table.
/// When one is missing, a datagram to the discard port makes the kernel resolve it (the fast
/// path's `bpf_fib_lookup` then finds it too).
pub struct Neighbours {
    uplink: String,
    table: HashMap<Ipv4Addr, [u8; 6]>,
    last_refresh: Instant,
    last_probe: HashMap<Ipv4Addr, Instant>,
    probe: Option<UdpSocket>,
}

impl Neighbours {
    pub fn new(uplink: &str) -> Neighbours {
        Neighbours {
            uplink: uplink.to_string(),
            table: HashMap::new(),
            last_refresh: Instant::now() - Duration::from_secs(10),
            last_probe: HashMap::new(),
            probe: UdpSocket::bind("0.0.0.0:0").ok(),
        }
    }

    /// Cached lookup only (the per-packet path).
    pub fn get(&self, ip: Ipv4Addr) -> Option<[u8; 6]> {
        self.table.get(&ip).copied()
    }

    /// Lookup that refreshes from the kernel (rate-limited) and probes on a miss.
    pub fn resolve(&mut self, ip: Ipv4Addr) -> Option<[u8; 6]> {
        if let Some(m) = self.get(ip) {
            return Some(m);
        }
        if self.last_refresh.elapsed() > Duration::from_millis(20) {
            self.refresh();
        }
        if let Some(m) = self.get(ip) {
            return Some(m);
        }
        self.kick(ip);
        None
    }

    /// Makes the kernel resolve `ip` if it is not known (rate-limited per address).
    pub fn kick(&mut self, ip: Ipv4Addr) {
        if self.table.contains_key(&ip) {
            return;
        }
        let due = self
            .last_probe
            .get(&ip)
            .is_none_or(|t| t.elapsed() > Duration::from_millis(200));
        if due {
            self.last_probe.insert(ip, Instant::now());
            if let Some(s) = &self.probe {
                debug!(%ip, "probing underlay neighbour");
                let _ = s.send_to(&[], (ip, 9));
            }
        }
    }

    /// Re-reads the kernel's table. Returns true if a next hop we knew changed or went away
    /// (megaflows carrying it must then go stale).
    pub fn refresh(&mut self) -> bool {
        self.last_refresh = Instant::now();
        let Ok(text) = std::fs::read_to_string("/proc/net/arp") else {
            return false;
        };
        let old = std::mem::take(&mut self.table);
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 6 || f[5] != self.uplink {
                continue;
            }
            let flags = u32::from_str_radix(f[2].trim_start_matches("0x"), 16).unwrap_or(0);
            if flags & 0x2 == 0 {
                continue;
            }
            if let (Ok(ip), Ok(m)) = (
                f[0].parse::<Ipv4Addr>(),
                f[3].parse::<geneflow_control::model::Mac>(),
            ) {
                self.table.insert(ip, m.0);
            }
        }
        old.iter().any(|(ip, mac)| self.table.get(ip) != Some(mac))
    }
}

fn ip_json(args: &[&str]) -> Option<Value> {
    let out = Command::new("ip").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// XDP_REDIRECT into a veth is silently dropped unless the receiving end (the peer) has an XDP
/// program or GRO enabled. For every port the datapath redirects to, enable GRO on its veth
/// peer, wherever that peer lives (same namespace or a named one). Returns whether the peer is
/// known to be ready; non-veth ports (tap, physical) need nothing.
pub fn prepare_redirect_target(iface: &str) -> bool {
    let Some(link) = ip_json(&["-j", "-d", "link", "show", "dev", iface]) else {
        warn!(iface, "cannot inspect interface");
        return false;
    };
    let l = &link[0];
    if l["linkinfo"]["info_kind"].as_str() != Some("veth") {
        return true;
    }
    let Some(peer_ix) = l["link_index"].as_u64() else {
        warn!(iface, "veth without a visible peer index");
        return false;
    };
    let ns_name = match l["link_netnsid"].as_u64() {
        None => None,
        Some(nsid) => {
            let ids = ip_json(&["-j", "netns", "list-id"]).unwrap_or(Value::Null);
            let name = ids.as_array().and_then(|a| {
                a.iter()
                    .find(|e| e["nsid"].as_u64() == Some(nsid))
                    .and_then(|e| e["name"].as_str().map(str::to_string))
            });
            match name {
                Some(n) => Some(n),
                None => {
                    warn!(
                        iface,
                        nsid, "veth peer is in an unnamed namespace; enable GRO or XDP on it, or redirected frames are dropped"
                    );
                    return false;
                }
            }
        }
    };
    let mut list_args = vec!["-j", "link", "show"];
    let ns_args;
    if let Some(n) = &ns_name {
        ns_args = ["-n".to_string(), n.clone()];
        list_args.splice(0..0, ns_args.iter().map(String::as_str));
    }
    let peers = ip_json(&list_args).unwrap_or(Value::Null);
    let peer_name = peers.as_array().and_then(|a| {
        a.iter()
            .find(|e| e["ifindex"].as_u64() == Some(peer_ix))
            .and_then(|e| e["ifname"].as_str().map(str::to_string))
    });
    let Some(peer) = peer_name else {
        warn!(iface, "veth peer not found");
        return false;
    };
    let mut cmd = match &ns_name {
        Some(n) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", n, "ethtool", "-K", &peer, "gro", "on"]);
            c
        }
        None => {
            let mut c = Command::new("ethtool");
            c.args(["-K", &peer, "gro", "on"]);
            c
        }
    };
    match cmd.output() {
        Ok(o) if o.status.success() => {
            info!(
                iface,
                peer,
                netns = ns_name.as_deref().unwrap_or("-"),
                "GRO enabled on veth peer for XDP redirect"
            );
            true
        }
        Ok(o) => {
            warn!(
                iface,
                peer,
                "enabling GRO on veth peer failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            false
        }
        Err(e) => {
            warn!(iface, peer, "cannot run ethtool: {e}");
            false
        }
    }
}
