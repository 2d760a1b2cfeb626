//! `cargo xtask bench`: the datapath benchmark. Every scenario is measured with the XDP
//! live-frames generator and an XDP counting sink (perf/), several times, median reported, and
//! compared with a plain XDP redirect between two veths measured in the same run (the limit of
//! this machine). Writes a Markdown table, the raw samples as JSON and an SVG bar chart.

use crate::testbed::{run, Testbed};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Opts {
    pub quick: bool,
    pub results: std::path::PathBuf,
}

struct Scenario {
    name: String,
    what: String,
    unit: &'static str,
    samples: Vec<f64>,
    /// Counts against the baseline (packets/s scenarios).
    vs_baseline: bool,
    /// The OVS scenario this one is compared with.
    vs_ovs: Option<&'static str>,
    /// Why there is no figure, if there is none.
    error: Option<String>,
}

impl Scenario {
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
}

struct Ctx {
    bins: String,
    reps: usize,
    window: f64,
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
        let sink = self.sink(sink_ns, sink_if)?;
        let dur = self.window + 1.0;
        let out = run(Command::new("ip")
            .args(["netns", "exec", gen_ns, &self.pktgen(), "send", "--quiet"])
            .args(gen_args)
            .args(["--duration", &dur.to_string()]))?;
        let _ = out;
        Self::sink_result(sink)
    }

    fn repeat(&self, f: impl Fn() -> Result<f64>) -> Result<Vec<f64>> {
        (0..self.reps).map(|_| f()).collect()
    }
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
        window: if o.quick { 0.5 } else { 2.0 },
    };
    let flow_counts: &[u32] = if o.quick {
        &[1, 1000]
    } else {
        &[1, 1000, 100_000]
    };
    let mut sc: Vec<Scenario> = Vec::new();

    // Baseline: plain XDP redirect veth -> veth.
    {
        eprintln!("==> baseline: XDP_REDIRECT between two veths");
        let mut tb = Testbed::new("bb")?;
        let g = tb.add_raw_ns("g")?;
        let r = tb.add_raw_ns("r")?;
        let s = tb.add_raw_ns("s")?;
        tb.raw_veth(&g, "eth0", &r, "a0")?;
        tb.raw_veth(&r, "b0", &s, "eth0")?;
        let mut red = Command::new("ip")
            .args([
                "netns",
                "exec",
                &r,
                &ctx.pktgen(),
                "redirect",
                "--from",
                "a0",
                "--to",
                "b0",
            ])
            .stdout(Stdio::piped())
            .spawn()?;
        let mut l = String::new();
        BufReader::new(red.stdout.take().context("stdout")?).read_line(&mut l)?;
        let gen = args(&[
            "--iface",
            "eth0",
            "--src-mac",
            "02:00:00:00:00:01",
            "--dst-mac",
            "02:00:00:00:00:02",
            "--src-ip",
            "10.9.0.1",
            "--dst-ip",
            "10.9.0.2",
            "--flows",
            "1000",
        ]);
        let samples = ctx.repeat(|| ctx.measure(&s, "eth0", &g, &gen));
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(red.id() as i32, libc::SIGTERM) };
        let _ = red.wait();
        sc.push(Scenario {
            name: "baseline".into(),
            what: "plain XDP_REDIRECT veth -> veth (the limit)".into(),
            unit: "Mpps",
            samples: samples?,
            vs_baseline: true,
            vs_ovs: None,
            error: None,
        });
    }

    // Encap and decap on one chassis; the "peer" chassis is the injector's address.
    {
        eprintln!("==> encap / decap: one chassis, VM port <-> uplink");
        let mut tb = Testbed::new("be")?;
        tb.add_chassis("ch1")?;
        tb.add_injector()?;
        tb.nbctl(&["chassis-add", "peer", "198.18.0.250"])?;
        tb.nbctl(&["ls-add", "ls1", "--key", "1000"])?;
        tb.add_vm("vm1", "ch1", "ls1", 1)?;
        tb.nbctl(&[
            "lsp-add",
            "ls1",
            "vmx",
            "0a:00:00:00:00:09",
            "10.0.0.9",
            "--key",
            "9",
        ])?;
        tb.nbctl(&["lsp-bind", "vmx", "peer", "vmx-if"])?;
        tb.start_agents()?;
        let ch = &tb.chassis[0];
        // Resolve the underlay neighbour before the sink takes the bridge port over.
        run(tb
            .ns_cmd(&ch.ns, "ping")
            .args(["-c", "1", "-W", "1", "198.18.0.250"]))?;
        let vm1 = tb.vm("vm1")?;
        let ul_mac = mac_of(&ch.ns, "ul")?;
        for &flows in flow_counts {
            let gen = args(&[
                "--iface",
                "eth0",
                "--src-mac",
                &vm1.mac,
                "--dst-mac",
                "0a:00:00:00:00:09",
                "--src-ip",
                &vm1.ip,
                "--dst-ip",
                "10.0.0.9",
                "--flows",
                &flows.to_string(),
            ]);
            let s = ctx.repeat(|| ctx.measure(&tb.underlay_ns, &ch.bridge_port, &vm1.ns, &gen))?;
            sc.push(Scenario {
                name: format!("encap {flows} flow{}", if flows > 1 { "s" } else { "" }),
                what: "VM port -> XDP megaflow -> Geneve on the uplink".into(),
                unit: "Mpps",
                samples: s,
                vs_baseline: true,
                vs_ovs: None,
                error: None,
            });
        }
        for &flows in flow_counts {
            let gen = args(&[
                "--iface",
                &ch.bridge_port,
                "--src-mac",
                "0a:00:00:00:00:09",
                "--dst-mac",
                &vm1.mac,
                "--src-ip",
                "10.0.0.9",
                "--dst-ip",
                &vm1.ip,
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
                &ul_mac,
                "--outer-src-ip",
                "198.18.0.250",
                "--outer-dst-ip",
                &ch.ip,
            ]);
            let s = ctx.repeat(|| ctx.measure(&vm1.ns, "eth0", &tb.underlay_ns, &gen))?;
            sc.push(Scenario {
                name: format!("decap {flows} flow{}", if flows > 1 { "s" } else { "" }),
                what: "Geneve on the uplink -> XDP decap -> VM port".into(),
                unit: "Mpps",
                samples: s,
                vs_baseline: true,
                vs_ovs: None,
                error: None,
            });
        }
        let hits = tb.counter("ch1", "vp-vm1", "fastpath_hit")?;
        eprintln!("    (fast-path hits on vp-vm1: {hits})");
    }

    // End to end across two chassis, and the slow path.
    {
        eprintln!("==> end to end: VM on ch1 -> VM on ch2 (uplinks on one veth pair)");
        let mut tb = Testbed::new("bx")?;
        tb.add_chassis_pair_direct("ch1", "ch2")?;
        tb.nbctl(&["ls-add", "ls1", "--key", "1000"])?;
        tb.add_vm("vm1", "ch1", "ls1", 1)?;
        tb.add_vm("vm3", "ch2", "ls1", 3)?;
        tb.start_agents()?;
        tb.ping("vm1", &tb.vm("vm3")?.ip.clone(), 2)?;
        let (vm1, vm3) = (tb.vm("vm1")?, tb.vm("vm3")?);
        let gen = args(&[
            "--iface",
            "eth0",
            "--src-mac",
            &vm1.mac,
            "--dst-mac",
            &vm3.mac,
            "--src-ip",
            &vm1.ip,
            "--dst-ip",
            &vm3.ip,
            "--flows",
            "1000",
        ]);
        let s = ctx.repeat(|| ctx.measure(&vm3.ns, "eth0", &vm1.ns, &gen))?;
        sc.push(Scenario {
            name: "end to end UDP 64B".into(),
            what: "VM ch1 -> encap (XDP) -> underlay veth -> decap (XDP) -> VM ch2".into(),
            unit: "Mpps",
            samples: s,
            vs_baseline: true,
            vs_ovs: Some("OVS afxdp end to end UDP 64B"),
            error: None,
        });
        // TCP with iperf3.
        let secs = if o.quick { 2 } else { 10 };
        let mut tcp = Vec::new();
        for _ in 0..ctx.reps {
            let mut srv = tb
                .ns_cmd(&vm3.ns, "iperf3")
                .args(["-s", "-1", "-p", "5201"])
                .stdout(Stdio::null())
                .spawn()?;
            std::thread::sleep(Duration::from_millis(300));
            let out = run(tb.ns_cmd(&vm1.ns, "iperf3").args([
                "-c",
                &vm3.ip,
                "-p",
                "5201",
                "-t",
                &secs.to_string(),
                "-J",
            ]));
            let _ = srv.kill();
            let _ = srv.wait();
            let v: Value = serde_json::from_str(&out?)?;
            let bps = v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap_or(0.0);
            tcp.push(bps / 1e9);
        }
        sc.push(Scenario {
            name: "end to end TCP (iperf3)".into(),
            what: format!("iperf3 {secs}s, vm1 -> vm3"),
            unit: "Gbit/s",
            samples: tcp,
            vs_baseline: false,
            vs_ovs: Some("OVS afxdp end to end TCP (iperf3)"),
            error: None,
        });
        eprintln!("==> slow path: every frame to a new destination");
        let gen = args(&[
            "--iface",
            "eth0",
            "--src-mac",
            &vm1.mac,
            "--dst-mac",
            "0a:00:00:ee:00:00",
            "--src-ip",
            &vm1.ip,
            "--dst-ip",
            &vm3.ip,
            "--flows",
            "60000",
            "--vary",
            "dst-mac",
        ]);
        let mut slow = Vec::new();
        for _ in 0..ctx.reps {
            let c0 = tb.counter("ch1", "vp-vm1", "slowpath_rx")?;
            let out = run(Command::new("ip")
                .args(["netns", "exec", &vm1.ns, &ctx.pktgen(), "send", "--quiet"])
                .args(&gen)
                .args(["--duration", &ctx.window.to_string()]))?;
            // Whatever is still queued (one ring at most) drains within a moment.
            std::thread::sleep(Duration::from_millis(200));
            let c1 = tb.counter("ch1", "vp-vm1", "slowpath_rx")?;
            // Over the generator's own sending window: the process start and the drain pause
            // are not slow-path time.
            let secs = serde_json::from_str::<Value>(out.trim())
                .ok()
                .and_then(|v| v["secs"].as_f64())
                .filter(|s| *s > 0.0)
                .with_context(|| format!("pktgen said {out:?}"))?;
            slow.push((c1 - c0) as f64 / secs / 1e6);
        }
        sc.push(Scenario {
            name: "slow path (AF_XDP)".into(),
            what: "every frame misses: AF_XDP -> userspace pipeline (drops: unknown MAC)".into(),
            unit: "Mpps",
            samples: slow,
            vs_baseline: true,
            vs_ovs: None,
            error: None,
        });
        // Flow setup: invalidate ls1 (an NB change), send one frame, time until the megaflow
        // for it is installed in XDP.
        let mut setup = Vec::new();
        for i in 0..(if o.quick { 3 } else { 10 }) {
            let applied = |tb: &Testbed| -> Result<u64> {
                Ok(tb.stats("ch1")?["pipelines_applied"].as_u64().unwrap_or(0))
            };
            let a0 = applied(&tb)?;
            tb.nbctl(&[
                "lsp-add",
                "ls1",
                &format!("dummy{i}"),
                &format!("0a:00:00:dd:00:{i:02x}"),
                "--key",
                &(100 + i).to_string(),
            ])?;
            let t = Instant::now();
            while applied(&tb)? == a0 && t.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(2));
            }
            let m0 = tb.counter("ch1", "vp-vm1", "megaflow_install")?;
            let t0 = Instant::now();
            run(Command::new("ip")
                .args(["netns", "exec", &vm1.ns, &ctx.pktgen(), "send", "--quiet"])
                .args([
                    "--iface",
                    "eth0",
                    "--src-mac",
                    &vm1.mac,
                    "--dst-mac",
                    &vm3.mac,
                ])
                .args(["--src-ip", &vm1.ip, "--dst-ip", &vm3.ip, "--count", "1"]))?;
            while tb.counter("ch1", "vp-vm1", "megaflow_install")? == m0 {
                if t0.elapsed() > Duration::from_secs(5) {
                    bail!("megaflow never installed");
                }
            }
            // Measured by the forwarder: from the frame's arrival on the AF_XDP ring to the
            // megaflow being in the BPF map.
            let us = tb.stats("ch1")?["last_flow_setup_us"]
                .as_f64()
                .unwrap_or(0.0);
            setup.push(us);
        }
        sc.push(Scenario {
            name: "flow setup".into(),
            what: "first frame of a flow on the AF_XDP ring -> its megaflow in XDP".into(),
            unit: "us",
            samples: setup,
            vs_baseline: false,
            vs_ovs: None,
            error: None,
        });
    }

    for afxdp in [false, true] {
        let kind = if afxdp { "afxdp" } else { "system" };
        eprintln!(
            "==> peer: Open vSwitch userspace datapath, {kind} ports, same end-to-end traffic"
        );
        let (udp, tcp) = match ovs_peer(&ctx, o, afxdp) {
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
            vs_ovs: None,
            error: udp.1,
        });
        sc.push(Scenario {
            name: format!("OVS {kind} end to end TCP (iperf3)"),
            what: format!("iperf3, two ovs-vswitchd (netdev), {kind} ports"),
            unit: "Gbit/s",
            samples: tcp.0,
            vs_baseline: false,
            vs_ovs: None,
            error: tcp.1,
        });
    }

    report(&sc, o, started.elapsed())
}

fn iperf(tb: &Testbed, from: &str, to: &str, secs: u32) -> Result<f64> {
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

/// The same end-to-end traffic through two Open vSwitch userspace chassis.
fn ovs_peer(ctx: &Ctx, o: &Opts, afxdp: bool) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut tb = Testbed::new(if afxdp { "bo2" } else { "bo1" })?;
    tb.nbctl(&["ls-add", "ls1", "--key", "1000"])?;
    tb.add_ovs_pair_direct("o1", "o2", afxdp)?;
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
    let mut ok = false;
    for _ in 0..10 {
        if tb.ping("vm1", &ip3, 1).is_ok() {
            ok = true;
            break;
        }
    }
    if !ok {
        bail!("vm1 cannot reach vm3 through OVS");
    }
    let (vm1, vm3) = (tb.vm("vm1")?, tb.vm("vm3")?);
    let gen = args(&[
        "--iface",
        "eth0",
        "--src-mac",
        &vm1.mac,
        "--dst-mac",
        &vm3.mac,
        "--src-ip",
        &vm1.ip,
        "--dst-ip",
        &vm3.ip,
        "--flows",
        "1000",
    ]);
    // TCP first: the UDP flood below (and the GRO it needs) must not disturb it.
    let secs = if o.quick { 2 } else { 10 };
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

fn machine() -> Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_string();
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": kernel.trim(),
        "cpu": cpu,
    })
}

fn report(sc: &[Scenario], o: &Opts, took: Duration) -> Result<()> {
    let base = sc
        .iter()
        .find(|s| s.name == "baseline")
        .map(|s| s.median())
        .unwrap_or(0.0);
    let m = machine();
    let mut md = String::new();
    md.push_str(&format!(
        "# geneflow datapath benchmark\n\nMachine: {} cores, {}, kernel {}. {} run(s) per scenario, median shown. Took {:.0} s.\n\n",
        m["cores"], m["cpu"].as_str().unwrap_or(""), m["kernel"].as_str().unwrap_or(""),
        if o.quick { 1 } else { 3 }, took.as_secs_f64()
    ));
    md.push_str("| scenario | median | min-max | ratio to baseline | ratio to OVS | what |\n|---|---|---|---|---|---|\n");
    for s in sc {
        if let Some(e) = &s.error {
            md.push_str(&format!(
                "| {} | not measured | - | - | - | {}: {} |\n",
                s.name,
                s.what,
                e.replace('|', "/")
            ));
            continue;
        }
        let ratio = if s.vs_baseline && base > 0.0 {
            format!("{:.2}", s.median() / base)
        } else {
            "-".into()
        };
        let ovs = match s.vs_ovs.and_then(|n| sc.iter().find(|x| x.name == n)) {
            Some(x) if x.median() > 0.0 => format!("{:.2}x {}", s.median() / x.median(), x.name),
            Some(_) => "OVS not measured".into(),
            None => "-".into(),
        };
        md.push_str(&format!(
            "| {} | {:.3} {} | {:.3}-{:.3} | {} | {} | {} |\n",
            s.name,
            s.median(),
            s.unit,
            s.min(),
            s.max(),
            ratio,
            ovs,
            s.what
        ));
    }
    std::fs::create_dir_all(&o.results)?;
    std::fs::write(o.results.join("bench.md"), &md)?;
    let raw = json!({
        "machine": m,
        "quick": o.quick,
        "scenarios": sc.iter().map(|s| json!({
            "name": s.name, "unit": s.unit, "samples": s.samples, "median": s.median(),
            "ratio_to_baseline": if s.vs_baseline && base > 0.0 { json!(s.median() / base) } else { Value::Null },
            "what": s.what,
            "error": s.error,
        })).collect::<Vec<_>>(),
    });
    std::fs::write(
        o.results.join("bench.json"),
        serde_json::to_vec_pretty(&raw)?,
    )?;
    std::fs::write(o.results.join("bench.svg"), svg(sc))?;
    println!("{md}");
    eprintln!("==> report: {}", o.results.join("bench.md").display());
    Ok(())
}

/// A horizontal bar chart of the packets/s scenarios.
fn svg(sc: &[Scenario]) -> String {
    let rows: Vec<&Scenario> = sc.iter().filter(|s| s.unit == "Mpps").collect();
    let max = rows.iter().map(|s| s.max()).fold(0.0, f64::max).max(1e-9);
    let (w, lh) = (720.0, 28.0);
    let h = 40.0 + lh * rows.len() as f64;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<text x=\"10\" y=\"20\" font-size=\"14\">geneflow datapath, Mpps (median, 64-byte frames)</text>\n"
    );
    for (i, s) in rows.iter().enumerate() {
        let y = 32.0 + lh * i as f64;
        let bw = (w - 330.0) * s.median() / max;
        out.push_str(&format!(
            "<text x=\"10\" y=\"{:.0}\">{}</text><rect x=\"200\" y=\"{:.0}\" width=\"{bw:.1}\" height=\"18\" fill=\"{}\"/><text x=\"{:.0}\" y=\"{:.0}\">{:.3}</text>\n",
            y + 13.0,
            s.name,
            y,
            if s.name == "baseline" { "#888" } else { "#3a7bd5" },
            205.0 + bw,
            y + 13.0,
            s.median()
        ));
    }
    out.push_str("</svg>\n");
    out
}

pub fn results_dir(root: &Path) -> std::path::PathBuf {
    root.join("results")
}

/// The scenarios every report must contain, each with a non-zero figure.
pub const REQUIRED: &[&str] = &[
    "baseline",
    "encap 1 flow",
    "encap 1000 flows",
    "decap 1 flow",
    "decap 1000 flows",
    "end to end UDP 64B",
    "end to end TCP (iperf3)",
    "slow path (AF_XDP)",
    "flow setup",
    "OVS system end to end UDP 64B",
    "OVS system end to end TCP (iperf3)",
    "OVS afxdp end to end UDP 64B",
    "OVS afxdp end to end TCP (iperf3)",
];

/// Fails unless the report in `dir` is complete: markdown, SVG, and every required scenario
/// with a non-zero median in the JSON.
pub fn check_complete(dir: &Path) -> Result<()> {
    for f in ["bench.md", "bench.svg", "bench.json"] {
        if std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0) == 0 {
            bail!("report file {f} missing or empty");
        }
    }
    let v: Value = serde_json::from_slice(&std::fs::read(dir.join("bench.json"))?)?;
    let sc = v["scenarios"].as_array().context("no scenarios")?;
    for name in REQUIRED {
        let s = sc
            .iter()
            .find(|s| s["name"] == *name)
            .with_context(|| format!("scenario {name:?} missing from the report"))?;
        if s["median"].as_f64().unwrap_or(0.0) <= 0.0 {
            bail!("scenario {name:?} has no figure: {s}");
        }
    }
    eprintln!("==> bench report complete ({} scenarios)", sc.len());
    Ok(())
}
