//! The security-group scenario: the encap scenario's traffic from a VM whose port is in a
//! security group (egress allowed). Conntrack runs in XDP for every packet; each of the 1000
//! flows is a connection, committed by XDP itself after the first flow's trip to the slow
//! path. Compared with "encap 1000 flows" of the same run (issue 10: at least 0.85x).

use super::{udp_gen, Ctx, Scenario};
use crate::bpfstats::prog_on;
use anyhow::{ensure, Result};

pub(super) const NAME: &str = "encap 1000 flows, security group";

pub(super) fn sg(ctx: &Ctx) -> Result<Scenario> {
    eprintln!("==> security group: VM in a group (conntrack on) -> XDP -> Geneve");
    let mut tb = super::with_peer_chassis("bs")?;
    tb.nbctl(&["ls-add", "ls1", "--key", "1000"])?;
    tb.nbctl(&["sg-add", "web"])?;
    tb.nbctl(&["sg-rule-add", "web", "out", "--direction", "egress"])?;
    tb.add_vm("vm1", "ch1", "ls1", 1)?;
    tb.nbctl(&["lsp-set-sg", "vm1", "web"])?;
    super::add_peer_port(&tb, "ls1", "vmx", "10.0.0.9")?;
    tb.start_agents()?;
    let ch = &tb.chassis[0];
    super::pin_peer_neighbour(&tb, &ch.ns)?;
    let vm1 = tb.vm("vm1")?;
    let gen = udp_gen(&vm1.mac, "0a:00:00:00:00:09", &vm1.ip, "10.0.0.9", 1000);
    let m0 = tb.counter("ch1", "vp-vm1", "slowpath_rx")?;
    let (samples, xdp_ns) = ctx.repeat_xdp(
        (&tb.underlay_ns, &ch.bridge_port),
        &vm1.ns,
        &gen,
        &[prog_on(&ch.ns, "vp-vm1")?],
    )?;
    let misses = tb.counter("ch1", "vp-vm1", "slowpath_rx")? - m0;
    let (entries, memlock) = ct_table_size()?;
    // The first flow's new and established packets, and what arrives meanwhile.
    ensure!(misses < 5_000, "{misses} frames went to the slow path");
    eprintln!("    ({misses} frames via the slow path)");
    Ok(Scenario {
        name: NAME.into(),
        what: format!(
            "as encap 1000 flows, the VM's port in a group: conntrack in XDP, 1000 connections committed by XDP; {misses} frames via the slow path; CT table {entries} entries, {:.1} MB locked",
            memlock as f64 / 1e6
        ),
        unit: "Mpps",
        samples,
        vs_baseline: true,
        vs: Some("encap 1000 flows"),
        error: None,
        xdp_ns,
    })
}

/// The CT map's capacity and the memory the kernel charges for it (bpftool), in the one
/// agent this testbed runs.
fn ct_table_size() -> Result<(u64, u64)> {
    let out =
        crate::testbed::run(std::process::Command::new("bpftool").args(["-j", "map", "show"]))?;
    let maps: serde_json::Value = serde_json::from_str(&out)?;
    let ct = maps
        .as_array()
        .and_then(|a| a.iter().find(|m| m["name"] == "CT"))
        .ok_or_else(|| anyhow::anyhow!("no CT map loaded"))?;
    Ok((
        ct["max_entries"].as_u64().unwrap_or(0),
        ct["bytes_memlock"].as_u64().unwrap_or(0),
    ))
}
