//! End-to-end: provider networks themselves. VMs attached straight to one reach its hosts and
//! each other through the chassis' provider interfaces, never through the overlay; a provider
//! network on a VLAN carries floating IPs and default SNAT tagged.

use anyhow::Result;
use geneflow_tests::provider::*;
use geneflow_tests::*;
use std::process::Command;
use std::time::Duration;
use xtask::testbed_provider::OUTSIDE_IP;

#[test]
fn vms_on_a_provider_network_talk_to_it_untunnelled() -> Result<()> {
    require_root();
    let mut tb = Testbed::new("fg")?;
    tb.add_chassis("ch1")?;
    tb.add_chassis("ch2")?;
    let out = tb.add_provider_network()?;
    tb.nbctl(&["ls-add", "ext", "--key", "900", "--provider", "physnet1"])?;
    tb.nbctl(&["subnet-add", "ext", "ext-sn", "172.24.4.0/24"])?;
    for (vm, ch, key, ip) in [
        ("pv1", "ch1", 71, "172.24.4.71"),
        ("pv2", "ch2", 72, "172.24.4.72"),
    ] {
        tb.add_vm_unbound(vm, ch, key)?;
        let ns = tb.vm(vm)?.ns.clone();
        run(tb.ns_cmd(&ns, "ip").args(["addr", "flush", "dev", "eth0"]))?;
        run(tb
            .ns_cmd(&ns, "ip")
            .args(["addr", "add", &format!("{ip}/24"), "dev", "eth0"]))?;
        let mac = tb.vm(vm)?.mac.clone();
        tb.nbctl(&["lsp-add", "ext", vm, &mac, ip, "--key", &key.to_string()])?;
        tb.nbctl(&["lsp-bind", vm, ch, &format!("vp-{vm}")])?;
    }
    tb.start_agents()?;
    let (cap_child, cap) = capture(&tb, &out, "provider", "icmp")?;
    tb.ping("pv1", OUTSIDE_IP, 3)?;
    ping_from(&tb, &out, "172.24.4.72", 3)?;
    // Between chassis, through the physical network: no Geneve on the underlay for it.
    let geneve0 = tb.counter("ch1", "ul", "tx_packets")?;
    let phy0 = tb.counter("ch1", "phy", "tx_packets")?;
    tb.ping("pv1", "172.24.4.72", 3)?;
    assert_eq!(tb.counter("ch1", "ul", "tx_packets")?, geneve0);
    assert!(tb.counter("ch1", "phy", "tx_packets")? >= phy0 + 3);
    stop(cap_child);
    let seen = fields(&cap, "icmp.type == 8", &["ip.src", "ip.dst"])?;
    assert!(seen
        .iter()
        .any(|l| l == &format!("172.24.4.71,{OUTSIDE_IP}")));
    assert!(seen
        .iter()
        .any(|l| l == &format!("{OUTSIDE_IP},172.24.4.72")));
    Ok(())
}

#[test]
fn a_provider_network_on_a_vlan_carries_floating_ips_and_snat_tagged() -> Result<()> {
    let (tb, out) = fip_bed_vlan("fh", Some(100))?;
    vlan_network_checks(&tb, &out)
}

/// The same with ch1 on the DPDK backend (its provider interface a DPDK port).
#[test]
fn a_provider_network_on_a_vlan_on_a_dpdk_chassis() -> Result<()> {
    let (mut tb, out) = fip_topology("fv", Some(100))?;
    tb.start_agent(1)?;
    let d = geneflow_tests::dpdk::start_dpdk(&tb, &["vp-vm1", "vp-vm3"])?;
    d.wait_log("pipeline applied")?;
    vlan_network_checks(&tb, &out)
}

/// ch1's side of a provider network on VLAN 100: ARP answered for a floating IP on the VLAN
/// it came on, echo replies and the VMs' own packets out tagged (with the floating IP, and
/// with the chassis' SNAT address), untagged frames refused, and `trace`.
fn vlan_network_checks(tb: &Testbed, out: &str) -> Result<()> {
    // This kernel has no 802.1Q support (no VLAN devices, no VLAN-aware bridge, and a Linux
    // bridge moves tags out of the frame), so the outside host's VLAN 100 frames are sent by
    // scapy straight into ch1's provider interface from its peer, where tshark also reads
    // what geneflow sends back.
    const SNAT1: &str = "172.24.4.61";
    let applied = pipelines_applied(tb, "ch1")?;
    tb.nbctl(&["chassis-set-external-ip", "ch1", SNAT1])?;
    wait_applied(tb, "ch1", applied)?;
    let pn = format!("{}-pn", tb.prefix);
    let (cap_child, cap) = capture_on(tb, &pn, "p0", "vlan", "")?;
    let mac = mac_of(out, "eth0")?;
    let fip_mac = "0a:fe:ac:18:04:33";
    let script = format!(
        "from scapy.all import *\n\
         v = Dot1Q(vlan=100)\n\
         sendp(Ether(src='{mac}', dst='ff:ff:ff:ff:ff:ff')/v/ARP(op=1, hwsrc='{mac}', psrc='{OUTSIDE_IP}', pdst='{FIP1}'), iface='p0', verbose=False)\n\
         sendp(Ether(src='{mac}', dst='ff:ff:ff:ff:ff:ff')/ARP(op=1, hwsrc='{mac}', psrc='{OUTSIDE_IP}', pdst='{FIP1}'), iface='p0', verbose=False)\n\
         sendp([Ether(src='{mac}', dst='{fip_mac}')/v/IP(src='{OUTSIDE_IP}', dst='{FIP1}')/ICMP(id=77, seq=i) for i in range(3)], iface='p0', verbose=False, inter=0.2)\n\
         sendp(Ether(src='{mac}', dst='{fip_mac}')/IP(src='{OUTSIDE_IP}', dst='{FIP1}')/ICMP(id=78), iface='p0', verbose=False)\n"
    );
    run(tb.ns_cmd(&pn, "/usr/bin/python3").args(["-c", &script]))?;
    std::thread::sleep(Duration::from_millis(500));
    // Out of the VMs, to the next hop the tagged ARP taught: with the floating IP, and with
    // the chassis' SNAT address (the outside host cannot answer: it does not do VLANs).
    let _ = tb.ping("vm1", OUTSIDE_IP, 2);
    let _ = tb.ping("vm3", OUTSIDE_IP, 2);
    stop(cap_child);
    let from_geneflow = |filter: &str| -> Result<Vec<String>> {
        fields(
            &cap,
            &format!("eth.src[0:2] == 0a:fe && {filter}"),
            &["vlan.id", "ip.src", "icmp.type", "arp.src.proto_ipv4"],
        )
    };
    let arp = from_geneflow("arp.opcode == 2")?;
    assert_eq!(arp, vec![format!("100,,,{FIP1}")], "ARP answers: {arp:?}");
    let replies = from_geneflow("icmp.type == 0")?;
    assert_eq!(replies.len(), 3, "echo replies: {replies:?}");
    assert!(
        replies.iter().all(|l| l == &format!("100,{FIP1},0,")),
        "{replies:?}"
    );
    let outbound = from_geneflow("icmp.type == 8")?;
    assert!(outbound.contains(&format!("100,{FIP1},8,")), "{outbound:?}");
    assert!(
        outbound.contains(&format!("100,{SNAT1},8,")),
        "{outbound:?}"
    );
    let untagged = fields(&cap, "!vlan && eth.src[0:2] == 0a:fe", &["frame.number"])?;
    assert!(
        untagged.is_empty(),
        "untagged frames from geneflow: {untagged:?}"
    );
    // The untagged frames belong to no network of ch1.
    assert!(tb.counter("ch1", "phy", "drop_unknown_datapath")? >= 2);
    // trace follows a frame in from the physical network, on its VLAN.
    let trace = |vlan: &[&str]| {
        run(Command::new(tb.bin("geneflowctl"))
            .args(["trace", "--socket"])
            .arg(&tb.chassis[0].socket)
            .args(["--in-port", "physnet1"])
            .args(vlan)
            .args([
                "--eth-src",
                &mac,
                "--eth-dst",
                fip_mac,
                "--ip-src",
                OUTSIDE_IP,
            ])
            .args(["--ip-dst", FIP1, "--proto", "icmp"]))
    };
    let t = trace(&["--vlan", "100"])?;
    assert!(t.contains("provider interface phy, VLAN 100"), "{t}");
    assert!(
        t.contains("dnat: floating IP 172.24.4.51 -> fixed IP 10.0.0.1"),
        "{t}"
    );
    assert!(t.contains("verdict: forward"), "{t}");
    let t = trace(&[])?;
    assert!(t.contains("no switch of this chassis"), "{t}");
    Ok(())
}
