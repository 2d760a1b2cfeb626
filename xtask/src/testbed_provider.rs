//! A provider ("external") network for a testbed: a Linux bridge in its own namespace, each
//! chassis plugged into it by a veth `phy` (given to its agent as `--provider physnet1=phy`),
//! and an outside host, not managed by geneflow, at 172.24.4.100/24 with 172.24.4.1 as an
//! extra address (the upstream router the tenant routers point their default route at).

use crate::testbed::{ip, run, Testbed};
use anyhow::Result;

pub const PHYSNET: &str = "physnet1";
pub const OUTSIDE_IP: &str = "172.24.4.100";
pub const UPSTREAM_IP: &str = "172.24.4.1";

/// The provider switch's name and its physnet.
pub const EXT_SWITCH: &str = "ext";
pub const PHYSNET_SUBNET: &str = "172.24.4.0/24";

impl Testbed {
    /// The provider switch `ext` (physnet1, 172.24.4.0/24, on VLAN `vlan` if given) as the
    /// way out of `router`: its gateway port `<router>-gw` (MAC `mac`, 172.24.4.10/24, key 101)
    /// and a default route to the outside host's 172.24.4.1.
    pub fn add_provider_gateway(&self, router: &str, mac: &str, vlan: Option<u16>) -> Result<()> {
        let id = vlan.map(|v| v.to_string()).unwrap_or_default();
        let mut ext = vec!["ls-add", EXT_SWITCH, "--key", "900", "--provider", PHYSNET];
        if vlan.is_some() {
            ext.extend(["--vlan", &id]);
        }
        self.nbctl(&ext)?;
        self.nbctl(&["subnet-add", EXT_SWITCH, "ext-sn", PHYSNET_SUBNET])?;
        let gw = format!("{router}-gw");
        self.nbctl(&[
            "lrp-add",
            router,
            &gw,
            mac,
            "172.24.4.10/24",
            "--key",
            "101",
            "--switch",
            EXT_SWITCH,
        ])?;
        self.nbctl(&["lr-route-add", router, "0.0.0.0/0", UPSTREAM_IP])?;
        Ok(())
    }

    /// Builds the provider network and plugs every chassis added so far into it (call before
    /// `start_agents`). Returns the outside host's namespace.
    pub fn add_provider_network(&mut self) -> Result<String> {
        let pn = format!("{}-pn", self.prefix);
        self.add_ns(&pn)?;
        ip(&["-n", &pn, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &pn, "link", "set", "br0", "up"])?;
        for i in 0..self.chassis.len() {
            let ns = self.chassis[i].ns.clone();
            let peer = format!("p{i}");
            ip(&[
                "link", "add", "phy", "netns", &ns, "type", "veth", "peer", "name", &peer, "netns",
                &pn,
            ])?;
            ip(&["-n", &pn, "link", "set", &peer, "master", "br0"])?;
            ip(&["-n", &pn, "link", "set", &peer, "up"])?;
            ip(&["-n", &ns, "link", "set", "phy", "up"])?;
            self.chassis[i]
                .agent_args
                .extend(["--provider".to_string(), format!("{PHYSNET}=phy")]);
        }
        let out = format!("{}-out", self.prefix);
        self.add_ns(&out)?;
        ip(&[
            "link", "add", "eth0", "netns", &out, "type", "veth", "peer", "name", "pout", "netns",
            &pn,
        ])?;
        ip(&["-n", &pn, "link", "set", "pout", "master", "br0"])?;
        ip(&["-n", &pn, "link", "set", "pout", "up"])?;
        for a in [OUTSIDE_IP, UPSTREAM_IP] {
            ip(&["-n", &out, "addr", "add", &format!("{a}/24"), "dev", "eth0"])?;
        }
        ip(&["-n", &out, "link", "set", "eth0", "up"])?;
        // The outside host is a plain Linux host: no checksum offload left partial for XDP.
        run(self
            .ns_cmd(&out, "ethtool")
            .args(["-K", "eth0", "tx", "off"]))?;
        run(self
            .ns_cmd(&out, "sysctl")
            .args(["-qw", "net.ipv6.conf.all.disable_ipv6=1"]))?;
        Ok(out)
    }
}
