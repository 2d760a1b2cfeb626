//! End-to-end: stateful security groups. vm3 (ch2) in group "web": TCP 8080 from vm1's address
//! only, anything out. New connections are checked by the receiving chassis against vm3's
//! ingress rules, replies and vm3's own connections pass as established (conntrack in XDP),
//! and removing the rule refuses new connections at once.

use anyhow::{Context, Result};
use geneflow_tests::sg::{
    closed_connections, connects, ct_entries, in_group_web, pin_neighbour, pings, server,
    tracked_from_or_to, warm_up,
};
use geneflow_tests::*;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn security_groups_allow_their_rules_and_the_replies() -> Result<()> {
    let tb = two_chassis("sg")?;
    let (ip1, ip3) = (tb.vm("vm1")?.ip.clone(), tb.vm("vm3")?.ip.clone());
    // Before any group: everything passes.
    assert!(pings(&tb, "vm2", &ip3)?);
    let from_ip1 = format!("{ip1}/32");
    in_group_web(
        &tb,
        "vm3",
        "ch2",
        &[
            "http",
            "--direction",
            "ingress",
            "--protocol",
            "tcp",
            "--ports",
            "8080",
            "--remote-prefix",
            &from_ip1,
        ],
    )?;
    let mut srv = server(&tb, "vm3", 8080)?;
    let d0 = tb.counter("ch2", "ul", "drop_acl")?;
    // Allowed: TCP 8080 from vm1, twice (the second connection is set up in XDP: the
    // megaflow of the first commits it).
    let ok1 = connects(&tb, "vm1", &ip3, 8080)?;
    let ok2 = connects(&tb, "vm1", &ip3, 8080)?;
    // Read now, before the probes below (closed connections expire).
    let web = closed_connections(&tb, "ch2", &format!("{ip3}:8080"), 2)?;
    let ct = |c: &str| ct_entries(&tb, c);
    // Refused: another source, another port, ICMP.
    let other_src = connects(&tb, "vm2", &ip3, 8080)?;
    let other_port = connects(&tb, "vm1", &ip3, 8081)?;
    let ping_in = pings(&tb, "vm1", &ip3)?;
    // vm3's own connections go out, and their replies come back in.
    let ping_out = pings(&tb, "vm3", &ip1)?;
    let _ = srv.kill();
    let _ = srv.wait();
    assert!(ok1 && ok2, "vm1 -> vm3:8080 refused ({ok1}, {ok2})");
    assert!(!other_src, "vm2 -> vm3:8080 was let in");
    assert!(!other_port, "vm1 -> vm3:8081 was let in");
    assert!(!ping_in, "a ping to vm3 was let in");
    assert!(ping_out, "vm3's ping out got no reply");
    let drops = tb.counter("ch2", "ul", "drop_acl")? - d0;
    assert!(drops >= 3, "ch2 counted {drops} ACL drops");
    // The two connections are in ch2's conntrack (zone = ls1), one per source port; vm3's
    // ping too. ch1 has no port with groups: no conntrack there.
    assert_eq!(web.len(), 2, "{web:?}");
    assert!(web.iter().all(|e| e["src"]
        .as_str()
        .unwrap_or("")
        .starts_with(&format!("{ip1}:"))
        && e["zone"] == LS1_KEY
        && e["proto"] == 6));
    // The refused SYNs (vm2 to 8080, vm1 to 8081) committed nothing.
    let ip2 = tb.vm("vm2")?.ip.clone();
    let refused = tracked_from_or_to(&tb, "ch2", &ip2, &format!("{ip3}:8081"))?;
    assert!(
        refused.is_empty(),
        "refused connections tracked: {refused:?}"
    );
    assert!(ct("ch1")?.is_empty());
    // Both connections were closed (FIN): marked closing, they expire within 10 s of their
    // last packet (the collector runs every 10 s).
    assert!(web.iter().all(|e| e["closing"] == true), "{web:?}");
    let t = Instant::now();
    while ct("ch2")?.iter().any(|e| e["dst"] == format!("{ip3}:8080")) {
        assert!(
            t.elapsed() < Duration::from_secs(25),
            "closed connections never expired"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The rule goes: its connections end (the zone's entries are flushed) and new ones are
    // refused at once.
    let before = pipelines_applied(&tb, "ch2")?;
    tb.nbctl(&["sg-rule-del", "web", "http"])?;
    wait_applied(&tb, "ch2", before)?;
    assert!(
        ct("ch2")?.iter().all(|e| e["dst"] != format!("{ip3}:8080")),
        "connections of the removed rule are still tracked"
    );
    let mut srv = server(&tb, "vm3", 8080)?;
    let after = connects(&tb, "vm1", &ip3, 8080)?;
    let _ = srv.kill();
    let _ = srv.wait();
    assert!(
        !after,
        "vm1 -> vm3:8080 still allowed after the rule was removed"
    );
    // Ports without groups are untouched.
    assert!(pings(&tb, "vm2", &tb.vm("vm4")?.ip)?);
    // Established traffic stays in XDP: once one flow has installed the megaflows of vm3's
    // egress rule (new and established), vm3's UDP stream out runs in XDP from its first
    // packet, its connection committed there.
    warm_up(&tb, ("vm3", "vm1"), 7599, "ch2")?;
    let hits0 = tb.counter("ch2", "vp-vm3", "fastpath_hit")?;
    let miss0 = tb.counter("ch2", "vp-vm3", "miss")?;
    let rx = tb.udp_receiver("vm1", 7600, 2000, 10.0)?;
    tb.udp_send("vm3", &ip1, 7600, 2000, 4000)?;
    assert_eq!(Testbed::udp_result(rx)?, 2000);
    let hits = tb.counter("ch2", "vp-vm3", "fastpath_hit")? - hits0;
    let misses = tb.counter("ch2", "vp-vm3", "miss")? - miss0;
    assert!(
        hits == 2000 && misses == 0,
        "{hits} fast-path hits, {misses} misses"
    );
    Ok(())
}

#[test]
fn remote_group_rules_follow_membership() -> Result<()> {
    let tb = two_chassis("sh")?;
    let ip3 = tb.vm("vm3")?.ip.clone();
    for g in ["web", "app"] {
        tb.nbctl(&["sg-add", g])?;
        tb.nbctl(&["sg-rule-add", g, "out", "--direction", "egress"])?;
    }
    tb.nbctl(&[
        "sg-rule-add",
        "web",
        "peers",
        "--direction",
        "ingress",
        "--remote-group",
        "app",
    ])?;
    tb.nbctl(&["lsp-set-sg", "vm3", "web"])?;
    let reach = |want: bool| -> Result<bool> {
        let t = Instant::now();
        loop {
            let ok = pings(&tb, "vm2", &ip3)?;
            if ok == want || t.elapsed() > Duration::from_secs(5) {
                return Ok(ok);
            }
        }
    };
    assert!(!reach(false)?, "vm2 reached vm3 before joining app");
    tb.nbctl(&["lsp-set-sg", "vm2", "app"])?;
    assert!(reach(true)?, "vm2 in app cannot reach vm3");
    // Leaving the group ends it, established or not.
    tb.nbctl(&["lsp-set-sg", "vm2"])?;
    assert!(!reach(false)?, "vm2 still reaches vm3 after leaving app");
    Ok(())
}

/// ICMP errors about a tracked connection get in (RELATED, found by XDP from the quoted
/// header) although the group allows no ICMP in; an error quoting no connection does not.
#[test]
fn icmp_errors_about_a_connection_get_in_forged_ones_do_not() -> Result<()> {
    let tb = two_chassis("sk")?;
    let (vm1, vm3) = (tb.vm("vm1")?.clone(), tb.vm("vm3")?.clone());
    in_group_web(
        &tb,
        "vm3",
        "ch2",
        &[
            "http",
            "--direction",
            "ingress",
            "--protocol",
            "tcp",
            "--ports",
            "8080",
        ],
    )?;
    // vm3 sends UDP to a closed port of vm1: vm1's kernel answers "port unreachable", which
    // vm3's socket reports as "connection refused" only if the error got in.
    let code = format!(
        "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.connect(('{}',9999))\ns.settimeout(2)\ntry:\n    s.send(b'x')\n    s.recv(10)\nexcept ConnectionRefusedError:\n    sys.exit(0)\nexcept Exception as e:\n    print(e)\nsys.exit(1)\n",
        vm1.ip
    );
    let refused = Command::new("ip")
        .args(["netns", "exec", &vm3.ns, "/usr/bin/python3", "-c", &code])
        .status()?
        .success();
    assert!(refused, "vm3 never learnt that vm1:9999 is closed");
    // The same error quoting a datagram vm3 never sent: a new ICMP flow, refused.
    let d0 = tb.counter("ch2", "ul", "drop_acl")?;
    let forged = format!(
        "from scapy.all import *\nsendp(Ether(src='{m1}',dst='{m3}')/IP(src='{i1}',dst='{i3}')/ICMP(type=3,code=3)/IP(src='{i3}',dst='{i1}')/UDP(sport=1111,dport=2222),iface='eth0',count=3,verbose=0)\n",
        m1 = vm1.mac,
        m3 = vm3.mac,
        i1 = vm1.ip,
        i3 = vm3.ip
    );
    run(Command::new("ip").args(["netns", "exec", &vm1.ns, "/usr/bin/python3", "-c", &forged]))?;
    let t = Instant::now();
    while tb.counter("ch2", "ul", "drop_acl")? < d0 + 3 && t.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(tb.counter("ch2", "ul", "drop_acl")? - d0, 3);
    Ok(())
}

/// A rule removal ends the flows it let in at once, fast path included: their conntrack
/// entries go, and so do the tuples every CPU cached as established (the cache's epoch moves
/// on with the flush; otherwise it would let them through for up to a second).
#[test]
fn removing_a_rule_cuts_its_established_flows_at_once() -> Result<()> {
    let tb = two_chassis("sj")?;
    let vm3 = tb.vm("vm3")?.clone();
    in_group_web(
        &tb,
        "vm3",
        "ch2",
        &[
            "stream",
            "--direction",
            "ingress",
            "--protocol",
            "udp",
            "--ports",
            "7700",
        ],
    )?;
    // 10,000 datagrams/s for 4 s; established in XDP (and in the CPUs' caches) after 1 s.
    let mut tx = tb.udp_sender("vm1", &vm3.ip, 7700, 40_000, 10_000)?;
    std::thread::sleep(Duration::from_millis(1000));
    let r_before = rx_packets(&vm3.ns, "eth0")?;
    std::thread::sleep(Duration::from_millis(200));
    let flowing = rx_packets(&vm3.ns, "eth0")? - r_before;
    let hits = tb.counter("ch2", "ul", "fastpath_hit")?;
    let applied = pipelines_applied(&tb, "ch2")?;
    tb.nbctl(&["sg-rule-del", "web", "stream"])?;
    let t = Instant::now();
    while pipelines_applied(&tb, "ch2")? == applied {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "ch2 never applied the rule removal"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let r0 = rx_packets(&vm3.ns, "eth0")?;
    std::thread::sleep(Duration::from_millis(1200));
    let leaked = rx_packets(&vm3.ns, "eth0")? - r0;
    let _ = tx.kill();
    let _ = tx.wait();
    assert!(
        flowing > 1000,
        "the stream was not flowing: {flowing} in 200 ms"
    );
    assert!(
        hits > 5000,
        "the stream was not in the fast path ({hits} hits)"
    );
    assert!(
        leaked <= 5,
        "{leaked} datagrams reached vm3 after its rule was removed"
    );
    Ok(())
}

#[test]
fn a_full_conntrack_table_evicts_the_oldest_and_says_so() -> Result<()> {
    let tb = two_chassis("si")?;
    let (vm1, vm3) = (tb.vm("vm1")?.clone(), tb.vm("vm3")?.clone());
    tb.nbctl(&[
        "lsp-set-port-security",
        "vm1",
        "--allowed-pair",
        "10.0.0.0/16",
    ])?;
    in_group_web(&tb, "vm1", "ch1", &[])?;
    // 65,535 source ports, then 60,000 source addresses (vm1's pair): more connections than
    // the table's 65,536 entries, each committed by XDP.
    for (vary, flows) in [("sport", "65535"), ("ip", "60000")] {
        run(Command::new("ip")
            .args(["netns", "exec", &vm1.ns])
            .arg(tb.bin("geneflow-pktgen"))
            .args(["send", "--quiet", "--iface", "eth0", "--src-mac", &vm1.mac])
            .args([
                "--dst-mac",
                &vm3.mac,
                "--src-ip",
                &vm1.ip,
                "--dst-ip",
                &vm3.ip,
            ])
            // Paced, so that no frame is lost on the way: the address variant goes to the
            // slow path frame by frame (port security reads the source address).
            .args([
                "--flows", flows, "--vary", vary, "--count", flows, "--rate", "200000",
            ]))?;
    }
    let stats = |tb: &Testbed| -> Result<serde_json::Value> { tb.stats("ch1") };
    // The next expiry round (every 10 s) after the traffic reports the table full and has
    // counted every eviction.
    let full0 = stats(&tb)?["conntrack_full"].as_u64().unwrap_or(0);
    let t = Instant::now();
    while stats(&tb)?["conntrack_full"].as_u64().unwrap_or(0) == full0 {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the full table was never reported"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let s = stats(&tb)?;
    let (n, cap) = (
        s["conntrack_entries"].as_u64().unwrap_or(0),
        s["conntrack_capacity"].as_u64().unwrap_or(0),
    );
    assert!(n <= cap && n > cap / 2, "{n} entries, capacity {cap}");
    // More commits than the table holds: every one past what it keeps was an eviction
    // (nothing expired or was flushed meanwhile), and is counted as one.
    let commits = tb.counter("ch1", "vp-vm1", "ct_committed")?;
    let evicted = s["conntrack_evicted"].as_u64().unwrap_or(0);
    assert!(commits > cap, "{commits} commits counted");
    let want = commits - n;
    assert!(
        evicted.abs_diff(want) <= commits / 20,
        "{evicted} evictions counted, {want} expected ({commits} commits, {n} entries)"
    );
    assert!(tb.agent_log("ch1").contains("conntrack table full"));
    // New connections are still committed and answered.
    assert!(pings(&tb, "vm1", &vm3.ip)?);
    Ok(())
}

#[test]
fn a_port_that_joins_a_group_mid_stream_stays_in_xdp() -> Result<()> {
    let tb = two_chassis("sj")?;
    // Before: vm1 (no group) streams to vm3 in XDP.
    let stream = |label: &str| -> Result<()> {
        let hits0 = tb.counter("ch1", "vp-vm1", "fastpath_hit")?;
        let got = tb.udp_stream("vm1", "vm3", 6101, 10_000, 50_000)?;
        assert_eq!(got, 10_000, "{label}: lost {} datagrams", 10_000 - got);
        let hits = tb.counter("ch1", "vp-vm1", "fastpath_hit")? - hits0;
        assert_eq!(
            hits, 10_000,
            "{label}: only {hits} of 10000 datagrams took the XDP fast path"
        );
        Ok(())
    };
    // vm1 has not talked to vm3: ARP and the megaflow first (an ICMP one serves UDP too),
    // not inside a 50,000/s stream; no ARP probe inside it either.
    pin_neighbour(&tb, "vm1", "vm3")?;
    tb.ping("vm1", &tb.vm("vm3")?.ip, 1)?;
    let vm3_mac = tb.vm("vm3")?.mac.clone();
    within(Duration::from_secs(5), || {
        Ok(megaflow_to(&megaflows(&tb, "ch1")?, &vm3_mac).is_some())
    })?
    .context("no megaflow to vm3 after the ping")?;
    stream("before the group")?;
    // vm1 joins a group that lets anything out: its established stream is tracked and
    // stays in XDP.
    in_group_web(&tb, "vm1", "ch1", &[])?;
    warm_up(&tb, ("vm1", "vm3"), 6100, "ch1")?;
    stream("after joining")?;
    assert_no_drops(&tb, &["ch1", "ch2"])?;
    Ok(())
}
