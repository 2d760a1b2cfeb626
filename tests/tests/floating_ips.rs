//! End-to-end: a provider network and distributed floating IPs. An outside host on the
//! provider network (a plain Linux namespace, not managed by geneflow) reaches VMs by their
//! floating IPs and sees nothing but floating IPs; the VMs' own connections leave with their
//! floating IP; a floating IP follows its port to another chassis, announced by a gratuitous
//! ARP; VMs reach each other's floating IPs (hairpin). Captures are decoded by tshark.

use anyhow::{Context, Result};
use geneflow_tests::provider::*;
use geneflow_tests::*;
use std::process::Stdio;
use std::time::Duration;
use xtask::testbed_provider::{OUTSIDE_IP, UPSTREAM_IP};

#[test]
fn the_outside_reaches_vms_by_floating_ip_and_sees_only_floating_ips() -> Result<()> {
    let (tb, out) = fip_bed("fa")?;
    outside_checks(&tb, &out)
}

/// The same with ch1 on the DPDK backend (its provider interface a DPDK port too); vm2 on
/// the XDP chassis reaches vm1 by its floating IP as well (hairpin through r1), and the DPDK
/// chassis stops cleanly.
#[test]
fn floating_ips_on_a_dpdk_chassis() -> Result<()> {
    let runtime_before = geneflow_tests::dpdk::dpdk_runtime();
    let (mut tb, out) = fip_topology("df", None)?;
    tb.start_agent(1)?;
    let mut d = geneflow_tests::dpdk::start_dpdk(&tb, &["vp-vm1", "vp-vm3"])?;
    d.wait_log("pipeline applied")?;
    assert!(d.log().contains("provider network attached"), "{}", d.log());
    within(Duration::from_secs(10), || {
        Ok(ping_from(&tb, &out, FIP1, 1).is_ok())
    })?
    .with_context(|| format!("the outside never reached vm1's floating IP:\n{}", d.log()))?;
    outside_checks(&tb, &out).with_context(|| d.log())?;
    tb.ping("vm2", FIP1, 2)?;
    assert!(tb.counter("ch1", "vp-vm1", "fastpath_hit")? > 100);
    let ports = tb.stats("ch1")?["ports"].clone();
    assert!(
        ports.as_array().is_some_and(|p| p
            .iter()
            .any(|p| p["iface"] == "phy" && p["kind"] == "provider")),
        "{ports}"
    );
    assert!(
        d.stop(),
        "the DPDK geneflowd did not stop cleanly:\n{}",
        d.log()
    );
    geneflow_tests::dpdk::assert_nothing_left(&runtime_before);
    Ok(())
}

/// The outside host reaches vm1 (ch1) by its floating IP (ping, iperf3) and sees no address
/// but its own network's; vm1's own pings leave with its floating IP; vm3 without one is
/// dropped, counted; tshark checks the translated checksums; established traffic stays in
/// the fast path on ch1's provider interface.
fn outside_checks(tb: &Testbed, out: &str) -> Result<()> {
    let (outcap_child, outcap) = capture(tb, out, "outside", "ip or arp")?;
    let (vmcap_child, vmcap) = capture(tb, &tb.vm("vm1")?.ns.clone(), "vm1", "icmp or tcp")?;
    // In: ping and TCP (iperf3) to the floating IP.
    ping_from(tb, out, FIP1, 5)?;
    let vm1 = tb.vm("vm1")?.clone();
    let r = iperf3(tb, (&vm1.ns, out), FIP1, 5201, "20M")?;
    assert!(
        r.bytes > 1_000_000,
        "iperf3 to the floating IP: {}",
        r.report
    );
    // Out: the VM's own connection to the outside host leaves with its floating IP.
    tb.ping("vm1", OUTSIDE_IP, 3)?;
    // A VM without a floating IP cannot leave (no default SNAT here): dropped, counted.
    let before = tb.counter("ch1", "vp-vm3", "drop_no_nat")?;
    assert!(tb.ping("vm3", OUTSIDE_IP, 1).is_err());
    assert!(counter_reaches(tb, "ch1", "vp-vm3", "drop_no_nat", before + 1) > before);
    stop(vmcap_child);
    stop(outcap_child);
    // vm1 saw the outside host's echo requests at its fixed IP (DNAT).
    let seen = fields(&vmcap, "icmp.type == 8", &["ip.src", "ip.dst"])?;
    assert!(
        seen.iter()
            .any(|l| l == &format!("{OUTSIDE_IP},{}", vm1.ip)),
        "{seen:?}"
    );
    // The outside host saw no address but its own network's: no overlay, tenant or underlay
    // address leaked, and the VM's own pings came from its floating IP.
    let addrs = fields(&outcap, "ip", &["ip.src", "ip.dst"])?;
    assert!(!addrs.is_empty());
    for l in &addrs {
        for a in l.split(',') {
            assert!(a.starts_with("172.24.4."), "leaked {a} in {l}");
        }
    }
    let from_vm = fields(&outcap, "icmp.type == 8", &["ip.src"])?;
    assert!(from_vm.iter().any(|a| a == FIP1), "{from_vm:?}");
    // TCP and ICMP checksums were right after translation, as tshark checks them.
    let good = fields(
        &outcap,
        "ip.src == 172.24.4.51 && tcp.checksum.status == \"Good\" && ip.checksum.status == \"Good\"",
        &["frame.number"],
    )?;
    assert!(
        good.len() > 20,
        "{} translated TCP segments verified",
        good.len()
    );
    assert_no_bad_checksums(
        &outcap,
        "tcp.checksum.status == \"Bad\" || icmp.checksum.status == \"Bad\" || ip.checksum.status == \"Bad\"",
    )?;
    // Established traffic ran in the fast path on the provider interface.
    assert!(counter_reaches(tb, "ch1", "phy", "fastpath_hit", 101) > 100);
    Ok(())
}

#[test]
fn a_floating_ip_follows_its_port_and_is_announced() -> Result<()> {
    let (mut tb, out) = fip_bed("fb")?;
    ping_from(&tb, &out, FIP1, 2)?;
    let answered0 = tb.counter("ch1", "phy", "arp_reply")?;
    // vm1 moves to ch2: same MAC and address, a new interface there.
    let (garp_child, garp) = capture(&tb, &out, "garp", "arp")?;
    tb.add_vm_unbound("vm1b", "ch2", 1)?;
    default_route(&tb, "vm1b")?;
    let applied = pipelines_applied(&tb, "ch2")?;
    // ch2 announced vm2's floating IP when it started.
    let garps0 = tb.counter("ch2", "phy", "garp_sent")?;
    tb.nbctl(&["lsp-bind", "vm1", "ch2", "vp-vm1b"])?;
    wait_applied(&tb, "ch2", applied)?;
    assert_eq!(
        counter_reaches(&tb, "ch2", "phy", "garp_sent", garps0 + 1),
        garps0 + 1,
        "ch2 announced the floating IP"
    );
    stop(garp_child);
    let garps = fields(
        &garp,
        &format!("arp.isgratuitous == 1 && arp.src.proto_ipv4 == {FIP1}"),
        &["arp.src.hw_mac"],
    )?;
    assert_eq!(garps, vec!["0a:fe:ac:18:04:33".to_string()], "{garps:?}");
    // The outside host forgets what it knew and asks again: only ch2 answers now.
    run(tb
        .ns_cmd(&out, "ip")
        .args(["neigh", "flush", "dev", "eth0"]))?;
    ping_from(&tb, &out, FIP1, 3)?;
    assert_eq!(tb.counter("ch1", "phy", "arp_reply")?, answered0);
    assert!(tb.counter("ch2", "phy", "arp_reply")? >= 1);
    assert!(tb.counter("ch2", "vp-vm1b", "tx_packets")? >= 3);
    Ok(())
}

#[test]
fn vms_reach_each_others_floating_ips() -> Result<()> {
    let (tb, _out) = fip_bed("fc")?;
    let vm2 = tb.vm("vm2")?.clone();
    let (child, cap) = capture(&tb, &vm2.ns, "hairpin", "icmp")?;
    // vm1 (ch1) -> vm2's floating IP (vm2 is on ch2): translated on ch1, across the overlay.
    tb.ping("vm1", FIP2, 3)?;
    stop(child);
    // vm2 saw vm1 by its floating IP, at its own fixed IP.
    let seen = fields(&cap, "icmp.type == 8", &["ip.src", "ip.dst"])?;
    assert!(
        seen.iter().any(|l| l == &format!("{FIP1},{}", vm2.ip)),
        "{seen:?}"
    );
    Ok(())
}

#[test]
fn vms_without_a_floating_ip_leave_by_their_chassis_snat_address() -> Result<()> {
    let (tb, out) = fip_bed("fd")?;
    default_snat_checks(&tb, &out)
}

/// The same with ch1 on the DPDK backend: the translations in its own table, applied by the
/// poll threads.
#[test]
fn default_snat_on_a_dpdk_chassis() -> Result<()> {
    let (mut tb, out) = fip_topology("fe", None)?;
    tb.start_agent(1)?;
    let d = geneflow_tests::dpdk::start_dpdk(&tb, &["vp-vm1", "vp-vm3"])?;
    d.wait_log("pipeline applied")?;
    default_snat_checks(&tb, &out).with_context(|| d.log())
}

/// vm3 (ch1, no floating IP) leaves by ch1's SNAT address: ICMP and TCP out, translated with
/// good checksums (tshark), replies back, nothing unsolicited in, both directions in the
/// fast path after the first packets.
fn default_snat_checks(tb: &Testbed, out: &str) -> Result<()> {
    const SNAT1: &str = "172.24.4.61";
    let applied = pipelines_applied(tb, "ch1")?;
    tb.nbctl(&["chassis-set-external-ip", "ch1", SNAT1])?;
    wait_applied(tb, "ch1", applied)?;
    let (cap_child, cap) = capture(tb, out, "snat", "ip")?;
    // ICMP echo, TCP (iperf3 to a server on the outside host) and, unsolicited, nothing in.
    tb.ping("vm3", OUTSIDE_IP, 3)?;
    let vm3 = tb.vm("vm3")?.ns.clone();
    let r = iperf3(tb, (out, &vm3), OUTSIDE_IP, 5202, "20M")?;
    assert!(
        r.bytes > 1_000_000,
        "iperf3 through default SNAT: {}",
        r.report
    );
    let dropped = tb.counter("ch1", "phy", "drop_no_nat")?;
    assert!(
        ping_from(tb, out, SNAT1, 2).is_err(),
        "unsolicited ping got in"
    );
    assert!(counter_reaches(tb, "ch1", "phy", "drop_no_nat", dropped + 2) >= dropped + 2);
    stop(cap_child);
    // The outside saw vm3 only as the chassis' address; TCP checksums verified.
    let srcs = fields(&cap, "ip.dst == 172.24.4.100", &["ip.src"])?;
    assert!(!srcs.is_empty());
    assert!(srcs.iter().all(|a| a == SNAT1), "{srcs:?}");
    let good = fields(
        &cap,
        "ip.src == 172.24.4.61 && tcp.checksum.status == \"Good\"",
        &["frame.number"],
    )?;
    assert!(good.len() > 20, "{} translated segments", good.len());
    // TCP segments the receiving side's GRO merged carry no valid checksum in a capture: TCP
    // is checked on the segments above, ICMP and IPv4 on every frame.
    assert_no_bad_checksums(
        &cap,
        "icmp.checksum.status == \"Bad\" || ip.checksum.status == \"Bad\"",
    )?;
    // Both directions ran in the fast path after the first packets.
    assert!(counter_reaches(tb, "ch1", "phy", "fastpath_hit", 101) > 100);
    assert!(tb.counter("ch1", "vp-vm3", "fastpath_hit")? > 100);
    Ok(())
}

#[test]
fn security_groups_apply_to_the_fixed_ip_behind_a_floating_ip() -> Result<()> {
    let (tb, out) = fip_bed("fe")?;
    // vm1 takes ICMP and TCP 5201 in and may open nothing; vm2 may open anything and takes
    // nothing in. Replies of what each allowed must pass both ways through the translation.
    for (sg, rules) in [
        (
            "inbound",
            vec![
                vec!["in-icmp", "--direction", "ingress", "--protocol", "icmp"],
                vec![
                    "in-5201",
                    "--direction",
                    "ingress",
                    "--protocol",
                    "tcp",
                    "--ports",
                    "5201",
                ],
            ],
        ),
        ("outbound", vec![vec!["out-any", "--direction", "egress"]]),
    ] {
        tb.nbctl(&["sg-add", sg])?;
        for r in rules {
            let mut args = vec!["sg-rule-add", sg];
            args.extend(r);
            tb.nbctl(&args)?;
        }
    }
    let applied = pipelines_applied(&tb, "ch1")?;
    tb.nbctl(&["lsp-set-sg", "vm1", "inbound"])?;
    tb.nbctl(&["lsp-set-sg", "vm2", "outbound"])?;
    wait_applied(&tb, "ch1", applied)?;
    // In to vm1 by its floating IP, and the replies out.
    ping_from(&tb, &out, FIP1, 3)?;
    let vm1 = tb.vm("vm1")?.clone();
    let r = iperf3(&tb, (&vm1.ns, &out), FIP1, 5201, "5M")?;
    assert!(
        r.bytes > 1_000_000,
        "iperf3 in through the group: {}",
        r.report
    );
    // What the group does not allow stays out, and vm1 opens nothing.
    let acl0 = tb.counter("ch1", "phy", "drop_acl")?;
    let refused = iperf3(&tb, (&vm1.ns, &out), FIP1, 5999, "1K")?;
    assert!(!refused.ok, "TCP 5999 got in");
    assert!(tb.counter("ch1", "phy", "drop_acl")? > acl0);
    // (Not a ping: ICMP is tracked per address pair, and the outside host's pings made
    // that pair established.)
    let opened = iperf3(&tb, (&out, &vm1.ns), OUTSIDE_IP, 5203, "1K")?;
    assert!(!opened.ok, "vm1 opened a connection");
    // vm2 (on ch2) opens a connection out; its replies come back though nothing is allowed
    // in: they are found in conntrack as vm2 sees them.
    tb.ping("vm2", OUTSIDE_IP, 3)?;
    let acl0 = tb.counter("ch2", "phy", "drop_acl")?;
    let vm2 = tb.vm("vm2")?.ns.clone();
    let refused = iperf3(&tb, (&vm2, &out), FIP2, 5201, "1K")?;
    assert!(!refused.ok);
    assert!(
        tb.counter("ch2", "phy", "drop_acl")? > acl0,
        "a new connection got in to vm2"
    );
    Ok(())
}

#[test]
fn forged_claims_and_unassigned_floating_ips_are_dropped_and_counted() -> Result<()> {
    let (tb, out) = fip_bed("ff")?;
    let (cap_child, cap) = capture(&tb, &out, "claims", "arp")?;
    // vm3 claims vm1's floating IP with ARP replies to everyone: port security drops them.
    let vm3 = tb.vm("vm3")?.clone();
    let spoofed0 = tb.counter("ch1", "vp-vm3", "drop_spoofed_arp")?;
    run(tb
        .ns_cmd(&vm3.ns, "/usr/bin/python3")
        .arg(repo_root().join("tests/scripts/spoof.py"))
        .args(["--iface", "eth0", "--mac", &vm3.mac, "--ip", &vm3.ip])
        .args(["--victim-mac", "ff:ff:ff:ff:ff:ff", "--victim-ip", FIP1])
        .args(["--kind", "arp-spa", "--count", "5"]))?;
    assert_eq!(
        counter_reaches(&tb, "ch1", "vp-vm3", "drop_spoofed_arp", spoofed0 + 5),
        spoofed0 + 5
    );
    stop(cap_child);
    let claims = fields(
        &cap,
        &format!(
            "arp.src.proto_ipv4 == {FIP1} && arp.src.hw_mac == {}",
            vm3.mac
        ),
        &["frame.number"],
    )?;
    assert!(claims.is_empty(), "the claim reached the provider network");
    // Frames from the outside to an unassigned floating IP (no ARP answers for it, so a
    // forged frame to the MAC it would have), and to a floating IP bound elsewhere: no
    // chassis lets them in.
    let unassigned = "172.24.4.59";
    let mac = "0a:fe:ac:18:04:3b";
    let before: u64 = ["ch1", "ch2"]
        .iter()
        .map(|c| tb.counter(c, "phy", "drop_no_destination").unwrap_or(0))
        .sum();
    assert!(ping_from(&tb, &out, unassigned, 1).is_err());
    let script = format!(
        "from scapy.all import *\nsendp([Ether(dst='{mac}')/IP(src='{OUTSIDE_IP}',dst='{unassigned}')/ICMP()]*5, iface='eth0', verbose=False)\n"
    );
    run(tb.ns_cmd(&out, "/usr/bin/python3").args(["-c", &script]))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut after = 0;
    while std::time::Instant::now() < deadline {
        after = ["ch1", "ch2"]
            .iter()
            .map(|c| tb.counter(c, "phy", "drop_no_destination").unwrap_or(0))
            .sum::<u64>();
        if after >= before + 5 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(after >= before + 5, "{} of 5 counted", after - before);
    // To vm1's floating IP MAC but vm2's floating IP: not translated by ch1.
    let nonat0 = tb.counter("ch1", "phy", "drop_no_nat")?;
    let script = format!(
        "from scapy.all import *\nsendp([Ether(dst='0a:fe:ac:18:04:33')/IP(src='{OUTSIDE_IP}',dst='{FIP2}')/ICMP()]*3, iface='eth0', verbose=False)\n"
    );
    run(tb.ns_cmd(&out, "/usr/bin/python3").args(["-c", &script]))?;
    assert!(counter_reaches(&tb, "ch1", "phy", "drop_no_nat", nonat0 + 3) >= nonat0 + 3);
    Ok(())
}

#[test]
fn tenants_with_the_same_address_share_a_snat_address_apart() -> Result<()> {
    let (mut tb, out) = fip_bed("fi")?;
    // Tenant b on ch1: the same subnet, a VM with vm3's very address and MAC.
    for args in [
        vec!["ls-add", "lsb", "--key", "2000", "--tenant", "b"],
        vec!["subnet-add", "lsb", "snb", "10.0.0.0/16"],
        vec!["lr-add", "rb", "--key", "5001", "--tenant", "b"],
        vec![
            "lrp-add",
            "rb",
            "rb-ls",
            "0a:00:00:00:fe:01",
            "10.0.255.254/16",
            "--key",
            "100",
            "--switch",
            "lsb",
        ],
        vec![
            "lrp-add",
            "rb",
            "rb-gw",
            "0a:00:00:00:fe:02",
            "172.24.4.11/24",
            "--key",
            "102",
            "--switch",
            "ext",
        ],
        vec!["lr-route-add", "rb", "0.0.0.0/0", UPSTREAM_IP],
        vec!["chassis-set-external-ip", "ch1", "172.24.4.61"],
    ] {
        tb.nbctl(&args)?;
    }
    let applied = pipelines_applied(&tb, "ch1")?;
    tb.add_vm("wb", "ch1", "lsb", 3)?;
    default_route(&tb, "wb")?;
    wait_applied(&tb, "ch1", applied)?;
    assert_eq!(tb.vm("wb")?.ip, tb.vm("vm3")?.ip);
    // The outside host's ARP for the SNAT address teaches ch1 where it is (its ping is
    // unsolicited and dropped), so the single datagrams below find their next hop.
    let _ = ping_from(&tb, &out, "172.24.4.61", 1);
    // The outside host echoes two datagrams, saying where each came from.
    let mut echo = tb
        .ns_cmd(&out, "/usr/bin/python3")
        .args(["-c", "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',7000))\ns.settimeout(10)\nfor i in range(2):\n d,a=s.recvfrom(100)\n print(a[0],a[1],d.decode(),flush=True)\n s.sendto(d,a)\n"])
        .stdout(Stdio::piped())
        .spawn()?;
    wait_listening(&mut echo, &out, "udp", 7000)?;
    // Both send from the same address and port to the same place; each must get its own
    // answer back.
    let client = |vm: &str| -> Result<String> {
        run(tb.ns_cmd(&tb.vm(vm)?.ns, "/usr/bin/python3").args([
            "-c",
            &format!("import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',40000))\ns.settimeout(5)\ns.sendto(b'{vm}',('{OUTSIDE_IP}',7000))\nprint(s.recvfrom(100)[0].decode())\n"),
        ]))
    };
    assert_eq!(client("vm3")?.trim(), "vm3");
    assert_eq!(client("wb")?.trim(), "wb");
    let seen = echo.wait_with_output()?;
    let lines: Vec<String> = String::from_utf8_lossy(&seen.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    // Seen from outside: one SNAT address, two different ports.
    let (a, b): (Vec<&str>, Vec<&str>) =
        (lines[0].split(' ').collect(), lines[1].split(' ').collect());
    assert_eq!((a[0], b[0]), ("172.24.4.61", "172.24.4.61"), "{lines:?}");
    assert_ne!(a[1], b[1], "{lines:?}");
    Ok(())
}
