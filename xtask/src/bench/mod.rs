//! `cargo xtask bench`: the datapath benchmark. Every scenario is measured with the XDP
//! live-frames generator and an XDP counting sink (perf/), several times, median reported, and
//! compared with a plain XDP redirect between two veths measured in the same run (the limit of
//! this machine). Writes a Markdown table, the raw samples as JSON and an SVG bar chart.

mod dhcp;
mod dpdk;
mod fip;
pub mod memory;
mod ovs;
mod ovs_dpdk;
mod report;
mod routed;
pub mod scale;
mod scenarios;
mod setup;
mod sg;
mod slowpath;

pub use report::{check_complete, results_dir, REQUIRED};

/// The scenario that measures the generator alone.
pub(crate) const GENERATOR: &str = "generator ceiling";
/// The minimal live-frames generator (no per-frame work) into the same sink: what the
/// live-frames path itself allows here, the reference of the generator's ceiling.
pub(crate) const MINIMAL: &str = "minimal live-frames generator";
/// A packet rate at or above this share of the generator's ceiling says more about the
/// generator than about what it measures: such figures are marked generator-bound.
pub(crate) const GENERATOR_BOUND: f64 = 0.8;
/// The multi-core scenarios' generators (and veth queues): this machine kind has 2 cores.
pub(crate) const SCALING_CORES: u32 = 2;

use crate::bpfstats::{ProgStats, StatsOn};
use crate::testbed::{run, Testbed};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

pub struct Opts {
    pub quick: bool,
    /// Only these scenario groups (empty: all).
    pub only: Vec<String>,
    pub results: std::path::PathBuf,
}

pub(crate) struct Scenario {
    name: String,
    what: String,
    unit: &'static str,
    samples: Vec<f64>,
    /// Counts against the baseline (packets/s scenarios).
    vs_baseline: bool,
    /// The scenario this one is compared with (OVS, or the L2 path for the routed one).
    vs: Option<&'static str>,
    /// Why there is no figure, if there is none.
    error: Option<String>,
    /// The XDP programs' run time per packet (bpf_stats), where measured.
    xdp_ns: Vec<f64>,
    /// Generators (one per core, each on its own queue of 2-queue veths) that measured it:
    /// a scenario on more than one core is set against the generator ceiling and the
    /// baseline of as many cores, and compared with its own 1-core figure.
    cores: u32,
}

impl Scenario {
    /// A packet rate measured through XDP (Mpps against the baseline, with the programs' ns
    /// per packet), compared with the scenario `vs` if given.
    fn xdp_rate(
        name: impl Into<String>,
        what: impl Into<String>,
        samples: Vec<f64>,
        xdp_ns: Vec<f64>,
        vs: Option<&'static str>,
    ) -> Self {
        Scenario {
            name: name.into(),
            what: what.into(),
            unit: "Mpps",
            samples,
            vs_baseline: true,
            vs,
            error: None,
            xdp_ns,
            cores: 1,
        }
    }

    /// The name of the scenario measured with `cores` generators.
    fn on_cores(name: &str, cores: u32) -> String {
        if cores == 1 {
            name.to_string()
        } else {
            format!("{name}, {cores} cores")
        }
    }

    /// The 1-core scenario's name.
    fn one_core_name(&self) -> &str {
        self.name
            .strip_suffix(&format!(", {} cores", self.cores))
            .unwrap_or(&self.name)
    }

    /// A figure of its own (not set against the baseline or another scenario): answers,
    /// flow setups, seconds, Gbit/s.
    fn figure(name: &str, what: String, unit: &'static str, samples: Vec<f64>) -> Self {
        Scenario {
            name: name.into(),
            what,
            unit,
            samples,
            vs_baseline: false,
            vs: None,
            error: None,
            xdp_ns: vec![],
            cores: 1,
        }
    }

    /// A packet-rate scenario that could not be measured, and why.
    fn failed(name: &str, e: anyhow::Error) -> Self {
        Scenario {
            name: name.into(),
            what: String::new(),
            unit: "Mpps",
            samples: vec![],
            vs_baseline: true,
            vs: None,
            error: Some(format!("{e:#}")),
            xdp_ns: vec![],
            cores: 1,
        }
    }
    fn median(&self) -> f64 {
        let mut v = self.samples.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        if v.is_empty() {
            0.0
        } else {
            v[v.len() / 2]
        }
    }
    fn min(&self) -> f64 {
        self.samples.iter().cloned().fold(f64::INFINITY, f64::min)
    }
    fn max(&self) -> f64 {
        self.samples.iter().cloned().fold(0.0, f64::max)
    }
    fn xdp_ns_median(&self) -> Option<f64> {
        let mut v = self.xdp_ns.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        v.get(v.len() / 2).copied()
    }
}

pub(crate) struct Ctx {
    bins: String,
    reps: usize,
    window: f64,
    quick: bool,
}

impl Ctx {
    fn pktgen(&self) -> String {
        format!("{}/geneflow-pktgen", self.bins)
    }

    /// Starts a sink in `ns` on `iface`; returns once attached.
    fn sink(&self, ns: &str, iface: &str) -> Result<Child> {
        let mut c = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                &self.pktgen(),
                "sink",
                "--iface",
                iface,
            ])
            .args(["--window", &self.window.to_string(), "--wait", "10"])
            .stdout(Stdio::piped())
            .spawn()?;
        let out = c.stdout.take().context("sink stdout")?;
        let mut r = BufReader::new(out);
        let mut line = String::new();
        r.read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("sink did not start: {line:?}");
        }
        c.stdout = Some(r.into_inner());
        Ok(c)
    }

    fn sink_result(mut c: Child) -> Result<f64> {
        let out = c.stdout.take().context("sink stdout")?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        let _ = c.wait();
        let v: Value =
            serde_json::from_str(line.trim()).with_context(|| format!("sink said {line:?}"))?;
        v["mpps"].as_f64().context("no mpps")
    }

    /// One measurement: sink attached, generator flat out for window + margins.
    fn measure(
        &self,
        sink_ns: &str,
        sink_if: &str,
        gen_ns: &str,
        gen_args: &[String],
    ) -> Result<f64> {
        self.measure_on(1, (sink_ns, sink_if), gen_ns, gen_args)
    }

    /// [`Ctx::measure`] with the generator pinned to CPU `cpu`: for the poll-mode
    /// datapaths, whose thread owns the other core; unpinned, the generator lands on the
    /// poll thread's core in some windows and not in others, and the rate doubles or halves
    /// with it.
    fn measure_pinned(
        &self,
        cpu: u32,
        (sink_ns, sink_if): (&str, &str),
        gen_ns: &str,
        gen_args: &[String],
    ) -> Result<f64> {
        let sink = self.sink(sink_ns, sink_if)?;
        run(&mut self.generator(gen_ns, gen_args, Some(cpu)))?;
        Self::sink_result(sink)
    }

    /// The generator's command in `gen_ns`, pinned to `cpu` if given. It outlasts the sink's
    /// window (which starts at the first frame): by 1 s in full runs, by 0.1 s in quick ones
    /// (0.4 s windows; it keeps them under a minute).
    fn generator(&self, gen_ns: &str, gen_args: &[String], cpu: Option<u32>) -> Command {
        let dur = self.window + if self.quick { 0.1 } else { 1.0 };
        let mut c = Command::new("ip");
        c.args(["netns", "exec", gen_ns]);
        if let Some(cpu) = cpu {
            c.args(["taskset", "-c", &cpu.to_string()]);
        }
        c.args([&self.pktgen(), "send", "--quiet"])
            .args(gen_args)
            .args(["--duration", &dur.to_string()])
            .stdout(Stdio::null());
        c
    }

    /// [`Ctx::measure`] with `cores` generators, generator i on CPU i: a veth hands what a
    /// CPU sends to its peer's queue of that number, whose XDP runs on that CPU, so each core
    /// carries its own share end to end (the veths need `cores` queues). One generator runs
    /// where the scheduler puts it.
    fn measure_on(
        &self,
        cores: u32,
        (sink_ns, sink_if): (&str, &str),
        gen_ns: &str,
        gen_args: &[String],
    ) -> Result<f64> {
        let sink = self.sink(sink_ns, sink_if)?;
        let gen = |cpu: Option<u32>| self.generator(gen_ns, gen_args, cpu);
        if cores == 1 {
            run(&mut gen(None))?;
        } else {
            let children = (0..cores)
                .map(|cpu| gen(Some(cpu)).spawn())
                .collect::<std::io::Result<Vec<_>>>()?;
            for mut c in children {
                if !c.wait()?.success() {
                    bail!("a generator failed");
                }
            }
        }
        Self::sink_result(sink)
    }

    /// The scenario `name` measured again with `SCALING_CORES` generators (rates only: the
    /// per-packet cost is the 1-core figure's).
    fn scaled(
        &self,
        name: &str,
        what: &str,
        sink: (&str, &str),
        gen_ns: &str,
        gen_args: &[String],
    ) -> Scenario {
        let full = Scenario::on_cores(name, SCALING_CORES);
        match self.repeat(|| self.measure_on(SCALING_CORES, sink, gen_ns, gen_args)) {
            Ok(samples) => Scenario {
                vs_baseline: name != GENERATOR,
                name: full,
                what: format!("{what}; one generator per core, 2-queue veths"),
                unit: "Mpps",
                samples,
                vs: None,
                error: None,
                xdp_ns: vec![],
                cores: SCALING_CORES,
            },
            Err(e) => {
                eprintln!("    {full}: {e:#}");
                Scenario {
                    cores: SCALING_CORES,
                    ..Scenario::failed(&full, e)
                }
            }
        }
    }

    /// The programs whose ns/packet a scenario reads: none in quick runs (the baseline, encap
    /// at 1000 flows and end to end keep theirs there), which keeps them under a minute.
    fn full_only(&self, progs: Vec<u32>) -> Vec<u32> {
        if self.quick {
            Vec::new()
        } else {
            progs
        }
    }

    fn repeat(&self, f: impl Fn() -> Result<f64>) -> Result<Vec<f64>> {
        (0..self.reps).map(|_| f()).collect()
    }

    /// [`Ctx::measure`] `reps` times, then `reps` times more with the kernel's BPF statistics
    /// on, reading what the XDP programs `progs` cost per packet over those windows (summed over the
    /// programs, i.e. over the hops of the path). The statistics stay off while the rates are
    /// measured: their accounting (two clock reads per program run, the generator's and the
    /// sink's included) halves the generator's ceiling on this machine kind (4.55 -> 2.31 Mpps).
    /// Returns the packet rates and the ns/packet figure, if any (none without `progs`).
    fn repeat_xdp(
        &self,
        sink: (&str, &str),
        gen_ns: &str,
        gen_args: &[String],
        progs: &[u32],
    ) -> Result<(Vec<f64>, Vec<f64>)> {
        let rates = self.repeat(|| self.measure(sink.0, sink.1, gen_ns, gen_args))?;
        if progs.is_empty() {
            return Ok((rates, vec![]));
        }
        let stats = match StatsOn::enable() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("    no XDP ns/packet figure: {e:#}");
                return Ok((rates, vec![]));
            }
        };
        let mut ns = Vec::new();
        for _ in 0..self.reps {
            let before = read_all(progs)?;
            self.measure(sink.0, sink.1, gen_ns, gen_args)?;
            let after = read_all(progs)?;
            let per: Option<Vec<f64>> = before
                .iter()
                .zip(&after)
                .map(|(b, a)| b.ns_per_run(a))
                .collect();
            ns.extend(per.map(|p| p.iter().sum::<f64>()));
        }
        drop(stats);
        Ok((rates, ns))
    }
}

/// A one-chassis testbed (ch1) whose remote end is the injector, registered in the NB as
/// chassis "peer" (198.18.0.250): what ch1 encapsulates for the peer's ports reaches the sink
/// on ch1's bridge port.
fn with_peer_chassis(tag: &str) -> Result<Testbed> {
    let mut tb = Testbed::new(tag)?;
    tb.queues = SCALING_CORES;
    tb.add_chassis("ch1")?;
    tb.add_injector()?;
    tb.nbctl(&["chassis-add", "peer", "198.18.0.250"])?;
    Ok(tb)
}

/// Port `name` (key 9, MAC 0a:00:00:00:00:09, address `ip`) of `switch`, bound to the peer.
fn add_peer_port(tb: &Testbed, switch: &str, name: &str, ip: &str) -> Result<()> {
    tb.nbctl(&["lsp-add", switch, name, PEER_PORT_MAC, ip, "--key", "9"])?;
    tb.nbctl(&["lsp-bind", name, "peer", &format!("{name}-if")])?;
    Ok(())
}

const PEER_PORT_MAC: &str = "0a:00:00:00:00:09";

/// The sink takes over the chassis' bridge port and drops everything, ARP replies included:
/// the chassis' neighbour entry for the peer (198.18.0.250, the injector) is pinned, or it
/// would fail after its reachable time (30 s or so) in the middle of the encap scenarios.
fn pin_peer_neighbour(tb: &Testbed, chassis_ns: &str) -> Result<()> {
    let inj = tb.injector.clone().context("no injector")?;
    pin_neighbour(chassis_ns, "198.18.0.250", &mac_of(&inj, "eth0")?)
}

/// A permanent neighbour entry for underlay address `ip` on the uplink of the chassis in
/// `chassis_ns`.
fn pin_neighbour(chassis_ns: &str, ip: &str, mac: &str) -> Result<()> {
    run(Command::new("ip")
        .args(["-n", chassis_ns, "neigh", "replace", ip, "lladdr", mac])
        .args(["dev", "ul", "nud", "permanent"]))?;
    Ok(())
}

fn read_all(progs: &[u32]) -> Result<Vec<ProgStats>> {
    progs.iter().map(|&id| ProgStats::read(id)).collect()
}

/// Generator arguments: IPv4/UDP frames out of the namespace's eth0, `flows` source ports.
/// The template is not restored before each frame (`--no-restore`): a scenario whose device
/// rewrites frames in place (a router, a NAT) takes `--no-restore` out (`restoring`).
fn udp_gen(src_mac: &str, dst_mac: &str, src_ip: &str, dst_ip: &str, flows: u32) -> Vec<String> {
    let flows = flows.to_string();
    args(&[
        "--no-restore",
        "--iface",
        "eth0",
        "--src-mac",
        src_mac,
        "--dst-mac",
        dst_mac,
        "--src-ip",
        src_ip,
        "--dst-ip",
        dst_ip,
        "--flows",
        &flows,
    ])
}

/// Geneve frames from the peer (198.18.0.250, port key 9) on `bridge_port` to the VM of
/// `vm_mac`/`vm_ip` (port key 1) on the chassis at `ch_ip`/`ul_mac`, over `flows` flows.
fn decap_gen(
    bridge_port: &str,
    (vm_mac, vm_ip): (&str, &str),
    (ul_mac, ch_ip): (&str, &str),
    flows: u32,
) -> Vec<String> {
    args(&[
        "--no-restore",
        "--iface",
        bridge_port,
        "--src-mac",
        "0a:00:00:00:00:09",
        "--dst-mac",
        vm_mac,
        "--src-ip",
        "10.0.0.9",
        "--dst-ip",
        vm_ip,
        "--flows",
        &flows.to_string(),
        "--geneve-vni",
        "1000",
        "--ovn-ingress",
        "9",
        "--ovn-egress",
        "1",
        "--outer-src-mac",
        "02:00:c6:12:00:fa",
        "--outer-dst-mac",
        ul_mac,
        "--outer-src-ip",
        "198.18.0.250",
        "--outer-dst-ip",
        ch_ip,
    ])
}

/// `gen` with the template restored before each frame, for a device that rewrites frames in
/// place (the generator's pages come back as the device left them).
fn restoring(mut gen: Vec<String>) -> Vec<String> {
    gen.retain(|a| a != "--no-restore");
    gen
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn mac_of(ns: &str, iface: &str) -> Result<String> {
    let out = run(Command::new("ip").args(["-n", ns, "-j", "link", "show", "dev", iface]))?;
    let v: Value = serde_json::from_str(&out)?;
    v[0]["address"]
        .as_str()
        .map(str::to_string)
        .context("no MAC")
}

pub fn bench(o: &Opts) -> Result<()> {
    let started = Instant::now();
    let ctx = Ctx {
        bins: crate::testbed::bin_dir().display().to_string(),
        reps: if o.quick { 1 } else { 3 },
        window: if o.quick { 0.4 } else { 2.0 },
        quick: o.quick,
    };
    // Quick runs (a smoke test under a minute): 1000 flows only; one flow is the same code
    // with another generator argument.
    let flow_counts: &[u32] = if o.quick {
        &[1000]
    } else {
        &[1, 1000, 100_000]
    };
    let mut sc: Vec<Scenario> = Vec::new();
    sc.extend(scenarios::baseline(&ctx)?);
    let want = |g: &str| o.only.is_empty() || o.only.iter().any(|x| x == g);
    if want("encap") {
        sc.extend(scenarios::encap_decap(&ctx, flow_counts)?);
    }
    if want("routed") {
        sc.push(routed::routed(&ctx).unwrap_or_else(|e| {
            eprintln!("    routed: {e:#}");
            Scenario::failed(routed::NAME, e)
        }));
    }
    if want("sg") {
        sc.extend(sg::all(&ctx));
    }
    if want("fip") {
        sc.push(fip::floating_ip(&ctx).unwrap_or_else(|e| {
            eprintln!("    floating IP: {e:#}");
            Scenario::failed(fip::NAME, e)
        }));
    }
    if want("dhcp") {
        sc.extend(dhcp::all(&ctx));
    }
    if want("e2e") {
        sc.extend(scenarios::end_to_end(&ctx, o)?);
        // Full runs only: quick runs stay under a minute.
        if !o.quick {
            sc.push(scenarios::end_to_end_floor(&ctx).unwrap_or_else(|e| {
                eprintln!("    end-to-end floor: {e:#}");
                Scenario::failed(scenarios::FLOOR_2, e)
            }));
        }
    }
    // Full runs, or asked by name: quick runs stay under a minute.
    if (want("slow") && !o.quick) || o.only.iter().any(|x| x == "slow") {
        sc.extend(slowpath::per_core(&ctx));
    }
    // Full runs, or asked by name: quick runs stay under a minute.
    if (want("setup") && !o.quick) || o.only.iter().any(|x| x == "setup") {
        sc.extend(setup::all(&ctx));
    }
    // Full runs, or asked by name: quick runs stay under a minute.
    if (want("dpdk") && !o.quick) || o.only.iter().any(|x| x == "dpdk") {
        // The XDP figures the DPDK ones are set against, measured in the same run when their
        // own groups are not run (`--only dpdk`).
        if !want("encap") {
            sc.extend(scenarios::encap_decap(&ctx, &[1000])?);
        }
        if !want("e2e") {
            sc.extend(scenarios::end_to_end_udp(&ctx)?);
        }
        sc.extend(dpdk::all(&ctx));
    }
    for afxdp in [false, true].into_iter().filter(|_| want("ovs")) {
        let kind = if afxdp { "afxdp" } else { "system" };
        eprintln!(
            "==> peer: Open vSwitch userspace datapath, {kind} ports, same end-to-end traffic"
        );
        let (udp, tcp) = match ovs::ovs_peer(&ctx, o, afxdp) {
            Ok((u, t)) => ((u, None), (t, None)),
            Err(e) => {
                eprintln!("    OVS {kind}: {e:#}");
                (
                    (vec![], Some(format!("{e:#}"))),
                    (vec![], Some(format!("{e:#}"))),
                )
            }
        };
        sc.push(Scenario {
            name: format!("OVS {kind} end to end UDP 64B"),
            what: format!(
                "two ovs-vswitchd (netdev), {kind} ports, Geneve + OVN option via TLV map"
            ),
            unit: "Mpps",
            samples: udp.0,
            vs_baseline: true,
            vs: None,
            error: udp.1,
            xdp_ns: vec![],
            cores: 1,
        });
        sc.push(Scenario {
            name: format!("OVS {kind} end to end TCP (iperf3)"),
            what: format!("iperf3, two ovs-vswitchd (netdev), {kind} ports"),
            unit: "Gbit/s",
            samples: tcp.0,
            vs_baseline: false,
            vs: None,
            error: tcp.1,
            xdp_ns: vec![],
            cores: 1,
        });
    }
    report::report(&sc, o, started.elapsed())
}
