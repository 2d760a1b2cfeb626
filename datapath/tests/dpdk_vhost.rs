//! vhost-user VM ports on the DPDK datapath (issue 14): `geneflowd --datapath dpdk` serves two
//! VM ports as `net_vhost` devices (`--dpdk-devargs`), and the "VMs" are a DPDK process of
//! their own whose `net_virtio_user` ports connect to those sockets, as QEMU's virtio-net
//! would: the virtio rings in shared memory, no kernel interface on either side. Through it:
//! the ARP responder, UDP both ways (payloads checked with etherparse), and port security
//! refusing a forged source. geneflowd and the "VMs" run in a network namespace made here
//! (the uplink is a veth pair there); the VM side runs as a child (`--ignored --exact
//! child_vms`) because the EAL starts once per process.

#![cfg(feature = "dpdk")]

mod common;

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use geneflow_datapath::dpdk::{Burst, Eal, EthPort, Mempool};
use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr, EthernetAddress};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "GF_VHOST_DIR";
/// The EAL file prefixes of geneflowd and of the VMs' process.
const AGENT_PREFIX: &str = "gfvhost";
const VMS_PREFIX: &str = "gfvhostvms";
const MAC1: [u8; 6] = [0x0a, 0, 0, 0, 0, 1];
const MAC2: [u8; 6] = [0x0a, 0, 0, 0, 0, 2];
const IP1: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const IP2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("ip");
    assert!(st.success(), "ip {args:?}");
}

/// The namespace, the files and geneflowd of one run; all removed on drop.
struct Bed {
    ns: String,
    dir: PathBuf,
    agent: Option<Child>,
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Some(mut c) = self.agent.take() {
            // A failed run still stops geneflowd cleanly where it can (its EAL's cleanup).
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && !matches!(c.try_wait(), Ok(Some(_))) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for prefix in [AGENT_PREFIX, VMS_PREFIX] {
            let _ = std::fs::remove_dir(Path::new("/var/run/dpdk").join(prefix));
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The NB: one switch, vm1 and vm2 on chassis ch1, bound to the vhost ports' names.
fn nb(dir: &Path) -> PathBuf {
    let port = |name: &str, mac: &str, ip: &str, key: u32| {
        serde_json::json!({
            "name": name, "switch": "ls1", "mac": mac, "ips": [ip], "port_key": key,
            "chassis": "ch1", "iface": format!("vh-{name}"), "security_groups": [],
            "port_security": true, "allowed_address_pairs": [], "version": 1
        })
    };
    let doc = serde_json::json!({
        "version": 1,
        "chassis": {"ch1": {"name": "ch1", "encap_ip": "198.18.0.1", "version": 1}},
        "switches": {"ls1": {"name": "ls1", "tunnel_key": 10, "mtu": 1442,
                             "tenant": "default", "version": 1}},
        "ports": {
            "vm1": port("vm1", "0a:00:00:00:00:01", "10.0.0.1", 1),
            "vm2": port("vm2", "0a:00:00:00:00:02", "10.0.0.2", 2),
        },
    });
    let path = dir.join("nb.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&doc).expect("json")).expect("nb");
    path
}

fn runtime() -> Vec<PathBuf> {
    std::fs::read_dir("/var/run/dpdk")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[test]
fn vhost_user_vm_ports_carry_traffic() {
    let before = runtime();
    let pid = std::process::id();
    let mut bed = Bed {
        ns: format!("gf{pid}vhost"),
        dir: std::env::temp_dir().join(format!("gf-vhost-{pid}")),
        agent: None,
    };
    std::fs::create_dir_all(&bed.dir).expect("dir");
    ip(&["netns", "add", &bed.ns]);
    ip(&[
        "-n", &bed.ns, "link", "add", "ul", "type", "veth", "peer", "name", "ulp",
    ]);
    ip(&["-n", &bed.ns, "link", "set", "ul", "up"]);
    ip(&["-n", &bed.ns, "link", "set", "ulp", "up"]);
    let nb = nb(&bed.dir);
    let log = bed.dir.join("geneflowd.log");
    let sock = |vm: &str| bed.dir.join(format!("{vm}.sock")).display().to_string();
    let agent = Command::new("ip")
        .args(["netns", "exec", &bed.ns, env!("CARGO_BIN_EXE_geneflowd")])
        .args(["--chassis", "ch1", "--uplink", "ul", "--datapath", "dpdk"])
        .arg("--nb")
        .arg(&nb)
        .arg("--ctl-socket")
        .arg(bed.dir.join("ctl.sock"))
        .args(["--dpdk-port", "vh-vm1", "--dpdk-port", "vh-vm2"])
        .arg("--dpdk-devargs")
        .arg(format!("vh-vm1=net_vhost0,iface={}", sock("vm1")))
        .arg("--dpdk-devargs")
        .arg(format!("vh-vm2=net_vhost1,iface={}", sock("vm2")))
        .arg("--dpdk-eal")
        .arg(format!(
            "-l 0 --no-huge --no-pci --no-shconf -m 512 --file-prefix {AGENT_PREFIX}"
        ))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("geneflowd");
    bed.agent = Some(agent);
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !read_log().contains("pipeline applied") {
        assert!(Instant::now() < deadline, "no pipeline:\n{}", read_log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // The VMs, in the same namespace (their sockets are files; the namespace keeps the EAL
    // of the child off the host's interfaces).
    let (passed, text) = common::run_child(&bed.ns, "child_vms", (CHILD_ENV, bed.dir.as_os_str()));
    assert!(
        passed,
        "the VMs failed:\n{text}\ngeneflowd:\n{}",
        read_log()
    );
    // A clean stop: exit 0, every DPDK resource released.
    let mut agent = bed.agent.take().expect("agent");
    let _ = Command::new("kill")
        .args(["-INT", &agent.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = agent.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = agent.kill();
            panic!("geneflowd did not stop:\n{}", read_log());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "geneflowd exit {status}:\n{}", read_log());
    let log = read_log();
    assert!(log.contains("geneflowd stopped (DPDK datapath)"), "{log}");
    let left: Vec<_> = runtime()
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert!(left.is_empty(), "left under /var/run/dpdk: {left:?}");
}

fn udp(src: ([u8; 6], Ipv4Addr), dst: ([u8; 6], Ipv4Addr), port: u16, seq: u32) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src.0, dst.0)
        .ipv4(src.1.octets(), dst.1.octets(), 64)
        .udp(4000, port);
    let payload = seq.to_be_bytes();
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, &payload).expect("udp frame");
    out
}

/// The sequence number of a UDP frame from `src` to `port`, as sent by `udp`.
fn udp_seq(frame: &[u8], src: Ipv4Addr, port: u16) -> Option<u32> {
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        return None;
    };
    let Some(TransportSlice::Udp(u)) = &p.transport else {
        return None;
    };
    if ip.header().source_addr() != src || u.destination_port() != port {
        return None;
    }
    Some(u32::from_be_bytes(u.payload().try_into().ok()?))
}

fn arp_request(sha: [u8; 6], spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(sha),
        source_protocol_addr: spa,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: tpa,
    };
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&sha);
    f.extend_from_slice(&[0x08, 0x06]);
    f.resize(14 + repr.buffer_len(), 0);
    repr.emit(&mut ArpPacket::new_unchecked(&mut f[14..]));
    f
}

/// Sends `frames` on `from` (in bursts of 16), then collects for up to `wait` what `to`
/// receives. Returns how many were sent, and what came.
fn exchange(
    pool: &Mempool,
    from: &EthPort,
    to: &EthPort,
    frames: &[Vec<u8>],
    wait: Duration,
) -> (usize, Vec<Vec<u8>>) {
    let mut sent = 0;
    for chunk in frames.chunks(16) {
        let mut b = Burst::default();
        for f in chunk {
            assert!(b.push_copy(pool, f), "no mbuf");
        }
        sent += b.tx(from, 0);
    }
    let mut got = Vec::new();
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        let mut b = Burst::default();
        b.rx(to, 0);
        for i in 0..b.len() {
            got.push(b.frame(i).to_vec());
        }
        if b.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    (sent, got)
}

#[test]
#[ignore = "the VMs of vhost_user_vm_ports_carry_traffic, in its namespace"]
fn child_vms() {
    let dir = PathBuf::from(std::env::var_os(CHILD_ENV).expect("run by the parent test"));
    let sock = |vm: &str| dir.join(format!("{vm}.sock")).display().to_string();
    // On the other core than geneflowd's main thread and poll loop (this machine kind has 2).
    let args: Vec<String> = [
        "-l",
        "1",
        "--no-huge",
        "--no-pci",
        "--no-shconf",
        "-m",
        "256",
        "--file-prefix",
        VMS_PREFIX,
        "--vdev",
        &format!(
            "net_virtio_user0,path={},mac=0a:00:00:00:00:01",
            sock("vm1")
        ),
        "--vdev",
        &format!(
            "net_virtio_user1,path={},mac=0a:00:00:00:00:02",
            sock("vm2")
        ),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let eal = Eal::init(&args).expect("EAL of the VMs");
    let pool = Mempool::new(&eal, "gf-vms", 2047, 2176).expect("pool");
    let vm1 = EthPort::open("net_virtio_user0", 1, 256, &pool).expect("vm1's virtio port");
    let vm2 = EthPort::open("net_virtio_user1", 1, 256, &pool).expect("vm2's virtio port");

    // The ARP responder answers vm1 for vm2's address (asked again until the rings are up).
    let ask = arp_request(MAC1, IP1, IP2);
    let deadline = Instant::now() + Duration::from_secs(10);
    let reply = loop {
        let (_, got) = exchange(
            &pool,
            &vm1,
            &vm1,
            std::slice::from_ref(&ask),
            Duration::from_millis(200),
        );
        let reply = got.iter().find_map(|f| {
            let p = ArpPacket::new_checked(f.get(14..)?).ok()?;
            match ArpRepr::parse(&p).ok()? {
                ArpRepr::EthernetIpv4 {
                    operation: ArpOperation::Reply,
                    source_hardware_addr,
                    source_protocol_addr,
                    ..
                } if source_protocol_addr == IP2 => Some(source_hardware_addr.0),
                _ => None,
            }
        });
        if let Some(mac) = reply {
            break mac;
        }
        assert!(
            Instant::now() < deadline,
            "no ARP reply for vm2 over vhost-user"
        );
    };
    assert_eq!(reply, MAC2);

    // 200 datagrams each way, every one delivered once, in order of sequence numbers.
    for (from, to, src, dst, port) in [
        (&vm1, &vm2, (MAC1, IP1), (MAC2, IP2), 5001),
        (&vm2, &vm1, (MAC2, IP2), (MAC1, IP1), 5002),
    ] {
        let frames: Vec<_> = (0..200).map(|i| udp(src, dst, port, i)).collect();
        let (sent, got) = exchange(&pool, from, to, &frames, Duration::from_millis(500));
        assert_eq!(sent, 200, "the virtio ring refused frames");
        let mut seqs: Vec<u32> = got.iter().filter_map(|f| udp_seq(f, src.1, port)).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (0..200).collect::<Vec<_>>(), "{src:?} -> {dst:?}");
    }

    // Port security: vm1 posing as vm2 (its MAC and address) reaches no one.
    let forged: Vec<_> = (0..20)
        .map(|i| udp((MAC2, IP2), (MAC2, IP2), 5003, i))
        .chain((0..20).map(|i| udp((MAC1, IP2), (MAC2, IP2), 5003, i)))
        .collect();
    let (sent, got) = exchange(&pool, &vm1, &vm2, &forged, Duration::from_millis(300));
    assert_eq!(sent, 40);
    let through = got
        .iter()
        .filter(|f| udp_seq(f, IP2, 5003).is_some())
        .count();
    assert_eq!(through, 0, "forged frames from vm1 reached vm2");
    drop(vm1);
    drop(vm2);
    drop(pool);
    drop(eal);
}
