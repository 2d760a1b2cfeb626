//! gf-nb-bench: control-plane benchmarks.
//! - `compile`: validation + compile time for N ports on M switches, full vs incremental
//!   (one port changed); the full compile is the baseline of the ratio.
//! - `latency`: time from an NB write (in-process, through the backend) to the agent having
//!   applied the new pipeline to its fast path (its `pipelines_applied` counter moves). The
//!   write adds or removes a port (`--change port`) or a static route of `--router`
//!   (`--change route`).

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use geneflow_control::compiler::Compiler;
use geneflow_control::model::*;
use geneflow_control::nb;
use geneflow_perf::percentile;
use serde_json::json;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Compile {
        #[arg(long, default_value_t = 10_000)]
        ports: usize,
        #[arg(long, default_value_t = 100)]
        switches: usize,
        #[arg(long, default_value_t = 15)]
        runs: usize,
    },
    Latency {
        #[arg(long)]
        nb: String,
        #[arg(long)]
        ctl: String,
        /// Switch hosted by the agent; ports are added to it, bound to `--remote`.
        #[arg(long)]
        switch: String,
        #[arg(long)]
        remote: String,
        #[arg(long, default_value_t = 40)]
        samples: usize,
        /// What each write changes.
        #[arg(long, value_enum, default_value_t = Change::Port)]
        change: Change,
        /// Router whose static routes `--change route` adds and removes.
        #[arg(long, default_value = "r1")]
        router: String,
        /// Next hop of those routes (must be on one of the router's subnets).
        #[arg(long, default_value = "10.0.0.50")]
        nexthop: std::net::Ipv4Addr,
    },
    /// Adds `--ports` ports to `--switch` in one NB write, bound to `--remote`: port i has
    /// MAC 0a:ee:00:00 followed by i in 16 bits and key 100 + i (the memory benchmark's).
    Populate {
        #[arg(long)]
        nb: String,
        #[arg(long)]
        switch: String,
        #[arg(long)]
        remote: String,
        #[arg(long, default_value_t = 10_000)]
        ports: u16,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Change {
    Port,
    Route,
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("gf-nb-bench: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Compile {
            ports,
            switches,
            runs,
        } => compile(ports, switches, runs),
        Cmd::Latency {
            nb,
            ctl,
            switch,
            remote,
            samples,
            change,
            router,
            nexthop,
        } => {
            let change = match change {
                Change::Port => NbWrite::Port { switch, remote },
                Change::Route => NbWrite::Route { router, nexthop },
            };
            latency(&nb, &ctl, &change, samples)
        }
        Cmd::Populate {
            nb: url,
            switch,
            remote,
            ports,
        } => {
            if ports > 30_000 {
                bail!("--ports {ports}: at most 30,000 (port keys are 15 bits)");
            }
            let mut b = nb::open(&url)?;
            nb::update(&mut *b, |d| {
                for i in 0..ports {
                    let mac = Mac([0x0a, 0xee, 0, 0, (i >> 8) as u8, i as u8]);
                    add_port(d, &format!("m{i}"), &switch, mac, 100 + i, &remote, None, 0);
                }
                Ok(())
            })?;
            Ok(())
        }
    }
}

fn topo(ports: usize, switches: usize) -> NbDocument {
    let mut d = NbDocument::default();
    for c in 0..4 {
        let name = format!("ch{c}");
        d.chassis.insert(
            name.clone(),
            Chassis {
                name,
                encap_ip: format!("198.18.0.{}", c + 1).parse().expect("ip"),
                external_ip: None,
                version: 1,
            },
        );
    }
    for s in 0..switches {
        let name = format!("ls{s}");
        let sw = LogicalSwitch::overlay(&name, s as u32 + 1, &format!("t{}", s % 10));
        d.switches.insert(name, LogicalSwitch { version: 1, ..sw });
    }
    for p in 0..ports {
        let name = format!("p{p}");
        let sw = p % switches;
        let key = (p / switches + 1) as u16;
        let mac = Mac([
            0x0a,
            (p >> 24) as u8,
            (p >> 16) as u8,
            (p >> 8) as u8,
            p as u8,
            1,
        ]);
        let chassis = format!("ch{}", (p / switches) % 4);
        let iface = Some(format!("tap{p}"));
        add_port(
            &mut d,
            &name,
            &format!("ls{sw}"),
            mac,
            key,
            &chassis,
            iface,
            1,
        );
    }
    d
}

/// Adds a port with port security and no addresses, bound to `chassis`.
#[allow(clippy::too_many_arguments)]
fn add_port(
    d: &mut NbDocument,
    name: &str,
    switch: &str,
    mac: Mac,
    port_key: u16,
    chassis: &str,
    iface: Option<String>,
    version: u64,
) {
    d.ports.insert(
        name.to_string(),
        LogicalPort {
            name: name.to_string(),
            switch: switch.to_string(),
            mac,
            ips: vec![],
            port_key,
            chassis: Some(chassis.to_string()),
            iface,
            security_groups: vec![],
            port_security: true,
            allowed_address_pairs: vec![],
            version,
        },
    );
}

fn compile(ports: usize, switches: usize, runs: usize) -> Result<()> {
    let doc = topo(ports, switches);
    let (mut validate, mut full, mut incr) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let t = Instant::now();
        let v = doc.validated();
        validate.push(t.elapsed().as_secs_f64() * 1e3);
        if !v.rejected.is_empty() {
            bail!("generated topology invalid: {}", v.rejected[0]);
        }
        let mut c = Compiler::new("ch0");
        let t = Instant::now();
        let changed = c.update(&v.doc, None);
        full.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(changed.len(), switches);
        // One port changes MAC: only its switch is recompiled.
        let mut d2 = v.doc.clone();
        let p = d2.ports.get_mut(&format!("p{}", i % ports)).expect("port");
        p.mac.0[5] = 0x77;
        let dirty = BTreeSet::from([p.switch.clone()]);
        let t = Instant::now();
        let changed = c.update(&d2, Some(&dirty));
        incr.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(changed.len(), 1);
    }
    let (v50, f50, i50) = (
        percentile(&mut validate, 0.5),
        percentile(&mut full, 0.5),
        percentile(&mut incr, 0.5),
    );
    println!(
        "{}",
        json!({
            "ports": ports, "switches": switches, "runs": runs,
            "validate_ms_p50": v50, "full_compile_ms_p50": f50,
            "incremental_compile_ms_p50": i50, "incremental_over_full": i50 / f50,
        })
    );
    Ok(())
}

fn applied(ctl: &str) -> Result<u64> {
    let mut s = UnixStream::connect(ctl).with_context(|| format!("agent at {ctl}"))?;
    s.write_all(b"stats\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(&line)?;
    v["pipelines_applied"]
        .as_u64()
        .context("agent reports no pipelines_applied")
}

/// What a latency sample writes.
enum NbWrite {
    /// A port on `switch` bound to chassis `remote`, added then removed.
    Port { switch: String, remote: String },
    /// A static route of `router` via `nexthop`, added then removed.
    Route {
        router: String,
        nexthop: std::net::Ipv4Addr,
    },
}

impl NbWrite {
    /// Sample `i`: the odd pairs remove what the even pairs added (two objects alternate).
    fn apply(&self, d: &mut NbDocument, i: usize) {
        let add = i % 4 < 2;
        match self {
            NbWrite::Port { switch, remote } => {
                let name = format!("bench{}", i % 2);
                if !add {
                    d.ports.remove(&name);
                    return;
                }
                let mac = Mac([0x0a, 0xbe, 0, 0, 0, (i % 2) as u8 + 1]);
                add_port(
                    d,
                    &name,
                    switch,
                    mac,
                    30000 + (i % 2) as u16,
                    remote,
                    None,
                    0,
                );
            }
            NbWrite::Route { router, nexthop } => {
                let prefix = Ipv4Net {
                    addr: std::net::Ipv4Addr::new(10, 99, (i % 2) as u8, 0),
                    len: 24,
                };
                let r = Route::new(router, prefix, *nexthop);
                if add {
                    d.routes.insert(r.name.clone(), r);
                } else {
                    d.routes.remove(&r.name);
                }
            }
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            NbWrite::Port { .. } => "port",
            NbWrite::Route { .. } => "route",
        }
    }
}

fn latency(url: &str, ctl: &str, change: &NbWrite, samples: usize) -> Result<()> {
    let mut b = nb::open(url)?;
    let mut lat = Vec::new();
    let mut write_ms = Vec::new();
    for i in 0..samples {
        let before = applied(ctl)?;
        let t0 = Instant::now();
        nb::update(&mut *b, |d| {
            change.apply(d, i);
            Ok(())
        })?;
        write_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        let deadline = Instant::now() + Duration::from_secs(10);
        while applied(ctl)? == before {
            if Instant::now() > deadline {
                bail!("sample {i}: the agent never applied the change");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        lat.push(t0.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "{}",
        json!({
            "backend": b.kind(), "change": change.kind(), "samples": samples,
            "write_ms_p50": percentile(&mut write_ms, 0.5),
            "to_fastpath_ms_p50": percentile(&mut lat.clone(), 0.5),
            "to_fastpath_ms_p99": percentile(&mut lat, 0.99),
        })
    );
    Ok(())
}
