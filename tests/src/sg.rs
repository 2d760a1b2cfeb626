//! Security-group helpers for the end-to-end tests: a TCP server in a VM, connecting and
//! pinging from one, and a group "web" to put a VM in.

use crate::{counter_reaches, pipelines_applied, wait_applied, wait_listening, Testbed};
use anyhow::Result;
use std::process::{Child, Command, Stdio};

/// A TCP server in VM `vm` on `port` that answers every connection with "ok".
pub fn server(tb: &Testbed, vm: &str, port: u16) -> Result<Child> {
    let ns = tb.vm(vm)?.ns.clone();
    let code = format!(
        "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',{port}))\ns.listen(16)\nwhile True:\n    c,_=s.accept()\n    c.sendall(b'ok')\n    c.close()\n"
    );
    let mut c = Command::new("ip")
        .args(["netns", "exec", &ns, "/usr/bin/python3", "-c", &code])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    wait_listening(&mut c, &ns, "tcp", port)?;
    Ok(c)
}

/// Pins VM `to`'s address to its MAC in VM `from`'s neighbour table: no ARP probe of
/// `from`'s kernel (an entry gone stale is probed 5 s after its next use) lands in a stream
/// whose every frame a test counts.
pub fn pin_neighbour(tb: &Testbed, from: &str, to: &str) -> Result<()> {
    let (a, b) = (tb.vm(from)?, tb.vm(to)?);
    crate::run(Command::new("ip").args([
        "-n",
        &a.ns,
        "neigh",
        "replace",
        &b.ip,
        "lladdr",
        &b.mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]))?;
    Ok(())
}

/// Opens a UDP flow from VM `from` to VM `to` slowly (2 datagrams to `port`, 100 ms apart)
/// and waits until `chassis` has installed both of its megaflows, the new connection's and
/// the established one's. A stream started after it stays in XDP from its first frame, since
/// XDP commits new connections itself. Sent in a burst instead, the frames behind each
/// miss would miss too while the slow path waits for a CPU on a loaded machine. `to`'s
/// neighbour entry in `from` is pinned first (`pin_neighbour`).
pub fn warm_up(tb: &Testbed, (from, to): (&str, &str), port: u16, chassis: &str) -> Result<()> {
    pin_neighbour(tb, from, to)?;
    let iface = format!("vp-{from}");
    let inst0 = tb.counter(chassis, &iface, "megaflow_install")?;
    let rx = tb.udp_receiver(to, port, 2, 10.0)?;
    tb.udp_send(from, &tb.vm(to)?.ip.clone(), port, 2, 10)?;
    let got = Testbed::udp_result(rx)?;
    anyhow::ensure!(
        got == 2,
        "warm-up {from} -> {to}: {got} of 2 datagrams arrived"
    );
    let inst = counter_reaches(tb, chassis, &iface, "megaflow_install", inst0 + 2);
    anyhow::ensure!(
        inst >= inst0 + 2,
        "warm-up {from} -> {to}: {} megaflows installed on {iface}, 2 expected",
        inst.saturating_sub(inst0)
    );
    Ok(())
}

/// Whether VM `vm` gets "ok" from `ip`:`port` within 2 s.
pub fn connects(tb: &Testbed, vm: &str, ip: &str, port: u16) -> Result<bool> {
    let ns = tb.vm(vm)?.ns.clone();
    let code = format!(
        "import socket,sys\ntry:\n    c=socket.create_connection(('{ip}',{port}),timeout=2)\n    sys.exit(0 if c.recv(2)==b'ok' else 1)\nexcept Exception:\n    sys.exit(1)\n"
    );
    Ok(Command::new("ip")
        .args(["netns", "exec", &ns, "/usr/bin/python3", "-c", &code])
        .status()?
        .success())
}

pub fn pings(tb: &Testbed, from: &str, ip: &str) -> Result<bool> {
    let ns = tb.vm(from)?.ns.clone();
    Ok(Command::new("ip")
        .args([
            "netns", "exec", &ns, "ping", "-c", "2", "-W", "1", "-i", "0.2", ip,
        ])
        .stdout(Stdio::null())
        .status()?
        .success())
}

/// Puts `vm` (bound to `chassis`) in a new group "web": anything out, and in what the rule
/// `ingress` (`sg-rule-add web` arguments) allows, if given; returns once `chassis` has
/// applied it.
pub fn in_group_web(tb: &Testbed, vm: &str, chassis: &str, ingress: &[&str]) -> Result<()> {
    tb.nbctl(&["sg-add", "web"])?;
    tb.nbctl(&["sg-rule-add", "web", "out", "--direction", "egress"])?;
    if !ingress.is_empty() {
        let mut args = vec!["sg-rule-add", "web"];
        args.extend_from_slice(ingress);
        tb.nbctl(&args)?;
    }
    let before = pipelines_applied(tb, chassis)?;
    tb.nbctl(&["lsp-set-sg", vm, "web"])?;
    wait_applied(tb, chassis, before)
}

/// The conntrack entries `geneflowctl ct` lists on `chassis`.
pub fn ct_entries(tb: &Testbed, chassis: &str) -> Result<Vec<serde_json::Value>> {
    let sock = tb.chassis[tb.chassis_index(chassis)?].socket.clone();
    let out = crate::run(
        Command::new(tb.bin("geneflowctl"))
            .args(["ct", "--format", "json", "--socket"])
            .arg(&sock),
    )?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v["entries"].as_array().cloned().unwrap_or_default())
}

/// The connections `chassis` tracks to `dst` ("ip:port"), read once `want` of them are there
/// and all closing (their FINs in), or after 2 s. Meant for right after they closed: they
/// expire 10-20 s after their last packet, which the checks a test makes before reading
/// them can take on a loaded machine.
pub fn closed_connections(
    tb: &Testbed,
    chassis: &str,
    dst: &str,
    want: usize,
) -> Result<Vec<serde_json::Value>> {
    let to_dst = || -> Result<Vec<serde_json::Value>> {
        Ok(ct_entries(tb, chassis)?
            .into_iter()
            .filter(|e| e["dst"] == dst)
            .collect())
    };
    crate::within(std::time::Duration::from_secs(2), || {
        let c = to_dst()?;
        Ok(c.len() == want && c.iter().all(|e| e["closing"] == true))
    })?;
    to_dst()
}

/// The connections `chassis` tracks from address `src_ip` (any port) or to `dst`
/// ("ip:port"): where refused connection attempts must have left nothing.
pub fn tracked_from_or_to(
    tb: &Testbed,
    chassis: &str,
    src_ip: &str,
    dst: &str,
) -> Result<Vec<serde_json::Value>> {
    let from = format!("{src_ip}:");
    Ok(ct_entries(tb, chassis)?
        .into_iter()
        .filter(|e| e["src"].as_str().unwrap_or("").starts_with(&from) || e["dst"] == dst)
        .collect())
}
