//! End-to-end: a chassis on the DPDK backend (`geneflowd --datapath dpdk`, `net_af_packet`
//! vdevs on its veths) and a chassis on the XDP backend carry the same overlay: ping both
//! ways, a UDP stream without loss and TCP (iperf3) across, switching between two local ports
//! of the DPDK chassis, an NB change that invalidates its megaflows, and a clean stop (the
//! megaflow hits counted, nothing left under /var/run/dpdk). The DPDK chassis has no address
//! on its uplink: it answers ARP for its tunnel address itself. Its counters are on its
//! control socket by the XDP counters' names, and malformed Geneve from the underlay is
//! dropped with XDP's reasons. Also here: stateful security groups on the DPDK chassis, and a
//! floating IP moving onto it. The other apps' tests run a DPDK variant beside their XDP one
//! (floating IPs and default SNAT, a VLAN provider network, routing, DHCP).

use anyhow::{Context, Result};
use geneflow_tests::dpdk::{
    assert_nothing_left, assert_refused, dpdk_runtime, start_dpdk, two_chassis,
};
use geneflow_tests::provider::*;
use geneflow_tests::sg::{
    closed_connections, connects, ct_entries, in_group_web, pings, server, tracked_from_or_to,
};
use geneflow_tests::*;
use std::process::Command;
use std::time::Duration;

#[test]
fn a_dpdk_chassis_and_an_xdp_chassis_carry_the_same_overlay() -> Result<()> {
    require_root();
    let runtime_before = dpdk_runtime();
    let vms = [("vm1", "ch1", 1), ("vm2", "ch1", 2), ("vm3", "ch2", 3)];
    let mut tb = two_chassis("dk", &vms)?;
    // The injector: a chassis of the NB hosting vmx, whose Geneve frames scapy builds.
    add_peer(&mut tb)?;
    tb.start_agent(1)?;
    let ns1 = tb.chassis[0].ns.clone();
    // Bad input: an EAL argument DPDK refuses, an interface that does not exist, too little
    // memory: a non-zero exit, the last line naming the problem, nothing left behind.
    for (eal, port, want) in [
        (
            "--bogus -l 0 --no-huge --no-pci --no-shconf",
            "vp-vm1",
            "refused to start with [\"--bogus\"",
        ),
        (
            "-l 0 --no-huge --no-pci --no-shconf",
            "nope0",
            "no interface \"nope0\"",
        ),
        (
            "-l 0 --no-huge --no-pci --no-shconf -m 8",
            "vp-vm1",
            "DPDK out of memory",
        ),
    ] {
        let out = tb
            .ns_cmd(&ns1, &tb.bin("geneflowd"))
            .args(["--chassis", "ch1", "--nb", &tb.nb, "--uplink", "ul"])
            .args(["--datapath", "dpdk", "--dpdk-port", port, "--dpdk-eal", eal])
            .output()?;
        assert_refused(&out, eal, want);
    }
    // ch1 on DPDK, with no address on its uplink: its own ARP answers for 198.18.0.1.
    let mut d = start_dpdk(&tb, &["vp-vm1", "vp-vm2"])?;
    d.wait_log("pipeline applied")?;
    assert!(d.log().contains("threads=2"), "{}", d.log());
    let ports = tb.stats("ch1")?["ports"].clone();
    assert_eq!(ports.as_array().map(|a| a.len()), Some(3), "{ports}");
    let (ip2, ip3) = (tb.vm("vm2")?.ip.clone(), tb.vm("vm3")?.ip.clone());
    let ip1 = tb.vm("vm1")?.ip.clone();
    within(Duration::from_secs(10), || Ok(reachable(&tb, "vm1", &ip3)))?
        .with_context(|| format!("vm1 (DPDK) never reached vm3 (XDP):\n{}", d.log()))?;
    tb.ping("vm3", &ip1, 3)?;
    tb.ping("vm1", &ip2, 3)?;
    // A stream across, both ways of the tunnel's encap and decap, without loss.
    let got = tb.udp_stream("vm1", "vm3", 6600, 10_000, 20_000)?;
    assert_eq!(got, 10_000, "vm3 got {got} of 10000 from the DPDK chassis");
    let got = tb.udp_stream("vm3", "vm1", 6601, 10_000, 20_000)?;
    assert_eq!(got, 10_000, "vm1 (DPDK) got {got} of 10000");
    let vm3_ns = tb.vm("vm3")?.ns.clone();
    let vm1_ns = tb.vm("vm1")?.ns.clone();
    let r = iperf3(&tb, (&vm3_ns, &vm1_ns), &ip3, 5201, "20M")?;
    assert!(r.ok, "iperf3 from the DPDK chassis: {}", r.report);
    // Counted per port as XDP counts: the stream's frames left vm1's port from the cache.
    within(Duration::from_secs(2), || {
        Ok(tb.counter("ch1", "vp-vm1", "fastpath_hit")? >= 9_000)
    })?
    .context("the DPDK chassis's cache hits are not on vm1's port")?;
    assert!(tb.counter("ch1", "ul", "tx_packets")? >= 10_000);
    // Malformed Geneve from a chassis of the NB: dropped with XDP's reasons, and good
    // frames from it still reach vm1.
    for (kind, counter) in [
        ("critical", "drop_geneve_unknown_critical_option"),
        ("version1", "drop_geneve_version"),
        ("optlen", "drop_geneve_opt_len"),
        ("truncated", "drop_geneve_truncated"),
    ] {
        let before = tb.counter("ch1", "ul", counter)?;
        inject(&tb, kind, 10, 7100)?;
        within(Duration::from_secs(3), || {
            Ok(tb.counter("ch1", "ul", counter)? >= before + 10)
        })
        .with_context(|| format!("{kind} not counted as {counter}"))?;
    }
    let rx = tb.udp_receiver("vm1", 7101, 3, 10.0)?;
    inject(&tb, "good", 3, 7101)?;
    assert_eq!(Testbed::udp_result(rx)?, 3);
    // An NB change: vm3's port goes, and with it the DPDK chassis's megaflows to it.
    tb.nbctl(&["lsp-del", "vm3"])?;
    within(Duration::from_secs(5), || Ok(!reachable(&tb, "vm1", &ip3)))?
        .context("the DPDK chassis kept forwarding to a deleted port")?;
    tb.ping("vm1", &ip2, 1)?;
    // A clean stop: exit 0, the cache's hits reported, nothing left behind.
    assert!(
        d.stop(),
        "the DPDK geneflowd did not stop cleanly:\n{}",
        d.log()
    );
    let log = d.log();
    assert_eq!(log.matches("DPDK poll thread stopping").count(), 2, "{log}");
    // Each poll thread reports its own.
    let hits: u64 = log
        .split("fast_hits=")
        .skip(1)
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    assert!(hits >= 10_000, "megaflow hits {hits}:\n{log}");
    assert!(log.contains("geneflowd stopped (DPDK datapath)"), "{log}");
    assert_nothing_left(&runtime_before);
    Ok(())
}

/// Stateful security groups on the DPDK chassis (userspace conntrack, `userct`): vm1 (DPDK)
/// in group "web", TCP 8080 from vm3's address only, anything out. New connections are
/// checked against vm1's rules, replies and vm1's own connections pass as established, the
/// second connection is committed by the megaflow of the first, closed connections expire,
/// removing the rule ends its connections, and established traffic stays in the poll
/// threads' caches. `geneflowctl flows`, `trace` and `ct` answer from the DPDK datapath.
#[test]
fn security_groups_on_a_dpdk_chassis() -> Result<()> {
    require_root();
    let mut tb = Testbed::with_nb("dg", NbKind::File)?;
    tb.add_chassis("ch1")?;
    tb.add_chassis("ch2")?;
    tb.nbctl(&["ls-add", "ls1", "--key", &LS1_KEY.to_string()])?;
    for (vm, ch, key) in [("vm1", "ch1", 1), ("vm2", "ch1", 2), ("vm3", "ch2", 3)] {
        tb.add_vm(vm, ch, "ls1", key)?;
    }
    tb.start_agent(1)?;
    let d = start_dpdk(&tb, &["vp-vm1", "vp-vm2"])?;
    d.wait_log("pipeline applied")?;
    let (ip1, ip3) = (tb.vm("vm1")?.ip.clone(), tb.vm("vm3")?.ip.clone());
    within(Duration::from_secs(10), || Ok(reachable(&tb, "vm3", &ip1)))?
        .with_context(|| format!("vm3 never reached vm1 (DPDK):\n{}", d.log()))?;
    let from_ip3 = format!("{ip3}/32");
    in_group_web(
        &tb,
        "vm1",
        "ch1",
        &[
            "http",
            "--direction",
            "ingress",
            "--protocol",
            "tcp",
            "--ports",
            "8080",
            "--remote-prefix",
            &from_ip3,
        ],
    )?;
    let mut srv = server(&tb, "vm1", 8080)?;
    let drops0 = tb.counter("ch1", "ul", "drop_acl")? + tb.counter("ch1", "vp-vm2", "drop_acl")?;
    let commits0 = tb.counter("ch1", "ul", "ct_committed")?;
    let ok1 = connects(&tb, "vm3", &ip1, 8080)?;
    let ok2 = connects(&tb, "vm3", &ip1, 8080)?;
    // Read now, before the probes below (closed connections expire).
    let web = closed_connections(&tb, "ch1", &format!("{ip1}:8080"), 2)?;
    // Refused: another source (vm2, on the DPDK chassis itself), another port, ICMP.
    let other_src = connects(&tb, "vm2", &ip1, 8080)?;
    let other_port = connects(&tb, "vm3", &ip1, 8081)?;
    let ping_in = pings(&tb, "vm3", &ip1)?;
    // vm1's own connections go out, and their replies come back in.
    let ping_out = pings(&tb, "vm1", &ip3)?;
    let _ = srv.kill();
    let _ = srv.wait();
    assert!(
        ok1 && ok2,
        "vm3 -> vm1:8080 refused ({ok1}, {ok2}):\n{}",
        d.log()
    );
    assert!(!other_src, "vm2 -> vm1:8080 was let in");
    assert!(!other_port, "vm3 -> vm1:8081 was let in");
    assert!(!ping_in, "a ping to vm1 was let in");
    assert!(ping_out, "vm1's ping out got no reply");
    let drops = tb.counter("ch1", "ul", "drop_acl")? + tb.counter("ch1", "vp-vm2", "drop_acl")?;
    assert!(
        drops - drops0 >= 3,
        "ch1 counted {} ACL drops",
        drops - drops0
    );
    // Both connections committed on the uplink's frames: the first by the slow path, the
    // second by the megaflow the first installed.
    let commits = tb.counter("ch1", "ul", "ct_committed")? - commits0;
    assert!(commits >= 2, "{commits} commits on the uplink");
    assert_eq!(web.len(), 2, "{web:?}");
    // The refused SYNs (vm2 to 8080, vm3 to 8081) committed nothing.
    let ip2 = tb.vm("vm2")?.ip.clone();
    let refused = tracked_from_or_to(&tb, "ch1", &ip2, &format!("{ip1}:8081"))?;
    assert!(
        refused.is_empty(),
        "refused connections tracked: {refused:?}"
    );
    assert!(
        web.iter().all(|e| e["src"]
            .as_str()
            .unwrap_or("")
            .starts_with(&format!("{ip3}:"))
            && e["zone"] == LS1_KEY
            && e["proto"] == 6
            && e["closing"] == true),
        "{web:?}"
    );
    // Closed (FIN): they expire within 10 s of their last packet.
    within(Duration::from_secs(15), || {
        Ok(!ct_entries(&tb, "ch1")?
            .iter()
            .any(|e| e["dst"] == format!("{ip1}:8080")))
    })?
    .context("closed connections never expired")?;
    // The megaflows are listed per poll thread, with the connection state they match.
    let sock = tb.chassis[0].socket.display().to_string();
    let ctl = |args: &[&str]| {
        run(Command::new(tb.bin("geneflowctl"))
            .args(args)
            .args(["--socket", &sock]))
    };
    let flows = megaflows(&tb, "ch1")?;
    assert!(
        flows.iter().any(
            |f| f["thread"].is_u64() && f["match"].as_str().unwrap_or("").contains("ct_state=")
        ),
        "{flows:?}"
    );
    let text = ctl(&["flows"])?;
    assert!(text.contains("thread "), "{text}");
    let vm1 = tb.vm("vm1")?;
    let vm3 = tb.vm("vm3")?;
    let trace = ctl(&[
        "trace",
        "--in-port",
        "vm1",
        "--eth-src",
        &vm1.mac,
        "--eth-dst",
        &vm3.mac,
        "--ip-src",
        &vm1.ip,
        "--ip-dst",
        &vm3.ip,
        "--proto",
        "udp",
        "--dport",
        "7600",
    ])?;
    for want in [
        "logical port vm1",
        "Geneve encapsulation to 198.18.0.2",
        "verdict: forward",
    ] {
        assert!(trace.contains(want), "trace lacks {want:?}:\n{trace}");
    }
    // Established traffic stays in the caches: vm1's UDP stream out (its egress rule)
    // misses only for its first packet and its first established one, per poll thread.
    let hits0 = tb.counter("ch1", "vp-vm1", "fastpath_hit")?;
    let slow0 = tb.counter("ch1", "vp-vm1", "slowpath_rx")?;
    let rx = tb.udp_receiver("vm3", 7600, 2000, 3.0)?;
    tb.udp_send("vm1", &ip3, 7600, 2000, 4000)?;
    assert_eq!(Testbed::udp_result(rx)?, 2000);
    // The poll threads publish their counters every 100 ms.
    let hits = counter_reaches(&tb, "ch1", "vp-vm1", "fastpath_hit", hits0 + 1990) - hits0;
    let slow = tb.counter("ch1", "vp-vm1", "slowpath_rx")? - slow0;
    assert!(
        hits >= 1990 && slow <= 10,
        "{hits} cache hits, {slow} misses"
    );
    // The rule goes: its connections end and new ones are refused at once.
    let mut srv = server(&tb, "vm1", 8080)?;
    assert!(connects(&tb, "vm3", &ip1, 8080)?);
    let before = pipelines_applied(&tb, "ch1")?;
    tb.nbctl(&["sg-rule-del", "web", "http"])?;
    wait_applied(&tb, "ch1", before)?;
    let tracked = ct_entries(&tb, "ch1")?;
    let after = connects(&tb, "vm3", &ip1, 8080)?;
    let _ = srv.kill();
    let _ = srv.wait();
    assert!(
        tracked.iter().all(|e| e["dst"] != format!("{ip1}:8080")),
        "connections of the removed rule are still tracked: {tracked:?}"
    );
    assert!(
        !after,
        "vm3 -> vm1:8080 still allowed after the rule was removed"
    );
    assert!(tb.stats("ch1")?["conntrack_flushed"].as_u64().unwrap_or(0) >= 1);
    Ok(())
}

/// A floating IP follows its port onto the DPDK chassis: vm2 (ch2, XDP) moves to ch1 (DPDK),
/// which announces its floating IP with a gratuitous ARP out of its provider port (tshark
/// reads it on the outside host), and answers ARP for it from then on (the outside host asks
/// again); the VM behind it gets the traffic.
#[test]
fn a_floating_ip_moving_to_a_dpdk_chassis_is_announced() -> Result<()> {
    let (mut tb, out) = fip_topology("dm", None)?;
    tb.add_vm_unbound("vm2b", "ch1", 2)?;
    default_route(&tb, "vm2b")?;
    tb.start_agent(1)?;
    let d = start_dpdk(&tb, &["vp-vm1", "vp-vm3", "vp-vm2b"])?;
    d.wait_log("pipeline applied")?;
    within(Duration::from_secs(10), || {
        Ok(ping_from(&tb, &out, FIP2, 1).is_ok())
    })?
    .context("the outside never reached vm2's floating IP on ch2")?;
    let answered0 = tb.counter("ch2", "phy", "arp_reply")?;
    let (garp_child, garp) = capture(&tb, &out, "garp", "arp")?;
    let applied = pipelines_applied(&tb, "ch1")?;
    // ch1 announced vm1's floating IP when it started; its poll thread publishes counters
    // every 100 ms, so that one is awaited before the move's is counted.
    let garps0 = counter_reaches(&tb, "ch1", "phy", "garp_sent", 1);
    assert_eq!(
        garps0, 1,
        "ch1 (DPDK) announced {garps0} floating IPs at start"
    );
    tb.nbctl(&["lsp-bind", "vm2", "ch1", "vp-vm2b"])?;
    wait_applied(&tb, "ch1", applied)?;
    assert_eq!(
        counter_reaches(&tb, "ch1", "phy", "garp_sent", garps0 + 1),
        garps0 + 1,
        "ch1 (DPDK) did not announce the floating IP:\n{}",
        d.log()
    );
    stop(garp_child);
    let garps = fields(
        &garp,
        &format!("arp.isgratuitous == 1 && arp.src.proto_ipv4 == {FIP2}"),
        &["arp.src.hw_mac"],
    )?;
    assert_eq!(garps.len(), 1, "{garps:?}");
    run(tb
        .ns_cmd(&out, "ip")
        .args(["neigh", "flush", "dev", "eth0"]))?;
    ping_from(&tb, &out, FIP2, 3)?;
    assert_eq!(tb.counter("ch2", "phy", "arp_reply")?, answered0);
    assert!(counter_reaches(&tb, "ch1", "phy", "arp_reply", 1) >= 1);
    assert!(counter_reaches(&tb, "ch1", "vp-vm2b", "tx_packets", 3) >= 3);
    Ok(())
}
