//! Testbed helpers for routed topologies: VMs with their own subnet address and a default
//! route through their logical router's port.

use crate::testbed::{run, Testbed};
use anyhow::Result;
use std::process::Command;

/// The address of `add_ls1_router`'s port on ls1: the VMs' (10.0.0.x/16) gateway.
pub const LS1_GATEWAY: &str = "10.0.255.254";

impl Testbed {
    /// Router `router` (tunnel key `key`) with port `<router>-ls1` (MAC 0a:00:00:00:ff:01,
    /// 10.0.255.254/16, port key 100) on logical switch ls1.
    pub fn add_ls1_router(&self, router: &str, key: u32) -> Result<()> {
        self.nbctl(&["lr-add", router, "--key", &key.to_string()])?;
        self.nbctl(&[
            "lrp-add",
            router,
            &format!("{router}-ls1"),
            "0a:00:00:00:ff:01",
            &format!("{LS1_GATEWAY}/16"),
            "--key",
            "100",
            "--switch",
            "ls1",
        ])?;
        Ok(())
    }

    /// Adds VM `name` behind `chassis` on logical switch `switch` (port key `key`, MAC
    /// 0a:00:00:00:<key>) with address `cidr` (e.g. 10.1.0.11/24), default route via `gateway`
    /// and interface MTU `mtu`, and binds it in the NB.
    #[allow(clippy::too_many_arguments)]
    pub fn add_routed_vm(
        &mut self,
        name: &str,
        chassis: &str,
        switch: &str,
        key: u16,
        cidr: &str,
        gateway: &str,
        mtu: u32,
    ) -> Result<()> {
        self.add_vm_unbound(name, chassis, key)?;
        let ip = cidr.split('/').next().unwrap_or(cidr).to_string();
        let ns = self.vm(name)?.ns.clone();
        let ipc = |args: &[&str]| run(Command::new("ip").arg("-n").arg(&ns).args(args));
        ipc(&["addr", "flush", "dev", "eth0"])?;
        ipc(&["addr", "add", cidr, "dev", "eth0"])?;
        ipc(&["link", "set", "eth0", "mtu", &mtu.to_string()])?;
        ipc(&["route", "add", "default", "via", gateway])?;
        if let Some(vm) = self.vms.iter_mut().find(|v| v.name == name) {
            vm.ip = ip;
        }
        self.register_vm(name, switch)?;
        Ok(())
    }
}
