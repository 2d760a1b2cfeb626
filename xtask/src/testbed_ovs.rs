//! Testbed chassis run by Open vSwitch's userspace datapath (the interop tests and the
//! benchmark's peer), and their VMs.

use crate::testbed::*;
use anyhow::{anyhow, Result};
use std::process::Command;

impl Testbed {
    /// A chassis run by Open vSwitch's userspace datapath instead of geneflow, laid out as OVS
    /// userspace tunneling wants it: `br-phy` (netdev) holding the underlay veth, with the
    /// underlay address on the bridge, and `br-int` (netdev) with the VM ports and a Geneve
    /// port to `remote_ip`, the OVN option mapped to tun_metadata0. `afxdp` makes the ports
    /// `type=afxdp` (AF_XDP) instead of the default `system` (AF_PACKET).
    pub fn add_ovs_chassis(&mut self, name: &str, remote_ip: &str, afxdp: bool) -> Result<()> {
        let n = self.chassis.len() + 1;
        let ns = format!("{}-{name}", self.prefix);
        self.add_ns(&ns)?;
        let ipaddr = format!("198.18.0.{n}");
        let bridge_port = self.underlay_port(&ns, "ul", "")?;
        self.setup_ovs(name, &ns, &ipaddr, bridge_port, remote_ip, afxdp)
    }

    /// Two OVS chassis whose uplinks are one veth pair (198.18.0.1 and .2), for benchmarks.
    pub fn add_ovs_pair_direct(&mut self, a: &str, b: &str, afxdp: bool) -> Result<()> {
        let (na, nb) = (
            format!("{}-{a}", self.prefix),
            format!("{}-{b}", self.prefix),
        );
        self.add_ns(&na)?;
        self.add_ns(&nb)?;
        self.raw_veth(&na, "ul", &nb, "ul")?;
        self.setup_ovs(a, &na, "198.18.0.1", String::new(), "198.18.0.2", afxdp)?;
        self.setup_ovs(b, &nb, "198.18.0.2", String::new(), "198.18.0.1", afxdp)
    }

    pub(crate) fn setup_ovs(
        &mut self,
        name: &str,
        ns: &str,
        ipaddr: &str,
        bridge_port: String,
        remote_ip: &str,
        afxdp: bool,
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
            c.arg(format!("--db=unix:{d}/db.sock")).args(args);
            run(&mut c)
        };
        vsctl(&["--no-wait", "init"])?;
        let mut c = self.ns_cmd(&ns, "ovs-vswitchd");
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
        let port_type = if afxdp { "afxdp" } else { "system" };
        if !afxdp {
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
        vsctl(&[
            "add-port",
            "br-phy",
            "ul",
            "--",
            "set",
            "interface",
            "ul",
            &format!("type={port_type}"),
        ])?;
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
            port_type,
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
        let pt = o.port_type;
        // No GRO here: it would hand AF_PACKET (system ports) 64 KB TCP aggregates that OVS
        // cannot forward. The XDP generator's frames need it; the benchmark turns it on itself.
        let ovs_ns = o.ns.clone();
        if pt == "system" {
            keep_stack_out(self, &ovs_ns, &iface)?;
        }
        let mut c = Command::new("ovs-vsctl");
        c.env("OVS_RUNDIR", &d)
            .arg(format!("--db=unix:{d}/db.sock"))
            .args([
                "add-port",
                "br-int",
                &iface,
                "--",
                "set",
                "interface",
                &iface,
                &format!("type={pt}"),
            ]);
        run(&mut c)?;
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
                "in_port={iface},dl_dst={rmac},actions=set_field:{vni}->tun_id,set_field:{}->tun_metadata0,output:gnv0",
                meta(*rkey)
            )])?;
        }
        self.ofctl(chassis, &["add-flow", "br-int", &format!(
            "in_port={iface},dl_dst=01:00:00:00:00:00/01:00:00:00:00:00,actions=set_field:{vni}->tun_id,set_field:{}->tun_metadata0,output:gnv0",
            meta(0x8000)
        )])?;
        for egress in [key, 0x8000] {
            self.ofctl(
                chassis,
                &[
                    "add-flow",
                    "br-int",
                    &format!(
                "in_port=gnv0,tun_id={vni},tun_metadata0=0x{egress:x}/0xffff,actions=output:{iface}"
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
