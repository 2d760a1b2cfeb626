//! The security-group scenarios (issue 10), from a VM on ch1 to a port of a peer chassis:
//! - established: the encap scenario's traffic from a VM whose port is in a group (egress
//!   allowed). Conntrack runs in XDP for every packet; each of the 1000 flows is a
//!   connection, committed by XDP itself after the first flow's trip to the slow path.
//!   Compared with "encap 1000 flows" of the same run (target: at least 0.85x).
//! - new connections: TCP SYNs, each a new connection (source port x destination address, 2^32
//!   combinations), through an egress rule allowing TCP 80: every frame is looked up in
//!   conntrack (both ways), matches the rule's megaflow and is committed by XDP, into a full
//!   table (the LRU evicts one entry per commit). Compared with the same SYNs from a VM
//!   without groups.

use super::{udp_gen, Ctx, Scenario};
use crate::bpfstats::prog_on;
use crate::testbed::Testbed;
use anyhow::{ensure, Result};

pub(super) const NAME: &str = "encap 1000 flows, security group";
pub(super) const SYN: &str = "new connections (TCP SYN), security group";
pub(super) const SYN_PLAIN: &str = "new connections (TCP SYN), no groups";

const PEER_MAC: &str = "0a:00:00:00:00:09";
const PEER_IP: &str = "10.0.0.9";

/// Every scenario of this module; a failed one is reported as such.
pub(super) fn all(ctx: &Ctx) -> Vec<Scenario> {
    let or_failed = |name: &str, r: Result<Scenario>| {
        r.unwrap_or_else(|e| {
            eprintln!("    {name}: {e:#}");
            Scenario::failed(name, e)
        })
    };
    vec![
        or_failed(NAME, established(ctx)),
        or_failed(SYN_PLAIN, new_connections(ctx, false)),
        or_failed(SYN, new_connections(ctx, true)),
    ]
}

/// ch1 with vm1 (in group "web" with `rules` if there are any) and a peer chassis' port.
fn testbed(tag: &str, rules: &[&[&str]]) -> Result<Testbed> {
    let mut tb = super::with_peer_chassis(tag)?;
    tb.nbctl(&["ls-add", "ls1", "--key", "1000"])?;
    tb.add_vm("vm1", "ch1", "ls1", 1)?;
    if !rules.is_empty() {
        tb.nbctl(&["sg-add", "web"])?;
        for r in rules {
            let mut args = vec!["sg-rule-add", "web"];
            args.extend_from_slice(r);
            tb.nbctl(&args)?;
        }
        tb.nbctl(&["lsp-set-sg", "vm1", "web"])?;
    }
    super::add_peer_port(&tb, "ls1", "vmx", PEER_IP)?;
    tb.start_agents()?;
    super::pin_peer_neighbour(&tb, &tb.chassis[0].ns.clone())?;
    Ok(tb)
}

/// Runs `gen` from vm1; returns the samples, XDP ns/pkt and frames that went to the slow path.
fn measure(ctx: &Ctx, tb: &Testbed, gen: &[String]) -> Result<(Vec<f64>, Vec<f64>, u64)> {
    let ch = &tb.chassis[0];
    let vm1 = tb.vm("vm1")?;
    let m0 = tb.counter("ch1", "vp-vm1", "slowpath_rx")?;
    let (samples, xdp_ns) = ctx.repeat_xdp(
        (&tb.underlay_ns, &ch.bridge_port),
        &vm1.ns,
        gen,
        &ctx.full_only(vec![prog_on(&ch.ns, "vp-vm1")?]),
    )?;
    let misses = tb.counter("ch1", "vp-vm1", "slowpath_rx")? - m0;
    Ok((samples, xdp_ns, misses))
}

fn established(ctx: &Ctx) -> Result<Scenario> {
    eprintln!("==> security group: VM in a group (conntrack on) -> XDP -> Geneve");
    let tb = testbed("bs", &[&["out", "--direction", "egress"]])?;
    let vm1 = tb.vm("vm1")?;
    let gen = udp_gen(&vm1.mac, PEER_MAC, &vm1.ip, PEER_IP, 1000);
    let (samples, xdp_ns, misses) = measure(ctx, &tb, &gen)?;
    let (entries, memlock) = ct_table_size()?;
    // The first flow's new and established packets, and what arrives meanwhile.
    ensure!(misses < 5_000, "{misses} frames went to the slow path");
    eprintln!("    ({misses} frames via the slow path)");
    Ok(Scenario::xdp_rate(
NAME,
format!(
            "as encap 1000 flows, the VM's port in a group: conntrack in XDP, 1000 connections committed by XDP; {misses} frames via the slow path; CT table {entries} entries, {:.1} MB locked",
            memlock as f64 / 1e6
        ),
samples,
xdp_ns,
Some("encap 1000 flows"),
))
}

fn new_connections(ctx: &Ctx, group: bool) -> Result<Scenario> {
    let (name, tag, rules): (&str, &str, &[&[&str]]) = if group {
        eprintln!("==> new connections: TCP SYNs through a security group's allow rule");
        (
            SYN,
            "bn",
            &[&[
                "http",
                "--direction",
                "egress",
                "--protocol",
                "tcp",
                "--ports",
                "80",
            ]],
        )
    } else {
        eprintln!("==> new connections: the same TCP SYNs from a VM without groups");
        (SYN_PLAIN, "bp", &[])
    };
    let tb = testbed(tag, rules)?;
    let vm1 = tb.vm("vm1")?;
    let mut gen = udp_gen(&vm1.mac, PEER_MAC, &vm1.ip, PEER_IP, 65536);
    gen.extend(
        [
            "--proto", "tcp-syn", "--dport", "80", "--vary", "sport", "--vary2", "dst-ip",
        ]
        .map(String::from),
    );
    let (samples, xdp_ns, misses) = measure(ctx, &tb, &gen)?;
    // The rule's megaflow commits every later SYN in XDP.
    ensure!(misses < 5_000, "{misses} SYNs went to the slow path");
    let what = if group {
        format!(
            "every frame a new connection (2^32 tuples) allowed by an egress rule (TCP 80) and committed by XDP into the CT table ({} entries: full after as many SYNs, then the LRU evicts one entry per commit); {misses} via the slow path",
            ct_table_size()?.0
        )
    } else {
        format!("the same SYNs from a VM without groups: L2 encap, no conntrack; {misses} via the slow path")
    };
    Ok(Scenario::xdp_rate(
        name,
        what,
        samples,
        xdp_ns,
        group.then_some(SYN_PLAIN),
    ))
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
