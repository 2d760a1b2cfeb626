//! Memory of one chassis (`cargo xtask bench-nb`): the agent's resident set and the BPF maps'
//! memory with an empty NB, with 10,000 ports, and with 100,000 megaflows on top.
//!
//! The ports are remote ports on the switch of the chassis' VMs, so the agent holds and
//! compiles all of them. The megaflows come from real traffic: each of `VMS` VMs sends one
//! frame to each of the 10,000 ports' MACs; a megaflow matches the input port and the
//! destination MAC, so every (VM, port) pair is an entry, installed by the slow path.

use crate::bpfstats::prog_on;
use crate::testbed::{run, NbKind, Testbed};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PORTS: u16 = 10_000;
const VMS: u16 = 10;

/// What the kernel reports for the maps of the program on `iface`: total and FLOWS bytes
/// (`bytes_memlock`: preallocated maps' full size, FLOWS' the entries it holds).
fn bpf_bytes(ns: &str, iface: &str) -> Result<(u64, u64)> {
    let id = prog_on(ns, iface)?;
    let out = run(Command::new("bpftool").args(["-j", "prog", "show", "id", &id.to_string()]))?;
    let prog: Value = serde_json::from_str(&out)?;
    let (mut total, mut flows) = (0, 0);
    for m in prog["map_ids"].as_array().context("no map_ids")? {
        let out = run(Command::new("bpftool").args(["-j", "map", "show", "id", &m.to_string()]))?;
        let v: Value = serde_json::from_str(&out)?;
        let b = v["bytes_memlock"].as_u64().unwrap_or(0);
        total += b;
        if v["name"] == "FLOWS" {
            flows = b;
        }
    }
    Ok((total, flows))
}

fn rss_kb(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// Resident kB of the process' AF_XDP UMEMs: its anonymous mappings of exactly one UMEM's
/// size (4096 frames of 4096 bytes on the uplink, 1024 on a VM port: `FRAMES_WIDE` and
/// `FRAMES_VM` in `datapath/src/xsk.rs`), touched as frames pass.
fn umem_rss_kb(pid: u32) -> Result<u64> {
    const UMEM_KB: [u64; 2] = [4096 * 4096 / 1024, 1024 * 4096 / 1024];
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let (mut size, mut total) = (0u64, 0u64);
    for l in s.lines() {
        let num = |l: &str, k: &str| {
            l.strip_prefix(k)
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        };
        if let Some(v) = num(l, "Size:") {
            size = v;
        } else if let Some(v) = num(l, "Rss:") {
            if UMEM_KB.contains(&size) {
                total += v;
            }
        }
    }
    Ok(total)
}

fn installed(tb: &Testbed) -> Result<u64> {
    let mut n = 0;
    for i in 1..=VMS {
        n += tb.counter("ch1", &format!("vp-vm{i}"), "megaflow_install")?;
    }
    Ok(n)
}

pub fn memory() -> Result<Value> {
    let mut tb = Testbed::with_nb("bmem", NbKind::File)?;
    tb.add_chassis("ch1")?;
    tb.nbctl(&["chassis-add", "chr", "198.18.0.99"])?;
    tb.nbctl(&["ls-add", "ls1", "--key", "1000"])?;
    for i in 1..=VMS {
        tb.add_vm(&format!("vm{i}"), "ch1", "ls1", i)?;
    }
    tb.start_agents()?;
    let pid = tb.chassis[0]
        .agent
        .as_ref()
        .map(|c| c.id())
        .context("no agent")?;
    let ns = tb.chassis[0].ns.clone();
    // The remote chassis exists only in the NB: its underlay neighbour is pinned, so that
    // encapsulation towards it resolves (frames to it go nowhere but the underlay bridge).
    super::pin_neighbour(&ns, "198.18.0.99", "02:00:00:00:00:99")?;
    let point = |tb: &Testbed, what: &str, megaflows: u64| -> Result<Value> {
        std::thread::sleep(Duration::from_millis(500));
        let (bpf, flows) = bpf_bytes(&ns, "vp-vm1")?;
        Ok(json!({
            "what": what, "megaflows": megaflows, "agent_rss_kb": rss_kb(pid)?,
            "umem_rss_kb": umem_rss_kb(pid)?,
            "bpf_bytes": bpf, "flows_bytes": flows,
            "pipelines_applied": tb.stats("ch1")?["pipelines_applied"],
        }))
    };
    let mut points = vec![point(&tb, "empty (10 VMs, one switch)", installed(&tb)?)?];
    let applied0 = tb.stats("ch1")?["pipelines_applied"].as_u64().unwrap_or(0);
    let bench = tb.bin("gf-nb-bench");
    run(Command::new(&bench).args([
        "populate",
        "--nb",
        &tb.nb,
        "--switch",
        "ls1",
        "--remote",
        "chr",
        "--ports",
        &PORTS.to_string(),
    ]))?;
    let t = Instant::now();
    while tb.stats("ch1")?["pipelines_applied"].as_u64().unwrap_or(0) == applied0 {
        if t.elapsed() > Duration::from_secs(20) {
            bail!("the agent never applied the 10,000 ports");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    points.push(point(&tb, "10,000 ports", installed(&tb)?)?);
    // Every VM to every port's MAC, a few rounds: the slow path limits what it takes per port.
    let want = PORTS as u64 * VMS as u64;
    let base = installed(&tb)?;
    for _ in 0..6 {
        let mut kids = Vec::new();
        for i in 1..=VMS {
            let vm = tb.vm(&format!("vm{i}"))?;
            kids.push(
                tb.ns_cmd(&vm.ns, &tb.bin("geneflow-pktgen"))
                    .args(["send", "--quiet", "--iface", "eth0", "--src-mac", &vm.mac])
                    .args(["--dst-mac", "0a:ee:00:00:00:00", "--src-ip", &vm.ip])
                    .args(["--dst-ip", "10.0.200.1", "--vary", "dst-mac"])
                    .args(["--flows", &PORTS.to_string(), "--count", &PORTS.to_string()])
                    // Calls of 250 frames (each call waits for an RCU grace period, longer
                    // with ten generators at once: no --duration cut-off).
                    .args(["--rate", "50000", "--duration", "120"])
                    .stdout(Stdio::null())
                    .spawn()?,
            );
        }
        for mut k in kids {
            k.wait()?;
        }
        std::thread::sleep(Duration::from_millis(300));
        if installed(&tb)? - base >= want {
            break;
        }
    }
    let n = installed(&tb)? - base;
    // The agent's own count (a `geneflowctl flows` listing would build a 30 MB answer in it).
    let live = tb.stats("ch1")?["megaflows"].as_u64().unwrap_or(0);
    let mut p = point(
        &tb,
        "10,000 ports and the megaflows of 10 VMs to all of them",
        live,
    )?;
    p["installs"] = json!(n);
    let s = tb.stats("ch1")?;
    p["vm1_counters"] = s["ports"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["iface"] == "vp-vm1"))
        .map(|p| p["counters"].clone())
        .unwrap_or_default();
    points.push(p);
    Ok(json!(points))
}
