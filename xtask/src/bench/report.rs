//! The report: Markdown table, raw JSON, SVG chart, and the completeness check.

use super::{Opts, Scenario, GENERATOR, GENERATOR_BOUND, MINIMAL, SCALING_CORES};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

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
        // What the testbeds are made of (xtask/src/testbed.rs): the same in every scenario.
        "nic_driver": "veth",
        "xdp_mode": "native (driver)",
        "af_xdp": "copy mode",
    })
}

pub(super) fn report(sc: &[Scenario], o: &Opts, took: Duration) -> Result<()> {
    // The median of the scenario measured with as many cores as `s` whose 1-core name is
    // `name` (0 if none).
    let of_cores = |name: &str, s: &Scenario| -> f64 {
        sc.iter()
            .find(|x| x.cores == s.cores && x.one_core_name() == name && x.error.is_none())
            .map(|x| x.median())
            .unwrap_or(0.0)
    };
    let base_of = |s: &Scenario| of_cores("baseline", s);
    let ceiling_of = |s: &Scenario| of_cores(GENERATOR, s);
    let ceiling = sc
        .iter()
        .find(|s| s.name == GENERATOR)
        .map(|s| s.median())
        .unwrap_or(0.0);
    // The share of the generator's ceiling (of as many cores) a packet-rate scenario
    // reached, if it has one.
    let share = |s: &Scenario| -> Option<f64> {
        let c = ceiling_of(s);
        (s.unit == "Mpps"
            && s.one_core_name() != GENERATOR
            && s.name != MINIMAL
            && c > 0.0
            && s.error.is_none())
        .then(|| s.median() / c)
    };
    // The scenario `s` is compared with: its 1-core figure if it ran on more cores.
    let compared = |s: &Scenario| -> Option<&Scenario> {
        if s.cores > 1 {
            let n = s.one_core_name();
            sc.iter().find(|x| x.name == n)
        } else {
            s.vs.and_then(|n| sc.iter().find(|x| x.name == n))
        }
    };
    let minimal = sc
        .iter()
        .find(|s| s.name == MINIMAL)
        .map(|s| s.median())
        .unwrap_or(0.0);
    let m = machine();
    let mut md = String::new();
    md.push_str(&format!(
        "# geneflow datapath benchmark\n\nMachine: {} cores, {}, kernel {}; interfaces: {} pairs in network namespaces, XDP {}, AF_XDP {}. {} run(s) per scenario, median shown. Took {:.0} s.\n\n",
        m["cores"], m["cpu"].as_str().unwrap_or(""), m["kernel"].as_str().unwrap_or(""),
        m["nic_driver"].as_str().unwrap_or(""), m["xdp_mode"].as_str().unwrap_or(""),
        m["af_xdp"].as_str().unwrap_or(""),
        if o.quick { 1 } else { 3 }, took.as_secs_f64()
    ));
    md.push_str(&format!(
        "A packet rate at {GENERATOR_BOUND}x or more of the generator's own ceiling ({ceiling:.3} Mpps, measured in this run) is marked generator-bound: it shows the generator's limit, not the datapath's. That ceiling is {:.2}x of what the minimal live-frames generator (no per-frame work) reaches into the same sink ({minimal:.3} Mpps). XDP ns/pkt is the geneflow program's run time per packet from bpf_stats, read over extra windows after the rates (the statistics would slow the generator); the sum over both chassis end to end; the accounting's own clock reads are included.\n\n",
        if minimal > 0.0 { ceiling / minimal } else { 0.0 }
    ));
    md.push_str(&format!(
        "Scenarios marked \", {SCALING_CORES} cores\" run {SCALING_CORES} generators, one pinned to each core, on the same 2-queue veths: a veth hands what a CPU sends to the peer queue of that number, whose XDP runs on that CPU, so each core carries its own share of the path. They are set against the generator ceiling and the baseline measured the same way and compared with their 1-core figure; their XDP ns/pkt is the 1-core one.\n\n"
    ));
    md.push_str("| scenario | median | min-max | of generator ceiling | ratio to baseline | compared with | XDP ns/pkt | what |\n|---|---|---|---|---|---|---|---|\n");
    for s in sc {
        if let Some(e) = &s.error {
            md.push_str(&format!(
                "| {} | not measured | - | - | - | - | - | {}: {} |\n",
                s.name,
                s.what,
                e.replace('|', "/")
            ));
            continue;
        }
        let ratio = if s.vs_baseline && base_of(s) > 0.0 {
            format!("{:.2}", s.median() / base_of(s))
        } else {
            "-".into()
        };
        let ovs = match compared(s) {
            Some(x) if x.median() > 0.0 => format!("{:.2}x {}", s.median() / x.median(), x.name),
            Some(x) => format!("{} not measured", x.name),
            None => "-".into(),
        };
        let ns = s
            .xdp_ns_median()
            .map(|n| format!("{n:.0}"))
            .unwrap_or_else(|| "-".into());
        let gen = match share(s) {
            Some(x) if x >= GENERATOR_BOUND => format!("{x:.2} **generator-bound**"),
            Some(x) => format!("{x:.2}"),
            None => "-".into(),
        };
        md.push_str(&format!(
            "| {} | {:.3} {} | {:.3}-{:.3} | {} | {} | {} | {} | {} |\n",
            s.name,
            s.median(),
            s.unit,
            s.min(),
            s.max(),
            gen,
            ratio,
            ovs,
            ns,
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
            "cores": s.cores,
            "ratio_to_baseline": if s.vs_baseline && base_of(s) > 0.0 { json!(s.median() / base_of(s)) } else { Value::Null },
            "xdp_ns_per_packet": s.xdp_ns, "xdp_ns_per_packet_median": s.xdp_ns_median(),
            "of_generator_ceiling": share(s),
            "generator_bound": share(s).map(|x| x >= GENERATOR_BOUND),
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
    // The generator's ceilings (1 core, and as many as the scaling scenarios use) as lines
    // across the chart: a bar of as many cores that reaches its line measured the generator.
    for (k, g) in rows
        .iter()
        .filter(|s| s.one_core_name() == GENERATOR && s.error.is_none())
        .enumerate()
    {
        let x = 200.0 + (w - 330.0) * g.median() / max;
        out.push_str(&format!(
            "<line x1=\"{x:.1}\" y1=\"28\" x2=\"{x:.1}\" y2=\"{:.0}\" stroke=\"#d53a3a\" stroke-dasharray=\"4 3\"/><text x=\"{:.1}\" y=\"{:.0}\" fill=\"#d53a3a\">{}</text>\n",
            h - 4.0,
            x + 4.0,
            h - 6.0 - 14.0 * k as f64,
            g.name
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
    super::GENERATOR,
    super::MINIMAL,
    "baseline",
    "encap 1 flow",
    "encap 1000 flows",
    "decap 1 flow",
    "decap 1000 flows",
    "routed 1000 flows",
    super::sg::NAME,
    super::sg::SYN_PLAIN,
    super::sg::SYN,
    super::fip::NAME,
    super::dhcp::ANSWERS,
    super::dhcp::STORM,
    "end to end UDP 64B",
    "generator ceiling, 2 cores",
    "baseline, 2 cores",
    "encap 1000 flows, 2 cores",
    "decap 1000 flows, 2 cores",
    "end to end UDP 64B, 2 cores",
    "end to end TCP (iperf3)",
    "slow path (AF_XDP)",
    "flow setup",
    "OVS system end to end UDP 64B",
    "OVS system end to end TCP (iperf3)",
    "OVS afxdp end to end UDP 64B",
    "OVS afxdp end to end TCP (iperf3)",
];

/// Required of full runs only: quick runs measure encap and decap at 1000 flows.
const FULL_ONLY: &[&str] = &["encap 1 flow", "decap 1 flow"];

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
    let quick = v["quick"].as_bool().unwrap_or(false);
    for name in REQUIRED
        .iter()
        .filter(|n| !(quick && FULL_ONLY.contains(n)))
    {
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
