//! Ports that are DPDK devices, not kernel interfaces (issue 14, `--dpdk-devargs`): a DPDK
//! chassis whose uplink is named `nic0`, an interface that does not exist, and given by its
//! device string (a `net_af_packet` vdev on the underlay veth, as a PCI address would be on
//! bare metal), and whose VM port is a `net_tap` device made by DPDK, moved into the VM's
//! namespace: no veth, no kernel interface of the port's name. It carries the overlay to an
//! XDP chassis; bad device strings are refused in one line.

use anyhow::{Context, Result};
use geneflow_tests::dpdk::{
    assert_nothing_left, assert_refused, dpdk_runtime, start_dpdk_with, two_chassis,
};
use geneflow_tests::provider::iperf3;
use geneflow_tests::*;
use std::process::Command;
use std::time::Duration;
use xtask::testbed::run;

/// The tap DPDK makes for vm1's port, in ch1's namespace until moved into vm1's.
const TAP: &str = "gft-vm1";

#[test]
fn ports_given_as_dpdk_devices_carry_the_overlay() -> Result<()> {
    require_root();
    let runtime_before = dpdk_runtime();
    let mut tb = two_chassis("dv", &[("vm1", "ch1", 1), ("vm3", "ch2", 3)])?;
    tb.start_agent(1)?;
    let ns1 = tb.chassis[0].ns.clone();
    let vm1 = tb.vm("vm1")?.clone();
    // vm1's port (bound as vp-vm1 in the NB) loses its veth (both ends): DPDK will make its
    // interface.
    run(Command::new("ip").args(["-n", &ns1, "link", "del", "vp-vm1"]))?;
    let uplink = ("nic0", "net_af_packet9,iface=ul,qpairs=2");
    let tap_args = format!("net_tap0,iface={TAP}");
    let vm_port = ("vp-vm1", tap_args.as_str());

    // Bad device strings: one line naming the problem, a non-zero exit, nothing left.
    let no_pci = "-l 0 --no-huge --no-pci --no-shconf -m 256";
    for (devargs, eal, want) in [
        (
            vec![uplink, ("vp-vm9", "net_tap1")],
            no_pci,
            "dpdk_devargs) vp-vm9=net_tap1: no port named \"vp-vm9\"",
        ),
        (
            vec![uplink, ("vp-vm1", "net_nosuch0")],
            no_pci,
            "refused to start with [\"-l\", \"0\", \"--no-huge\", \"--no-pci\", \"--no-shconf\", \"-m\", \"256\", \"--vdev\", \"net_af_packet9,iface=ul,qpairs=2\", \"--vdev\", \"net_nosuch0\"]: No such device",
        ),
        (
            vec![uplink, ("vp-vm1", "net_af_packet9,iface=ul")],
            no_pci,
            "device net_af_packet9 backs another port too",
        ),
        (
            vec![("nic0", "0000:ff:1f.7"), vm_port],
            no_pci,
            "dpdk_devargs) nic0: a PCI device, but the EAL arguments have --no-pci",
        ),
        (
            vec![("nic0", "ff:1f.7"), vm_port],
            "-l 0 --no-huge --no-shconf -m 256",
            "no DPDK port \"0000:ff:1f.7\": the EAL has no such device",
        ),
    ] {
        let mut cmd = tb.ns_cmd(&ns1, &tb.bin("geneflowd"));
        cmd.args(["--chassis", "ch1", "--nb", &tb.nb, "--uplink", "nic0"])
            .args(["--datapath", "dpdk", "--dpdk-port", "vp-vm1"])
            .args(["--dpdk-eal", eal]);
        for (n, a) in &devargs {
            cmd.arg("--dpdk-devargs").arg(format!("{n}={a}"));
        }
        assert_refused(&cmd.output()?, &format!("{devargs:?}"), want);
    }
    // None of them left a tap behind.
    let tap = Command::new("ip")
        .args(["-n", &ns1, "link", "show", TAP])
        .output()?;
    assert!(!tap.status.success(), "{TAP} left behind");

    let mut d = start_dpdk_with(&tb, uplink.0, &["vp-vm1"], &[uplink, vm_port])?;
    d.wait_log("pipeline applied")?;
    // The tap is the VM's interface: into vm1's namespace with its address.
    within(Duration::from_secs(5), || {
        Ok(Command::new("ip")
            .args(["-n", &ns1, "link", "show", TAP])
            .output()?
            .status
            .success())
    })?
    .with_context(|| format!("DPDK made no {TAP}:\n{}", d.log()))?;
    run(Command::new("ip").args(["-n", &ns1, "link", "set", TAP, "netns", &vm1.ns]))?;
    run(Command::new("ip").args([
        "-n", &vm1.ns, "link", "set", TAP, "address", &vm1.mac, "mtu", "1442", "up",
    ]))?;
    let cidr = format!("{}/16", vm1.ip);
    run(Command::new("ip").args(["-n", &vm1.ns, "addr", "add", &cidr, "dev", TAP]))?;

    // The ports as the chassis reports them: by their names, with indexes of their own.
    let ports = tb.stats("ch1")?["ports"].clone();
    let names: Vec<String> = ports
        .as_array()
        .context("ports")?
        .iter()
        .filter_map(|p| p["iface"].as_str().map(str::to_string))
        .collect();
    assert_eq!(names, ["nic0", "vp-vm1"], "{ports}");
    let ixs: Vec<u64> = ports
        .as_array()
        .context("ports")?
        .iter()
        .filter_map(|p| p["ifindex"].as_u64())
        .collect();
    assert!(
        ixs.len() == 2 && ixs[0] != ixs[1] && ixs.iter().all(|&i| i >= 0xf0_0000),
        "device ports need indexes of their own: {ports}"
    );
    let ip3 = tb.vm("vm3")?.ip.clone();
    within(Duration::from_secs(10), || Ok(reachable(&tb, "vm1", &ip3)))?
        .with_context(|| format!("vm1 (a DPDK tap) never reached vm3 (XDP):\n{}", d.log()))?;
    tb.ping("vm3", &vm1.ip, 3)?;
    let got = tb.udp_stream("vm1", "vm3", 6700, 5_000, 20_000)?;
    assert_eq!(got, 5_000, "vm3 got {got} of 5000 through the devices");
    let got = tb.udp_stream("vm3", "vm1", 6701, 5_000, 20_000)?;
    assert_eq!(got, 5_000, "vm1 got {got} of 5000 through the devices");
    // Counted under the ports' names; vm1's stream left its port from the cache.
    within(Duration::from_secs(2), || {
        Ok(tb.counter("ch1", "vp-vm1", "fastpath_hit")? >= 4_500)
    })?
    .context("no cache hits counted on the tap port")?;
    assert!(tb.counter("ch1", "nic0", "tx_packets")? >= 5_000);
    let vm3_ns = tb.vm("vm3")?.ns.clone();
    let r = iperf3(&tb, (&vm3_ns, &vm1.ns), &ip3, 5202, "20M")?;
    assert!(r.ok, "iperf3 through the devices: {}", r.report);

    assert!(
        d.stop(),
        "the DPDK geneflowd did not stop cleanly:\n{}",
        d.log()
    );
    assert!(d.log().contains("geneflowd stopped (DPDK datapath)"));
    assert_nothing_left(&runtime_before);
    Ok(())
}
