//! The DPDK wrapper against real ports: `net_af_packet` vdevs on a veth pair in a network
//! namespace made here. Each DPDK scenario runs in a child process (`ip netns exec` of this
//! test binary with `--ignored --exact child_...`): the EAL starts once per process, and the
//! child's `/sys` is the namespace's.

#![cfg(feature = "dpdk")]

mod common;

use geneflow_datapath::dpdk::{Burst, DpdkError, Eal, EthPort, Mempool};
use std::process::Command;
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "GF_DPDK_CHILD";

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("ip");
    assert!(st.success(), "ip {args:?}");
}

/// A namespace with the veth pair dp0 (DPDK's) - dp1 (the kernel's), removed on drop.
struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Ns {
        let ns = Ns(format!("gf{}dpdk{tag}", std::process::id()));
        ip(&["netns", "add", &ns.0]);
        ip(&[
            "-n", &ns.0, "link", "add", "dp0", "type", "veth", "peer", "name", "dp1",
        ]);
        ip(&["-n", &ns.0, "link", "set", "dp0", "up"]);
        ip(&["-n", &ns.0, "link", "set", "dp1", "up"]);
        ns
    }

    /// Runs the ignored test `child` of this binary inside the namespace.
    fn run_child(&self, child: &str) {
        let (passed, text) =
            common::run_child(&self.0, child, (CHILD_ENV, std::ffi::OsStr::new(&self.0)));
        assert!(passed, "{child} failed or did not run:\n{text}");
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn in_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// The EAL arguments of a child: its own file prefix (the children run in parallel, and each
/// checks that its runtime directory goes).
fn eal_args(iface: &str, prefix: &str) -> Vec<String> {
    [
        "--file-prefix",
        prefix,
        "-l",
        "0",
        "--no-huge",
        "--no-pci",
        "-m",
        "256",
        "--no-shconf",
        "--no-telemetry",
        "--log-level",
        "error",
        "--vdev",
        &format!("net_af_packet0,iface={iface}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn sysfs_count(iface: &str, what: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{iface}/statistics/{what}"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn af_packet_ports_send_and_receive() {
    Ns::new("rt").run_child("child_round_trip");
}

#[test]
fn bad_eal_arguments_and_missing_ports_are_named() {
    Ns::new("bad").run_child("child_bad_input");
}

/// 64 frames out through DPDK (the kernel counts them on dp1), 20 in from scapy on dp1.
#[test]
#[ignore = "runs inside the namespace of af_packet_ports_send_and_receive"]
fn child_round_trip() {
    assert!(in_child(), "run by af_packet_ports_send_and_receive");
    let eal = Eal::init(&eal_args("dp0", "gfrt")).expect("EAL");
    assert_eq!(eal.port_count(), 1);
    let pool = Mempool::new(&eal, "gf-test", 2047, 2176).expect("pool");
    let port = EthPort::open("net_af_packet0", 1, 256, &pool).expect("port");
    let mut frame = vec![0xffu8; 6];
    frame.extend_from_slice(&port.mac());
    frame.extend_from_slice(&[0x88, 0xb5]);
    frame.extend_from_slice(&[0x5a; 50]);
    let before = sysfs_count("dp1", "rx_packets");
    let mut sent = 0;
    for _ in 0..2 {
        let mut b = Burst::default();
        while b.push_copy(&pool, &frame) {}
        assert_eq!(b.len(), geneflow_datapath::dpdk::BURST);
        sent += b.tx(&port, 0);
    }
    assert_eq!(sent, 64);
    let deadline = Instant::now() + Duration::from_secs(3);
    while sysfs_count("dp1", "rx_packets") < before + 64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(sysfs_count("dp1", "rx_packets") >= before + 64);
    // 20 frames from an independent sender, each marked, received in bursts.
    let st = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "from scapy.all import *\nsendp([Ether(dst='ff:ff:ff:ff:ff:ff',type=0x88b6)/Raw(b'gf-dpdk-'*8)]*20, iface='dp1', verbose=0)",
        ])
        .status()
        .expect("scapy");
    assert!(st.success());
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(3);
    while got < 20 && Instant::now() < deadline {
        let mut b = Burst::default();
        b.rx(&port, 0);
        for i in 0..b.len() {
            let f = b.frame(i);
            if f.len() >= 14 + 64 && f[12..14] == [0x88, 0xb6] && &f[14..22] == b"gf-dpdk-" {
                assert_eq!(b.segments(i), 1);
                got += 1;
            }
        }
    }
    assert_eq!(got, 20, "{:?}", port.stats());
    assert!(port.stats().ipackets >= 20);
}

/// An argument the EAL refuses, a second start, a port that does not exist: each an error
/// that names it; nothing left under /var/run/dpdk.
#[test]
#[ignore = "runs inside the namespace of bad_eal_arguments_and_missing_ports_are_named"]
fn child_bad_input() {
    assert!(
        in_child(),
        "run by bad_eal_arguments_and_missing_ports_are_named"
    );
    let e = Eal::init(&["--no-such-flag".to_string()])
        .err()
        .expect("refused");
    let msg = e.to_string();
    assert!(
        matches!(e, DpdkError::Eal { .. }) && msg.contains("--no-such-flag"),
        "{msg}"
    );
    let eal = Eal::init(&eal_args("dp0", "gfbad")).expect("EAL after a refused start");
    assert!(matches!(
        Eal::init(&eal_args("dp0", "gfbad")),
        Err(DpdkError::EalTwice)
    ));
    let pool = Mempool::new(&eal, "gf-test", 511, 2176).expect("pool");
    let e = EthPort::open("net_af_packet7", 1, 256, &pool)
        .err()
        .expect("no port");
    assert!(e.to_string().contains("net_af_packet7"), "{e}");
    let e = Mempool::new(&eal, "gf-huge", 4_000_000, 9000)
        .err()
        .expect("out of memory");
    assert!(matches!(e, DpdkError::NoMemory(_)), "{e}");
    drop(pool);
    drop(eal);
    // This child's own runtime directory (the other child runs beside it with its own).
    let dir = std::path::Path::new("/var/run/dpdk/gfbad");
    assert!(!dir.exists(), "left behind: {}", dir.display());
}
