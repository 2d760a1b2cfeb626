//! The floating-IP scenario (issue 11): an outside host on the provider network sends to a
//! VM's floating IP, 1000 flows; XDP on the chassis' provider interface translates the
//! destination (DNAT, incremental checksums), routes (MACs, TTL) and redirects to the VM
//! port, where the sink counts. Compared with "decap 1000 flows" of the same run (target: at
//! least 0.85x): both are one XDP hop from an interface to a VM port.

use super::{args, Ctx, Scenario};
use crate::bpfstats::prog_on;
use crate::testbed::{run, Testbed};
use anyhow::{ensure, Result};

pub(super) const NAME: &str = "floating IP 1000 flows";
const FIP: &str = "172.24.4.51";
const FIP_MAC: &str = "0a:fe:ac:18:04:33";

pub(super) fn floating_ip(ctx: &Ctx) -> Result<Scenario> {
    eprintln!("==> floating IP: outside host -> provider interface -> XDP DNAT + route -> VM");
    let mut tb = Testbed::new("bf")?;
    tb.add_chassis("ch1")?;
    let _outside = tb.add_provider_network()?;
    tb.nbctl(&["ls-add", "ls1", "--key", "1000"])?;
    tb.add_ls1_router("r1", 5000)?;
    tb.add_provider_gateway("r1", "0a:00:00:00:ff:02", None)?;
    tb.add_vm("vm1", "ch1", "ls1", 1)?;
    tb.nbctl(&["fip-add", "fip1", FIP, "vm1", "r1"])?;
    tb.start_agents()?;
    let ch_ns = tb.chassis[0].ns.clone();
    let vm1 = tb.vm("vm1")?.clone();
    let pn = format!("{}-pn", tb.prefix);
    // The generator sends from the bridge's side of ch1's provider veth (as the decap
    // scenario does from the underlay bridge's side of the uplink).
    run(tb.ns_cmd(&pn, "ip").args(["link", "set", "p0", "nomaster"]))?;
    let gen = args(&[
        "--iface",
        "p0",
        "--src-mac",
        "0e:00:00:00:00:64",
        "--dst-mac",
        FIP_MAC,
        "--src-ip",
        "172.24.4.100",
        "--dst-ip",
        FIP,
        "--flows",
        "1000",
    ]);
    let m0 = tb.counter("ch1", "phy", "slowpath_rx")?;
    let (samples, xdp_ns) = ctx.repeat_xdp(
        (&vm1.ns, "eth0"),
        &pn,
        &gen,
        &ctx.full_only(vec![prog_on(&ch_ns, "phy")?]),
    )?;
    let misses = tb.counter("ch1", "phy", "slowpath_rx")? - m0;
    ensure!(misses < 5_000, "{misses} frames went to the slow path");
    eprintln!("    ({misses} frames via the slow path)");
    Ok(Scenario::xdp_rate(
        NAME,
        format!("outside host -> floating IP: XDP DNAT (address + checksums), route, redirect to the VM port; {misses} frames via the slow path"),
        samples,
        xdp_ns,
        Some("decap 1000 flows"),
    ))
}
