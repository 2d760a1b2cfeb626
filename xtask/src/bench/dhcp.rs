//! The DHCP responder (issue 11):
//! - answers per second: one VM floods DISCOVERs (the XDP live-frames generator, far faster
//!   than any client) with the per-port limit lifted (`--dhcp-rate`), and a sink on the VM's
//!   interface counts the OFFERs: what one chassis' slow path answers, in Mpps;
//! - boot storm: 50 VMs on one chassis (20 in quick runs, which stay under a minute) run
//!   busybox `udhcpc` at the same moment, as after a host reboot, under the default limit (20
//!   answers/s per port): the time until the last is bound, in seconds; every one must be.

use super::{args, Ctx, Scenario};
use crate::testbed::{run, Testbed};
use anyhow::{ensure, Context, Result};
use std::process::{Command, Stdio};
use std::time::Instant;

pub(super) const ANSWERS: &str = "DHCP answers (slow path)";
pub(super) const STORM: &str = "DHCP boot storm";

pub(super) fn all(ctx: &Ctx) -> Vec<Scenario> {
    let answers = answers(ctx).unwrap_or_else(|e| {
        eprintln!("    {ANSWERS}: {e:#}");
        Scenario::failed(ANSWERS, e)
    });
    let storm = boot_storm(ctx).unwrap_or_else(|e| {
        eprintln!("    {STORM}: {e:#}");
        let mut s = Scenario::failed(STORM, e);
        s.unit = "s";
        s.vs_baseline = false;
        s
    });
    vec![answers, storm]
}

fn dhcp_subnet(tb: &Testbed) -> Result<()> {
    tb.nbctl(&["ls-add", "ls1", "--key", "1000"])?;
    tb.nbctl(&[
        "subnet-add",
        "ls1",
        "sn1",
        "10.0.0.0/16",
        "--gateway",
        "10.0.255.254",
        "--dhcp",
        "--dns",
        "10.0.0.53",
    ])?;
    Ok(())
}

fn answers(ctx: &Ctx) -> Result<Scenario> {
    eprintln!("==> DHCP: DISCOVERs flat out from one VM, OFFERs counted at the VM");
    let mut tb = Testbed::new("bd")?;
    tb.add_chassis("ch1")?;
    tb.chassis[0]
        .agent_args
        .extend(["--dhcp-rate".to_string(), "10000000".to_string()]);
    dhcp_subnet(&tb)?;
    tb.add_vm("vm1", "ch1", "ls1", 1)?;
    tb.start_agents()?;
    let vm1 = tb.vm("vm1")?.clone();
    let gen = args(&[
        "--iface",
        "eth0",
        "--src-mac",
        &vm1.mac,
        "--dst-mac",
        "ff:ff:ff:ff:ff:ff",
        "--src-ip",
        "0.0.0.0",
        "--dst-ip",
        "255.255.255.255",
        "--proto",
        "dhcp-discover",
    ]);
    let r0 = tb.counter("ch1", "vp-vm1", "dhcp_reply")?;
    let rx0 = tb.counter("ch1", "vp-vm1", "rx_packets")?;
    let samples = ctx.repeat(|| ctx.measure(&vm1.ns, "eth0", &vm1.ns, &gen))?;
    let answered = tb.counter("ch1", "vp-vm1", "dhcp_reply")? - r0;
    let offered = tb.counter("ch1", "vp-vm1", "rx_packets")? - rx0;
    ensure!(answered > 0, "no DHCP answer");
    Ok(Scenario::figure(
        ANSWERS,
        format!(
            "DISCOVER -> OFFER by one chassis' slow path (AF_XDP, copy mode), per-port limit lifted; {answered} answers to {offered} DISCOVERs offered (the generator outruns the responder, so this is the responder's rate)"
        ),
        "Mpps",
        samples,
    ))
}

fn boot_storm(ctx: &Ctx) -> Result<Scenario> {
    let ports: u16 = if ctx.quick { 20 } else { 50 };
    eprintln!("==> DHCP boot storm: {ports} VMs of one chassis run udhcpc at once");
    let mut tb = Testbed::new("bs")?;
    tb.add_chassis("ch1")?;
    dhcp_subnet(&tb)?;
    for k in 1..=ports {
        tb.add_vm(&format!("v{k}"), "ch1", "ls1", k)?;
    }
    tb.start_agents()?;
    let nss: Vec<String> = tb.vms.iter().map(|v| v.ns.clone()).collect();
    for ns in &nss {
        run(tb.ns_cmd(ns, "ip").args(["addr", "flush", "dev", "eth0"]))?;
    }
    let mut samples = Vec::new();
    for _ in 0..ctx.reps {
        let t0 = Instant::now();
        // The stock client with a script that applies nothing: the measure is the lease.
        let children: Vec<_> = nss
            .iter()
            .map(|ns| {
                Command::new("ip")
                    .args(["netns", "exec", ns, "udhcpc", "-f", "-q", "-n"])
                    .args(["-i", "eth0", "-t", "10", "-T", "1", "-s", "/bin/true"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("udhcpc")
            })
            .collect::<Result<_>>()?;
        let mut bound = 0;
        let mut last = 0.0f64;
        for mut c in children {
            if c.wait()?.success() {
                bound += 1;
                last = last.max(t0.elapsed().as_secs_f64());
            }
        }
        ensure!(bound == ports as usize, "{bound} of {ports} clients bound");
        samples.push(last);
    }
    let limited = tb
        .vms
        .iter()
        .map(|v| tb.counter("ch1", &v.iface, "drop_rate_limit").unwrap_or(0))
        .sum::<u64>();
    Ok(Scenario::figure(
        STORM,
        format!(
            "{ports} udhcpc started at once, default limit (20 answers/s per port): seconds until the last is bound, all of them bound; {limited} answers held back by the limit"
        ),
        "s",
        samples,
    ))
}
