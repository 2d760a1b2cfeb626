//! End-to-end: the L2 overlay across two chassis, its wire format checked by tshark, frames
//! built by scapy, malformed Geneve, and NB changes reaching the fast path.

use anyhow::{Context, Result};
use geneflow_tests::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn ping_every_pair_and_streams_stay_in_the_fast_path() -> Result<()> {
    let tb = two_chassis("a")?;
    ping_all_pairs(&tb)?;
    // Cross-chassis (vm1 on ch1 -> vm3 on ch2) and same-chassis (vm1 -> vm2) streams.
    for (to, port) in [("vm3", 6001u16), ("vm2", 6002)] {
        let hits0 = tb.counter("ch1", "vp-vm1", "fastpath_hit")?;
        let got = tb.udp_stream("vm1", to, port, 10_000, 50_000)?;
        assert_eq!(got, 10_000, "vm1 -> {to}: lost {} datagrams", 10_000 - got);
        let hits = tb.counter("ch1", "vp-vm1", "fastpath_hit")? - hits0;
        assert!(
            hits >= 9_900,
            "vm1 -> {to}: only {hits} of 10000 datagrams took the XDP fast path"
        );
    }
    // The receiving chassis decapsulated in XDP too.
    assert!(tb.counter("ch2", "ul", "fastpath_hit")? >= 9_900);
    assert_no_drops(&tb, &["ch1", "ch2"])?;
    Ok(())
}

#[test]
fn underlay_capture_decodes_as_ovn_geneve_in_tshark() -> Result<()> {
    let tb = with_peer("b")?;
    let inj = tb.injector.clone().unwrap();
    let vm1 = tb.vm("vm1")?;
    // vm1 knows vmx's MAC, so the stream is plain unicast: first packet through the slow path,
    // the rest through XDP. Both kinds must be on the wire correctly.
    run(Command::new("ip").args([
        "-n", &vm1.ns, "neigh", "replace", PEER_VM_IP, "lladdr", PEER_MAC, "dev", "eth0",
    ]))?;
    let fields = [
        "geneve.vni",
        "geneve.option.class",
        "geneve.option.type",
        "geneve.option.unknown.data",
        "ip.checksum.status",
        "udp.checksum.status",
        "ip.flags.df",
        "ip.ttl",
        "udp.srcport",
        "geneve.version",
        "frame.len",
    ];
    let mut cmd = Command::new("ip");
    // Only the test stream (inner UDP port 7777): floods (ARP, IPv6 multicast) share the tunnel.
    cmd.args(["netns", "exec", &inj, "tshark", "-l", "-n", "-i", "eth0"])
        .args([
            "-a",
            "duration:6",
            "-f",
            "udp dst port 6081",
            "-Y",
            "udp.dstport == 7777",
        ])
        .args(["-T", "fields"])
        .args(["-E", "separator=|", "-E", "aggregator=/"])
        .args([
            "-o",
            "ip.check_checksum:TRUE",
            "-o",
            "udp.check_checksum:TRUE",
        ]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    let mut tshark = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    // tshark announces the capture on stderr; wait for it before sending.
    {
        use std::io::Read;
        let mut err = tshark.stderr.take().unwrap();
        let mut buf = [0u8; 4096];
        let mut seen = String::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        while !seen.contains("Capturing on") && Instant::now() < deadline {
            let n = err.read(&mut buf)?;
            if n == 0 {
                break;
            }
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert!(
            seen.contains("Capturing on"),
            "tshark did not start: {seen}"
        );
        // dumpcap reports before its socket is fully set up; give it a moment.
        std::thread::sleep(Duration::from_millis(1000));
    }
    let slow0 = tb.counter("ch1", "vp-vm1", "slowpath_rx")?;
    let fast0 = tb.counter("ch1", "vp-vm1", "fastpath_hit")?;
    tb.udp_send("vm1", PEER_VM_IP, 7777, 20, 200)?;
    let out = tshark.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(
        lines.len(),
        20,
        "captured:\n{text}\nch1 stats: {}",
        tb.stats("ch1")?
    );
    let mut sports = std::collections::HashSet::new();
    for l in &lines {
        let f: Vec<&str> = l.split('|').collect();
        let outer = |i: usize| f[i].split(['/', '\\']).next().unwrap_or("");
        assert_eq!(f[0], "0x0003e8", "VNI of ls1 (1000): {l}");
        assert_eq!(f[1], "0x0102", "OVN option class: {l}");
        assert_eq!(f[2], "0x80", "OVN option type (critical): {l}");
        // 1 reserved bit, 15-bit ingress key 1 (vm1), 16-bit egress key 9 (vmx).
        assert_eq!(f[3], "00010009", "OVN option value: {l}");
        assert_eq!(outer(4), "1", "outer IPv4 checksum status: {l}");
        assert_eq!(outer(5), "1", "outer UDP checksum status: {l}");
        assert_eq!(outer(6), "1", "DF: {l}");
        assert_eq!(outer(7), "64", "TTL: {l}");
        assert_eq!(f[9], "0", "Geneve version: {l}");
        let sport: u32 = outer(8).parse()?;
        assert!((32768..61000).contains(&sport), "UDP source port {sport}");
        sports.insert(sport);
    }
    // One flow, one source port, whichever path built the frame.
    assert_eq!(sports.len(), 1, "source ports {sports:?}");
    let slow = tb.counter("ch1", "vp-vm1", "slowpath_rx")? - slow0;
    let fast = tb.counter("ch1", "vp-vm1", "fastpath_hit")? - fast0;
    assert!(
        slow >= 1 && fast >= 15,
        "slow {slow} fast {fast}: both paths must be exercised"
    );
    Ok(())
}

#[test]
fn scapy_geneve_frame_reaches_the_right_vm() -> Result<()> {
    let tb = with_peer("c")?;
    let rx = tb.udp_receiver("vm1", 7000, 5, 10.0)?;
    inject(&tb, "good", 5, 7000)?;
    let got = Testbed::udp_result(rx)?;
    assert_eq!(got, 5, "vm1 received {got} of 5 injected frames");
    // A frame for a port key that does not exist on this chassis goes nowhere, counted.
    let before = tb.counter("ch1", "ul", "drop_unknown_port")?;
    inject_to(&tb, "good", 3, 7000, 77)?;
    let deadline = Instant::now() + Duration::from_secs(2);
    while tb.counter("ch1", "ul", "drop_unknown_port")? < before + 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(tb.counter("ch1", "ul", "drop_unknown_port")?, before + 3);
    Ok(())
}

#[test]
fn malformed_geneve_is_dropped_counted_and_reaches_no_vm() -> Result<()> {
    let tb = with_peer("d")?;
    let vm1 = tb.vm("vm1")?;
    let rx = tb.udp_receiver("vm1", 7100, 1, 8.0)?;
    let vm_rx0 = rx_packets(&vm1.ns, "eth0")?;
    let cases = [
        ("critical", "drop_geneve_unknown_critical_option"),
        ("version1", "drop_geneve_version"),
        ("optlen", "drop_geneve_opt_len"),
        ("truncated", "drop_geneve_truncated"),
    ];
    for (kind, counter) in cases {
        let before = tb.counter("ch1", "ul", counter)?;
        inject(&tb, kind, 10, 7100)?;
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut now = before;
        while now < before + 10 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            now = tb.counter("ch1", "ul", counter)?;
        }
        assert_eq!(now - before, 10, "{kind}: {counter} went {before} -> {now}");
    }
    let got = Testbed::udp_result(rx)?;
    assert_eq!(got, 0, "a malformed frame reached vm1");
    assert_eq!(
        rx_packets(&vm1.ns, "eth0")?,
        vm_rx0,
        "vm1's interface received frames"
    );
    // The agent is still forwarding.
    let rx = tb.udp_receiver("vm1", 7101, 3, 10.0)?;
    inject(&tb, "good", 3, 7101)?;
    assert_eq!(Testbed::udp_result(rx)?, 3);
    Ok(())
}

#[test]
fn deleting_a_port_stops_its_traffic_within_a_second() -> Result<()> {
    let tb = two_chassis("e")?;
    tb.ping("vm1", &tb.vm("vm3")?.ip, 2)?;
    let vm3_ns = tb.vm("vm3")?.ns.clone();
    let vm3_ip = tb.vm("vm3")?.ip.clone();
    // A long stream, so the entries are hot in XDP when the port goes; long enough to run
    // past the last check below however slowly the machine starts processes (killed there).
    let sender = tb.udp_sender("vm1", &vm3_ip, 6100, 150_000, 10_000)?;
    let mut sender = scopeguard(sender);
    std::thread::sleep(Duration::from_millis(800));
    let fast_before = tb.counter("ch1", "vp-vm1", "fastpath_hit")?;
    assert!(
        fast_before > 1000,
        "stream not in the fast path before the delete"
    );
    // The stream reaches vm3 right up to the delete...
    let r_pre = rx_packets(&vm3_ns, "eth0")?;
    std::thread::sleep(Duration::from_millis(200));
    let r0 = rx_packets(&vm3_ns, "eth0")?;
    assert!(
        r0 > r_pre + 500,
        "vm3 received only {} frames in the 200 ms before the delete",
        r0 - r_pre
    );
    tb.nbctl(&["lsp-del", "vm3"])?;
    // ...and stops within a second of it.
    std::thread::sleep(Duration::from_millis(1000));
    let r1 = rx_packets(&vm3_ns, "eth0")?;
    std::thread::sleep(Duration::from_millis(1000));
    let r2 = rx_packets(&vm3_ns, "eth0")?;
    assert_eq!(
        r2,
        r1,
        "vm3 still received {} frames more than 1 s after its port was deleted",
        r2 - r1
    );
    // The sender's chassis now drops the stream for want of a destination, in the slow path
    // (the stale megaflow no longer matches).
    let d0 = tb.counter("ch1", "vp-vm1", "drop_no_destination")?;
    std::thread::sleep(Duration::from_millis(300));
    assert!(tb.counter("ch1", "vp-vm1", "drop_no_destination")? > d0);
    let _ = sender.0.kill();
    let _ = sender.0.wait();
    // Other pairs are unaffected.
    tb.ping("vm1", &tb.vm("vm4")?.ip, 2)?;
    Ok(())
}

#[test]
fn malformed_nb_keeps_the_last_good_pipeline() -> Result<()> {
    let tb = two_chassis("f")?;
    tb.ping("vm1", &tb.vm("vm3")?.ip, 1)?;
    let path = tb.dir.join("nb.json");
    let good = std::fs::read_to_string(&path)?;
    std::fs::write(&path, "{\n  \"version\": 99,\n  \"switches\": {,\n}\n")?;
    std::thread::sleep(Duration::from_millis(300));
    // Traffic keeps flowing on the last good pipeline, including new flows.
    tb.ping("vm2", &tb.vm("vm4")?.ip, 2)?;
    let log = tb.agent_log("ch1");
    assert!(
        log.contains("nb.json:3:") && log.contains("keeping the last good pipeline"),
        "agent log does not name the file and position:\n{log}"
    );
    // geneflowctl refuses to edit it, with the same one-line report.
    let err = tb
        .nbctl(&["ls-add", "ls9", "--key", "9"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("nb.json:3:"), "{err}");
    std::fs::write(&path, good)?;
    std::thread::sleep(Duration::from_millis(300));
    tb.ping("vm1", &tb.vm("vm4")?.ip, 1)?;
    Ok(())
}

#[test]
fn deleting_the_nb_file_keeps_traffic_flowing() -> Result<()> {
    let tb = two_chassis("g")?;
    tb.ping("vm1", &tb.vm("vm3")?.ip, 1)?;
    let path = tb.dir.join("nb.json");
    let good = std::fs::read(&path)?;
    let applied =
        |c: &str| -> Result<u64> { Ok(tb.stats(c)?["pipelines_applied"].as_u64().unwrap_or(0)) };
    let a0 = applied("ch1")?;
    std::fs::remove_file(&path)?;
    // Unavailable, not empty: the agent notices, no pipeline was applied, every port still
    // forwards, new flows included, and the agent says what happened.
    within(Duration::from_secs(5), || {
        Ok(tb.stats("ch1")?["nb"]["connected"] == false)
    })?
    .context("ch1 still says it is connected to the deleted NB file")?;
    assert_eq!(applied("ch1")?, a0, "a pipeline was applied without the NB");
    tb.ping("vm1", &tb.vm("vm3")?.ip, 2)?;
    tb.ping("vm2", &tb.vm("vm4")?.ip, 2)?;
    assert_eq!(applied("ch1")?, a0, "a pipeline was applied without the NB");
    let log = tb.agent_log("ch1");
    assert!(
        log.contains("NB connection lost") && log.contains("nb.json"),
        "agent log does not report the lost NB file:\n{log}"
    );
    // Back: the agent reconnects and follows changes again.
    std::fs::write(&path, good)?;
    let t = Instant::now();
    while tb.stats("ch1")?["nb"]["connected"] != true {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "agent never reconnected"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    tb.nbctl(&["lsp-del", "vm4"])?;
    let t = Instant::now();
    while tb.ping("vm2", &tb.vm("vm4")?.ip, 1).is_ok() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "lsp-del not applied after the NB came back"
        );
    }
    tb.ping("vm1", &tb.vm("vm3")?.ip, 1)?;
    Ok(())
}

/// Kills the child if the test fails before it is reaped.
struct Guard(std::process::Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
fn scopeguard(c: std::process::Child) -> Guard {
    Guard(c)
}
