//! Facts about the host's interfaces and neighbours that the datapath needs, read from the
//! kernel (sysfs, /proc, rtnetlink, the ethtool ioctl). Control-path only, except `Neighbours::get`,
//! which the slow path calls per encapsulated frame and which reads a lock-free snapshot.

mod neighbour;
mod rtnl;
mod veth;
pub use neighbour::{NeighReader, Neighbours};

use std::ffi::CString;
use tracing::{debug, info, warn};

pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: FFI call with a valid NUL-terminated string.
    let ix = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (ix != 0).then_some(ix)
}

/// The name of interface `ifindex` as `struct ifreq` wants it (NUL-terminated).
pub(crate) fn ifname_raw(ifindex: u32) -> std::io::Result<[libc::c_char; libc::IF_NAMESIZE]> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes (NUL included) into `name`.
    if unsafe { libc::if_indextoname(ifindex, name.as_mut_ptr()) }.is_null() {
        return Err(std::io::Error::last_os_error());
    }
    Ok(name)
}

/// A name from `ifname_raw`.
fn c_name(name: &[libc::c_char; libc::IF_NAMESIZE]) -> String {
    // SAFETY: if_indextoname NUL-terminated `name` (ifname_raw succeeded).
    unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// The MTU of the interface with index `ifindex`.
pub fn mtu_of_index(ifindex: u32) -> Option<u32> {
    mtu(&c_name(&ifname_raw(ifindex).ok()?))
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

/// The interface's receive queues in use (its `queues/rx-N` entries; 1 if unreadable).
pub fn rx_queues(name: &str) -> u32 {
    std::fs::read_dir(format!("/sys/class/net/{name}/queues"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                .count() as u32
        })
        .unwrap_or(1)
        .max(1)
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

/// A provider interface: 802.1Q tags must reach XDP in the frame, not in the receive
/// descriptor (rx VLAN offload off). `false` when the driver cannot say or cannot turn it
/// off: VLAN networks on it could not be told apart, and are refused.
pub fn keep_vlan_tags(name: &str) -> bool {
    let Some(ix) = ifindex(name) else {
        return false;
    };
    match veth::rx_vlan_offload_off(ix) {
        Ok(true) => {
            debug!(iface = name, "rx VLAN offload turned off");
            true
        }
        Ok(false) => true,
        Err(e) => {
            warn!(
                iface = name,
                "cannot turn rx VLAN offload off: VLAN provider networks on it are refused: {e}"
            );
            false
        }
    }
}

/// Pins the calling thread to `core`.
pub fn pin_thread(core: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set, filled by CPU_SET; the call
    // only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
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

/// XDP_REDIRECT into a veth is silently dropped unless the receiving end (the peer) has an XDP
/// program or GRO enabled. For every port the datapath redirects to, enable GRO on its veth
/// peer, wherever that peer lives (same namespace or a named one). Returns whether the peer is
/// known to be ready; non-veth ports (tap, physical) need nothing.
pub fn prepare_redirect_target(iface: &str) -> bool {
    let Some(ix) = ifindex(iface) else {
        warn!(iface, "cannot inspect interface: no such interface");
        return false;
    };
    let facts = match veth::link_facts(ix) {
        Ok(f) => f,
        Err(e) => {
            warn!(iface, "cannot inspect interface: {e}");
            return false;
        }
    };
    if !facts.is_veth {
        return true;
    }
    let Some(peer_ix) = facts.peer_ifindex else {
        warn!(iface, "veth without a visible peer index");
        return false;
    };
    let (ns_name, done) = match facts.peer_nsid {
        None => (None, veth::gro_on(peer_ix)),
        Some(nsid) => match veth::named_netns(nsid) {
            Some((name, file)) => {
                let r = veth::gro_on_in(&file, peer_ix);
                (Some(name), r)
            }
            None => {
                warn!(
                    iface,
                    nsid, "veth peer is in an unnamed namespace; enable GRO or XDP on it, or redirected frames are dropped"
                );
                return false;
            }
        },
    };
    match done {
        Ok(peer) => {
            info!(
                iface,
                peer,
                netns = ns_name.as_deref().unwrap_or("-"),
                "GRO enabled on veth peer for XDP redirect"
            );
            true
        }
        Err(e) => {
            warn!(
                iface,
                peer_ifindex = peer_ix,
                netns = ns_name.as_deref().unwrap_or("-"),
                "enabling GRO on veth peer failed: {e}"
            );
            false
        }
    }
}
