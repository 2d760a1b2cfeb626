//! Operating the agent: Prometheus metrics against real traffic, `geneflowctl trace` against
//! what the packet really does, `flows`/`ports`, and configuration errors.

use anyhow::{Context, Result};
use geneflow_tests::*;
use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

/// Scrapes the agent's /metrics from inside its namespace (it listens on the namespace's
/// loopback) and parses the samples: "name{labels}" -> value.
fn scrape(tb: &Testbed, chassis: &str) -> Result<HashMap<String, f64>> {
    let ns = &tb.chassis[tb.chassis_index(chassis)?].ns;
    let out = run(Command::new("ip").args([
        "netns", "exec", ns, "/usr/bin/python3", "-c",
        "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:9469/metrics').read().decode())",
    ]))?;
    let mut m = HashMap::new();
    for l in out.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        if let Some((k, v)) = l.rsplit_once(' ') {
            m.insert(k.to_string(), v.parse().unwrap_or(f64::NAN));
        }
    }
    Ok(m)
}

fn sample(m: &HashMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.iter()
        .find(|(k, _)| {
            k.starts_with(&format!("{name}{{")) || **k == name
        } && labels.iter().all(|(l, v)| k.contains(&format!("{l}=\"{v}\""))))
        .map(|(_, v)| *v)
        .unwrap_or(0.0)
}

#[test]
fn metrics_count_a_stream_and_a_provoked_drop() -> Result<()> {
    let tb = two_chassis("ma")?;
    tb.ping("vm1", &tb.vm("vm3")?.ip.clone(), 2)?;
    let m0 = scrape(&tb, "ch1")?;
    let r0 = scrape(&tb, "ch2")?;
    // 5000 datagrams over 4 s, scraped in the middle and after.
    let (vm1, vm3) = (tb.vm("vm1")?.clone(), tb.vm("vm3")?.clone());
    let rx = tb.udp_receiver("vm3", 6600, 5_000, 10.0)?;
    let mut tx = tb.udp_sender(&vm1.name, &vm3.ip, 6600, 5_000, 1_250)?;
    // A scrape that saw part of the stream: at least 1000 counted, the sender still running
    // once the scrape is in.
    let mut mid = HashMap::new();
    let seen = |m: &HashMap<String, f64>| {
        sample(m, "geneflow_rx_packets_total", &[("iface", "vp-vm1")])
            - sample(&m0, "geneflow_rx_packets_total", &[("iface", "vp-vm1")])
    };
    within(Duration::from_secs(3), || {
        mid = scrape(&tb, "ch1")?;
        Ok(seen(&mid) >= 1_000.0)
    })?;
    let mid_stream = tx.try_wait()?.is_none();
    assert!(tx.wait()?.success());
    assert_eq!(Testbed::udp_result(rx)?, 5_000);
    let m1 = scrape(&tb, "ch1")?;
    let r1 = scrape(&tb, "ch2")?;
    let d = |a: &HashMap<String, f64>, b: &HashMap<String, f64>, n: &str, iface: &str| {
        sample(b, n, &[("iface", iface)]) - sample(a, n, &[("iface", iface)])
    };
    let half = seen(&mid);
    assert!(
        mid_stream && (1_000.0..4_500.0).contains(&half),
        "mid-stream scrape saw {half} of 5000 (sender still running: {mid_stream})"
    );
    // What vm1 sent leaves ch1's uplink encapsulated and ch2's vm3 port decapsulated: the
    // same frames, 58 bytes of Geneve apart.
    let tx_ul = d(&m0, &m1, "geneflow_tx_packets_total", "ul");
    let tx_vm3 = d(&r0, &r1, "geneflow_tx_packets_total", &vm3.iface);
    assert!((5_000.0..5_100.0).contains(&tx_ul), "ch1 ul tx {tx_ul}");
    assert!(
        (5_000.0..5_100.0).contains(&tx_vm3),
        "ch2 vm3 port tx {tx_vm3}"
    );
    let bytes_ul = d(&m0, &m1, "geneflow_tx_bytes_total", "ul");
    let bytes_vm3 = d(&r0, &r1, "geneflow_tx_bytes_total", &vm3.iface);
    assert!(
        (bytes_ul - bytes_vm3 - 58.0 * tx_vm3).abs() < 58.0 * 100.0,
        "uplink tx bytes {bytes_ul} vs vm3 port {bytes_vm3}"
    );
    let rx = d(&m0, &m1, "geneflow_rx_packets_total", "vp-vm1");
    let fast = d(&m0, &m1, "geneflow_fastpath_hits_total", "vp-vm1");
    let miss = d(&m0, &m1, "geneflow_fastpath_misses_total", "vp-vm1");
    assert!(rx >= 5_000.0, "rx_packets moved by {rx}");
    // Every frame received was either run in XDP or sent to the slow path.
    assert_eq!(rx, fast + miss, "rx {rx} != fast {fast} + miss {miss}");
    assert!(fast >= 4_950.0, "fast path hits {fast}");
    let decap = d(&r0, &r1, "geneflow_fastpath_hits_total", "ul");
    assert!(decap >= 4_950.0, "ch2 decapsulated {decap} in XDP");
    assert!(sample(&m1, "geneflow_megaflows", &[]) >= 1.0);
    assert_eq!(sample(&m1, "geneflow_nb_connected", &[]), 1.0);
    assert!(sample(&m1, "geneflow_nb_records", &[("table", "ports")]) >= 4.0);
    assert!(m1
        .keys()
        .any(|k| k.starts_with("geneflow_nb_change_to_fastpath_seconds_bucket")));
    // Provoke a drop: frames to a MAC no port has.
    let vm1 = tb.vm("vm1")?;
    run(Command::new("ip").args([
        "-n",
        &vm1.ns,
        "neigh",
        "replace",
        "10.0.0.99",
        "lladdr",
        "0a:00:00:00:00:99",
        "dev",
        "eth0",
    ]))?;
    let before = sample(
        &m1,
        "geneflow_drops_total",
        &[("iface", "vp-vm1"), ("reason", "no_destination")],
    );
    tb.udp_send("vm1", "10.0.0.99", 6601, 20, 1000)?;
    let m2 = scrape(&tb, "ch1")?;
    let after = sample(
        &m2,
        "geneflow_drops_total",
        &[("iface", "vp-vm1"), ("reason", "no_destination")],
    );
    assert_eq!(
        after - before,
        20.0,
        "no_destination drops went {before} -> {after}"
    );
    Ok(())
}

/// Stalled clients (a request never finished, a response never read) hold only their own
/// connection: 20 concurrent scrapes still complete, and unknown paths get a 404.
const SLOW_CLIENTS: &str = r#"
import socket, threading, time, urllib.request, urllib.error
stalled = []
for i in range(50):
    s = socket.create_connection(("127.0.0.1", 9469))
    s.sendall(b"GET /metr")
    stalled.append(s)
for i in range(20):
    s = socket.create_connection(("127.0.0.1", 9469))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 50)
    stalled.append(s)
ok, lock = [], threading.Lock()
def scrape():
    body = urllib.request.urlopen("http://127.0.0.1:9469/metrics", timeout=3).read()
    if b"geneflow_rx_packets_total" in body:
        with lock:
            ok.append(1)
t0 = time.time()
ts = [threading.Thread(target=scrape) for _ in range(20)]
[t.start() for t in ts]
[t.join() for t in ts]
try:
    urllib.request.urlopen("http://127.0.0.1:9469/nope", timeout=3)
    code = 200
except urllib.error.HTTPError as e:
    code = e.code
print(len(ok), code, round(time.time() - t0, 2))
"#;

#[test]
fn metrics_server_is_not_blocked_by_stalled_clients() -> Result<()> {
    let tb = two_chassis("mb")?;
    let ns = &tb.chassis[tb.chassis_index("ch1")?].ns;
    let out = run(Command::new("ip").args([
        "netns",
        "exec",
        ns,
        "/usr/bin/python3",
        "-c",
        SLOW_CLIENTS,
    ]))?;
    let f: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(
        f.first(),
        Some(&"20"),
        "scrapes completed, 404, seconds: {out}"
    );
    assert_eq!(f.get(1), Some(&"404"), "{out}");
    Ok(())
}

#[test]
fn trace_says_what_the_packet_really_does() -> Result<()> {
    let tb = two_chassis("tr")?;
    let (vm1, vm3) = (tb.vm("vm1")?, tb.vm("vm3")?);
    let sock = tb.chassis[0].socket.display().to_string();
    let ctl = |args: &[&str]| {
        run(Command::new(tb.bin("geneflowctl"))
            .args(args)
            .args(["--socket", &sock]))
    };
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
        "6700",
    ])?;
    for want in [
        "logical port vm1 (key 1) on logical switch ls1 (tunnel key 1000)",
        "egress logical port vm3 (key 3), remote, on chassis ch2 (198.18.0.2)",
        "Geneve encapsulation to 198.18.0.2",
        "VNI 1000",
        "ingress key 1 egress key 3",
        "encap_geneve(vni=1000,ovn=0x00010003)",
        "verdict: forward",
    ] {
        assert!(trace.contains(want), "trace lacks {want:?}:\n{trace}");
    }
    // Nothing was sent: no megaflow exists yet for vm3's MAC.
    let flows = ctl(&["flows", "--format", "json"])?;
    assert!(
        !flows.contains("0a:00:00:00:00:03"),
        "trace installed something:\n{flows}"
    );
    // Now a real packet: the megaflow the slow path installs is the one the trace named...
    tb.udp_send("vm1", &vm3.ip, 6700, 1, 1000)?;
    let to_vm3 = || -> Result<Option<serde_json::Value>> {
        Ok(megaflow_to(&megaflows(&tb, "ch1")?, &vm3.mac))
    };
    within(Duration::from_secs(5), || Ok(to_vm3()?.is_some()))?
        .with_context(|| format!("no megaflow for vm3: {:?}", megaflows(&tb, "ch1")))?;
    let f = to_vm3()?.context("the megaflow for vm3 went")?;
    let action = f["action"].as_str().unwrap_or("");
    assert!(
        action.starts_with("encap_geneve(dst=198.18.0.2,vni=1000,ovn=0x00010003"),
        "{action}"
    );
    // ... and the fast path uses it for every packet that follows.
    let hits = |f: &serde_json::Value| f["hits"].as_u64().unwrap_or(0);
    let h0 = hits(&f);
    tb.udp_send("vm1", &vm3.ip, 6700, 10, 1000)?;
    within(Duration::from_secs(5), || {
        Ok(to_vm3()?.is_some_and(|f| hits(&f) >= h0 + 10))
    })?;
    let f = to_vm3()?.context("the megaflow for vm3 went")?;
    assert_eq!(hits(&f), h0 + 10, "{f}");
    // Traced drops match real drops too.
    let t = ctl(&[
        "trace",
        "--in-port",
        "vm1",
        "--eth-src",
        &vm1.mac,
        "--eth-dst",
        "0a:00:00:00:00:99",
    ])?;
    assert!(t.contains("verdict: drop: NoDestination"), "{t}");
    let ports = ctl(&["ports"])?;
    assert!(
        ports.contains("port vm1 key 1") && ports.contains("switch ls1"),
        "{ports}"
    );
    Ok(())
}

#[test]
fn bad_config_files_are_refused_with_one_line_naming_the_key() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("gf-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let bin = xtask::testbed::bin_dir().join("geneflowd");
    let cases = [
        (
            "unknown.toml",
            "chassis = \"ch1\"\nuplnk = \"eth1\"\n",
            "`uplnk`",
        ),
        (
            "mode.toml",
            "chassis = \"ch1\"\nxdp_mode = \"turbo\"\n",
            "`xdp_mode`",
        ),
        ("ip.toml", "encap_ip = \"300.1.1.1\"\n", "`encap_ip`"),
        (
            "cores.toml",
            "forwarder_cores = [\"zero\"]\n",
            "`forwarder_cores`",
        ),
        ("nb.toml", "nb = \"mysql://db\"\n", "`nb`"),
        (
            "addr.toml",
            "metrics_address = \"localhost\"\n",
            "`metrics_address`",
        ),
        ("syntax.toml", "chassis = \"ch1\n", "line 1"),
    ];
    for (name, text, want) in cases {
        let p = dir.join(name);
        std::fs::write(&p, text)?;
        let out = Command::new(&bin).arg("--config").arg(&p).output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{name}: {err}");
        assert!(err.contains(want) && err.contains(name), "{name}: {err}");
    }
    let out = Command::new(&bin)
        .args(["--config", "/nonexistent/geneflowd.toml"])
        .output()?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/geneflowd.toml"));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn every_miss_is_accounted_for_even_when_the_slow_path_falls_behind() -> Result<()> {
    let tb = two_chassis("sf")?;
    let vm1 = tb.vm("vm1")?.clone();
    let before = tb.stats("ch1")?;
    // Bursts of frames to 60000 unknown MACs: every one misses, and the bursts can overrun
    // the slow path's ring.
    run(tb
        .ns_cmd(&vm1.ns, &tb.bin("geneflow-pktgen"))
        .args(["send", "--quiet", "--iface", "eth0", "--src-mac", &vm1.mac])
        .args([
            "--dst-mac",
            "0a:00:00:ee:00:00",
            "--vary",
            "dst-mac",
            "--flows",
            "60000",
        ])
        .args(["--src-ip", &vm1.ip, "--dst-ip", "10.0.0.99"])
        .args(["--rate", "2000000", "--duration", "1"]))?;
    // The socket statistics are read once a second.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let after = tb.stats("ch1")?;
    let d = |name: &str| {
        let get = |s: &serde_json::Value| {
            s["ports"]
                .as_array()
                .and_then(|a| a.iter().find(|p| p["iface"] == vm1.iface.as_str()))
                .and_then(|p| p["counters"][name].as_u64())
                .unwrap_or(0)
        };
        get(&after) - get(&before)
    };
    let (miss, slow, full, other) = (
        d("miss"),
        d("slowpath_rx"),
        d("drop_xsk_ring_full"),
        d("drop_xsk_rx"),
    );
    assert!(
        miss > 10_000,
        "the flood did not reach the slow path: {miss}"
    );
    assert_eq!(
        miss,
        slow + full + other,
        "misses {miss} != slow path {slow} + ring full {full} + socket drops {other}"
    );
    // What the slow path saw of the flood, it dropped for the reason it had (a few of its
    // frames are vm1's own: ARP, IPv6 neighbour discovery).
    let nodest = d("drop_no_destination");
    assert!(
        nodest <= slow && nodest + 100 >= slow,
        "slow path {slow}, no_destination {nodest}"
    );
    eprintln!("misses {miss}: slow path {slow}, ring full {full}, socket drops {other}");
    Ok(())
}
