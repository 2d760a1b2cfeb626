//! Testbed chassis run by Open vSwitch's userspace datapath (the interop tests and the
//! benchmark's peer), and their VMs. The DPDK build of OVS uses the same layout and flows
//! (its own settings in testbed_ovs_dpdk.rs).

use crate::testbed::*;
use crate::testbed_ovs_dpdk as dpdk;
use anyhow::{anyhow, bail, Result};
use std::process::Command;

/// What an OVS chassis's ports are, and so which ovs-vswitchd runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OvsPorts {
    /// `type=system` (AF_PACKET), plain ovs-vswitchd.
    System,
    /// `type=afxdp` (AF_XDP), plain ovs-vswitchd.
    Afxdp,
    /// `type=dpdk` on `net_af_packet` vdevs, ovs-vswitchd-dpdk with one PMD thread on this
    /// core.
    Dpdk { pmd_core: u32 },
}

impl OvsPorts {
    pub(crate) fn of(afxdp: bool) -> OvsPorts {
        if afxdp {
            OvsPorts::Afxdp
        } else {
            OvsPorts::System
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            OvsPorts::System => "system",
            OvsPorts::Afxdp => "afxdp",
            OvsPorts::Dpdk { .. } => "dpdk",
        }
    }

    /// The OVS port of kernel interface `iface`: the interface itself, except for DPDK,
    /// whose port only names a vdev on it.
    pub fn port(self, iface: &str) -> String {
        match self {
            OvsPorts::Dpdk { .. } => format!("d{iface}"),
            _ => iface.to_string(),
        }
    }

    /// The Interface columns of port `iface`; `vdev` numbers a DPDK vdev, unique in the
    /// instance.
    fn settings(self, iface: &str, vdev: u32) -> Vec<String> {
        match self {
            OvsPorts::Dpdk { .. } => dpdk::port_settings(iface, vdev),
            _ => vec![format!("type={}", self.kind())],
        }
    }

    /// Whether the chassis kernel sees the frames of these ports (AF_PACKET taps, `system`
    /// ports and DPDK's af_packet vdevs alike) and must be kept out of them.
    fn kernel_sees_frames(self) -> bool {
        self != OvsPorts::Afxdp
    }
}

impl Testbed {
    /// A chassis run by Open vSwitch's userspace datapath instead of geneflow, laid out as OVS
    /// userspace tunneling wants it: `br-phy` (netdev) holding the underlay veth, with the
    /// underlay address on the bridge, and `br-int` (netdev) with the VM ports and a Geneve
    /// port to `remote_ip`, the OVN option mapped to tun_metadata0. `afxdp` makes the ports
    /// `type=afxdp` (AF_XDP) instead of the default `system` (AF_PACKET).
    pub fn add_ovs_chassis(&mut self, name: &str, remote_ip: &str, afxdp: bool) -> Result<()> {
        self.add_ovs_chassis_with(name, remote_ip, OvsPorts::of(afxdp))
    }

    /// [`Testbed::add_ovs_chassis`] with ports of any kind.
    pub fn add_ovs_chassis_with(
        &mut self,
        name: &str,
        remote_ip: &str,
        ports: OvsPorts,
    ) -> Result<()> {
        let n = self.chassis.len() + 1;
        let ns = format!("{}-{name}", self.prefix);
        self.add_ns(&ns)?;
        let ipaddr = format!("198.18.0.{n}");
        let bridge_port = self.underlay_port(&ns, "ul", "")?;
        self.setup_ovs(name, &ns, &ipaddr, bridge_port, remote_ip, ports)
    }

    /// Two OVS chassis whose uplinks are one veth pair (198.18.0.1 and .2), for benchmarks.
    pub fn add_ovs_pair_direct(&mut self, a: &str, b: &str, afxdp: bool) -> Result<()> {
        let p = OvsPorts::of(afxdp);
        self.add_ovs_pair_direct_with(a, b, [p, p])
    }

    /// [`Testbed::add_ovs_pair_direct`] with ports of any kind, per chassis.
    pub fn add_ovs_pair_direct_with(
        &mut self,
        a: &str,
        b: &str,
        ports: [OvsPorts; 2],
    ) -> Result<()> {
        let (na, nb) = (
            format!("{}-{a}", self.prefix),
            format!("{}-{b}", self.prefix),
        );
        self.add_ns(&na)?;
        self.add_ns(&nb)?;
        self.raw_veth(&na, "ul", &nb, "ul")?;
        self.setup_ovs(a, &na, "198.18.0.1", String::new(), "198.18.0.2", ports[0])?;
        self.setup_ovs(b, &nb, "198.18.0.2", String::new(), "198.18.0.1", ports[1])
    }

    pub(crate) fn setup_ovs(
        &mut self,
        name: &str,
        ns: &str,
        ipaddr: &str,
        bridge_port: String,
        remote_ip: &str,
        ports: OvsPorts,
    ) -> Result<()> {
        let ns = ns.to_string();
        let ipaddr = ipaddr.to_string();
        // The underlay address lives on br-phy; the kernel must not answer ARP on ul itself.
        run(self
            .ns_cmd(&ns, "sysctl")
            .args(["-qw", "net.ipv4.conf.ul.arp_ignore=1"]))?;
        let dir = self.dir.join(format!("ovs-{name}"));
        std::fs::create_dir_all(&dir)?;
        let d = dir.display().to_string();
        let env = |c: &mut Command| {
            c.env("OVS_RUNDIR", &d)
                .env("OVS_DBDIR", &d)
                .env("OVS_LOGDIR", &d)
                .env("OVS_SYSCONFDIR", &d);
        };
        let mut c = Command::new("ovsdb-tool");
        c.args([
            "create",
            &format!("{d}/conf.db"),
            "/usr/share/openvswitch/vswitch.ovsschema",
        ]);
        run(&mut c)?;
        let mut c = self.ns_cmd(&ns, "ovsdb-server");
        env(&mut c);
        c.args([
            &format!("{d}/conf.db"),
            &format!("--remote=punix:{d}/db.sock"),
            &format!("--pidfile={d}/ovsdb-server.pid"),
            &format!("--unixctl={d}/ovsdb-server.ctl"),
            &format!("--log-file={d}/ovsdb-server.log"),
            "--detach",
        ]);
        run(&mut c)?;
        let vsctl = |args: &[&str]| -> Result<String> {
            let mut c = Command::new("ovs-vsctl");
            env(&mut c);
            // A port whose vswitchd never commits it must fail the run, not hang it.
            c.arg("--timeout=60")
                .arg(format!("--db=unix:{d}/db.sock"))
                .args(args);
            run(&mut c)
        };
        vsctl(&["--no-wait", "init"])?;
        let mut c = match ports {
            OvsPorts::Dpdk { pmd_core } => {
                let mut a = vec![
                    "--no-wait".to_string(),
                    "set".into(),
                    "Open_vSwitch".into(),
                    ".".into(),
                ];
                a.extend(dpdk::other_config(&ns, pmd_core));
                vsctl(&a.iter().map(String::as_str).collect::<Vec<_>>())?;
                let rt = dpdk::runtime_dir(&dir);
                std::fs::create_dir_all(&rt)?;
                let mut c = self.ns_cmd(&ns, dpdk::OVS_VSWITCHD_DPDK);
                c.env("RUNTIME_DIRECTORY", &rt);
                c
            }
            _ => self.ns_cmd(&ns, "ovs-vswitchd"),
        };
        env(&mut c);
        c.args([
            &format!("unix:{d}/db.sock"),
            &format!("--pidfile={d}/ovs-vswitchd.pid"),
            &format!("--unixctl={d}/ovs-vswitchd.ctl"),
            &format!("--log-file={d}/ovs-vswitchd.log"),
            "--detach",
        ]);
        run(&mut c)?;
        for pidf in ["ovsdb-server.pid", "ovs-vswitchd.pid"] {
            if let Ok(p) = std::fs::read_to_string(dir.join(pidf)) {
                if let (Ok(pid), Ok(mut l)) = (p.trim().parse::<u32>(), LIVE.lock()) {
                    if let Some(e) = l.get_mut(self.slot) {
                        e.pids.push(pid);
                    }
                }
            }
        }
        if ports.kernel_sees_frames() {
            keep_stack_out(self, &ns, "ul")?;
        }
        vsctl(&[
            "add-br",
            "br-int",
            "--",
            "set",
            "bridge",
            "br-int",
            "datapath_type=netdev",
        ])?;
        vsctl(&[
            "add-br",
            "br-phy",
            "--",
            "set",
            "bridge",
            "br-phy",
            "datapath_type=netdev",
        ])?;
        let ul = ports.port("ul");
        let mut a = vec!["add-port", "br-phy", &ul, "--", "set", "interface", &ul];
        let settings = ports.settings("ul", 0);
        a.extend(settings.iter().map(String::as_str));
        vsctl(&a)?;
        check_port(&vsctl, &ul)?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ipaddr}/24"),
            "dev",
            "br-phy",
        ])?;
        ip(&["-n", &ns, "link", "set", "br-phy", "up"])?;
        vsctl(&[
            "add-port",
            "br-int",
            "gnv0",
            "--",
            "set",
            "interface",
            "gnv0",
            "type=geneve",
            &format!("options:remote_ip={remote_ip}"),
            "options:key=flow",
            "options:csum=true",
        ])?;
        self.nbctl(&["chassis-add", name, &ipaddr])?;
        self.ovs.push(OvsInfo {
            chassis: name.to_string(),
            ns: ns.clone(),
            dir: dir.clone(),
            ports,
        });
        self.chassis.push(Chassis {
            name: name.to_string(),
            ns,
            bridge_port,
            ip: ipaddr,
            socket: self.dir.join(format!("{name}.sock")),
            log: dir.join("ovs-vswitchd.log"),
            agent_args: Vec::new(),
            agent: None,
        });
        Ok(())
    }

    /// Runs ovs-ofctl (OpenFlow 1.5 for tunnel metadata) against an OVS chassis's br-int.
    pub fn ofctl(&self, chassis: &str, args: &[&str]) -> Result<String> {
        let o = self
            .ovs
            .iter()
            .find(|o| o.chassis == chassis)
            .ok_or_else(|| anyhow!("no OVS chassis {chassis}"))?;
        let d = o.dir.display().to_string();
        run(Command::new("ovs-ofctl")
            .env("OVS_RUNDIR", &d)
            .args(["-O", "OpenFlow15"])
            .args(args))
    }

    /// Adds a VM behind an OVS chassis on `switch` (VNI `vni`) with the flows that give it
    /// OVN semantics: to a remote MAC -> tunnel with (ingress key, egress key); floods ->
    /// egress 32768; from the tunnel with egress = its key (or a flood) -> the VM.
    pub fn add_ovs_vm(
        &mut self,
        name: &str,
        chassis: &str,
        switch: &str,
        vni: u32,
        key: u16,
        remotes: &[(String, u16)],
    ) -> Result<()> {
        self.add_vm_unbound(name, chassis, key)?;
        let vm = self.vm(name)?;
        let (mac, ipaddr, iface) = (vm.mac.clone(), vm.ip.clone(), vm.iface.clone());
        let o = self
            .ovs
            .iter()
            .find(|o| o.chassis == chassis)
            .ok_or_else(|| anyhow!("no OVS chassis {chassis}"))?;
        let d = o.dir.display().to_string();
        let pt = o.ports;
        let port = pt.port(&iface);
        // The VM's vdev: the uplink's is 0, the VMs' count from 1 (this one is in `vms`).
        let vdev = self.vms.iter().filter(|v| v.chassis == chassis).count() as u32;
        // No GRO here: it would hand AF_PACKET (system ports) 64 KB TCP aggregates that OVS
        // cannot forward. The XDP generator's frames need it; the benchmark turns it on itself.
        let ovs_ns = o.ns.clone();
        if pt.kernel_sees_frames() {
            keep_stack_out(self, &ovs_ns, &iface)?;
        }
        let vsctl = |args: &[&str]| -> Result<String> {
            run(Command::new("ovs-vsctl")
                .env("OVS_RUNDIR", &d)
                .arg("--timeout=60")
                .arg(format!("--db=unix:{d}/db.sock"))
                .args(args))
        };
        let mut a = vec!["add-port", "br-int", &port, "--", "set", "interface", &port];
        let settings = pt.settings(&iface, vdev);
        a.extend(settings.iter().map(String::as_str));
        vsctl(&a)?;
        check_port(&vsctl, &port)?;
        self.ofctl(
            chassis,
            &[
                "add-tlv-map",
                "br-int",
                "{class=0x0102,type=0x80,len=4}->tun_metadata0",
            ],
        )
        .or_else(|e| {
            if e.to_string().contains("already") {
                Ok(String::new())
            } else {
                Err(e)
            }
        })?;
        let meta = |egress: u16| format!("0x{:08x}", ((key as u32) << 16) | egress as u32);
        for (rmac, rkey) in remotes {
            self.ofctl(chassis, &["add-flow", "br-int", &format!(
                "in_port={port},dl_dst={rmac},actions=set_field:{vni}->tun_id,set_field:{}->tun_metadata0,output:gnv0",
                meta(*rkey)
            )])?;
        }
        self.ofctl(chassis, &["add-flow", "br-int", &format!(
            "in_port={port},dl_dst=01:00:00:00:00:00/01:00:00:00:00:00,actions=set_field:{vni}->tun_id,set_field:{}->tun_metadata0,output:gnv0",
            meta(0x8000)
        )])?;
        for egress in [key, 0x8000] {
            self.ofctl(
                chassis,
                &[
                    "add-flow",
                    "br-int",
                    &format!(
                "in_port=gnv0,tun_id={vni},tun_metadata0=0x{egress:x}/0xffff,actions=output:{port}"
            ),
                ],
            )?;
        }
        self.nbctl(&[
            "lsp-add",
            switch,
            name,
            &mac,
            &ipaddr,
            "--key",
            &key.to_string(),
        ])?;
        self.nbctl(&["lsp-bind", name, chassis, &iface])?;
        Ok(())
    }
}

/// Fails unless OVS made port `port` (an interface it could not open gets ofport -1 and says
/// why in its `error` column).
fn check_port(vsctl: &impl Fn(&[&str]) -> Result<String>, port: &str) -> Result<()> {
    let ofport = vsctl(&["get", "interface", port, "ofport"])?;
    if ofport.trim().parse::<i64>().unwrap_or(-1) <= 0 {
        let err = vsctl(&["get", "interface", port, "error"]).unwrap_or_default();
        bail!("OVS could not add port {port}: {}", err.trim());
    }
    Ok(())
}
