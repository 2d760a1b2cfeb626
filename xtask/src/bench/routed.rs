//! The routed scenario: a VM on one subnet sends to a VM on another subnet of the same
//! distributed router, hosted by another chassis. The first chassis routes (MAC rewrite,
//! TTL - 1) and encapsulates in XDP; compared with the L2 encap scenario of the same run.

use super::{udp_gen, Ctx, Scenario};
use crate::bpfstats::prog_on;
use crate::testbed::Testbed;
use anyhow::{ensure, Result};

const ROUTER_MAC: &str = "0a:00:00:00:ff:01";
const FLOWS: u32 = 1000;
pub(super) const NAME: &str = "routed 1000 flows";

pub(super) fn routed(ctx: &Ctx) -> Result<Scenario> {
    eprintln!("==> routed: VM ls1 -> distributed router -> VM ls2 on another chassis");
    let mut tb = super::with_peer_chassis("br")?;
    for i in 1..=2u32 {
        let sw = format!("ls{i}");
        tb.nbctl(&["ls-add", &sw, "--key", &(1000 + i).to_string()])?;
        tb.nbctl(&[
            "subnet-add",
            &sw,
            &format!("s{i}"),
            &format!("10.{i}.0.0/24"),
            "--gateway",
            &format!("10.{i}.0.1"),
        ])?;
    }
    tb.nbctl(&["lr-add", "r1", "--key", "1010"])?;
    for i in 1..=2u32 {
        tb.nbctl(&[
            "lrp-add",
            "r1",
            &format!("r1-ls{i}"),
            &format!("0a:00:00:00:ff:{i:02x}"),
            &format!("10.{i}.0.1/24"),
            "--key",
            "100",
            "--switch",
            &format!("ls{i}"),
        ])?;
    }
    tb.add_routed_vm("vm1", "ch1", "ls1", 1, "10.1.0.11/24", "10.1.0.1", 1442)?;
    super::add_peer_port(&tb, "ls2", "vmy", "10.2.0.9")?;
    tb.start_agents()?;
    let ch = &tb.chassis[0];
    super::pin_peer_neighbour(&tb, &ch.ns)?;
    let vm1 = tb.vm("vm1")?;
    // The router rewrites the MACs and the TTL in place.
    let gen = super::restoring(udp_gen(
        &vm1.mac,
        ROUTER_MAC,
        "10.1.0.11",
        "10.2.0.9",
        FLOWS,
    ));
    let counters = |tb: &Testbed| -> Result<(u64, u64)> {
        Ok((
            tb.counter("ch1", "vp-vm1", "fastpath_hit")?,
            tb.counter("ch1", "vp-vm1", "slowpath_rx")?,
        ))
    };
    let (h0, m0) = counters(&tb)?;
    let (samples, xdp_ns) = ctx.repeat_xdp(
        (&tb.underlay_ns, &ch.bridge_port),
        &vm1.ns,
        &gen,
        &ctx.full_only(vec![prog_on(&ch.ns, "vp-vm1")?]),
    )?;
    let (h1, m1) = counters(&tb)?;
    let (hits, misses) = (h1 - h0, m1 - m0);
    // The routed flows share one megaflow: only the frames that arrive while its first frame
    // is in userspace (flow setup, tens of microseconds at line rate) may miss.
    ensure!(
        hits > 0 && misses * 100 <= hits + misses,
        "routed traffic left XDP: {hits} fast-path hits, {misses} to the slow path"
    );
    eprintln!("    ({hits} routed frames in XDP, {misses} to the slow path)");
    Ok(Scenario::xdp_rate(
NAME,
format!(
            "VM ls1 -> XDP: router r1 (MACs, TTL-1) + Geneve -> uplink; {misses} of {} frames via the slow path",
            hits + misses
        ),
samples,
xdp_ns,
Some("encap 1000 flows"),
))
}
