//! End-to-end: VMs get their address from their own chassis with stock, unmodified DHCP
//! clients (busybox `udhcpc` and ISC `dhclient`, with their Debian scripts), the exchange is
//! decoded by tshark, nothing of it crosses the overlay, and abuse is counted without starving
//! anyone.
//!
//! The clients run with a private, writable view of /etc (an overlay mounted inside the
//! `ip netns exec` mount namespace), so their scripts write resolv.conf there and never the
//! host's.

use anyhow::{bail, Context, Result};
use geneflow_tests::provider::{self, stop};
use geneflow_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const GATEWAY: &str = "10.0.0.254";

/// ch1 hosts vm1 and vm3, ch2 hosts vm2, all on ls1, whose subnet 10.0.0.0/16 has DHCP with a
/// gateway, DNS, a domain, a host route and a lease of `lease` seconds. The DHCP clients'
/// interfaces start without an address and with a 1500-byte MTU.
fn dhcp_bed(tag: &str, lease: u32) -> Result<Testbed> {
    Ok(dhcp_bed_on(tag, lease, false)?.0)
}

/// `dhcp_bed`, with ch1 on the DPDK backend if `dpdk` (its geneflowd, stopped on drop).
fn dhcp_bed_on(
    tag: &str,
    lease: u32,
    dpdk: bool,
) -> Result<(Testbed, Option<geneflow_tests::dpdk::Dpdk>)> {
    require_root();
    let mut tb = Testbed::new(tag)?;
    tb.add_chassis("ch1")?;
    tb.add_chassis("ch2")?;
    tb.nbctl(&["ls-add", "ls1", "--key", &LS1_KEY.to_string()])?;
    tb.nbctl(&[
        "subnet-add",
        "ls1",
        "sn1",
        "10.0.0.0/16",
        "--gateway",
        GATEWAY,
        "--dhcp",
        "--dns",
        "10.0.0.53",
        "--dhcp-option",
        "domain_name=tenant.test",
        "--dhcp-option",
        &format!("lease_time={lease}"),
        "--host-route",
        "172.16.0.0/12,10.0.0.10",
    ])?;
    for (vm, ch, key) in [("vm1", "ch1", 1), ("vm2", "ch2", 2), ("vm3", "ch1", 3)] {
        tb.add_vm(vm, ch, "ls1", key)?;
    }
    let d = if dpdk {
        tb.start_agent(1)?;
        let d = geneflow_tests::dpdk::start_dpdk(&tb, &["vp-vm1", "vp-vm3"])?;
        d.wait_log("pipeline applied")?;
        Some(d)
    } else {
        tb.start_agents()?;
        None
    };
    for vm in ["vm1", "vm3"] {
        let ns = tb.vm(vm)?.ns.clone();
        run(tb.ns_cmd(&ns, "ip").args(["addr", "flush", "dev", "eth0"]))?;
        run(tb
            .ns_cmd(&ns, "ip")
            .args(["link", "set", "eth0", "mtu", "1500"]))?;
    }
    Ok((tb, d))
}

/// A command that runs `client` in `vm` with /etc overlaid by `<dir>/<vm>-etc/upper`.
fn in_vm_with_own_etc(tb: &Testbed, vm: &str, client: &[&str]) -> Result<(Command, PathBuf)> {
    let ns = tb.vm(vm)?.ns.clone();
    let base = tb.dir.join(format!("{vm}-etc"));
    let (upper, work) = (base.join("upper"), base.join("work"));
    std::fs::create_dir_all(&upper)?;
    std::fs::create_dir_all(&work)?;
    let script = format!(
        "mount -t overlay overlay -o lowerdir=/etc,upperdir={},workdir={} /etc && exec \"$@\"",
        upper.display(),
        work.display()
    );
    let mut c = tb.ns_cmd(&ns, "sh");
    c.args(["-c", &script, "sh"]).args(client);
    Ok((c, upper))
}

fn ipv4_of(tb: &Testbed, vm: &str) -> Result<Option<(String, u64)>> {
    let ns = &tb.vm(vm)?.ns;
    let out = run(tb
        .ns_cmd(ns, "ip")
        .args(["-j", "-4", "addr", "show", "dev", "eth0"]))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v[0]["addr_info"].get(0).map(|a| {
        (
            a["local"].as_str().unwrap_or("").to_string(),
            a["prefixlen"].as_u64().unwrap_or(0),
        )
    }))
}

fn wait_for_address(tb: &Testbed, vm: &str, want: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((a, len)) = ipv4_of(tb, vm)? {
            if a == want {
                assert_eq!(len, 16, "prefix length from option 1");
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{vm} has no {want} 20 s into DHCP: {:?}\nch1 {:#}",
                ipv4_of(tb, vm)?,
                tb.stats("ch1")?
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn mtu_of(tb: &Testbed, vm: &str) -> Result<u64> {
    let out = run(tb
        .ns_cmd(&tb.vm(vm)?.ns, "ip")
        .args(["-j", "link", "show", "dev", "eth0"]))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v[0]["mtu"].as_u64().context("no mtu")
}

fn routes_of(tb: &Testbed, vm: &str) -> Result<String> {
    run(tb
        .ns_cmd(&tb.vm(vm)?.ns, "ip")
        .args(["-4", "route", "show", "dev", "eth0"]))
}

/// A capture of DHCP on `vm`'s interface into `<dir>/<name>.pcap`.
fn capture(tb: &Testbed, vm: &str, name: &str) -> Result<(Child, PathBuf)> {
    let ns = tb.vm(vm)?.ns.clone();
    provider::capture(tb, &ns, name, "udp port 67 or udp port 68")
}

/// DHCP message types in a capture, in order, as tshark decodes them.
fn dhcp_types(cap: &Path) -> Result<Vec<u64>> {
    let out = run(Command::new("tshark").args(["-n", "-r"]).arg(cap).args([
        "-Y",
        "dhcp",
        "-T",
        "fields",
        "-e",
        "dhcp.option.dhcp",
    ]))?;
    Ok(out.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

#[test]
fn udhcpc_brings_a_vm_up_and_renews_and_nothing_crosses_the_overlay() -> Result<()> {
    let tb = dhcp_bed("dha", 600)?;
    udhcpc_checks(&tb)
}

/// The same with ch1 on the DPDK backend.
#[test]
fn udhcpc_on_a_dpdk_chassis() -> Result<()> {
    let (tb, _dpdk) = dhcp_bed_on("dhd", 600, true)?;
    udhcpc_checks(&tb)
}

/// udhcpc in vm1 (ch1) gets its address, MTU, routes and DNS from ch1, renews, and nothing of
/// it crosses the overlay to vm2 (tshark on both).
fn udhcpc_checks(tb: &Testbed) -> Result<()> {
    // vm2 is on the same switch, behind ch2: a flooded DISCOVER would reach it.
    let (far, far_cap) = capture(tb, "vm2", "far")?;
    let (near, near_cap) = capture(tb, "vm1", "near")?;
    let (mut cmd, etc) = in_vm_with_own_etc(
        tb,
        "vm1",
        &[
            "udhcpc", "-f", "-i", "eth0", "-t", "10", "-T", "1", "-A", "1",
        ],
    )?;
    let log = tb.dir.join("udhcpc.log");
    let mut client = cmd
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(tb.dir.join("udhcpc.err"))?)
        .spawn()?;
    let result = (|| -> Result<()> {
        wait_for_address(tb, "vm1", "10.0.0.1").with_context(|| {
            format!(
                "udhcpc said: {}{}",
                std::fs::read_to_string(&log).unwrap_or_default(),
                std::fs::read_to_string(tb.dir.join("udhcpc.err")).unwrap_or_default()
            )
        })?;
        assert_eq!(mtu_of(tb, "vm1")?, 1442, "MTU from option 26");
        let routes = routes_of(tb, "vm1")?;
        assert!(
            routes.contains(&format!("default via {GATEWAY}")),
            "{routes}"
        );
        // udhcpc's script wrote the DNS server and domain into the VM's own /etc.
        let resolv = std::fs::read_to_string(etc.join("resolv.conf"))?;
        assert!(resolv.contains("nameserver 10.0.0.53"), "{resolv}");
        assert!(resolv.contains("tenant.test"), "{resolv}");
        tb.ping("vm1", &tb.vm("vm2")?.ip, 3)?;
        // A renewal (udhcpc renews on SIGUSR1; at T1 it would wait at least a minute):
        // unicast REQUEST to the server's address, which the ARP responder resolved,
        // answered with an ACK.
        let acks = counter_reaches(tb, "ch1", "vp-vm1", "dhcp_reply", 2);
        assert!(acks >= 2, "OFFER and ACK: {acks}");
        // SAFETY: kill(2) on our own child (ip netns exec and sh exec into udhcpc).
        unsafe { libc::kill(client.id() as i32, libc::SIGUSR1) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while tb.counter("ch1", "vp-vm1", "dhcp_reply")? == acks {
            assert!(Instant::now() < deadline, "no renewal answered in 10 s");
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(
            ipv4_of(tb, "vm1")?.map(|a| a.0),
            Some("10.0.0.1".into()),
            "still bound after renewing"
        );
        Ok(())
    })();
    let _ = client.kill();
    let _ = client.wait();
    std::thread::sleep(Duration::from_millis(300));
    stop(near);
    stop(far);
    result?;
    // tshark: DISCOVER, OFFER, REQUEST, ACK, then the renewal's REQUEST and ACK.
    let near = dhcp_types(&near_cap)?;
    assert!(
        near.starts_with(&[1, 2, 3, 5, 3, 5]),
        "vm1 saw {near:?}; udhcpc said {}",
        std::fs::read_to_string(tb.dir.join("udhcpc.err")).unwrap_or_default()
    );
    assert_eq!(
        dhcp_types(&far_cap)?,
        Vec::<u64>::new(),
        "DHCP crossed to vm2"
    );
    Ok(())
}

#[test]
fn dhclient_gets_its_routes_and_a_nak_for_a_stale_address() -> Result<()> {
    let tb = dhcp_bed("dhb", 600)?;
    // A lease from an earlier life on another network: dhclient asks for it first (INIT-REBOOT)
    // and must be told no.
    let leases = tb.dir.join("vm3.leases");
    std::fs::write(
        &leases,
        "lease {\n  interface \"eth0\";\n  fixed-address 10.0.0.99;\n  \
         option subnet-mask 255.255.0.0;\n  renew 4 2037/01/01 00:00:00;\n  \
         rebind 4 2037/01/01 00:00:00;\n  expire 4 2037/01/01 00:00:00;\n}\n",
    )?;
    let pid = tb.dir.join("vm3.pid");
    // dhclient with its lease and pid files in the test's directory, and `mode`'s flags.
    let dhclient = |mode: &[&str]| {
        let files = [
            "-lf",
            leases.to_str().unwrap_or(""),
            "-pf",
            pid.to_str().unwrap_or(""),
            "eth0",
        ];
        let args: Vec<&str> = ["dhclient"]
            .iter()
            .chain(mode)
            .chain(&files)
            .copied()
            .collect();
        in_vm_with_own_etc(&tb, "vm3", &args)
    };
    let (cap_child, cap) = capture(&tb, "vm3", "vm3")?;
    let (mut cmd, etc) = dhclient(&["-1", "-v"])?;
    let out = cmd.output()?;
    let result = (|| -> Result<()> {
        if !out.status.success() {
            bail!("dhclient: {}", String::from_utf8_lossy(&out.stderr));
        }
        wait_for_address(&tb, "vm3", "10.0.0.3")?;
        assert_eq!(mtu_of(&tb, "vm3")?, 1442);
        // Option 121 via Debian's rfc3442 hook: the host route and the default route.
        let routes = routes_of(&tb, "vm3")?;
        assert!(routes.contains("172.16.0.0/12 via 10.0.0.10"), "{routes}");
        assert!(
            routes.contains(&format!("default via {GATEWAY}")),
            "{routes}"
        );
        let resolv = std::fs::read_to_string(etc.join("resolv.conf"))?;
        assert!(resolv.contains("nameserver 10.0.0.53"), "{resolv}");
        tb.ping("vm3", &tb.vm("vm2")?.ip, 2)?;
        Ok(())
    })();
    // Release: sent to the server, taken without an answer.
    let replies = tb.counter("ch1", "vp-vm3", "dhcp_reply")?;
    let (mut rel, _) = dhclient(&["-r"])?;
    let _ = rel.output();
    std::thread::sleep(Duration::from_millis(500));
    stop(cap_child);
    result?;
    assert_eq!(tb.counter("ch1", "vp-vm3", "dhcp_reply")?, replies);
    let seen = dhcp_types(&cap)?;
    // REQUEST 10.0.0.99, NAK, DISCOVER, OFFER, REQUEST, ACK, RELEASE.
    assert_eq!(seen, vec![3, 6, 1, 2, 3, 5, 7], "vm3 saw {seen:?}");
    Ok(())
}

fn abuse(tb: &Testbed, vm: &str, kind: &str, count: u32) -> Result<()> {
    let v = tb.vm(vm)?;
    run(tb
        .ns_cmd(&v.ns, "/usr/bin/python3")
        .arg(repo_root().join("tests/scripts/dhcp_abuse.py"))
        .args(["--iface", "eth0", "--mac", &v.mac, "--kind", kind])
        .args(["--count", &count.to_string()]))?;
    Ok(())
}

#[test]
fn malformed_and_flooding_dhcp_is_counted_and_starves_no_one() -> Result<()> {
    let tb = dhcp_bed("dhc", 600)?;
    for kind in ["truncated", "hlen", "overflow"] {
        let before = tb.counter("ch1", "vp-vm1", "drop_dhcp_malformed")?;
        abuse(&tb, "vm1", kind, 10)?;
        assert_eq!(
            counter_reaches(&tb, "ch1", "vp-vm1", "drop_dhcp_malformed", before + 10),
            before + 10,
            "{kind}"
        );
    }
    // A rogue server in a VM: its OFFERs reach no one.
    let (far, far_cap) = capture(&tb, "vm2", "rogue")?;
    abuse(&tb, "vm1", "server", 5)?;
    assert_eq!(
        counter_reaches(&tb, "ch1", "vp-vm1", "drop_dhcp_server", 5),
        5
    );
    std::thread::sleep(Duration::from_millis(300));
    stop(far);
    assert_eq!(dhcp_types(&far_cap)?, Vec::<u64>::new());
    // vm1 floods DISCOVERs while vm3, on the same chassis, boots with udhcpc.
    let limited0 = tb.counter("ch1", "vp-vm1", "drop_rate_limit")?;
    let replies0 = tb.counter("ch1", "vp-vm1", "dhcp_reply")?;
    let started = Instant::now();
    let vm1 = tb.vm("vm1")?.clone();
    let mut flood = tb
        .ns_cmd(&vm1.ns, "/usr/bin/python3")
        .arg(repo_root().join("tests/scripts/dhcp_abuse.py"))
        .args(["--iface", "eth0", "--mac", &vm1.mac, "--kind", "discover"])
        .args(["--count", "3000"])
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    let (mut cmd, _) = in_vm_with_own_etc(
        &tb,
        "vm3",
        &[
            "udhcpc", "-f", "-q", "-n", "-i", "eth0", "-t", "10", "-T", "1",
        ],
    )?;
    let boot = cmd.output()?;
    let bound = ipv4_of(&tb, "vm3")?;
    let _ = flood.wait();
    let elapsed = started.elapsed().as_secs_f64();
    assert!(boot.status.success(), "udhcpc failed during the flood");
    assert_eq!(bound.map(|a| a.0), Some("10.0.0.3".into()));
    let replies = tb.counter("ch1", "vp-vm1", "dhcp_reply")? - replies0;
    let limited = tb.counter("ch1", "vp-vm1", "drop_rate_limit")? - limited0;
    // 20 answers/s per port, bursts of 20.
    let most = 20.0 + 20.0 * elapsed + 5.0;
    assert!(
        (replies as f64) <= most,
        "{replies} answers in {elapsed:.1} s"
    );
    assert!(limited > 1000, "only {limited} rate-limited");
    // The agent is alive and still answers.
    tb.stats("ch1")?;
    Ok(())
}
