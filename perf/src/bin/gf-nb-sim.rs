//! gf-nb-sim: many chassis' control planes in one process against a real NB, to measure how the
//! distributed control plane scales (issue 13). Each simulated chassis runs the real agent
//! (`geneflow_control::agent`: its own NB connection, selective subscription, compiler), with
//! no datapath: what it would hand the forwarder is counted and dropped.
//!
//! The topology: `--tenants` tenants, one switch each; chassis `sim<i>` hosts one port of
//! tenant `i % tenants`, so each tenant is spread over agents/tenants chassis. Each write adds
//! a port to one tenant, bound to a chassis that is not simulated: the agents of that tenant
//! must compile it, the others must not hear of it. Prints one JSON object.

use anyhow::{bail, Context, Result};
use clap::Parser;
use geneflow_control::agent::{self, NbConfig, NbStatus, PipelineUpdate};
use geneflow_control::model::*;
use geneflow_control::nb;
use geneflow_perf::percentile;
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Cli {
    #[arg(long)]
    nb: String,
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    #[arg(long, default_value_t = 100)]
    tenants: usize,
    /// NB writes to time.
    #[arg(long, default_value_t = 30)]
    writes: usize,
    /// Every agent follows every tenant (to measure what selective distribution saves).
    #[arg(long)]
    no_selective: bool,
    /// How long every agent may take to start (and to restart in the storm).
    #[arg(long, default_value_t = 300)]
    sync_secs: u64,
    /// The store's server processes, for their CPU time and memory.
    #[arg(long, value_delimiter = ',')]
    store_pids: Vec<u32>,
}

/// What every simulated agent has handed over so far: pipelines, and when the last came
/// (ns since `epoch`).
struct Published {
    epoch: Instant,
    count: Vec<AtomicU64>,
    last_ns: Vec<AtomicU64>,
}

struct Fleet {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    status: Vec<Arc<Mutex<NbStatus>>>,
    drain: std::thread::JoinHandle<()>,
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("gf-nb-sim: {e:#}");
        std::process::exit(1);
    }
}

/// Writes the topology: the switches and the ghost chassis, then 30 chassis with their ports
/// per write (etcd takes at most 128 operations in a transaction by default).
fn populate(url: &str, agents: usize, tenants: usize) -> Result<()> {
    let mut b = nb::open(url)?;
    nb::update(&mut *b, |d| {
        for t in 0..tenants {
            let name = format!("s{t}");
            let sw = LogicalSwitch::overlay(&name, 1000 + t as u32, &format!("t{t}"));
            d.switches.insert(name, sw);
        }
        d.chassis.insert(
            "ghost".into(),
            Chassis {
                name: "ghost".into(),
                encap_ip: "198.18.255.254".parse().expect("ip"),
                external_ip: None,
                version: 0,
            },
        );
        Ok(())
    })?;
    for chunk in (0..agents).collect::<Vec<_>>().chunks(30) {
        nb::update(&mut *b, |d| {
            add_chassis(d, chunk, tenants);
            Ok(())
        })?;
    }
    Ok(())
}

/// Chassis `sim<i>` for each `i` in `which`, with its port.
fn add_chassis(d: &mut NbDocument, which: &[usize], tenants: usize) {
    for &i in which {
        let name = format!("sim{i}");
        d.chassis.insert(
            name.clone(),
            Chassis {
                name: name.clone(),
                encap_ip: std::net::Ipv4Addr::new(198, 19, (i >> 8) as u8, i as u8),
                external_ip: None,
                version: 0,
            },
        );
        d.ports
            .insert(format!("p{i}"), port(&format!("p{i}"), i, tenants, &name));
    }
}

/// Port `name` of tenant `i % tenants`'s switch, key and MAC from `i`, bound to `chassis`.
fn port(name: &str, i: usize, tenants: usize, chassis: &str) -> LogicalPort {
    LogicalPort {
        name: name.to_string(),
        switch: format!("s{}", i % tenants),
        mac: Mac([0x0a, 0xcc, (i >> 16) as u8, (i >> 8) as u8, i as u8, 1]),
        ips: vec![],
        port_key: (1 + i / tenants) as u16,
        chassis: Some(chassis.to_string()),
        iface: Some(format!("tap{i}")),
        security_groups: vec![],
        port_security: true,
        allowed_address_pairs: vec![],
        version: 0,
    }
}

fn spawn(url: &str, agents: usize, selective: bool, p: &Arc<Published>) -> Result<Fleet> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::with_capacity(agents);
    let mut status = Vec::with_capacity(agents);
    let mut rxs = Vec::with_capacity(agents);
    for i in 0..agents {
        let (tx, rx) = crossbeam_channel::unbounded::<PipelineUpdate>();
        let st = Arc::new(Mutex::new(NbStatus::default()));
        let p = p.clone();
        let wake: agent::Waker = Arc::new(move || {
            p.last_ns[i].store(p.epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
            p.count[i].fetch_add(1, Ordering::Relaxed);
        });
        let cfg = NbConfig {
            url: url.to_string(),
            chassis: format!("sim{i}"),
            reconcile: None,
            selective,
        };
        threads.push(
            agent::spawn(cfg, tx, stop.clone(), st.clone(), wake)
                .with_context(|| format!("agent {i}"))?,
        );
        status.push(st);
        rxs.push(rx);
    }
    // The pipelines themselves are not needed: drop them as they come.
    let s = stop.clone();
    let drain = std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            for rx in &rxs {
                while rx.try_recv().is_ok() {}
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    Ok(Fleet {
        stop,
        threads,
        status,
        drain,
    })
}

impl Fleet {
    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let _ = self.drain.join();
    }

    /// Waits until every agent is connected and has published a pipeline after `from`.
    fn synced(&self, p: &Published, from: &[u64], limit: Duration) -> Result<()> {
        let t = Instant::now();
        loop {
            let done = (0..self.status.len()).all(|i| {
                p.count[i].load(Ordering::Relaxed) > from[i]
                    && self.status[i].lock().map(|s| s.connected).unwrap_or(false)
            });
            if done {
                return Ok(());
            }
            if t.elapsed() > limit {
                bail!("agents not synced within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The store's processes: CPU seconds so far, and resident memory (kB).
fn store_usage(pids: &[u32]) -> (f64, u64) {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let (mut cpu, mut rss) = (0.0, 0);
    for pid in pids {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // Fields after the command (which may hold spaces): utime and stime are the
            // 12th and 13th after the closing parenthesis.
            let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let f: Vec<&str> = rest.split_whitespace().collect();
            let t = |k: usize| f.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            cpu += (t(11) + t(12)) / hz;
        }
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            rss += s
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    (cpu, rss)
}

/// Each agent's notified changes and their bytes so far.
fn received(f: &Fleet) -> Vec<(u64, u64)> {
    f.status
        .iter()
        .map(|s| {
            s.lock()
                .map(|s| (s.events, s.event_bytes))
                .unwrap_or((0, 0))
        })
        .collect()
}

fn counts(p: &Published) -> Vec<u64> {
    p.count.iter().map(|c| c.load(Ordering::Relaxed)).collect()
}

fn run(cli: Cli) -> Result<()> {
    let (n, tenants) = (cli.agents, cli.tenants.max(1));
    if n == 0 || n > 60_000 || n / tenants + 1 >= 10_000 {
        bail!("--agents {n} --tenants {tenants}: want 1..60000 agents and under 10,000 per tenant");
    }
    let t0 = Instant::now();
    populate(&cli.nb, n, tenants)?;
    let populate_s = t0.elapsed().as_secs_f64();
    let new_published = || {
        Arc::new(Published {
            epoch: Instant::now(),
            count: (0..n).map(|_| AtomicU64::new(0)).collect(),
            last_ns: (0..n).map(|_| AtomicU64::new(0)).collect(),
        })
    };
    // Cold start: every agent connects, reads its tenant and compiles.
    let (cpu0, _) = store_usage(&cli.store_pids);
    let p = new_published();
    let ts = Instant::now();
    let fleet = spawn(&cli.nb, n, !cli.no_selective, &p)?;
    fleet.synced(&p, &vec![0; n], Duration::from_secs(cli.sync_secs))?;
    let start_s = ts.elapsed().as_secs_f64();
    let (cpu1, rss_synced) = store_usage(&cli.store_pids);
    // Writes: one port added to tenant w % tenants each, bound to the ghost chassis.
    let mut per_agent_ms = Vec::new();
    let mut all_ms = Vec::new();
    let mut write_ms = Vec::new();
    let mut uninterested = 0u64;
    let mut recipients = Vec::new();
    // What the notifications delivered per change: records, bytes and agents that got any.
    let (mut delivered, mut delivered_bytes, mut receivers) = (Vec::new(), Vec::new(), Vec::new());
    let mut b = nb::open(&cli.nb)?;
    for w in 0..cli.writes {
        let t = w % tenants;
        let before = counts(&p);
        let got_before = received(&fleet);
        let at = p.epoch.elapsed().as_nanos() as u64;
        let tw = Instant::now();
        nb::update(&mut *b, |d| {
            let name = format!("x{w}");
            let mut lp = port(&name, t, tenants, "ghost");
            lp.port_key = 10_000 + w as u16;
            lp.mac = Mac([0x0a, 0xdd, 0, (w >> 8) as u8, w as u8, 2]);
            lp.iface = None;
            d.ports.insert(name, lp);
            Ok(())
        })?;
        write_ms.push(tw.elapsed().as_secs_f64() * 1e3);
        let interested: Vec<usize> = (0..n).filter(|i| i % tenants == t).collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !interested
            .iter()
            .all(|&i| p.count[i].load(Ordering::Relaxed) > before[i])
        {
            if Instant::now() > deadline {
                bail!("write {w}: not every agent of tenant t{t} compiled it within 30 s");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let mut worst = 0f64;
        for &i in &interested {
            let ms = p.last_ns[i].load(Ordering::Relaxed).saturating_sub(at) as f64 / 1e6;
            per_agent_ms.push(ms);
            worst = worst.max(ms);
        }
        all_ms.push(worst);
        // Anything else that moves in the next 100 ms heard of a tenant it does not serve.
        // (A second when every agent hears everything: a thousand of them take a while.)
        std::thread::sleep(Duration::from_millis(if cli.no_selective {
            1000
        } else {
            100
        }));
        let after = counts(&p);
        uninterested += (0..n)
            .filter(|i| i % tenants != t && after[*i] > before[*i])
            .count() as u64;
        recipients.push(interested.len() as f64);
        let got = received(&fleet);
        let moved = got.iter().zip(&got_before).filter(|(a, b)| a.0 > b.0);
        receivers.push(moved.clone().count() as f64);
        delivered.push(moved.clone().map(|(a, b)| (a.0 - b.0) as f64).sum::<f64>());
        delivered_bytes.push(moved.map(|(a, b)| (a.1 - b.1) as f64).sum::<f64>());
    }
    let (cpu2, _) = store_usage(&cli.store_pids);
    // The resync storm: every agent restarts at the same moment.
    fleet.stop();
    let p2 = new_published();
    let ts = Instant::now();
    let fleet = spawn(&cli.nb, n, !cli.no_selective, &p2)?;
    fleet.synced(&p2, &vec![0; n], Duration::from_secs(cli.sync_secs))?;
    let storm_s = ts.elapsed().as_secs_f64();
    let (cpu3, rss_end) = store_usage(&cli.store_pids);
    fleet.stop();
    let pct = |v: &[f64], q: f64| percentile(&mut v.to_vec(), q);
    println!(
        "{}",
        json!({
            "backend": b.kind(),
            "agents": n,
            "tenants": tenants,
            "agents_per_tenant": n / tenants,
            "populate_s": populate_s,
            "cold_start_s": start_s,
            "writes": cli.writes,
            "write_ms_p50": pct(&write_ms, 0.5),
            "to_agent_ms_p50": pct(&per_agent_ms, 0.5),
            "to_agent_ms_p99": pct(&per_agent_ms, 0.99),
            "to_all_interested_ms_p50": pct(&all_ms, 0.5),
            "to_all_interested_ms_p99": pct(&all_ms, 0.99),
            "to_all_interested_ms_max": all_ms.iter().cloned().fold(0.0, f64::max),
            "compiling_agents_per_change": pct(&recipients, 0.5),
            "uninterested_agents_that_compiled": uninterested,
            "selective": !cli.no_selective,
            "receiving_agents_per_change": pct(&receivers, 0.5),
            "records_delivered_per_change": pct(&delivered, 0.5),
            "bytes_delivered_per_change": pct(&delivered_bytes, 0.5),
            "resync_storm_s": storm_s,
            "store_cpu_s_cold_start": cpu1 - cpu0,
            "store_cpu_s_writes": cpu2 - cpu1,
            "store_cpu_s_storm": cpu3 - cpu2,
            "store_rss_kb_synced": rss_synced,
            "store_rss_kb_end": rss_end,
        })
    );
    Ok(())
}
