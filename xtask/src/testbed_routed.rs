//! A routed underlay for the testbed: chassis in different IP subnets joined by a router
//! namespace, so that the next hop toward a remote chassis is the router, not the chassis.
//!
//! ```text
//!   chassis A (ul 198.18.1.1/24, default via .254) ── r1 198.18.1.254 ┐
//!                                                                     router (ip_forward=1)
//!   chassis B (ul 198.18.2.1/24, default via .254) ── r2 198.18.2.254 ┘
//! ```
//!
//! Every namespace is registered with the testbed (`add_raw_ns`), so it is removed on drop, on
//! failure and on Ctrl-C like the others; the chassis are registered in the NB and in
//! `tb.chassis`, so `start_agents`, `add_vm`, `ping` and `counter` work on them unchanged.

use crate::testbed::{run, Chassis, Testbed};
use anyhow::{bail, Result};
use std::process::Command;

/// The router namespace's short name (the testbed prefixes it).
const ROUTER: &str = "rt";

/// The underlay address of the routed chassis in subnet `subnet` (198.18.<subnet>.1).
pub fn routed_chassis_ip(subnet: u8) -> String {
    format!("198.18.{subnet}.1")
}

/// The router's address in subnet `subnet`, the chassis's default gateway.
pub fn router_ip(subnet: u8) -> String {
    format!("198.18.{subnet}.254")
}

fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

impl Testbed {
    /// The router namespace of the routed underlay, created on first use (IPv4 forwarding on).
    pub fn router_ns(&mut self) -> Result<String> {
        let ns = format!("{}-{ROUTER}", self.prefix);
        if std::path::Path::new("/run/netns").join(&ns).exists() {
            return Ok(ns);
        }
        self.add_raw_ns(ROUTER)?;
        run(self
            .ns_cmd(&ns, "sysctl")
            .args(["-qw", "net.ipv4.ip_forward=1"]))?;
        Ok(ns)
    }

    /// Adds chassis `name` in its own underlay subnet 198.18.<subnet>.0/24 (1..=254, not 0: the
    /// bridged underlay and the NB servers use 198.18.0.0/24): uplink `ul` at .1 with a
    /// default route via the router's .254 on the other end of the veth. Registers it in the
    /// NB with its underlay address.
    pub fn add_routed_chassis(&mut self, name: &str, subnet: u8) -> Result<()> {
        if subnet == 0 || subnet == 255 {
            bail!("subnet {subnet} is not for routed chassis");
        }
        let router = self.router_ns()?;
        let ns = self.add_raw_ns(name)?;
        let r_if = format!("r{subnet}");
        self.raw_veth(&ns, "ul", &router, &r_if)?;
        let (addr, gw) = (routed_chassis_ip(subnet), router_ip(subnet));
        ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", "ul"])?;
        ip(&[
            "-n", &ns, "route", "add", "default", "via", &gw, "dev", "ul",
        ])?;
        ip(&[
            "-n",
            &router,
            "addr",
            "add",
            &format!("{gw}/24"),
            "dev",
            &r_if,
        ])?;
        self.nbctl(&["chassis-add", name, &addr])?;
        let c = Chassis::new(name, ns, r_if, addr, &self.dir);
        self.chassis.push(c);
        Ok(())
    }
}
