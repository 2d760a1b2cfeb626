//! The slow path: every frame a miss (a new, unknown destination MAC, so the pipeline drops
//! it), taken from vp-vm1 by the AF_XDP sockets and decided in userspace. Once with one
//! generator in the end-to-end testbed (one slow-path thread), and on a chassis of its own
//! with one generator per core, against one slow-path thread and then one per core
//! (`--forwarder-cores 0,1`, each thread serving one receive queue of every port).

use super::{args, Ctx, Scenario, SCALING_CORES};
use crate::testbed::Testbed;
use anyhow::{Context, Result};
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::Duration;

pub(super) const NAME: &str = "slow path (AF_XDP)";
const WHAT: &str = "every frame misses: AF_XDP -> userspace pipeline (drops: unknown MAC)";

/// vm1's frames to 60,000 unknown MACs, so every frame misses.
fn misses(tb: &Testbed) -> Result<Vec<String>> {
    let vm1 = tb.vm("vm1")?;
    Ok(args(&[
        "--iface",
        "eth0",
        "--src-mac",
        &vm1.mac,
        "--dst-mac",
        "0a:00:00:ee:00:00",
        "--src-ip",
        &vm1.ip,
        "--dst-ip",
        "10.0.0.3",
        "--flows",
        "60000",
        "--vary",
        "dst-mac",
    ]))
}

/// CPU time (ns) ch1's slow-path threads have used: the agent's main thread (the first) and
/// its `gf-slow*` threads, from /proc.
fn slow_cpu_ns(tb: &Testbed) -> Result<u64> {
    let pid = tb.chassis[0]
        .agent
        .as_ref()
        .map(|c| c.id())
        .context("ch1 has no agent")?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let mut ticks = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = t?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let main = dir.file_name().and_then(|n| n.to_str()) == Some(&pid.to_string());
        if !main && !comm.starts_with("gf-slow") {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat"))?;
        // After the command's closing parenthesis: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        ticks += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    Ok(ticks * 1_000_000_000 / hz)
}

/// One window of the slow path: frames per second (millions) it took from vp-vm1, the CPU
/// its threads used per frame (ns), and the frames lost because a receive ring was full
/// (the threads did not keep up).
struct Window {
    mpps: f64,
    cpu_ns: f64,
    ring_full: u64,
}

/// A window of generators on `cpus` (one each, pinned; none listed: one, where the scheduler
/// puts it). The rate is over the generators' own sending window (the process start and
/// the drain pause are not slow-path time).
fn rate(ctx: &Ctx, tb: &Testbed, cpus: &[u32]) -> Result<Window> {
    let vm1 = tb.vm("vm1")?;
    let gen = misses(tb)?;
    let c0 = tb.counter("ch1", "vp-vm1", "slowpath_rx")?;
    let full0 = tb.counter("ch1", "vp-vm1", "drop_xsk_ring_full")?;
    let cpu0 = slow_cpu_ns(tb)?;
    let pin: Vec<Vec<String>> = if cpus.is_empty() {
        vec![vec![]]
    } else {
        cpus.iter()
            .map(|c| vec!["taskset".into(), "-c".into(), c.to_string()])
            .collect()
    };
    let children = pin
        .iter()
        .map(|p| {
            Command::new("ip")
                .args(["netns", "exec", &vm1.ns])
                .args(p)
                .args([&ctx.pktgen(), "send", "--quiet"])
                .args(&gen)
                .args(["--duration", &ctx.window.to_string()])
                .stdout(Stdio::piped())
                .spawn()
                .context("starting geneflow-pktgen")
        })
        .collect::<Result<Vec<_>>>()?;
    let mut secs: f64 = 0.0;
    for c in children {
        let out = c.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let s = serde_json::from_str::<Value>(text.trim())
            .ok()
            .and_then(|v| v["secs"].as_f64())
            .filter(|s| *s > 0.0)
            .with_context(|| format!("pktgen said {text:?}"))?;
        secs = secs.max(s);
    }
    // Whatever is still queued (one ring at most) drains within a moment.
    std::thread::sleep(Duration::from_millis(200));
    let c1 = tb.counter("ch1", "vp-vm1", "slowpath_rx")?;
    let cpu = slow_cpu_ns(tb)? - cpu0;
    // The ring's drops are counted once a second (quick runs, a smoke test that stays under
    // a minute, do not wait for them).
    if !ctx.quick {
        std::thread::sleep(Duration::from_millis(1100));
    }
    Ok(Window {
        mpps: (c1 - c0) as f64 / secs / 1e6,
        cpu_ns: cpu as f64 / (c1 - c0).max(1) as f64,
        ring_full: tb.counter("ch1", "vp-vm1", "drop_xsk_ring_full")? - full0,
    })
}

/// The windows' rates, and what the report says of them: the threads' CPU per frame and the
/// frames the rings lost (medians of the windows).
fn windows(ctx: &Ctx, tb: &Testbed, cpus: &[u32]) -> Result<(Vec<f64>, String)> {
    let w = (0..ctx.reps)
        .map(|_| rate(ctx, tb, cpus))
        .collect::<Result<Vec<_>>>()?;
    let mut cpu: Vec<f64> = w.iter().map(|w| w.cpu_ns).collect();
    cpu.sort_by(|a, b| a.total_cmp(b));
    let lost: Vec<u64> = w.iter().map(|w| w.ring_full).collect();
    let note = format!(
        "slow-path threads' CPU {:.0} ns/frame; frames lost to full rings per window {lost:?}",
        cpu[cpu.len() / 2]
    );
    eprintln!("    ({note})");
    Ok((w.iter().map(|w| w.mpps).collect(), note))
}

/// One generator, where the scheduler puts it, into the forwarder's one thread.
pub(super) fn one_thread(ctx: &Ctx, tb: &Testbed) -> Result<Scenario> {
    eprintln!("==> slow path: every frame to a new destination");
    let (samples, note) = windows(ctx, tb, &[])?;
    Ok(scenario(NAME.into(), format!("{WHAT}; {note}"), samples, 1))
}

/// A slow-path rate, set against the baseline (and the ceiling) of `cores` generators.
fn scenario(name: String, what: String, samples: Vec<f64>, cores: u32) -> Scenario {
    Scenario {
        name,
        what,
        unit: "Mpps",
        samples,
        vs_baseline: true,
        vs: None,
        error: None,
        xdp_ns: vec![],
        cores,
    }
}

/// ch1 with vm1 on 2-queue veths, the agent started with `agent_args`.
fn testbed(agent_args: &[&str]) -> Result<Testbed> {
    let mut tb = Testbed::new("bs")?;
    tb.queues = SCALING_CORES;
    tb.add_chassis("ch1")?;
    tb.nbctl(&["ls-add", "ls1", "--key", "1000"])?;
    tb.add_vm("vm1", "ch1", "ls1", 1)?;
    tb.chassis[0].agent_args = agent_args.iter().map(|a| a.to_string()).collect();
    tb.start_agents()?;
    Ok(tb)
}

/// One generator per core, into one slow-path thread (not pinned), then into one thread per
/// core (pinned there, beside the generator).
pub(super) fn per_core(ctx: &Ctx) -> Vec<Scenario> {
    let cpus: Vec<u32> = (0..SCALING_CORES).collect();
    let cores = cpus
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let runs = [
        (
            format!("{NAME}, 1 thread, {SCALING_CORES} cores"),
            vec![],
            1,
        ),
        (
            Scenario::on_cores(NAME, SCALING_CORES),
            vec!["--forwarder-cores", cores.as_str()],
            SCALING_CORES,
        ),
    ];
    let mut sc = Vec::new();
    for (name, agent_args, threads) in runs {
        eprintln!("==> {name}: {threads} slow-path thread(s), one generator per core");
        let measured = testbed(&agent_args).and_then(|tb| {
            let (s, note) = windows(ctx, &tb, &cpus)?;
            let per = tb.stats("ch1")?["slow_path_threads"].clone();
            eprintln!("    (frames per slow-path thread: {per})");
            Ok((s, note))
        });
        sc.push(match measured {
            // Both run a generator on each core: set against the ceiling and the baseline of
            // as many.
            Ok((samples, note)) => scenario(
                name,
                format!("{WHAT}; one generator per core, 2-queue veths, {threads} slow-path thread(s); {note}"),
                samples,
                SCALING_CORES,
            ),
            Err(e) => {
                eprintln!("    {name}: {e:#}");
                Scenario::failed(&name, e)
            }
        });
    }
    sc
}
