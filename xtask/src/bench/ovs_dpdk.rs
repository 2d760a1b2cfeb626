//! The peer of the DPDK scenarios: Open vSwitch's DPDK build (ovs-vswitchd-dpdk, userspace
//! tunnelling, the OVN option mapped to tun_metadata0, testbed_ovs_dpdk.rs) on the same
//! `net_af_packet` vdevs, with the same traffic and the same PMD placement as geneflow's DPDK
//! backend: encap and decap at 1000 flows on one chassis (PMD on core 1), and end to end
//! between two OVS-DPDK chassis (PMDs on cores 0 and 1). Each is compared with geneflow's
//! DPDK figure. Its ns/packet is the PMD threads' processing cycles per received packet
//! (`dpif-netdev/pmd-stats-show`) at the TSC's rate: the cost of the iterations that carried
//! packets, af_packet receive and transmit included (the kernel's copies and the veth
//! transmit), so it is not comparable with geneflow's poll-loop figure, which leaves them out.

use super::dpdk::{PassOn, DECAP, E2E, E2E_SLEEP, ENCAP};
use super::{decap_gen, mac_of, udp_gen, Ctx, Scenario, PEER_PORT_MAC, SCALING_CORES};
use crate::testbed::{run, Testbed};
use crate::testbed_ovs_dpdk::{tsc_hz, var_run_dpdk};
use anyhow::{anyhow, bail, Context, Result};
use std::process::Command;
use std::time::Duration;

const ENCAP_OVS: &str = "OVS-DPDK encap 1000 flows";
const DECAP_OVS: &str = "OVS-DPDK decap 1000 flows";
const E2E_OVS: &str = "OVS-DPDK end to end UDP 64B";
const E2E_OVS_BUSY: &str = "OVS-DPDK end to end UDP 64B, PMDs never sleep";

pub(super) fn all(ctx: &Ctx) -> Vec<Scenario> {
    // DPDK's default runtime directory: the chassis keep theirs in the testbed's directory,
    // so nothing may appear here.
    let before = var_run_dpdk();
    let mut sc = Vec::new();
    match encap_decap(ctx) {
        Ok(s) => sc.extend(s),
        Err(e) => {
            eprintln!("    OVS-DPDK encap/decap: {e:#}");
            sc.push(Scenario::failed(ENCAP_OVS, anyhow!("{e:#}")));
            sc.push(Scenario::failed(DECAP_OVS, anyhow!("{e:#}")));
        }
    }
    match end_to_end(ctx) {
        Ok(s) => sc.extend(s),
        Err(e) => {
            eprintln!("    OVS-DPDK end to end: {e:#}");
            sc.push(Scenario::failed(E2E_OVS, anyhow!("{e:#}")));
            sc.push(Scenario::failed(E2E_OVS_BUSY, anyhow!("{e:#}")));
        }
    }
    let left: Vec<String> = var_run_dpdk()
        .into_iter()
        .filter(|e| !before.contains(e))
        .collect();
    if !left.is_empty() {
        eprintln!("    warning: the OVS-DPDK scenarios left {left:?} in /var/run/dpdk");
    }
    sc
}

/// The PMD threads' ns per packet, summed over `chassis` (the hops), over one more
/// measurement window.
fn pmd_ns(tb: &Testbed, chassis: &[&str], measure: impl Fn() -> Result<f64>) -> Result<f64> {
    let hz = tsc_hz().context("no TSC rate on this architecture")?;
    for c in chassis {
        tb.pmd_stats_clear(c)?;
    }
    measure()?;
    let mut ns = 0.0;
    for c in chassis {
        let s = tb.pmd_stats(c)?;
        if s.packets == 0 {
            bail!("{c}: the PMD threads received no packets");
        }
        ns += s.processing_cycles as f64 / s.packets as f64 / hz * 1e9;
    }
    Ok(ns)
}

/// Sends the generator's flows for a moment, so that OVS has made its datapath flows
/// (upcalls) before the first window.
fn warm_up(ctx: &Ctx, gen_ns: &str, gen: &[String]) -> Result<()> {
    run(Command::new("ip")
        .args(["netns", "exec", gen_ns, &ctx.pktgen(), "send", "--quiet"])
        .args(gen)
        .args(["--duration", "0.5"]))?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(())
}

fn encap_decap(ctx: &Ctx) -> Result<Vec<Scenario>> {
    eprintln!("==> OVS-DPDK encap / decap: one OVS-DPDK chassis, VM port <-> uplink");
    let mut tb = Testbed::new("bd1")?;
    tb.queues = SCALING_CORES;
    tb.nbctl(&["ls-add", "ls1", "--key", "1000"])?;
    tb.add_ovs_dpdk_chassis("o1", "198.18.0.250", 1)?;
    let inj = tb.add_injector()?;
    tb.add_ovs_vm(
        "vm1",
        "o1",
        "ls1",
        1000,
        1,
        &[(PEER_PORT_MAC.to_string(), 9)],
    )?;
    let (o_ns, bridge_port, o_ip) = (
        tb.chassis[0].ns.clone(),
        tb.chassis[0].bridge_port.clone(),
        tb.chassis[0].ip.clone(),
    );
    // The sink drops the ARP OVS would send for the peer (the injector, 198.18.0.250):
    // give OVS's tunnel neighbour cache its MAC.
    tb.ovs_appctl(
        "o1",
        &[
            "tnl/arp/set",
            "br-phy",
            "198.18.0.250",
            &mac_of(&inj, "eth0")?,
        ],
    )?;
    let vm1 = tb.vm("vm1")?.clone();
    let _pass = (
        PassOn::start(ctx, &o_ns, "vp-vm1")?,
        PassOn::start(ctx, &o_ns, "ul")?,
    );
    let gen = udp_gen(&vm1.mac, PEER_PORT_MAC, &vm1.ip, "10.0.0.9", 1000);
    warm_up(ctx, &vm1.ns, &gen)?;
    let sink = (tb.underlay_ns.as_str(), bridge_port.as_str());
    // The generator on core 0, the PMD on core 1.
    let m = || ctx.measure_pinned(0, sink, &vm1.ns, &gen);
    let rates = ctx.repeat(m)?;
    let ns = pmd_ns(&tb, &["o1"], m)?;
    let rss = tb.ovs_vswitchd_rss_mb("o1")?;
    let mut out = vec![Scenario::xdp_rate(
        ENCAP_OVS,
        format!("VM port -> OVS-DPDK (one PMD, core 1; EMC/megaflow, tnl_push) -> uplink; af_packet vdevs; ovs-vswitchd-dpdk RSS {rss:.0} MB; ns/pkt: the PMD's processing cycles per packet, af_packet rx/tx included"),
        rates,
        vec![ns],
        Some(ENCAP),
    )];
    // Userspace tunnelling terminates Geneve sent to br-phy's MAC and address.
    let phy_mac = mac_of(&o_ns, "br-phy")?;
    let gen = decap_gen(&bridge_port, (&vm1.mac, &vm1.ip), (&phy_mac, &o_ip), 1000);
    warm_up(ctx, &tb.underlay_ns, &gen)?;
    let m = || ctx.measure_pinned(0, (&vm1.ns, "eth0"), &tb.underlay_ns, &gen);
    let rates = ctx.repeat(m)?;
    let ns = pmd_ns(&tb, &["o1"], m)?;
    out.push(Scenario::xdp_rate(
        DECAP_OVS,
        "Geneve on the uplink -> OVS-DPDK (one PMD, core 1; br-phy, tnl_pop, recirculation, br-int) -> VM port; af_packet vdevs; ns/pkt: the PMD's processing cycles per packet, af_packet rx/tx included",
        rates,
        vec![ns],
        Some(DECAP),
    ));
    Ok(out)
}

fn end_to_end(ctx: &Ctx) -> Result<Vec<Scenario>> {
    eprintln!("==> OVS-DPDK end to end: VM on o1 -> VM on o2, both chassis OVS-DPDK");
    let mut tb = Testbed::new("bd2")?;
    tb.nbctl(&["ls-add", "ls1", "--key", "1000"])?;
    tb.add_ovs_dpdk_pair_direct("o1", "o2", [0, 1])?;
    super::ovs::add_vm_pair(&mut tb, "OVS-DPDK")?;
    let (vm1, vm3) = (tb.vm("vm1")?.clone(), tb.vm("vm3")?.clone());
    let _pass = PassOn::start(ctx, &tb.chassis[0].ns, "vp-vm1")?;
    let gen = udp_gen(&vm1.mac, &vm3.mac, &vm1.ip, &vm3.ip, 1000);
    warm_up(ctx, &vm1.ns, &gen)?;
    let rates = ctx.repeat(|| ctx.measure(&vm3.ns, "eth0", &vm1.ns, &gen))?;
    let ns = pmd_ns(&tb, &["o1", "o2"], || {
        ctx.measure(&vm3.ns, "eth0", &vm1.ns, &gen)
    })?;
    let what = "VM o1 -> OVS-DPDK encap -> underlay veth -> OVS-DPDK decap -> VM o2 (a PMD per chassis, cores 0 and 1, shared with the generator); af_packet vdevs";
    let mut out = vec![Scenario::xdp_rate(
        E2E_OVS,
        format!("{what}; a lightly loaded PMD sleeps up to 100 us (pmd-maxsleep=100); ns/pkt: both PMDs' processing cycles per packet, af_packet rx/tx included"),
        rates,
        vec![ns],
        Some(E2E_SLEEP),
    )];
    // Without the sleep: set against geneflow's loops without theirs.
    for c in ["o1", "o2"] {
        tb.ovs_vsctl(
            c,
            &["set", "Open_vSwitch", ".", "other_config:pmd-maxsleep=0"],
        )?;
    }
    std::thread::sleep(Duration::from_millis(500));
    let rates = ctx.repeat(|| ctx.measure(&vm3.ns, "eth0", &vm1.ns, &gen))?;
    out.push(Scenario::xdp_rate(
        E2E_OVS_BUSY,
        format!("{what}; PMDs busy-poll without sleeping (pmd-maxsleep=0), as geneflow's loops do by default"),
        rates,
        vec![],
        Some(E2E),
    ));
    Ok(out)
}
