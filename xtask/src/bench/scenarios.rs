//! The single-hop and two-chassis scenarios: the baseline redirect, encap and decap on one
//! chassis, end to end across two chassis (UDP and TCP), the slow path and flow setup.

use super::{decap_gen, mac_of, udp_gen, Ctx, Opts, Scenario, GENERATOR, MINIMAL, SCALING_CORES};
use crate::bpfstats::prog_on;
use crate::testbed::Testbed;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The traffic of the testbeds without geneflow (ceiling, baseline, floors): 1000 UDP flows.
fn raw_gen() -> Vec<String> {
    udp_gen(
        "02:00:00:00:00:01",
        "02:00:00:00:00:02",
        "10.9.0.1",
        "10.9.0.2",
        1000,
    )
}

/// The generator's own ceiling (generator -> veth -> XDP_DROP sink) and the baseline, a plain
/// XDP redirect veth -> veth: this machine's limit for one hop.
pub(super) fn baseline(ctx: &Ctx) -> Result<Vec<Scenario>> {
    eprintln!("==> generator ceiling, and the baseline: XDP_REDIRECT between two veths");
    let mut tb = Testbed::new("bb")?;
    tb.queues = SCALING_CORES;
    let g = tb.add_raw_ns("g")?;
    let r = tb.add_raw_ns("r")?;
    let s = tb.add_raw_ns("s")?;
    tb.raw_veth(&g, "eth0", &r, "a0")?;
    tb.raw_veth(&r, "b0", &s, "eth0")?;
    let gen = raw_gen();
    // The sink straight on the generator's peer: nothing but the generator in the path. The
    // minimal generator's windows alternate with the generator's, so that both see the same
    // machine.
    let mut gen_min = gen.clone();
    gen_min.push("--minimal".into());
    let (mut ceiling, mut minimal) = (vec![], vec![]);
    for _ in 0..ctx.reps {
        ceiling.push(ctx.measure(&r, "a0", &g, &gen)?);
        minimal.push(ctx.measure(&r, "a0", &g, &gen_min)?);
    }
    let ceiling2 = ctx.scaled(
        GENERATOR,
        "generator -> veth -> XDP_DROP sink",
        (&r, "a0"),
        &g,
        &gen,
    );
    let red = Redirect::start(ctx, &r, ("a0", "b0"), false)?;
    let measured = prog_on(&r, "a0").and_then(|p| ctx.repeat_xdp((&s, "eth0"), &g, &gen, &[p]));
    let base2 = ctx.scaled(
        "baseline",
        "plain XDP_REDIRECT veth -> veth",
        (&s, "eth0"),
        &g,
        &gen,
    );
    drop(red);
    let (samples, xdp_ns) = measured?;
    // Full runs only: quick runs stay under a minute.
    let floor = (!ctx.quick).then(|| {
        floor(ctx, (&r, &s, &g), &gen).unwrap_or_else(|e| {
            eprintln!("    {FLOOR}: {e:#}");
            Scenario::failed(FLOOR, e)
        })
    });
    let mut sc = vec![
        Scenario {
            name: GENERATOR.into(),
            what: "generator -> veth -> XDP_DROP sink: the most any scenario can show".into(),
            unit: "Mpps",
            samples: ceiling,
            vs_baseline: false,
            vs: Some(MINIMAL),
            error: None,
            xdp_ns: vec![],
            cores: 1,
        },
        Scenario::figure(
            MINIMAL,
            "the template as it is, XDP_TX, no per-frame work (one flow) -> the same sink: what live frames allow here".into(),
            "Mpps",
            minimal,
        ),
        Scenario::xdp_rate(
            "baseline",
            "plain XDP_REDIRECT veth -> veth (the limit)",
            samples,
            xdp_ns,
            None,
        ),
        ceiling2,
        base2,
    ];
    sc.extend(floor);
    Ok(sc)
}

/// `geneflow-pktgen redirect` (with `--lookup`, the floor's lookup first) in a namespace,
/// from its program's attachment until dropped.
struct Redirect(std::process::Child);

impl Redirect {
    fn start(ctx: &Ctx, ns: &str, (from, to): (&str, &str), lookup: bool) -> Result<Redirect> {
        let mut r = Redirect(
            Command::new("ip")
                .args(["netns", "exec", ns, &ctx.pktgen(), "redirect"])
                .args(["--from", from, "--to", to])
                .args(lookup.then_some("--lookup"))
                .stdout(Stdio::piped())
                .spawn()?,
        );
        // It prints a line once attached (stopped on the way out if it never does).
        let mut l = String::new();
        BufReader::new(r.0.stdout.take().context("stdout")?).read_line(&mut l)?;
        Ok(r)
    }
}

impl Drop for Redirect {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

const FLOOR: &str = "baseline + one megaflow-sized lookup";

/// The baseline again with one hash lookup per frame in a table shaped as the megaflow table
/// (40-byte key, 104-byte value, 1000 keys live): what any datapath that looks each frame up
/// once costs here, the floor under encap and decap.
fn floor(ctx: &Ctx, (r, s, g): (&str, &str, &str), gen: &[String]) -> Result<Scenario> {
    let red = Redirect::start(ctx, r, ("a0", "b0"), true)?;
    let measured = prog_on(r, "a0").and_then(|p| ctx.repeat_xdp((s, "eth0"), g, gen, &[p]));
    drop(red);
    let (samples, xdp_ns) = measured?;
    Ok(Scenario::xdp_rate(
        FLOOR,
        "XDP: the frame's first 40 bytes looked up in a 262,144-entry hash map (104-byte values, 1000 flows), then XDP_REDIRECT veth -> veth",
        samples,
        xdp_ns,
        None,
    ))
}

pub(super) const FLOOR_2: &str = "two plain redirects (the end-to-end floor)";

/// What the end-to-end path allows any XDP datapath here: the same veths and hops as
/// `end_to_end_testbed` (generator -> veth -> XDP hop -> veth -> XDP hop -> veth -> sink),
/// each hop a plain XDP_REDIRECT with no lookup and frames that do not grow. Set against
/// OVS afxdp like end to end, it bounds the ratio geneflow can show there.
pub(super) fn end_to_end_floor(ctx: &Ctx) -> Result<Scenario> {
    eprintln!("==> end-to-end floor: two plain XDP_REDIRECT hops");
    let mut tb = Testbed::new("bf")?;
    tb.queues = SCALING_CORES;
    let g = tb.add_raw_ns("g")?;
    let (r1, r2) = (tb.add_raw_ns("r1")?, tb.add_raw_ns("r2")?);
    let s = tb.add_raw_ns("s")?;
    tb.raw_veth(&g, "eth0", &r1, "a0")?;
    tb.raw_veth(&r1, "b0", &r2, "c0")?;
    tb.raw_veth(&r2, "d0", &s, "eth0")?;
    let gen = raw_gen();
    let hops = [
        Redirect::start(ctx, &r1, ("a0", "b0"), false)?,
        Redirect::start(ctx, &r2, ("c0", "d0"), false)?,
    ];
    let measured = prog_on(&r1, "a0")
        .and_then(|a| Ok([a, prog_on(&r2, "c0")?]))
        .and_then(|p| ctx.repeat_xdp((&s, "eth0"), &g, &gen, &p));
    drop(hops);
    let (samples, xdp_ns) = measured?;
    Ok(Scenario::xdp_rate(
        FLOOR_2,
        "generator -> veth -> XDP_REDIRECT -> veth -> XDP_REDIRECT -> veth -> sink: end to end's hops with nothing to do, the most any XDP datapath shows there",
        samples,
        xdp_ns,
        Some("OVS afxdp end to end UDP 64B"),
    ))
}

/// Encap and decap on one chassis; the "peer" chassis is the injector's address.
pub(super) fn encap_decap(ctx: &Ctx, flow_counts: &[u32]) -> Result<Vec<Scenario>> {
    let mut sc = Vec::new();
    eprintln!("==> encap / decap: one chassis, VM port <-> uplink");
    let mut tb = super::with_peer_chassis("be")?;
    tb.nbctl(&["ls-add", "ls1", "--key", "1000"])?;
    tb.add_vm("vm1", "ch1", "ls1", 1)?;
    super::add_peer_port(&tb, "ls1", "vmx", "10.0.0.9")?;
    tb.start_agents()?;
    let ch = &tb.chassis[0];
    super::pin_peer_neighbour(&tb, &ch.ns)?;
    let vm1 = tb.vm("vm1")?;
    let ul_mac = mac_of(&ch.ns, "ul")?;
    // Quick runs read the programs' cost for encap at 1000 flows only (it keeps them under
    // a minute).
    let progs = |flows: u32, ns: &str, iface: &str| -> Result<Vec<u32>> {
        Ok(if ctx.quick && (flows != 1000 || iface == "ul") {
            vec![]
        } else {
            vec![prog_on(ns, iface)?]
        })
    };
    for &flows in flow_counts {
        let gen = udp_gen(&vm1.mac, "0a:00:00:00:00:09", &vm1.ip, "10.0.0.9", flows);
        let (s, xdp_ns) = ctx.repeat_xdp(
            (&tb.underlay_ns, &ch.bridge_port),
            &vm1.ns,
            &gen,
            &progs(flows, &ch.ns, "vp-vm1")?,
        )?;
        let name = format!("encap {flows} flow{}", if flows > 1 { "s" } else { "" });
        let what = "VM port -> XDP megaflow -> Geneve on the uplink";
        sc.push(Scenario::xdp_rate(&name, what, s, xdp_ns, None));
        if flows == 1000 {
            sc.push(ctx.scaled(
                &name,
                what,
                (&tb.underlay_ns, &ch.bridge_port),
                &vm1.ns,
                &gen,
            ));
        }
    }
    for &flows in flow_counts {
        let gen = decap_gen(
            &ch.bridge_port,
            (&vm1.mac, &vm1.ip),
            (&ul_mac, &ch.ip),
            flows,
        );
        let (s, xdp_ns) = ctx.repeat_xdp(
            (&vm1.ns, "eth0"),
            &tb.underlay_ns,
            &gen,
            &progs(flows, &ch.ns, "ul")?,
        )?;
        let name = format!("decap {flows} flow{}", if flows > 1 { "s" } else { "" });
        let what = "Geneve on the uplink -> XDP decap -> VM port";
        sc.push(Scenario::xdp_rate(&name, what, s, xdp_ns, None));
        if flows == 1000 {
            sc.push(ctx.scaled(&name, what, (&vm1.ns, "eth0"), &tb.underlay_ns, &gen));
        }
    }
    let hits = tb.counter("ch1", "vp-vm1", "fastpath_hit")?;
    eprintln!("    (fast-path hits on vp-vm1: {hits})");
    Ok(sc)
}

/// Two XDP chassis on one veth pair, vm1 on ch1 and vm3 on ch2, agents started.
fn end_to_end_testbed() -> Result<Testbed> {
    eprintln!("==> end to end: VM on ch1 -> VM on ch2 (uplinks on one veth pair)");
    let mut tb = Testbed::new("bx")?;
    tb.queues = SCALING_CORES;
    tb.add_chassis_pair_direct("ch1", "ch2")?;
    tb.nbctl(&["ls-add", "ls1", "--key", "1000"])?;
    tb.add_vm("vm1", "ch1", "ls1", 1)?;
    tb.add_vm("vm3", "ch2", "ls1", 3)?;
    tb.start_agents()?;
    tb.ping("vm1", &tb.vm("vm3")?.ip.clone(), 2)?;
    Ok(tb)
}

/// End to end UDP only (1 core and 2), for runs that want the XDP figure beside the DPDK
/// backend's without the rest of the end-to-end group.
pub(super) fn end_to_end_udp(ctx: &Ctx) -> Result<Vec<Scenario>> {
    let tb = end_to_end_testbed()?;
    end_to_end_udp_on(ctx, &tb)
}

fn end_to_end_udp_on(ctx: &Ctx, tb: &Testbed) -> Result<Vec<Scenario>> {
    let mut sc = Vec::new();
    let (vm1, vm3) = (tb.vm("vm1")?, tb.vm("vm3")?);
    let gen = udp_gen(&vm1.mac, &vm3.mac, &vm1.ip, &vm3.ip, 1000);
    let progs = [
        prog_on(&tb.chassis[0].ns, "vp-vm1")?,
        prog_on(&tb.chassis[1].ns, "ul")?,
    ];
    let (s, xdp_ns) = ctx.repeat_xdp((&vm3.ns, "eth0"), &vm1.ns, &gen, &progs)?;
    sc.push(Scenario::xdp_rate(
        "end to end UDP 64B",
        "VM ch1 -> encap (XDP) -> underlay veth -> decap (XDP) -> VM ch2",
        s,
        xdp_ns,
        Some("OVS afxdp end to end UDP 64B"),
    ));
    sc.push(ctx.scaled(
        "end to end UDP 64B",
        "VM ch1 -> encap (XDP) -> underlay veth -> decap (XDP) -> VM ch2",
        (&vm3.ns, "eth0"),
        &vm1.ns,
        &gen,
    ));
    Ok(sc)
}

/// End to end across two chassis, and the slow path.
pub(super) fn end_to_end(ctx: &Ctx, o: &Opts) -> Result<Vec<Scenario>> {
    let tb = end_to_end_testbed()?;
    let mut sc = end_to_end_udp_on(ctx, &tb)?;
    // TCP with iperf3.
    let secs = if o.quick { 1 } else { 10 };
    let tcp = (0..ctx.reps)
        .map(|_| super::ovs::iperf(&tb, "vm1", "vm3", secs))
        .collect::<Result<Vec<_>>>()?;
    sc.push(Scenario {
        name: "end to end TCP (iperf3)".into(),
        what: format!("iperf3 {secs}s, vm1 -> vm3"),
        unit: "Gbit/s",
        samples: tcp,
        vs_baseline: false,
        vs: Some("OVS afxdp end to end TCP (iperf3)"),
        error: None,
        xdp_ns: vec![],
        cores: 1,
    });
    sc.push(super::slowpath::one_thread(ctx, &tb)?);
    // Flow setup: a long-lived UDP stream vm1 -> vm3 (1000 datagrams/s, to a listening
    // port); each round invalidates ls1 (an NB change) and waits for the stream's next
    // datagram to install the megaflow again. (Starting a generator process per flow made
    // the p99: its start and teardown took the forwarder's core for milliseconds.)
    let mut setup = Vec::new();
    let flows: u64 = if o.quick { 5 } else { 100 };
    let vm3_ip = tb.vm("vm3")?.ip.clone();
    let rx = tb.udp_receiver("vm3", 6399, 60_000, 30.0)?;
    let tx = tb.udp_sender("vm1", &vm3_ip, 6399, 60_000, 1000)?;
    let measured = (|| -> Result<()> {
        for i in 0..flows {
            let m0 = tb.counter("ch1", "vp-vm1", "megaflow_install")?;
            tb.applied_after("ch1", Duration::from_secs(5), || {
                tb.nbctl(&[
                    "lsp-add",
                    "ls1",
                    &format!("dummy{i}"),
                    &format!("0a:00:00:dd:{:02x}:{:02x}", i >> 8, i & 0xff),
                    "--key",
                    &(100 + i).to_string(),
                ])
                .map(|_| ())
            })?;
            let t0 = Instant::now();
            while tb.counter("ch1", "vp-vm1", "megaflow_install")? == m0 {
                if t0.elapsed() > Duration::from_secs(5) {
                    bail!("megaflow never installed");
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            // Measured by the forwarder: from the frame's arrival on the AF_XDP ring to the
            // megaflow being in the BPF map.
            let us = tb.stats("ch1")?["last_flow_setup_us"]
                .as_f64()
                .unwrap_or(0.0);
            setup.push(us);
        }
        Ok(())
    })();
    for mut c in [tx, rx] {
        let _ = c.kill();
        let _ = c.wait();
    }
    measured?;
    let mut sorted = setup.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let pct = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
    sc.push(Scenario::figure(
        "flow setup",
        format!(
            "first frame of a flow on the AF_XDP ring -> its megaflow in XDP; p50 {:.1} us, p99 {:.1} us over {flows} flows",
            pct(0.5),
            pct(0.99)
        ),
        "us",
        setup,
    ));
    Ok(sc)
}
