//! `cargo xtask bench-nb --agents N`: N simulated chassis control planes (`gf-nb-sim`: the real
//! agent, its own NB connection, selective subscription and compiler, no datapath) against each
//! NB backend started by the harness, spread over `tenants` tenants; then again without
//! selective distribution on the networked backends, for what it saves.

use crate::testbed::{run, NbKind, Testbed};
use anyhow::{Context, Result};
use serde_json::Value;
use std::process::Command;

/// The runs: every backend with selective distribution, then etcd, Redis and etcd with
/// ZeroMQ publishers without it.
const RUNS: &[(NbKind, bool)] = &[
    (NbKind::File, true),
    (NbKind::Etcd(1), true),
    (NbKind::Redis, true),
    (NbKind::RedisCluster, true),
    (NbKind::EtcdZmq(1), true),
    (NbKind::Etcd(1), false),
    (NbKind::Redis, false),
    (NbKind::EtcdZmq(1), false),
];

/// One `gf-nb-sim` run per entry of `RUNS`; each result is its JSON object.
pub fn scale(agents: usize, tenants: usize, writes: usize) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for &(kind, selective) in RUNS {
        eprintln!("==> {agents} agents, {tenants} tenants on {kind:?}, selective {selective}");
        let tb = Testbed::with_nb("bsc", kind)?;
        let pids: Vec<String> = tb.server_pids().iter().map(|p| p.to_string()).collect();
        let sim = tb.bin("gf-nb-sim");
        let mut c = match &tb.db_ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, &sim]);
                c
            }
            None => Command::new(&sim),
        };
        c.args(["--nb", &tb.nb])
            .args(["--agents", &agents.to_string()])
            .args(["--tenants", &tenants.to_string()])
            .args(["--writes", &writes.to_string()]);
        if !selective {
            c.arg("--no-selective");
        }
        if !pids.is_empty() {
            c.args(["--store-pids", &pids.join(",")]);
        }
        if !selective {
            // Without selective distribution a store may never serve every agent: that is
            // a result, reported, not a reason to lose the other runs.
            c.args(["--sync-secs", "120"]);
        }
        match run(&mut c) {
            Ok(line) => out.push(serde_json::from_str(line.trim()).context("gf-nb-sim output")?),
            Err(e) => {
                eprintln!("==> {kind:?}, selective {selective}: {e:#}");
                let why = format!("{e:#}");
                out.push(serde_json::json!({
                    "backend": backend_name(kind),
                    "selective": selective,
                    "agents": agents,
                    "tenants": tenants,
                    // The simulator's own words, after the command line.
                    "error": why.rsplit("gf-nb-sim: ").next().unwrap_or(&why).trim(),
                }));
            }
        }
    }
    Ok(out)
}

/// The name `gf-nb-sim` reports for a backend.
fn backend_name(kind: NbKind) -> &'static str {
    match kind {
        NbKind::File => "file",
        NbKind::Etcd(_) => "etcd",
        NbKind::Redis => "redis",
        NbKind::RedisCluster => "redis-cluster",
        NbKind::EtcdZmq(_) => "etcd+zmq",
    }
}

/// A run's name: its backend, marked when it ran without selective distribution.
fn name(r: &Value) -> String {
    let b = r["backend"].as_str().unwrap_or("?");
    if r["selective"] == false {
        format!("{b}, no selective")
    } else {
        b.to_string()
    }
}

/// The Markdown table of `scale`'s results.
pub fn table(results: &[Value]) -> String {
    let mut md = String::from(
        "| backend | agents / tenants | cold start | write p50 | to an agent p50 / p99 | to all of a tenant's agents p50 / p99 / max | agents compiling a change / others | delivered per change: agents / records / KB | resync storm | store CPU: start / writes / storm | store RSS |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        if let Some(e) = r["error"].as_str() {
            md.push_str(&format!(
                "| {} | {} / {} | failed: {} |||||||||\n",
                name(r),
                r["agents"],
                r["tenants"],
                e.replace('|', "/")
            ));
            continue;
        }
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        md.push_str(&format!(
            "| {} | {} / {} | {:.2} s | {:.1} ms | {:.1} / {:.1} ms | {:.1} / {:.1} / {:.1} ms | {:.0} / {} | {:.0} / {:.0} / {:.1} | {:.2} s | {:.2} / {:.2} / {:.2} s | {:.1} MB |\n",
            name(r),
            r["agents"],
            r["tenants"],
            f("cold_start_s"),
            f("write_ms_p50"),
            f("to_agent_ms_p50"),
            f("to_agent_ms_p99"),
            f("to_all_interested_ms_p50"),
            f("to_all_interested_ms_p99"),
            f("to_all_interested_ms_max"),
            f("compiling_agents_per_change"),
            r["uninterested_agents_that_compiled"],
            f("receiving_agents_per_change"),
            f("records_delivered_per_change"),
            f("bytes_delivered_per_change") / 1024.0,
            f("resync_storm_s"),
            f("store_cpu_s_cold_start"),
            f("store_cpu_s_writes"),
            f("store_cpu_s_storm"),
            f("store_rss_kb_end") / 1024.0,
        ));
    }
    md
}

/// Two panels of horizontal bars, one row per run: the time from a write to every agent of
/// its tenant having compiled it (p50 and p99, log scale: the file store is 1000 times
/// slower), and the records the notifications delivered per change.
pub fn svg(results: &[Value]) -> String {
    let (lh, left, width) = (22.0, 230.0, 420.0);
    let panel = 30.0 + lh * results.len() as f64;
    let h = 2.0 * panel + 30.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{:.0}\" height=\"{h:.0}\" font-family=\"sans-serif\" font-size=\"12\">\n",
        left + width + 90.0
    );
    let agents = results
        .first()
        .map(|r| r["agents"].clone())
        .unwrap_or_default();
    // Panel 1: latency, log10 from 1 ms to 10 s.
    out.push_str(&format!(
        "<text x=\"10\" y=\"18\" font-size=\"14\">{agents} agents: NB write to all of a tenant's agents compiled, ms (p50 dark, p99 light; log scale)</text>\n"
    ));
    let x = |ms: f64| left + width * (ms.max(1.0).log10() / 4.0).min(1.0);
    for decade in 0..=4 {
        let xv = left + width * decade as f64 / 4.0;
        out.push_str(&format!(
            "<line x1=\"{xv:.0}\" y1=\"24\" x2=\"{xv:.0}\" y2=\"{:.0}\" stroke=\"#ddd\"/><text x=\"{xv:.0}\" y=\"{:.0}\" fill=\"#888\" text-anchor=\"middle\">{}</text>\n",
            panel,
            panel + 12.0,
            10f64.powi(decade)
        ));
    }
    for (i, r) in results.iter().enumerate() {
        let y = 28.0 + lh * i as f64;
        if r["error"].is_string() {
            out.push_str(&failed_row(r, left, y, "failed: agents not all served"));
            continue;
        }
        let p50 = r["to_all_interested_ms_p50"].as_f64().unwrap_or(0.0);
        let p99 = r["to_all_interested_ms_p99"].as_f64().unwrap_or(0.0);
        out.push_str(&format!(
            "<text x=\"10\" y=\"{:.0}\">{}</text><rect x=\"{left}\" y=\"{y:.0}\" width=\"{:.1}\" height=\"16\" fill=\"#a9c4ee\"/><rect x=\"{left}\" y=\"{y:.0}\" width=\"{:.1}\" height=\"16\" fill=\"#3a7bd5\"/><text x=\"{:.0}\" y=\"{:.0}\">{p50:.1} / {p99:.1}</text>\n",
            y + 12.0,
            name(r),
            x(p99) - left,
            x(p50) - left,
            x(p99) + 4.0,
            y + 12.0
        ));
    }
    // Panel 2: records delivered per change, linear.
    let top = panel + 30.0;
    let max = results
        .iter()
        .filter_map(|r| r["records_delivered_per_change"].as_f64())
        .fold(1.0, f64::max);
    out.push_str(&format!(
        "<text x=\"10\" y=\"{:.0}\" font-size=\"14\">records the notifications delivered per change (over all agents)</text>\n",
        top - 6.0
    ));
    for (i, r) in results.iter().enumerate() {
        let y = top + lh * i as f64;
        if r["error"].is_string() {
            out.push_str(&failed_row(r, left, y, "failed"));
            continue;
        }
        let v = r["records_delivered_per_change"].as_f64().unwrap_or(0.0);
        let bw = width * v / max;
        out.push_str(&format!(
            "<text x=\"10\" y=\"{:.0}\">{}</text><rect x=\"{left}\" y=\"{y:.0}\" width=\"{bw:.1}\" height=\"16\" fill=\"{}\"/><text x=\"{:.0}\" y=\"{:.0}\">{v:.0}</text>\n",
            y + 12.0,
            name(r),
            if r["selective"] == false { "#d5893a" } else { "#3a7bd5" },
            left + bw + 4.0,
            y + 12.0
        ));
    }
    out.push_str("</svg>\n");
    out
}

/// A chart row for a run that failed: its name and `what`, in red.
fn failed_row(r: &Value, left: f64, y: f64, what: &str) -> String {
    format!(
        "<text x=\"10\" y=\"{:.0}\">{}</text><text x=\"{left}\" y=\"{:.0}\" fill=\"#d53a3a\">{what}</text>\n",
        y + 12.0,
        name(r),
        y + 12.0
    )
}
