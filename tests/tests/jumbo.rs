//! End-to-end: underlay MTUs 1500, 3000 and 9000 with the inner MTU to match (underlay less
//! Geneve's 58 bytes). Full-size pings (first one through the slow path, which takes and sends
//! frames of several AF_XDP descriptors), UDP datagrams of the full size, TCP with iperf3, IP
//! fragments and a UDP datagram without a checksum, all between VMs on two chassis. Every outer
//! UDP checksum on the underlay is checked by tshark, and the frames that carry TCP, UDP or ICMP
//! must have a real one (derived from the inner checksum, whatever the size).

use anyhow::Result;
use geneflow_tests::provider::{capture_on, fields, iperf3, stop};
use geneflow_tests::*;
use std::process::Stdio;

/// Geneve with the OVN option: outer Ethernet, IPv4, UDP, Geneve and the option.
const OVERHEAD: u32 = 58;

fn set_mtu(ns: &str, iface: &str, mtu: u32) -> Result<()> {
    run(std::process::Command::new("ip").args([
        "-n",
        ns,
        "link",
        "set",
        iface,
        "mtu",
        &mtu.to_string(),
    ]))?;
    Ok(())
}

/// ch1 hosts vm1, ch2 hosts vm3 on ls1; the underlay (uplinks, bridge ports) has MTU
/// `underlay`, the VMs and their ports `underlay - 58`.
fn jumbo_bed(tag: &str, underlay: u32) -> Result<Testbed> {
    require_root();
    let mut tb = Testbed::new(tag)?;
    tb.add_chassis("ch1")?;
    tb.add_chassis("ch2")?;
    tb.nbctl(&["ls-add", "ls1", "--key", &LS1_KEY.to_string()])?;
    tb.add_vm("vm1", "ch1", "ls1", 1)?;
    tb.add_vm("vm3", "ch2", "ls1", 3)?;
    for c in &tb.chassis {
        set_mtu(&tb.underlay_ns, &c.bridge_port, underlay)?;
        set_mtu(&c.ns, "ul", underlay)?;
    }
    let inner = underlay - OVERHEAD;
    for v in &tb.vms {
        let ch = &tb.chassis[tb.chassis_index(&v.chassis)?];
        set_mtu(&ch.ns, &v.iface, inner)?;
        set_mtu(&v.ns, "eth0", inner)?;
    }
    tb.start_agents()?;
    Ok(tb)
}

fn ping_size(tb: &Testbed, from: &str, to_ip: &str, size: u32, df: bool) -> Result<()> {
    let vm = tb.vm(from)?;
    let mut c = tb.ns_cmd(&vm.ns, "ping");
    c.args(["-c", "3", "-i", "0.2", "-W", "2", "-s", &size.to_string()]);
    c.args(["-M", if df { "do" } else { "dont" }, to_ip]);
    let out = c.output()?;
    anyhow::ensure!(
        out.status.success(),
        "ping -s {size} {to_ip} from {from}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `count` datagrams of `size` bytes from vm1 to vm3; returns how many distinct ones arrived.
fn udp_sized(tb: &Testbed, port: u16, count: u64, size: u32) -> Result<u64> {
    let rx = tb.udp_receiver("vm3", port, count, 2.0)?;
    let vm1 = tb.vm("vm1")?;
    let st = tb
        .ns_cmd(&vm1.ns, &tb.bin("gf-udp"))
        .args(["send", "--dst", &format!("{}:{port}", tb.vm("vm3")?.ip)])
        .args(["--count", &count.to_string(), "--rate", "5000"])
        .args(["--size", &size.to_string()])
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(st.success(), "gf-udp send: {st}");
    Testbed::udp_result(rx)
}

fn run_mtu(underlay: u32) -> Result<()> {
    let tb = jumbo_bed(&format!("j{underlay}"), underlay)?;
    let inner = underlay - OVERHEAD;
    let vm3_ip = tb.vm("vm3")?.ip.clone();
    let (cap, path) = capture_on(
        &tb,
        &tb.underlay_ns,
        &tb.chassis[0].bridge_port,
        "underlay",
        "udp dst port 6081",
    )?;
    // Full-size echo requests (IP packet = inner MTU), DF set: the first through the slow path.
    ping_size(&tb, "vm1", &vm3_ip, inner - 28, true)?;
    // Larger, without DF: the VM fragments it, and the fragments cross too.
    ping_size(&tb, "vm1", &vm3_ip, inner + 1000, false)?;
    // UDP datagrams filling the inner MTU.
    let n = udp_sized(&tb, 7001, 500, inner - 28)?;
    assert_eq!(
        n,
        500,
        "MTU {underlay}: {} of 500 full-size datagrams lost",
        500 - n
    );
    // TCP: the VMs' MSS follows their MTU.
    let vm1 = tb.vm("vm1")?.ns.clone();
    let vm3 = tb.vm("vm3")?.ns.clone();
    let r = iperf3(&tb, (&vm3, &vm1), &vm3_ip, 5201, "20M")?;
    // (The receiver's count is taken when the sender has sent its last byte: some are still
    // in flight.)
    assert!(
        r.ok && r.bytes >= 5_000_000,
        "MTU {underlay}: iperf3: {}",
        r.report
    );
    // A UDP datagram without a checksum: the outer checksum cannot be derived from it.
    let script = format!(
        "from scapy.all import *\nsendp([Ether(src='{}',dst='{}')/IP(src='{}',dst='{vm3_ip}')/UDP(sport=9,dport=7002,chksum=0)/Raw(b'x'*{})]*3, iface='eth0', verbose=False)\n",
        tb.vm("vm1")?.mac,
        tb.vm("vm3")?.mac,
        tb.vm("vm1")?.ip,
        inner - 28
    );
    run(tb.ns_cmd(&vm1, "/usr/bin/python3").args(["-c", &script]))?;
    stop(cap);

    // tshark decodes every frame: no bad checksum anywhere (outer or inner).
    let bad = fields(
        &path,
        "ip.checksum.status == \"Bad\" || udp.checksum.status == \"Bad\" || tcp.checksum.status == \"Bad\"",
        &["frame.number", "frame.len"],
    )?;
    assert!(
        bad.is_empty(),
        "MTU {underlay}: {} frames with bad checksums, first {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    // Frames that carry an unfragmented TCP segment, UDP datagram with a checksum or ICMP
    // message have a real outer checksum, the largest ones included (not the ICMP errors
    // that quote the checksum-less datagrams: tshark's udp.checksum would name the quote's).
    let derivable =
        "(tcp || icmp || udp.dstport == 7001) && !(ip.flags.mf == 1) && !(ip.frag_offset > 0) \
         && !(udp.port == 7002)";
    let good = fields(
        &path,
        &format!("{derivable} && udp.checksum.status == \"Good\""),
        &["frame.len"],
    )?;
    let zero = fields(
        &path,
        &format!("{derivable} && udp.checksum == 0"),
        &[
            "frame.number",
            "frame.len",
            "frame.protocols",
            "udp.dstport",
        ],
    )?;
    assert!(
        zero.is_empty(),
        "MTU {underlay}: {} frames without an outer checksum: {zero:?}",
        zero.len()
    );
    let largest = good
        .iter()
        .filter_map(|l| l.parse::<u32>().ok())
        .max()
        .unwrap_or(0);
    assert_eq!(
        largest,
        underlay + 14,
        "MTU {underlay}: the largest frame with a good outer checksum is {largest} bytes"
    );
    // The datagrams without a checksum crossed (with a zero outer checksum if they could not
    // be summed, never a wrong one).
    let nock = fields(&path, "udp.dstport == 7002 && !icmp", &["frame.len"])?;
    assert_eq!(
        nock.len(),
        3,
        "MTU {underlay}: checksum-less datagrams: {nock:?}"
    );
    assert_no_drops_but(&tb, &["ch1", "ch2"], &[])?;
    Ok(())
}

#[test]
fn underlay_mtu_1500() -> Result<()> {
    run_mtu(1500)
}

#[test]
fn underlay_mtu_3000() -> Result<()> {
    run_mtu(3000)
}

#[test]
fn underlay_mtu_9000() -> Result<()> {
    run_mtu(9000)
}
