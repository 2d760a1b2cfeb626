//! End-to-end: interfaces with two receive queues (as every NIC with RSS has). XDP hands a
//! frame that misses to the slow-path socket of the queue it arrived on (an AF_XDP socket
//! only takes frames of its own queue), so the slow path serves every queue of the VM ports
//! and of the uplink, and the overlay forwards whichever queue a flow lands on.

use anyhow::{Context, Result};
use geneflow_tests::*;
use std::process::Command;

/// Frames XDP saw on each receive queue of the veth `iface` in `ns` (`ethtool -S`).
fn xdp_per_queue(ns: &str, iface: &str) -> Result<Vec<u64>> {
    let out = run(Command::new("ip").args(["netns", "exec", ns, "ethtool", "-S", iface]))?;
    let mut q = Vec::new();
    for l in out.lines() {
        let Some((k, v)) = l.trim().split_once(':') else {
            continue;
        };
        if let Some(n) = k
            .strip_prefix("rx_queue_")
            .and_then(|r| r.strip_suffix("_xdp_packets"))
        {
            let n: usize = n.parse()?;
            q.resize(q.len().max(n + 1), 0);
            q[n] = v.trim().parse()?;
        }
    }
    Ok(q)
}

/// `geneflow-pktgen send` in `ns` on CPU `cpu`: a veth hands what a CPU transmits to the
/// peer's receive queue of that number.
fn send_on_cpu(tb: &Testbed, ns: &str, cpu: u32, args: &[&str]) -> Result<()> {
    run(Command::new("ip")
        .args(["netns", "exec", ns, "taskset", "-c", &cpu.to_string()])
        .arg(tb.bin("geneflow-pktgen"))
        .args(["send", "--quiet", "--rate", "20000", "--count", "1000"])
        .args(["--flows", "1000", "--vary", "dst-mac"])
        .args(args))?;
    Ok(())
}

/// Runs `f`, then checks that queue 0 and queue 1 of `iface` each took at least 1000
/// frames and that none was lost on its way to the slow path; returns what the slow path
/// received from `iface` (after waiting for `want` frames at most 5 s).
fn through_both_queues(
    tb: &Testbed,
    (ns, iface): (&str, &str),
    want: u64,
    f: impl Fn() -> Result<()>,
) -> Result<u64> {
    let q0 = xdp_per_queue(ns, iface)?;
    let rx0 = tb.counter("ch1", iface, "slowpath_rx")?;
    f()?;
    let q1 = xdp_per_queue(ns, iface)?;
    let per: Vec<u64> = q1
        .iter()
        .zip(q0.iter().chain(std::iter::repeat(&0)))
        .map(|(a, b)| a - b)
        .collect();
    assert!(
        per.len() == 2 && per.iter().all(|&n| n >= 1000),
        "{iface}: frames per receive queue {per:?}"
    );
    for c in ["drop_xsk", "drop_xsk_ring_full", "drop_xsk_rx"] {
        assert_eq!(tb.counter("ch1", iface, c)?, 0, "{iface}: {c}");
    }
    Ok(counter_reaches(tb, "ch1", iface, "slowpath_rx", rx0 + want) - rx0)
}

#[test]
fn the_slow_path_serves_every_receive_queue() -> Result<()> {
    let tb = with_peer_queues("mq", 2)?;
    let (ch_ns, ch_ip, bridge_port) = (
        tb.chassis[0].ns.clone(),
        tb.chassis[0].ip.clone(),
        tb.chassis[0].bridge_port.clone(),
    );
    let vm1 = tb.vm("vm1")?.clone();
    // From vm1: frames to 1000 unknown MACs from each CPU, every one a miss.
    let rx = through_both_queues(&tb, (&ch_ns, "vp-vm1"), 2000, || {
        for (cpu, dst) in [(0, "0a:00:00:e0:00:00"), (1, "0a:00:00:e1:00:00")] {
            send_on_cpu(
                &tb,
                &vm1.ns,
                cpu,
                &[
                    "--iface",
                    "eth0",
                    "--src-mac",
                    &vm1.mac,
                    "--dst-mac",
                    dst,
                    "--src-ip",
                    &vm1.ip,
                    "--dst-ip",
                    PEER_VM_IP,
                ],
            )?;
        }
        Ok(())
    })?;
    assert_eq!(rx, 2000, "the slow path received {rx} of vm1's 2000 frames");
    // From the peer chassis: Geneve for vm1's port (injected on the uplink's peer, so the
    // CPU picks the queue), queue 1 first: its first frames miss, and once their megaflow is
    // in, the rest and queue 0's take it. Every frame reaches vm1.
    let ul_mac = mac_of(&ch_ns, "ul")?;
    let tx0 = tb.counter("ch1", "vp-vm1", "tx_packets")?;
    let rx = through_both_queues(&tb, (&ch_ns, "ul"), 1, || {
        for (cpu, dst) in [(1, "0a:00:00:e3:00:00"), (0, "0a:00:00:e2:00:00")] {
            send_on_cpu(
                &tb,
                &tb.underlay_ns,
                cpu,
                &[
                    "--iface",
                    &bridge_port,
                    "--src-mac",
                    PEER_MAC,
                    "--dst-mac",
                    dst,
                    "--src-ip",
                    PEER_VM_IP,
                    "--dst-ip",
                    &vm1.ip,
                    "--geneve-vni",
                    &LS1_KEY.to_string(),
                    "--ovn-ingress",
                    &PEER_PORT_KEY.to_string(),
                    "--ovn-egress",
                    "1",
                    "--outer-src-mac",
                    "02:00:c6:12:00:fa",
                    "--outer-dst-mac",
                    &ul_mac,
                    "--outer-src-ip",
                    "198.18.0.250",
                    "--outer-dst-ip",
                    &ch_ip,
                ],
            )
            .context("injecting Geneve")?;
        }
        Ok(())
    })?;
    assert!(rx >= 1, "no frame of the uplink reached the slow path");
    let tx = counter_reaches(&tb, "ch1", "vp-vm1", "tx_packets", tx0 + 2000) - tx0;
    assert_eq!(tx, 2000, "vm1 got {tx} of the 2000 frames from the peer");
    Ok(())
}

#[test]
fn the_overlay_forwards_over_two_queues() -> Result<()> {
    let tb = two_chassis_queues("mo", NbKind::File, 2)?;
    ping_all_pairs(&tb)?;
    for (to, port) in [("vm3", 6201u16), ("vm2", 6202)] {
        let got = tb.udp_stream("vm1", to, port, 10_000, 50_000)?;
        assert_eq!(got, 10_000, "vm1 -> {to}: lost {} datagrams", 10_000 - got);
    }
    assert_no_drops(&tb, &["ch1", "ch2"])?;
    Ok(())
}
