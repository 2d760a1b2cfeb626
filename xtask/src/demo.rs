//! `cargo xtask demo`: two chassis, four VMs, pings and streams, a hitless restart, a routed
//! flow with its trace, a floating IP reached from a host on a provider network, counters.

use crate::{step, target_dir};
use anyhow::{bail, Result};
use std::process::Command;
use std::time::{Duration, Instant};
use xtask::testbed::{run, Testbed};
use xtask::testbed_provider::OUTSIDE_IP;

pub(crate) fn demo() -> Result<()> {
    let started = Instant::now();
    std::env::set_var("GENEFLOW_BIN_DIR", target_dir().join("debug"));
    step("testbed: underlay switch 198.18.0.0/24, chassis ch1 and ch2, logical switch ls1 (VNI 1000)");
    let mut tb = Testbed::new("demo")?;
    tb.add_chassis("ch1")?;
    tb.add_chassis("ch2")?;
    let outside = tb.add_provider_network()?;
    tb.nbctl(&["ls-add", "ls1", "--key", "1000"])?;
    for (vm, ch, key) in [
        ("vm1", "ch1", 1),
        ("vm2", "ch1", 2),
        ("vm3", "ch2", 3),
        ("vm4", "ch2", 4),
    ] {
        tb.add_vm(vm, ch, "ls1", key)?;
    }
    print!("{}", tb.nbctl(&["show"])?);
    step("starting geneflowd in each chassis namespace");
    tb.start_agents()?;
    step("ping every VM pair");
    let vms: Vec<(String, String)> = tb
        .vms
        .iter()
        .map(|v| (v.name.clone(), v.ip.clone()))
        .collect();
    for (a, _) in &vms {
        for (b, ip) in &vms {
            if a != b {
                tb.ping(a, ip, 3)?;
                eprintln!("    {a} -> {b} ({ip}): 3/3 replies");
            }
        }
    }
    step("UDP stream: 10000 datagrams vm1 (ch1) -> vm3 (ch2) and vm1 -> vm2 (same chassis)");
    for (to, port) in [("vm3", 5001u16), ("vm2", 5002)] {
        let got = tb.udp_stream("vm1", to, port, 10_000, 50_000)?;
        eprintln!("    vm1 -> {to}: {got}/10000 received");
        if got != 10_000 {
            bail!("UDP stream vm1 -> {to} lost {} datagrams", 10_000 - got);
        }
    }
    step("hitless restart: SIGKILL ch1's geneflowd during a 3 s stream vm1 -> vm3, start it again");
    {
        let (vm1, vm3) = (tb.vm("vm1")?.clone(), tb.vm("vm3")?.clone());
        let n = 30_000u64;
        let rx = tb.udp_receiver("vm3", 5003, n, 2.0)?;
        let mut tx = tb.udp_sender(&vm1.name, &vm3.ip, 5003, n, 10_000)?;
        std::thread::sleep(Duration::from_secs(1));
        tb.kill_agent(0);
        eprintln!("    ch1's agent killed; its pinned XDP program keeps forwarding");
        std::thread::sleep(Duration::from_millis(500));
        let t0 = Instant::now();
        tb.start_agent(0)?;
        eprintln!(
            "    ch1's agent back in {:.0} ms, adopted the pinned maps and swapped its program in",
            t0.elapsed().as_secs_f64() * 1e3
        );
        tx.wait()?;
        let got = Testbed::udp_result(rx)?;
        eprintln!("    vm1 -> vm3 across the restart: {got}/{n} received");
        if got != n {
            bail!("the restart lost {} datagrams", n - got);
        }
    }
    step("routing: router r1 joins ls1 (gateway 10.0.255.254/16) and ls2 (10.1.0.0/24, VNI 1001); vm5 on ls2 behind ch2");
    {
        tb.nbctl(&["ls-add", "ls2", "--key", "1001"])?;
        tb.add_ls1_router("r1", 5000)?;
        tb.nbctl(&[
            "lrp-add",
            "r1",
            "r1-ls2",
            "0a:00:00:00:ff:02",
            "10.1.0.1/24",
            "--key",
            "100",
            "--switch",
            "ls2",
        ])?;
        tb.add_routed_vm("vm5", "ch2", "ls2", 5, "10.1.0.5/24", "10.1.0.1", 1442)?;
        let vm1 = tb.vm("vm1")?.clone();
        run(tb
            .ns_cmd(&vm1.ns, "ip")
            .args(["route", "add", "default", "via", "10.0.255.254"]))?;
        let t0 = Instant::now();
        while tb.ping("vm1", "10.1.0.5", 1).is_err() {
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("vm1 cannot reach vm5 through r1");
            }
        }
        tb.ping("vm1", "10.1.0.5", 3)?;
        eprintln!("    vm1 (10.0.0.1, ch1) -> vm5 (10.1.0.5, ch2) routed by ch1: 3/3 replies");
        tb.ping("vm1", "10.0.255.254", 3)?;
        eprintln!("    vm1 -> its gateway 10.0.255.254: 3/3 replies (answered by ch1)");
        let got = tb.udp_stream("vm1", "vm5", 5004, 10_000, 50_000)?;
        eprintln!("    routed UDP vm1 -> vm5: {got}/10000 received");
        if got != 10_000 {
            bail!("routed stream lost {} datagrams", 10_000 - got);
        }
        eprintln!("    geneflowctl trace of that flow on ch1:");
        let out = run(Command::new(tb.bin("geneflowctl"))
            .args(["trace", "--socket"])
            .arg(&tb.chassis[0].socket)
            .args([
                "--in-port",
                "vm1",
                "--eth-src",
                &vm1.mac,
                "--eth-dst",
                "0a:00:00:00:ff:01",
                "--ip-src",
                "10.0.0.1",
                "--ip-dst",
                "10.1.0.5",
                "--proto",
                "udp",
                "--dport",
                "5004",
            ]))?;
        for l in out.lines() {
            println!("      {l}");
        }
    }
    floating_ip(&tb, &outside)?;
    step("per-chassis counters (XDP fast path + AF_XDP slow path)");
    for c in ["ch1", "ch2"] {
        let s = tb.stats(c)?;
        println!(
            "chassis {c}: {} megaflows, {} masks",
            s["megaflows"], s["masks"]
        );
        for p in s["ports"].as_array().cloned().unwrap_or_default() {
            let ctr = &p["counters"];
            let drops: Vec<String> = ctr
                .as_object()
                .map(|o| {
                    o.iter()
                        .filter(|(k, v)| k.starts_with("drop_") && v.as_u64().unwrap_or(0) > 0)
                        .map(|(k, v)| format!("{}={v}", &k[5..]))
                        .collect()
                })
                .unwrap_or_default();
            println!(
                "  {:<10} {:<6} rx {:>7}  tx {:>7}  fast-path hits {:>7}  slow-path {:>5}  to-stack {:>4}  drops: {}",
                p["iface"].as_str().unwrap_or("?"),
                p["kind"].as_str().unwrap_or("?"),
                ctr["rx_packets"],
                ctr["tx_packets"],
                ctr["fastpath_hit"],
                ctr["slowpath_rx"],
                ctr["pass_to_stack"],
                if drops.is_empty() { "none".to_string() } else { drops.join(" ") }
            );
        }
    }
    drop(tb);
    step(&format!(
        "demo done in {:.1}s; namespaces removed",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// The provider network `ext` (physnet1, 172.24.4.0/24, the outside host at .100) becomes r1's
/// gateway; vm1 gets floating IP 172.24.4.51, and the outside host reaches it.
fn floating_ip(tb: &Testbed, outside: &str) -> Result<()> {
    step("floating IP: provider network ext (physnet1, 172.24.4.0/24) as r1's gateway; vm1 gets 172.24.4.51");
    tb.add_provider_gateway("r1", "0a:00:00:00:ff:03", None)?;
    tb.nbctl(&["fip-add", "fip1", "172.24.4.51", "vm1", "r1"])?;
    let t0 = Instant::now();
    while run(tb
        .ns_cmd(outside, "ping")
        .args(["-c", "1", "-W", "1", "172.24.4.51"]))
    .is_err()
    {
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("the outside host cannot reach vm1's floating IP");
        }
    }
    run(tb
        .ns_cmd(outside, "ping")
        .args(["-c", "3", "-i", "0.2", "172.24.4.51"]))?;
    eprintln!(
        "    outside host ({OUTSIDE_IP}) -> 172.24.4.51: 3/3 replies (DNAT to vm1 10.0.0.1 on ch1)"
    );
    tb.ping("vm1", OUTSIDE_IP, 3)?;
    eprintln!("    vm1 -> outside host: 3/3 replies, sent from 172.24.4.51 (SNAT on ch1)");
    let neigh = run(tb
        .ns_cmd(outside, "ip")
        .args(["neigh", "show", "172.24.4.51"]))?;
    eprintln!("    outside host's ARP entry: {}", neigh.trim());
    Ok(())
}
