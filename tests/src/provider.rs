//! The provider-network testbed of the floating-IP and provider tests, and capture helpers
//! (tcpdump in a namespace, tshark to read it).

use crate::{require_root, Testbed, LS1_KEY};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use xtask::testbed::run;

pub const FIP1: &str = "172.24.4.51";
pub const FIP2: &str = "172.24.4.52";
pub use xtask::testbed_l3::LS1_GATEWAY as ROUTER_IP;

/// ch1 hosts vm1 (floating IP .51) and vm3 (none), ch2 hosts vm2 (.52), all on ls1
/// (10.0.0.0/16) behind router r1, whose gateway port is on the provider switch `ext`
/// (physnet1, 172.24.4.0/24) with a default route to the outside host's 172.24.4.1.
pub fn fip_bed(tag: &str) -> Result<(Testbed, String)> {
    fip_bed_vlan(tag, None)
}

/// `fip_bed` with the provider network on VLAN `vlan`.
pub fn fip_bed_vlan(tag: &str, vlan: Option<u16>) -> Result<(Testbed, String)> {
    let (mut tb, out) = fip_topology(tag, vlan)?;
    tb.start_agents()?;
    Ok((tb, out))
}

/// `fip_bed_vlan` with no agent started.
pub fn fip_topology(tag: &str, vlan: Option<u16>) -> Result<(Testbed, String)> {
    require_root();
    let mut tb = Testbed::new(tag)?;
    tb.add_chassis("ch1")?;
    tb.add_chassis("ch2")?;
    let out = tb.add_provider_network()?;
    tb.nbctl(&["ls-add", "ls1", "--key", &LS1_KEY.to_string()])?;
    tb.nbctl(&["subnet-add", "ls1", "sn1", "10.0.0.0/16"])?;
    tb.add_ls1_router("r1", 5000)?;
    tb.add_provider_gateway("r1", "0a:00:00:00:ff:02", vlan)?;
    for (vm, ch, key) in [("vm1", "ch1", 1), ("vm2", "ch2", 2), ("vm3", "ch1", 3)] {
        tb.add_vm(vm, ch, "ls1", key)?;
        default_route(&tb, vm)?;
    }
    tb.nbctl(&["fip-add", "fip1", FIP1, "vm1", "r1"])?;
    tb.nbctl(&["fip-add", "fip2", FIP2, "vm2", "r1"])?;
    Ok((tb, out))
}

pub fn default_route(tb: &Testbed, vm: &str) -> Result<()> {
    run(tb
        .ns_cmd(&tb.vm(vm)?.ns, "ip")
        .args(["route", "add", "default", "via", ROUTER_IP]))?;
    Ok(())
}

pub fn ping_from(tb: &Testbed, ns: &str, to: &str, count: u32) -> Result<()> {
    let out = tb
        .ns_cmd(ns, "ping")
        .args(["-c", &count.to_string(), "-i", "0.2", "-W", "2", to])
        .output()?;
    if !out.status.success() {
        bail!(
            "ping {to} from {ns}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(())
}

pub fn capture(tb: &Testbed, ns: &str, name: &str, filter: &str) -> Result<(Child, PathBuf)> {
    capture_on(tb, ns, "eth0", name, filter)
}

pub fn capture_on(
    tb: &Testbed,
    ns: &str,
    iface: &str,
    name: &str,
    filter: &str,
) -> Result<(Child, PathBuf)> {
    let cap = tb.dir.join(format!("{name}.pcap"));
    let mut child = tb
        .ns_cmd(ns, "tcpdump")
        .args(["-n", "-U", "--immediate-mode", "-i", iface, "-w"])
        .arg(&cap)
        .arg(filter)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    // tcpdump says "listening on" once its filter is attached: tests read the very first
    // frames (DHCP's sequence, the first pings), which a fixed sleep lost on a loaded machine.
    // The thread drains the rest of its stderr until it exits.
    let stderr = child.stderr.take().context("tcpdump's stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("listening on") {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(10)).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        bail!("tcpdump on {iface} in {ns} did not start listening within 10 s");
    }
    Ok((child, cap))
}

pub fn stop(mut c: Child) {
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
    let _ = c.wait();
}

/// tshark's fields of the frames of `cap` that match `filter`, one line per frame.
pub fn fields(cap: &Path, filter: &str, fields: &[&str]) -> Result<Vec<String>> {
    let mut c = Command::new("tshark");
    c.args(["-n", "-r"])
        .arg(cap)
        .args(["-Y", filter, "-T", "fields"]);
    for p in [
        "ip.check_checksum:TRUE",
        "tcp.check_checksum:TRUE",
        "udp.check_checksum:TRUE",
    ] {
        c.args(["-o", p]);
    }
    c.args(["-E", "separator=,"]);
    for f in fields {
        c.args(["-e", f]);
    }
    Ok(run(&mut c)?
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// What one iperf3 run said: whether the client connected and finished, the bytes the server received,
/// and the client's JSON report.
pub struct Iperf {
    pub ok: bool,
    pub bytes: u64,
    pub report: String,
}

/// An iperf3 server on `port` in `server_ns` (for one test), a client in `client_ns` sending
/// `amount` (e.g. "20M") to `dst`, giving up connecting after 1.5 s.
pub fn iperf3(
    tb: &Testbed,
    (server_ns, client_ns): (&str, &str),
    dst: &str,
    port: u16,
    amount: &str,
) -> Result<Iperf> {
    let port_s = port.to_string();
    let mut server = tb
        .ns_cmd(server_ns, "iperf3")
        .args(["-s", "-1", "-p", &port_s])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    crate::wait_listening(&mut server, server_ns, "tcp", port)?;
    let client = tb
        .ns_cmd(client_ns, "iperf3")
        .args(["-c", dst, "-p", &port_s, "-n", amount, "-J"])
        .args(["--connect-timeout", "1500"])
        .output()?;
    let _ = server.kill();
    let _ = server.wait();
    let report: serde_json::Value = serde_json::from_slice(&client.stdout).unwrap_or_default();
    // iperf3 -J exits 0 when it cannot connect (3.12 does): the report's "error" and its
    // list of connections say whether it did.
    let connected = report["start"]["connected"]
        .as_array()
        .is_some_and(|c| !c.is_empty());
    Ok(Iperf {
        ok: client.status.success() && connected && report["error"].is_null(),
        bytes: report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0),
        report: report.to_string(),
    })
}

/// Fails unless no frame of `cap` that matches `filter` (a tshark display filter naming bad
/// checksums) is there.
pub fn assert_no_bad_checksums(cap: &Path, filter: &str) -> Result<()> {
    let bad = fields(cap, filter, &["frame.number"])?;
    assert!(
        bad.is_empty(),
        "{} frames with bad checksums, first {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    Ok(())
}
