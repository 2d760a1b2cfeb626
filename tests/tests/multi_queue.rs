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
/// peer's receive queue of that number. Paced at 5000/s: the test is about which queue
/// serves the frames, and a slow path kept off the CPU for a few ms on a loaded machine
/// must not see its ring overrun.
fn send_on_cpu(tb: &Testbed, ns: &str, cpu: u32, args: &[&str]) -> Result<()> {
    run(Command::new("ip")
        .args(["netns", "exec", ns, "taskset", "-c", &cpu.to_string()])
        .arg(tb.bin("geneflow-pktgen"))
        .args(["send", "--quiet", "--rate", "5000", "--count", "1000"])
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

/// `ping` from `vm` to `ip`, run on CPU `cpu`, after vm's neighbour cache is emptied. With
/// transmit queue q taken on CPU q (XPS), its ARP request and echo requests leave on that
/// queue, and a veth hands them to its peer's receive queue of that number.
fn ping_from_cpu(tb: &Testbed, vm: &str, cpu: u32, ip: &str) -> Result<()> {
    let ns = tb.vm(vm)?.ns.clone();
    for q in 0..2 {
        let xps = format!(
            "echo {} > /sys/class/net/eth0/queues/tx-{q}/xps_cpus",
            1 << q
        );
        run(Command::new("ip").args(["netns", "exec", &ns, "sh", "-c", &xps]))?;
    }
    run(Command::new("ip").args(["netns", "exec", &ns, "ip", "neigh", "flush", "dev", "eth0"]))?;
    run(Command::new("ip")
        .args(["netns", "exec", &ns, "taskset", "-c", &cpu.to_string()])
        .args(["ping", "-c", "3", "-i", "0.05", "-W", "2", "-q", ip]))
    .with_context(|| format!("ping {vm} -> {ip} on CPU {cpu}"))?;
    Ok(())
}

/// The frames each slow-path thread of `ch` took (`geneflowctl stats`).
fn per_thread(tb: &Testbed, ch: &str) -> Result<Vec<u64>> {
    per_thread_stat(tb, ch, "slow_path_threads")
}

/// A per-thread list of `geneflowctl stats`.
fn per_thread_stat(tb: &Testbed, ch: &str, what: &str) -> Result<Vec<u64>> {
    Ok(tb.stats(ch)?[what]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_u64())
        .collect())
}

/// `--forwarder-cores 0,1`: two slow-path threads, the second serving receive queue 1 of every
/// port. It forwards what it can decide alone, installs the megaflows of the flows it decides
/// itself, and hands the first thread the rest (here the ARP responder's answers, whose budget
/// the first thread keeps).
#[test]
fn two_slow_path_threads_share_the_queues() -> Result<()> {
    let tb = two_chassis_with("mt", NbKind::File, 2, |tb| {
        for c in tb.chassis.iter_mut() {
            c.agent_args
                .extend(["--forwarder-cores", "0,1"].map(String::from));
        }
        Ok(())
    })?;
    let (vm2_ip, vm3_ip) = (tb.vm("vm2")?.ip.clone(), tb.vm("vm3")?.ip.clone());
    for cpu in [1, 0] {
        ping_from_cpu(&tb, "vm1", cpu, &vm3_ip)?;
        ping_from_cpu(&tb, "vm1", cpu, &vm2_ip)?;
    }
    ping_all_pairs(&tb)?;
    for (to, port) in [("vm3", 6301u16), ("vm2", 6302)] {
        let got = tb.udp_stream("vm1", to, port, 10_000, 50_000)?;
        assert_eq!(got, 10_000, "vm1 -> {to}: lost {} datagrams", 10_000 - got);
    }
    for ch in ["ch1", "ch2"] {
        let per = per_thread(&tb, ch)?;
        assert!(
            per.len() == 2 && per.iter().all(|&n| n > 0),
            "{ch}: frames per slow-path thread {per:?}"
        );
    }
    // A flow that starts on queue 1: the second thread decides its first frame and installs
    // its megaflow, so the rest stay in XDP. An NB change to ls1 first makes its megaflows
    // stale (the pings above installed vm1 -> vm3's).
    let dummy = [
        "lsp-add",
        "ls1",
        "dummy1",
        "0a:00:00:dd:00:01",
        "--key",
        "101",
    ];
    let applied = tb.applied_after("ch1", std::time::Duration::from_secs(10), || {
        tb.nbctl(&dummy).map(|_| ())
    })?;
    assert!(applied, "the NB change never reached ch1");
    // The sweep takes the stale entry out (the second thread only adds where a key is free;
    // it hands the first thread a megaflow that would replace one).
    let vm3_mac = tb.vm("vm3")?.mac.clone();
    let to_vm3 = format!("eth_dst={vm3_mac}");
    let t = std::time::Instant::now();
    while megaflows(&tb, "ch1")?
        .iter()
        .any(|f| f["match"].as_str().unwrap_or("").contains(&to_vm3))
    {
        assert!(
            t.elapsed().as_secs() < 5,
            "the stale megaflow to vm3 stayed"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let vm1 = tb.vm("vm1")?.clone();
    let before = per_thread(&tb, "ch1")?;
    let installs0 = per_thread_stat(&tb, "ch1", "slow_path_thread_installs")?;
    let rx0 = tb.counter("ch1", "vp-vm1", "slowpath_rx")?;
    let hit0 = tb.counter("ch1", "vp-vm1", "fastpath_hit")?;
    run(Command::new("ip")
        .args(["netns", "exec", &vm1.ns, "taskset", "-c", "1"])
        .arg(tb.bin("geneflow-pktgen"))
        .args(["send", "--quiet", "--rate", "5000", "--count", "1000"])
        .args(tb.gen_between("vm1", "vm3")?)
        .args(["--sport", "7301"]))?;
    // The frames sent before the megaflow is in (at 5,000/s, one per 200 us) take the slow
    // path: one or a few, a few dozen if a busy machine delays the install by milliseconds.
    let t = std::time::Instant::now();
    let (hits, slow) = loop {
        let hits = tb.counter("ch1", "vp-vm1", "fastpath_hit")? - hit0;
        let slow = tb.counter("ch1", "vp-vm1", "slowpath_rx")? - rx0;
        if hits + slow >= 1000 || t.elapsed().as_secs() >= 5 {
            break (hits, slow);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let after = per_thread(&tb, "ch1")?;
    assert!(
        after[1] > before[1],
        "the flow's first frame did not reach the second thread: {before:?} -> {after:?}"
    );
    assert!(
        hits >= 900 && hits + slow == 1000,
        "{hits} of 1000 frames in XDP, {slow} to the slow path: the megaflow was not installed"
    );
    let installs = per_thread_stat(&tb, "ch1", "slow_path_thread_installs")?;
    assert!(
        installs[1] > installs0[1],
        "the second thread did not install the flow's megaflow: {installs0:?} -> {installs:?}"
    );
    // The first thread took it into its mirror: it lists it, with its fast-path hits.
    let flows = megaflows(&tb, "ch1")?;
    let f = megaflow_to(&flows, &vm3_mac)
        .with_context(|| format!("the megaflow to vm3 is not listed: {flows:?}"))?;
    assert!(f["hits"].as_u64().unwrap_or(0) >= 900, "{f}");
    let handed = tb.counter("ch1", "vp-vm1", "slowpath_handoff")?;
    assert!(handed > 0, "no frame of vm1 was handed to the first thread");
    assert_no_drops(&tb, &["ch1", "ch2"])?;
    Ok(())
}
