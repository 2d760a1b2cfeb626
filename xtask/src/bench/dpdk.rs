//! The DPDK backend (`geneflowd --datapath dpdk`, one poll thread pinned to a core,
//! `net_af_packet` vdevs on the testbed's veths) on the XDP scenarios' traffic: encap and
//! decap at 1000 flows on one chassis, and end to end between two DPDK chassis. Each is set
//! against its XDP figure. On veth vdevs the kernel's copies (af_packet in and out) dominate,
//! so the report also gives the engine's own cost per packet, measured in the poll loop
//! (`busy_ns` / `busy_frames` over the window), which is what carries over to a real NIC.
//! Open vSwitch's DPDK build runs the same scenarios beside them (ovs_dpdk.rs).

use super::{add_peer_port, decap_gen, mac_of, udp_gen, with_peer_chassis, Ctx, Scenario};
use crate::testbed::{run, Testbed};
use anyhow::{Context, Result};
use std::process::Command;
use std::time::Duration;

/// The EAL arguments of a bench chassis: no hugepages here, nothing left on disk.
const EAL: &str = "-l 0 --no-huge --no-pci --no-shconf -m 1024";

/// Makes chassis `i` a DPDK chassis serving `ports`, its poll thread on `core`.
fn use_dpdk(tb: &mut Testbed, i: usize, ports: &[&str], core: u32) {
    let mut a: Vec<String> = vec![
        "--datapath".into(),
        "dpdk".into(),
        "--dpdk-eal".into(),
        EAL.into(),
    ];
    for p in ports {
        a.push("--dpdk-port".into());
        a.push(p.to_string());
    }
    a.push("--forwarder-cores".into());
    a.push(core.to_string());
    tb.chassis[i].agent_args = a;
}

/// XDP_PASS on a DPDK chassis's port for as long as it lives: the generator's frames (an
/// XDP program's, from the other end of the veth) are dropped by a veth without XDP, so the
/// port's af_packet would see none.
pub(super) struct PassOn(std::process::Child);

impl PassOn {
    pub(super) fn start(ctx: &Ctx, ns: &str, iface: &str) -> Result<PassOn> {
        use std::io::BufRead;
        let mut c = Command::new("ip")
            .args(["netns", "exec", ns, &ctx.pktgen(), "pass", "--iface", iface])
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let out = c.stdout.take().context("pass stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = c.kill();
            let _ = c.wait();
            anyhow::bail!("XDP_PASS on {iface} did not start: {line:?}");
        }
        Ok(PassOn(c))
    }
}

impl Drop for PassOn {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// The poll loop's ns per packet over one more measurement window.
fn poll_ns(tb: &Testbed, chassis: &[&str], measure: impl Fn() -> Result<f64>) -> Result<f64> {
    let read = |c: &str| -> Result<(u64, u64)> {
        let s = tb.stats(c)?;
        Ok((
            s["busy_ns"].as_u64().context("no busy_ns")?,
            s["busy_frames"].as_u64().context("no busy_frames")?,
        ))
    };
    let before: Vec<(u64, u64)> = chassis.iter().map(|c| read(c)).collect::<Result<_>>()?;
    measure()?;
    // The loops publish every 100 ms.
    std::thread::sleep(Duration::from_millis(250));
    let mut ns = 0.0;
    for (c, b) in chassis.iter().zip(before) {
        let a = read(c)?;
        let frames = a.1.saturating_sub(b.1).max(1);
        ns += a.0.saturating_sub(b.0) as f64 / frames as f64;
    }
    Ok(ns)
}

pub(super) fn all(ctx: &Ctx) -> Vec<Scenario> {
    let mut sc = Vec::new();
    match encap_decap(ctx) {
        Ok(s) => sc.extend(s),
        Err(e) => {
            eprintln!("    DPDK encap/decap: {e:#}");
            sc.push(Scenario::failed(ENCAP, anyhow::anyhow!("{e:#}")));
            sc.push(Scenario::failed(DECAP, anyhow::anyhow!("{e:#}")));
        }
    }
    sc.push(end_to_end(ctx, 0).unwrap_or_else(|e| {
        eprintln!("    DPDK end to end: {e:#}");
        Scenario::failed(E2E, e)
    }));
    sc.push(end_to_end(ctx, 100).unwrap_or_else(|e| {
        eprintln!("    DPDK end to end, sleeping: {e:#}");
        Scenario::failed(E2E_SLEEP, e)
    }));
    sc.extend(super::ovs_dpdk::all(ctx));
    sc
}

pub(super) const ENCAP: &str = "DPDK encap 1000 flows";
pub(super) const DECAP: &str = "DPDK decap 1000 flows";
pub(super) const E2E: &str = "DPDK end to end UDP 64B";
pub(super) const E2E_SLEEP: &str = "DPDK end to end UDP 64B, loops sleep under light load";

fn encap_decap(ctx: &Ctx) -> Result<Vec<Scenario>> {
    eprintln!("==> DPDK encap / decap: one chassis on DPDK, VM port <-> uplink");
    let mut tb = with_peer_chassis("bk")?;
    tb.nbctl(&["ls-add", "ls1", "--key", "1000"])?;
    tb.add_vm("vm1", "ch1", "ls1", 1)?;
    add_peer_port(&tb, "ls1", "vmx", "10.0.0.9")?;
    use_dpdk(&mut tb, 0, &["vp-vm1"], 1);
    tb.start_agents()?;
    let (ch_ns, bridge_port, ch_ip) = (
        tb.chassis[0].ns.clone(),
        tb.chassis[0].bridge_port.clone(),
        tb.chassis[0].ip.clone(),
    );
    let vm1 = tb.vm("vm1")?.clone();
    let _pass = (
        PassOn::start(ctx, &ch_ns, "vp-vm1")?,
        PassOn::start(ctx, &ch_ns, "ul")?,
    );
    let gen = udp_gen(&vm1.mac, "0a:00:00:00:00:09", &vm1.ip, "10.0.0.9", 1000);
    // The sink will drop the ARP the chassis sends on its uplink: let it learn the peer
    // (the injector answers for 198.18.0.250) before.
    run(Command::new("ip")
        .args(["netns", "exec", &vm1.ns, &ctx.pktgen(), "send", "--quiet"])
        .args(&gen)
        .args(["--duration", "0.2"]))?;
    std::thread::sleep(Duration::from_millis(300));
    let sink = (tb.underlay_ns.as_str(), bridge_port.as_str());
    // The generator on core 0, the poll thread on core 1.
    let m = || ctx.measure_pinned(0, sink, &vm1.ns, &gen);
    let rates = ctx.repeat(m)?;
    let ns = poll_ns(&tb, &["ch1"], m)?;
    let mut out = vec![Scenario::xdp_rate(
        ENCAP,
        "VM port -> DPDK poll loop (cache, userspace encap) -> uplink; ns/pkt: the poll loop's",
        rates,
        vec![ns],
        Some("encap 1000 flows"),
    )];
    let ul_mac = mac_of(&ch_ns, "ul")?;
    let gen = decap_gen(&bridge_port, (&vm1.mac, &vm1.ip), (&ul_mac, &ch_ip), 1000);
    let m = || ctx.measure_pinned(0, (&vm1.ns, "eth0"), &tb.underlay_ns, &gen);
    let rates = ctx.repeat(m)?;
    let ns = poll_ns(&tb, &["ch1"], m)?;
    out.push(Scenario::xdp_rate(
        DECAP,
        "Geneve on the uplink -> DPDK poll loop (cache, userspace decap) -> VM port; ns/pkt: the poll loop's",
        rates,
        vec![ns],
        Some("decap 1000 flows"),
    ));
    Ok(out)
}

/// `max_sleep_us`: the poll loops' light-load sleep cap (`--dpdk-max-sleep-us`), 0 for none.
fn end_to_end(ctx: &Ctx, max_sleep_us: u32) -> Result<Scenario> {
    eprintln!("==> DPDK end to end: VM on ch1 -> VM on ch2, both chassis on DPDK (max sleep {max_sleep_us} us)");
    let mut tb = Testbed::new("bj")?;
    tb.add_chassis_pair_direct("ch1", "ch2")?;
    tb.nbctl(&["ls-add", "ls1", "--key", "1000"])?;
    tb.add_vm("vm1", "ch1", "ls1", 1)?;
    tb.add_vm("vm3", "ch2", "ls1", 3)?;
    use_dpdk(&mut tb, 0, &["vp-vm1"], 0);
    use_dpdk(&mut tb, 1, &["vp-vm3"], 1);
    for c in &mut tb.chassis {
        c.agent_args
            .extend(["--dpdk-max-sleep-us".into(), max_sleep_us.to_string()]);
    }
    tb.start_agents()?;
    tb.ping("vm1", &tb.vm("vm3")?.ip.clone(), 2)?;
    let (vm1, vm3) = (tb.vm("vm1")?.clone(), tb.vm("vm3")?.clone());
    let _pass = PassOn::start(ctx, &tb.chassis[0].ns, "vp-vm1")?;
    let gen = udp_gen(&vm1.mac, &vm3.mac, &vm1.ip, &vm3.ip, 1000);
    let rates = ctx.repeat(|| ctx.measure(&vm3.ns, "eth0", &vm1.ns, &gen))?;
    let ns = poll_ns(&tb, &["ch1", "ch2"], || {
        ctx.measure(&vm3.ns, "eth0", &vm1.ns, &gen)
    })?;
    let (name, what) = if max_sleep_us == 0 {
        (E2E, "VM ch1 -> DPDK encap -> underlay veth -> DPDK decap -> VM ch2 (a poll thread per chassis, one core each, shared with the generator); the loops poll without sleeping under load; ns/pkt: both poll loops'".to_string())
    } else {
        (E2E_SLEEP, format!("the same, the loops sleeping under light load up to {max_sleep_us} us (--dpdk-max-sleep-us, as OVS-DPDK's pmd-maxsleep); ns/pkt: both poll loops'"))
    };
    Ok(Scenario::xdp_rate(
        name,
        what,
        rates,
        vec![ns],
        Some("end to end UDP 64B"),
    ))
}
