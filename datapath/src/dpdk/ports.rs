//! Which DPDK device backs each port of the chassis, and the EAL arguments that make them.
//!
//! A port has a name: the uplink's (`--uplink`), a VM port's (what the NB binds it by) or a
//! provider network's interface. By default the name is a kernel interface and the port a
//! `net_af_packet` vdev on it (a veth in tests, any netdev). `--dpdk-devargs NAME=DEVARGS`
//! makes the port any device DPDK can drive instead, with no kernel interface behind it:
//! a PCI address (`0000:03:00.0`, with the driver's options after a comma), given to the
//! EAL with `-a`, or a vdev string (`net_tap0,iface=t0`, `net_vhost0,iface=/run/vm1.sock`),
//! given with `--vdev`. Such a port gets an interface index of its own, out of the range a
//! kernel hands out in practice, which the tables use as they use a kernel one.

use super::DpdkError;
use geneflow_abi::MAX_PORTS;
use std::collections::{HashMap, HashSet};

/// The first interface index given to a port that is not a kernel interface. Below 2^24:
/// conntrack zones carry an interface index in their upper 24 bits (`nat::out_zone`).
pub const SYNTHETIC_IFINDEX: u32 = 0x00f0_0000;

/// The ports, by slot: the uplink first, then the VM ports, then the providers'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPlan {
    /// The ethdev name to open for each (`is_pci` tells a PCI device).
    pub devices: Vec<String>,
    pub ifindexes: Vec<u32>,
    /// Whether the port is a kernel interface (an af_packet vdev on it).
    pub kernel: Vec<bool>,
    /// The EAL arguments that make the devices.
    pub eal: Vec<String>,
}

/// Plans the ports `names` for `queues` queues each; `devargs` maps a port name to its
/// device. `ifindex` looks a kernel interface up (`netdev::ifindex` outside tests).
pub fn plan(
    names: &[String],
    devargs: &[(String, String)],
    queues: usize,
    ifindex: &dyn Fn(&str) -> Option<u32>,
) -> Result<PortPlan, DpdkError> {
    if names.len() > MAX_PORTS as usize {
        return Err(DpdkError::NoPort(format!(
            "{}: more than {MAX_PORTS} ports",
            names[MAX_PORTS as usize]
        )));
    }
    let mut given: HashMap<&str, &str> = HashMap::new();
    for (name, args) in devargs {
        if !names.contains(name) {
            return Err(DpdkError::Devargs(format!(
                "{name}={args}: no port named {name:?} (the uplink, a --dpdk-port or a \
                 --provider interface)"
            )));
        }
        if args.is_empty() || args.contains(char::is_whitespace) {
            return Err(DpdkError::Devargs(format!(
                "{name}={args:?}: not a PCI address or vdev string"
            )));
        }
        if given.insert(name, args).is_some() {
            return Err(DpdkError::Devargs(format!("{name}: given twice")));
        }
    }
    let mut p = PortPlan {
        devices: Vec::new(),
        ifindexes: Vec::new(),
        kernel: Vec::new(),
        eal: Vec::new(),
    };
    let mut devices = HashSet::new();
    for (slot, name) in names.iter().enumerate() {
        let (device, ix) = match given.get(name.as_str()) {
            Some(args) => {
                let device = device_name(args);
                if is_pci(&device) {
                    p.eal.extend(["-a".to_string(), args.to_string()]);
                } else {
                    p.eal.extend(["--vdev".to_string(), args.to_string()]);
                }
                (device, 0)
            }
            None => {
                let ix = ifindex(name).ok_or_else(|| DpdkError::NoInterface(name.clone()))?;
                let device = format!("net_af_packet{slot}");
                p.eal.extend([
                    "--vdev".to_string(),
                    format!("{device},iface={name},qpairs={queues}"),
                ]);
                (device, ix)
            }
        };
        if !devices.insert(device.clone()) {
            return Err(DpdkError::Devargs(format!(
                "{name}: device {device} backs another port too"
            )));
        }
        p.kernel.push(ix != 0);
        p.devices.push(device);
        p.ifindexes.push(ix);
    }
    // The other ports get indexes no kernel port of this chassis has.
    let mut next = SYNTHETIC_IFINDEX;
    for slot in 0..names.len() {
        if !p.kernel[slot] {
            while p.ifindexes.contains(&next) {
                next += 1;
            }
            p.ifindexes[slot] = next;
            next += 1;
        }
    }
    Ok(p)
}

/// The ethdev name of a device string: what comes before its options; a PCI address in
/// DPDK's form, lowercase with a domain (DPDK names a PCI port `0000:03:00.0`, also when
/// given `03:00.0` or `0000:03:00.0` in capitals). A PCI function that makes several
/// ethdevs (representors, some multi-port NICs) names them otherwise: not supported.
fn device_name(args: &str) -> String {
    let name = args.split(',').next().unwrap_or(args);
    if is_short_pci(name) {
        format!("0000:{}", name.to_ascii_lowercase())
    } else if is_pci(name) {
        name.to_ascii_lowercase()
    } else {
        name.to_string()
    }
}

/// `DOMAIN:03:00.0`: a domain of 4 hex digits or more (Intel VMD's have 5), then a short
/// address.
pub fn is_pci(name: &str) -> bool {
    match name.split_once(':') {
        Some((domain, rest)) => {
            domain.len() >= 4 && domain.bytes().all(|c| c.is_ascii_hexdigit()) && is_short_pci(rest)
        }
        None => false,
    }
}

/// `03:00.0`: bus, device (hex) and function (0-7).
fn is_short_pci(s: &str) -> bool {
    let b = s.as_bytes();
    let hex = |i: usize| b[i].is_ascii_hexdigit();
    b.len() == 7
        && hex(0)
        && hex(1)
        && b[2] == b':'
        && hex(3)
        && hex(4)
        && b[5] == b'.'
        && (b'0'..=b'7').contains(&b[6])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    fn kernel(name: &str) -> Option<u32> {
        match name {
            "ul" => Some(7),
            "vp1" => Some(9),
            _ => None,
        }
    }

    #[test]
    fn kernel_interfaces_become_af_packet_vdevs() {
        let p = plan(&names(&["ul", "vp1"]), &[], 2, &kernel).unwrap();
        assert_eq!(p.devices, ["net_af_packet0", "net_af_packet1"]);
        assert_eq!(p.ifindexes, [7, 9]);
        assert_eq!(p.kernel, [true, true]);
        assert_eq!(
            p.eal,
            [
                "--vdev",
                "net_af_packet0,iface=ul,qpairs=2",
                "--vdev",
                "net_af_packet1,iface=vp1,qpairs=2"
            ]
        );
    }

    #[test]
    fn devargs_name_pci_and_vdev_devices() {
        let d = vec![
            ("nic0".to_string(), "03:00.0,txq_inline=128".to_string()),
            ("vm1".to_string(), "net_tap3,iface=t3".to_string()),
            ("vm2".to_string(), "0000:81:00.1".to_string()),
        ];
        let p = plan(&names(&["nic0", "vm1", "vp1", "vm2"]), &d, 1, &kernel).unwrap();
        assert_eq!(
            p.devices,
            ["0000:03:00.0", "net_tap3", "net_af_packet2", "0000:81:00.1"]
        );
        assert_eq!(p.kernel, [false, false, true, false]);
        let pci: Vec<bool> = p.devices.iter().map(|d| is_pci(d)).collect();
        assert_eq!(pci, [true, false, false, true]);
        // Capitals and longer domains, as DPDK names them.
        assert_eq!(device_name("AF:00.1,x=1"), "0000:af:00.1");
        assert_eq!(device_name("0000:AF:00.1"), "0000:af:00.1");
        assert_eq!(device_name("10000:01:00.0"), "10000:01:00.0");
        assert!(is_pci(&device_name("10000:01:00.0")));
        assert!(!is_pci("net_tap0"));
        assert!(!is_pci("00:03:00.0"));
        assert_eq!(
            p.ifindexes,
            [
                SYNTHETIC_IFINDEX,
                SYNTHETIC_IFINDEX + 1,
                9,
                SYNTHETIC_IFINDEX + 2
            ]
        );
        assert_eq!(
            p.eal,
            [
                "-a",
                "03:00.0,txq_inline=128",
                "--vdev",
                "net_tap3,iface=t3",
                "--vdev",
                "net_af_packet2,iface=vp1,qpairs=1",
                "-a",
                "0000:81:00.1"
            ]
        );
    }

    #[test]
    fn synthetic_indexes_skip_kernel_ones() {
        let d = vec![("a".to_string(), "net_tap0".to_string())];
        let k = |n: &str| (n == "b").then_some(SYNTHETIC_IFINDEX);
        let p = plan(&names(&["a", "b"]), &d, 1, &k).unwrap();
        assert_eq!(p.ifindexes, [SYNTHETIC_IFINDEX + 1, SYNTHETIC_IFINDEX]);
    }

    #[test]
    fn bad_devargs_are_named() {
        let err = |n: &[&str], d: &[(&str, &str)]| {
            let d: Vec<_> = d
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
            plan(&names(n), &d, 1, &kernel).unwrap_err().to_string()
        };
        let e = err(&["ul"], &[("nic9", "0000:03:00.0")]);
        assert!(e.contains("no port named \"nic9\""), "{e}");
        let e = err(&["ul"], &[("ul", "net tap")]);
        assert!(e.contains("not a PCI address or vdev string"), "{e}");
        let e = err(&["ul"], &[("ul", "net_tap0"), ("ul", "net_tap1")]);
        assert!(e.contains("given twice"), "{e}");
        let e = err(
            &["ul", "x"],
            &[("ul", "net_tap0"), ("x", "net_tap0,iface=b")],
        );
        assert!(e.contains("device net_tap0 backs another port"), "{e}");
        // Without devargs, a port is a kernel interface, which must exist.
        let e = err(&["ul", "nope0"], &[]);
        assert!(e.contains("no interface \"nope0\""), "{e}");
        // A generated vdev name cannot be taken by a given one.
        let e = err(&["ul", "x"], &[("x", "net_af_packet0,iface=ul")]);
        assert!(e.contains("backs another port"), "{e}");
    }
}
