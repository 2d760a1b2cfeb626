//! The peer: the same end-to-end traffic through two Open vSwitch userspace chassis.

use super::{udp_gen, Ctx, Opts};
use crate::testbed::{run, Testbed};
use anyhow::{bail, Result};
use serde_json::Value;
use std::process::Stdio;
use std::time::Duration;

/// iperf3 from VM `from` to VM `to` for `secs` s: the receiver's Gbit/s.
pub(super) fn iperf(tb: &Testbed, from: &str, to: &str, secs: u32) -> Result<f64> {
    let (a, b) = (tb.vm(from)?, tb.vm(to)?);
    let mut srv = tb
        .ns_cmd(&b.ns, "iperf3")
        .args(["-s", "-1", "-p", "5201"])
        .stdout(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let out = run(tb.ns_cmd(&a.ns, "iperf3").args([
        "-c",
        &b.ip,
        "-p",
        "5201",
        "-t",
        &secs.to_string(),
        "-J",
    ]));
    let _ = srv.kill();
    let _ = srv.wait();
    let v: Value = serde_json::from_str(&out?)?;
    Ok(v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9)
}

/// vm1 on o1 and vm3 on o2 (ls1, tunnel key 1000), each knowing the other's MAC, and vm1
/// reaching vm3 (`what` names the peer in the error).
pub(super) fn add_vm_pair(tb: &mut Testbed, what: &str) -> Result<()> {
    tb.add_ovs_vm(
        "vm1",
        "o1",
        "ls1",
        1000,
        1,
        &[("0a:00:00:00:00:03".into(), 3)],
    )?;
    tb.add_ovs_vm(
        "vm3",
        "o2",
        "ls1",
        1000,
        3,
        &[("0a:00:00:00:00:01".into(), 1)],
    )?;
    let ip3 = tb.vm("vm3")?.ip.clone();
    // OVS resolves its tunnel next hop itself; give it a moment on the first packets.
    if !(0..10).any(|_| tb.ping("vm1", &ip3, 1).is_ok()) {
        bail!("vm1 cannot reach vm3 through {what}");
    }
    Ok(())
}

/// The same end-to-end traffic through two Open vSwitch userspace chassis.
pub(super) fn ovs_peer(ctx: &Ctx, o: &Opts, afxdp: bool) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut tb = Testbed::new(if afxdp { "bo2" } else { "bo1" })?;
    tb.nbctl(&["ls-add", "ls1", "--key", "1000"])?;
    tb.add_ovs_pair_direct("o1", "o2", afxdp)?;
    add_vm_pair(&mut tb, "OVS")?;
    let (vm1, vm3) = (tb.vm("vm1")?, tb.vm("vm3")?);
    let gen = udp_gen(&vm1.mac, &vm3.mac, &vm1.ip, &vm3.ip, 1000);
    // TCP first: the UDP flood below (and the GRO it needs) must not disturb it.
    let secs = if o.quick { 1 } else { 10 };
    let tcp = (0..ctx.reps)
        .map(|_| iperf(&tb, "vm1", "vm3", secs))
        .collect::<Result<Vec<_>>>()?;
    // The generator transmits with XDP_TX into vm1's veth: with AF_PACKET (system) ports the
    // OVS side needs GRO there, or the kernel drops the frames before OVS sees them.
    let o1 = tb.chassis[tb.chassis_index("o1")?].ns.clone();
    run(tb
        .ns_cmd(&o1, "ethtool")
        .args(["-K", "vp-vm1", "gro", "on"]))?;
    let udp = ctx.repeat(|| ctx.measure(&vm3.ns, "eth0", &vm1.ns, &gen))?;
    Ok((udp, tcp))
}
