//! `cargo xtask bench-nb --agents N`: N simulated chassis control planes (`gf-nb-sim`: the real
//! agent, its own NB connection, selective subscription and compiler, no datapath) against each
//! NB backend started by the harness, spread over `tenants` tenants.

use crate::testbed::{run, NbKind, Testbed};
use anyhow::{Context, Result};
use serde_json::Value;
use std::process::Command;

/// One `gf-nb-sim` run per backend; each result is its JSON object.
pub fn scale(agents: usize, tenants: usize, writes: usize) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for kind in [
        NbKind::File,
        NbKind::Etcd(1),
        NbKind::Redis,
        NbKind::RedisCluster,
    ] {
        eprintln!("==> {agents} agents, {tenants} tenants on {kind:?}");
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
        if !pids.is_empty() {
            c.args(["--store-pids", &pids.join(",")]);
        }
        let line = run(&mut c).with_context(|| format!("gf-nb-sim on {kind:?}"))?;
        out.push(serde_json::from_str(line.trim()).context("gf-nb-sim output")?);
    }
    Ok(out)
}

/// The Markdown table of `scale`'s results.
pub fn table(results: &[Value]) -> String {
    let mut md = String::from(
        "| backend | agents / tenants | cold start | write p50 | to an agent p50 / p99 | to all of a tenant's agents p50 / p99 / max | agents compiling a change | others that did | resync storm | store CPU: start / writes / storm | store RSS |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        md.push_str(&format!(
            "| {} | {} / {} | {:.2} s | {:.1} ms | {:.1} / {:.1} ms | {:.1} / {:.1} / {:.1} ms | {:.0} | {} | {:.2} s | {:.2} / {:.2} / {:.2} s | {:.1} MB |\n",
            r["backend"].as_str().unwrap_or("?"),
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
            f("resync_storm_s"),
            f("store_cpu_s_cold_start"),
            f("store_cpu_s_writes"),
            f("store_cpu_s_storm"),
            f("store_rss_kb_end") / 1024.0,
        ));
    }
    md
}
