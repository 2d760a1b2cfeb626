//! Flow setups per second: how fast new flows reach the fast path when they come in a crowd.
//! Each frame needs a megaflow of its own: two VMs of one chassis send frames to the MACs of
//! 10,000 remote ports of their switch, one generator per core, every (VM, MAC) pair a flow
//! for the slow path to decide and install. Once into one slow-path thread, once into one
//! per core (`--forwarder-cores`), where each thread installs what it decides itself.
//!
//! A window makes every megaflow stale (an NB change to the switch), waits for the sweep to
//! delete them, starts the generators, and times the installs from the 2,000th to the
//! 18,000th (`geneflowctl stats`, polled): neither the generators' start-up nor the last
//! flows, whose frames come seldom once most are in the fast path, are in the figure.

use super::{Ctx, Scenario, SCALING_CORES};
use crate::testbed::{run, Testbed};
use anyhow::{bail, Context, Result};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub(super) const NAME: &str = "flow setups";
const PORTS: u32 = 10_000;
const VMS: u32 = 2;

/// ch1 with vm1 and vm2 on 2-queue veths, 10,000 ports of their switch on a remote chassis
/// (its underlay neighbour pinned), the agent started with `agent_args`.
fn testbed(agent_args: &[&str]) -> Result<Testbed> {
    let mut tb = Testbed::new("bfs")?;
    tb.queues = SCALING_CORES;
    tb.add_chassis("ch1")?;
    tb.nbctl(&["chassis-add", "chr", "198.18.0.99"])?;
    tb.nbctl(&["ls-add", "ls1", "--key", "1000"])?;
    for i in 1..=VMS {
        tb.add_vm(&format!("vm{i}"), "ch1", "ls1", i as u16)?;
    }
    tb.chassis[0].agent_args = agent_args.iter().map(|a| a.to_string()).collect();
    tb.start_agents()?;
    super::pin_neighbour(&tb.chassis[0].ns, "198.18.0.99", "02:00:00:00:00:99")?;
    let nb = tb.nb.clone();
    let bench = tb.bin("gf-nb-bench");
    let ports = PORTS.to_string();
    let applied = tb.applied_after("ch1", Duration::from_secs(20), || {
        run(Command::new(&bench)
            .args(["populate", "--nb", &nb, "--switch", "ls1"])
            .args(["--remote", "chr", "--ports", &ports]))
        .map(|_| ())
    })?;
    if !applied {
        bail!("the agent never applied the 10,000 ports");
    }
    Ok(tb)
}

/// Megaflows ch1 has installed (all ports), and how many are live.
fn installs(tb: &Testbed) -> Result<(u64, u64)> {
    let s = tb.stats("ch1")?;
    let n = s["ports"]
        .as_array()
        .context("no ports")?
        .iter()
        .filter_map(|p| p["counters"]["megaflow_install"].as_u64())
        .sum();
    Ok((n, s["megaflows"].as_u64().unwrap_or(0)))
}

/// One window: thousands of flow setups per second.
fn window(ctx: &Ctx, tb: &Testbed, round: u32) -> Result<f64> {
    let dummy = format!("0a:00:00:fd:{:02x}:{:02x}", round >> 8, round & 0xff);
    let applied = tb.applied_after("ch1", Duration::from_secs(10), || {
        let key = (30_000 + round).to_string();
        tb.nbctl(&[
            "lsp-add",
            "ls1",
            &format!("fs{round}"),
            &dummy,
            "--key",
            &key,
        ])
        .map(|_| ())
    })?;
    if !applied {
        bail!("the NB change never reached ch1");
    }
    // The sweep (once a second) deletes the stale entries.
    let t = Instant::now();
    while installs(tb)?.1 > 10 {
        if t.elapsed() > Duration::from_secs(5) {
            bail!("the stale megaflows were not swept");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (n0, _) = installs(tb)?;
    let want = (PORTS * VMS) as u64;
    let kids = (1..=VMS)
        .map(|i| {
            let vm = tb.vm(&format!("vm{i}"))?;
            // vm1 on core 0, vm2 on core 1: each sends on the queue of its core, flat out
            // (millions of frames a second, far more new flows than the slow path sets up;
            // a paced generator makes a call per few thousand frames, each waiting for an
            // RCU grace period, and measured 15-16k flows/s: its own limit).
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &vm.ns,
                    "taskset",
                    "-c",
                    &(i - 1).to_string(),
                ])
                .args([&ctx.pktgen(), "send", "--quiet", "--iface", "eth0"])
                .args(["--src-mac", &vm.mac, "--src-ip", &vm.ip])
                .args(["--dst-mac", "0a:ee:00:00:00:00", "--dst-ip", "10.0.200.1"])
                .args(["--vary", "dst-mac", "--flows", &PORTS.to_string()])
                .args(["--duration", "3"])
                .stdout(Stdio::null())
                .spawn()
                .context("starting geneflow-pktgen")
        })
        .collect::<Result<Vec<_>>>()?;
    let mut first: Option<(Instant, u64)> = None;
    let mut last = None;
    let t = Instant::now();
    let mut n = n0;
    while t.elapsed() < Duration::from_secs(3) {
        n = installs(tb)?.0;
        let now = Instant::now();
        if n - n0 >= want / 10 && first.is_none() {
            first = Some((now, n));
        }
        if n - n0 >= want * 9 / 10 {
            last = Some((now, n));
            break;
        }
        // Each poll runs geneflowctl: often enough for a figure within a few per cent,
        // seldom enough not to take the cores from what it measures.
        std::thread::sleep(Duration::from_millis(10));
    }
    for mut k in kids {
        let _ = k.kill();
        let _ = k.wait();
    }
    let ((t1, a), (t2, b)) = first
        .zip(last)
        .with_context(|| format!("{} of {want} megaflows installed within 3 s", n - n0))?;
    Ok((b - a) as f64 / (t2 - t1).as_secs_f64() / 1e3)
}

/// One slow-path thread, then one per core; each with one generator per core.
pub(super) fn all(ctx: &Ctx) -> Vec<Scenario> {
    let cores = (0..SCALING_CORES)
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let runs = [
        (format!("{NAME}, 1 thread"), vec![], 1),
        (
            format!("{NAME}, {SCALING_CORES} threads"),
            vec!["--forwarder-cores", cores.as_str()],
            SCALING_CORES,
        ),
    ];
    let mut sc = Vec::new();
    for (name, agent_args, threads) in runs {
        eprintln!("==> {name}: 20,000 new flows from 2 VMs, one generator per core");
        let measured = testbed(&agent_args).and_then(|tb| {
            let s = (0..ctx.reps)
                .map(|r| window(ctx, &tb, r as u32))
                .collect::<Result<Vec<_>>>()?;
            let per = tb.stats("ch1")?["slow_path_thread_installs"].clone();
            eprintln!("    ({s:?} k/s; megaflows each thread installed itself: {per})");
            Ok(s)
        });
        sc.push(match measured {
            Ok(samples) => Scenario::figure(
                &name,
                format!(
                    "2 VMs -> 10,000 remote MACs each, every frame a new megaflow; one generator per core, flat out, 2-queue veths, {threads} slow-path thread(s); installs 2,000 to 18,000"
                ),
                "k/s",
                samples,
            ),
            Err(e) => {
                eprintln!("    {name}: {e:#}");
                Scenario::failed(&name, e)
            }
        });
    }
    sc
}
