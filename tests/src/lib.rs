//! Topologies and helpers for the end-to-end tests (tests/tests/*.rs). The tests run real
//! `geneflowd` agents with real XDP programs and AF_XDP sockets on veths in network namespaces
//! they create and remove; they need root.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;
pub use xtask::testbed::{run, NbKind, Testbed, DB_IP};

pub mod dpdk;
pub mod provider;
pub mod sg;

pub const LS1_KEY: u32 = 1000;

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the end-to-end tests need root (run `cargo xtask test`)"
    );
}

/// ch1 hosts vm1 (key 1) and vm2 (key 2), ch2 hosts vm3 (key 3) and vm4 (key 4), all on ls1.
pub fn two_chassis(tag: &str) -> Result<Testbed> {
    two_chassis_on(tag, NbKind::File)
}

/// `two_chassis` with the NB in `kind`.
pub fn two_chassis_on(tag: &str, kind: NbKind) -> Result<Testbed> {
    two_chassis_queues(tag, kind, 1)
}

/// `two_chassis_on` with `queues` receive and transmit queues on every veth.
pub fn two_chassis_queues(tag: &str, kind: NbKind, queues: u32) -> Result<Testbed> {
    two_chassis_with(tag, kind, queues, |_| Ok(()))
}

/// `two_chassis_queues`, with `before_agents` run on the testbed just before the agents start.
pub fn two_chassis_with(
    tag: &str,
    kind: NbKind,
    queues: u32,
    before_agents: impl FnOnce(&mut Testbed) -> Result<()>,
) -> Result<Testbed> {
    require_root();
    let mut tb = Testbed::with_nb(tag, kind)?;
    tb.queues = queues;
    tb.add_chassis("ch1")?;
    tb.add_chassis("ch2")?;
    tb.nbctl(&["ls-add", "ls1", "--key", &LS1_KEY.to_string()])?;
    for (vm, ch, key) in [
        ("vm1", "ch1", 1),
        ("vm2", "ch1", 2),
        ("vm3", "ch2", 3),
        ("vm4", "ch2", 4),
    ] {
        tb.add_vm(vm, ch, "ls1", key)?;
    }
    before_agents(&mut tb)?;
    tb.start_agents()?;
    Ok(tb)
}

pub const PEER_PORT_KEY: u16 = 9;
pub const PEER_MAC: &str = "0a:00:00:00:00:09";
pub const PEER_VM_IP: &str = "10.0.0.9";

/// ch1 (agent) hosts vm1 (key 1) on ls1; "peer" is a chassis in the NB whose encap IP is the
/// injector namespace (198.18.0.250), hosting port vmx (key 9): what geneflow sends to vmx can be
/// captured there, and frames built by scapy there look like they come from a real chassis.
pub fn with_peer(tag: &str) -> Result<Testbed> {
    with_peer_queues(tag, 1)
}

/// `with_peer` with `queues` receive and transmit queues on every veth.
pub fn with_peer_queues(tag: &str, queues: u32) -> Result<Testbed> {
    require_root();
    let mut tb = Testbed::new(tag)?;
    tb.queues = queues;
    tb.add_chassis("ch1")?;
    tb.nbctl(&["ls-add", "ls1", "--key", &LS1_KEY.to_string()])?;
    tb.add_vm("vm1", "ch1", "ls1", 1)?;
    add_peer(&mut tb)?;
    tb.start_agents()?;
    Ok(tb)
}

/// The injector as chassis "peer" of the NB (198.18.0.250), hosting port vmx (key 9) on ls1.
pub fn add_peer(tb: &mut Testbed) -> Result<()> {
    tb.add_injector()?;
    tb.nbctl(&["chassis-add", "peer", "198.18.0.250"])?;
    tb.nbctl(&[
        "lsp-add",
        "ls1",
        "vmx",
        PEER_MAC,
        PEER_VM_IP,
        "--key",
        &PEER_PORT_KEY.to_string(),
    ])?;
    tb.nbctl(&["lsp-bind", "vmx", "peer", "vmx-if"])?;
    Ok(())
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// MAC of an interface inside a namespace.
pub fn mac_of(ns: &str, iface: &str) -> Result<String> {
    let out = run(Command::new("ip").args(["-n", ns, "-j", "link", "show", "dev", iface]))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v[0]["address"]
        .as_str()
        .map(str::to_string)
        .context("no address")
}

/// Packets received by an interface inside a namespace (kernel counter).
pub fn rx_packets(ns: &str, iface: &str) -> Result<u64> {
    let out = run(Command::new("ip").args(["-n", ns, "-s", "-j", "link", "show", "dev", iface]))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .context("no rx counter")
}

/// Injects `count` scapy-built Geneve frames of `kind` from the injector to ch1, addressed
/// (inner) from vmx to vm1 on UDP port `dport`.
pub fn inject(tb: &Testbed, kind: &str, count: u32, dport: u16) -> Result<()> {
    let egress = tb.vm("vm1")?.key;
    inject_to(tb, kind, count, dport, egress)
}

/// As `inject`, with the OVN option's egress port key chosen by the caller.
pub fn inject_to(tb: &Testbed, kind: &str, count: u32, dport: u16, egress: u16) -> Result<()> {
    inject_from(tb, "198.18.0.250", kind, LS1_KEY, egress, count, dport)
}

/// Injects `count` scapy-built Geneve frames of `kind` (tests/scripts/inject.py) to ch1 from
/// underlay address `src` (spoofed if it is not the injector's), in VNI `vni` to egress key
/// `egress`, inner UDP from vmx to vm1 port `dport`.
pub fn inject_from(
    tb: &Testbed,
    src: &str,
    kind: &str,
    vni: u32,
    egress: u16,
    count: u32,
    dport: u16,
) -> Result<()> {
    let inj = tb.injector.clone().context("no injector")?;
    let ch1 = &tb.chassis[tb.chassis_index("ch1")?];
    let vm1 = tb.vm("vm1")?;
    let out = Command::new("ip")
        .args(["netns", "exec", &inj, "/usr/bin/python3"])
        .arg(repo_root().join("tests/scripts/inject.py"))
        .args(["--iface", "eth0", "--dst-mac", &mac_of(&ch1.ns, "ul")?])
        .args(["--src-ip", src, "--dst-ip", &ch1.ip])
        .args(["--inner-src-mac", PEER_MAC, "--inner-dst-mac", &vm1.mac])
        .args(["--inner-src-ip", PEER_VM_IP, "--inner-dst-ip", &vm1.ip])
        .args([
            "--vni",
            &vni.to_string(),
            "--ingress",
            &PEER_PORT_KEY.to_string(),
        ])
        .args([
            "--egress",
            &egress.to_string(),
            "--dport",
            &dport.to_string(),
        ])
        .args(["--count", &count.to_string(), "--kind", kind])
        .output()?;
    if !out.status.success() {
        bail!("inject.py failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Waits (up to 5 s) until `server`, just started, listens on `port` (`proto` "tcp" or "udp")
/// in namespace `ns`: on a loaded machine it may not have bound yet, and a fixed sleep lost
/// the first connection or datagram there. On failure the server is killed and reaped.
pub fn wait_listening(
    server: &mut std::process::Child,
    ns: &str,
    proto: &str,
    port: u16,
) -> Result<()> {
    let r = listening(ns, proto, port);
    if r.is_err() {
        let _ = server.kill();
        let _ = server.wait();
    }
    r
}

fn listening(ns: &str, proto: &str, port: u16) -> Result<()> {
    let flags = match proto {
        "tcp" => "-Hltn",
        "udp" => "-Hlun",
        _ => bail!("wait_listening: unknown protocol {proto}"),
    };
    let filter = format!("sport = :{port}");
    let bound = within(std::time::Duration::from_secs(5), || {
        Ok(
            !run(Command::new("ip").args(["netns", "exec", ns, "ss", flags, &filter]))?
                .trim()
                .is_empty(),
        )
    })?;
    bound
        .map(|_| ())
        .with_context(|| format!("nothing listens on {proto} port {port} in {ns} after 5 s"))
}

/// Polls `f` every 20 ms until it returns true or `within` passes; returns the time it took.
pub fn within(
    within: std::time::Duration,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<Option<std::time::Duration>> {
    let t0 = std::time::Instant::now();
    loop {
        if f()? {
            return Ok(Some(t0.elapsed()));
        }
        if t0.elapsed() > within {
            return Ok(None);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Pipelines `chassis` has applied so far (stats `pipelines_applied`).
/// Polls a counter until it reaches `want` (up to 5 s); returns its last value.
pub fn counter_reaches(tb: &Testbed, chassis: &str, iface: &str, name: &str, want: u64) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let v = tb.counter(chassis, iface, name).unwrap_or(0);
        if v >= want || std::time::Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

pub fn pipelines_applied(tb: &Testbed, chassis: &str) -> Result<u64> {
    tb.stats(chassis)?["pipelines_applied"]
        .as_u64()
        .context("no pipelines_applied in stats")
}

/// Waits until `chassis` has applied a pipeline after `before` (a `pipelines_applied` read
/// before the NB write) and then none for 200 ms: the write and any it was batched with are in
/// its fast path. Fails after 5 s. A fixed sleep here was too short on a loaded CI machine.
pub fn wait_applied(tb: &Testbed, chassis: &str, before: u64) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut n = pipelines_applied(tb, chassis)?;
    let mut since = std::time::Instant::now();
    while n == before || since.elapsed() < std::time::Duration::from_millis(200) {
        if std::time::Instant::now() > deadline {
            bail!("{chassis} applied no pipeline within 5 s of an NB write");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        let m = pipelines_applied(tb, chassis)?;
        if m != n {
            n = m;
            since = std::time::Instant::now();
        }
    }
    Ok(())
}

/// Tenant `t` gets switches `<t>-ls1` (10.1.0.0/24) and `<t>-ls2` (10.2.0.0/24) joined by
/// router `<t>-r` (port `<t>-r-ls<i>`, MAC `tenant_router_mac(base, i)`, the subnet's first
/// address); `base` offsets the tunnel keys.
pub fn add_routed_tenant(tb: &Testbed, t: &str, base: u32) -> Result<()> {
    for (i, sw) in ["ls1", "ls2"].iter().enumerate() {
        let name = format!("{t}-{sw}");
        tb.nbctl(&[
            "ls-add",
            &name,
            "--key",
            &(base + i as u32).to_string(),
            "--tenant",
            t,
        ])?;
        tb.nbctl(&[
            "subnet-add",
            &name,
            &format!("{t}-s{}", i + 1),
            &format!("10.{}.0.0/24", i + 1),
            "--gateway",
            &format!("10.{}.0.1", i + 1),
        ])?;
    }
    let r = format!("{t}-r");
    tb.nbctl(&[
        "lr-add",
        &r,
        "--key",
        &(base + 10).to_string(),
        "--tenant",
        t,
    ])?;
    for i in 1..=2 {
        tb.nbctl(&[
            "lrp-add",
            &r,
            &format!("{r}-ls{i}"),
            &tenant_router_mac(base, i),
            &format!("10.{i}.0.1/24"),
            "--key",
            "100",
            "--switch",
            &format!("{t}-ls{i}"),
        ])?;
    }
    Ok(())
}

/// The MAC of router port `i` (1 or 2) of the tenant added with `base`.
pub fn tenant_router_mac(base: u32, i: u32) -> String {
    format!("0a:00:00:00:ff:{:02x}", base as u8 + i as u8)
}

/// Pings between every pair of the testbed's VMs (2 each).
pub fn ping_all_pairs(tb: &Testbed) -> Result<()> {
    let vms: Vec<(String, String)> = tb
        .vms
        .iter()
        .map(|v| (v.name.clone(), v.ip.clone()))
        .collect();
    for (a, _) in &vms {
        for (b, ip) in &vms {
            if a != b {
                tb.ping(a, ip, 2)?;
            }
        }
    }
    Ok(())
}

/// Puts vm5 (made unbound on ch2 with `add_vm_unbound("vm5", "ch2", 5)`) on ls1: its port
/// (key 5) added and bound to ch2's vp-vm5.
pub fn add_port_of_vm5(tb: &Testbed) -> Result<()> {
    let ip5 = tb.vm("vm5")?.ip.clone();
    tb.nbctl(&[
        "lsp-add",
        "ls1",
        "vm5",
        "0a:00:00:00:00:05",
        &ip5,
        "--key",
        "5",
    ])?;
    tb.nbctl(&["lsp-bind", "vm5", "ch2", "vp-vm5"])?;
    Ok(())
}

/// Whether one ping from `from` to `ip` gets an answer within 300 ms.
pub fn reachable(tb: &Testbed, from: &str, ip: &str) -> bool {
    let Ok(vm) = tb.vm(from) else { return false };
    tb.ns_cmd(&vm.ns, "ping")
        .args(["-c", "1", "-W", "0.3", "-q", ip])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The id of the XDP program attached to `iface` in namespace `ns`, if any.
pub fn xdp_prog_id(ns: &str, iface: &str) -> Result<Option<u64>> {
    let out = run(Command::new("ip").args(["-n", ns, "-j", "-d", "link", "show", "dev", iface]))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v[0]["xdp"]["prog"]["id"].as_u64())
}

/// The megaflows `geneflowctl flows --format json` lists on `chassis`.
pub fn megaflows(tb: &Testbed, chassis: &str) -> Result<Vec<serde_json::Value>> {
    let sock = tb.chassis[tb.chassis_index(chassis)?].socket.clone();
    let out = run(Command::new(tb.bin("geneflowctl"))
        .args(["flows", "--format", "json", "--socket"])
        .arg(&sock))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v["megaflows"]
        .as_array()
        .cloned()
        .with_context(|| format!("no megaflows in {v}"))
}

/// The megaflow among `flows` that matches destination MAC `mac` (and is not stale).
pub fn megaflow_to(flows: &[serde_json::Value], mac: &str) -> Option<serde_json::Value> {
    let m = format!("eth_dst={mac}");
    flows
        .iter()
        .find(|f| f["stale"] == false && f["match"].as_str().unwrap_or("").contains(&m))
        .cloned()
}

/// Asserts that no port of `chassis` counted any drop.
pub fn assert_no_drops(tb: &Testbed, chassis: &[&str]) -> Result<()> {
    assert_no_drops_but(tb, chassis, &[])
}

/// As `assert_no_drops`, but the counters named in `allowed` may count.
pub fn assert_no_drops_but(tb: &Testbed, chassis: &[&str], allowed: &[&str]) -> Result<()> {
    for c in chassis {
        let s = tb.stats(c)?;
        for p in s["ports"].as_array().into_iter().flatten() {
            for (k, v) in p["counters"].as_object().into_iter().flatten() {
                if k.starts_with("drop_") && !allowed.contains(&k.as_str()) {
                    assert_eq!(v.as_u64(), Some(0), "{c} {}: {k} = {v}", p["iface"]);
                }
            }
        }
    }
    Ok(())
}
