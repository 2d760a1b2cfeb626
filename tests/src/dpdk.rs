//! A chassis on the DPDK backend for the end-to-end tests: `geneflowd --datapath dpdk` in
//! ch1's namespace with two poll threads, `net_af_packet` vdevs on its veths, no address on
//! its uplink.

use crate::Testbed;
use anyhow::{bail, Context, Result};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use xtask::testbed::run;

/// The DPDK geneflowd of a chassis: stopped (SIGINT, then SIGKILL) on drop.
pub struct Dpdk {
    child: Option<Child>,
    log: std::path::PathBuf,
}

impl Dpdk {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_log(&self, what: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.log().contains(what) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the DPDK chassis never logged {what:?}:\n{}", self.log())
    }

    /// SIGINT and wait: true if it exited 0 within 10 s.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .args(["-INT", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = c.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }
}

impl Drop for Dpdk {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Two chassis on switch ls1 of a file NB, with `vms` as (name, chassis, port key); no agent
/// started yet.
pub fn two_chassis(prefix: &str, vms: &[(&str, &str, u16)]) -> Result<Testbed> {
    let mut tb = Testbed::with_nb(prefix, crate::NbKind::File)?;
    tb.add_chassis("ch1")?;
    tb.add_chassis("ch2")?;
    tb.nbctl(&["ls-add", "ls1", "--key", &crate::LS1_KEY.to_string()])?;
    for (vm, ch, key) in vms {
        tb.add_vm(vm, ch, "ls1", *key)?;
    }
    Ok(tb)
}

/// A geneflowd that refused to start (`what` names the case): a non-zero exit, its last
/// line the one error naming `want`, nothing on stdout.
pub fn assert_refused(out: &std::process::Output, what: &str, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what}: exit 0");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("geneflowd: error: ") && last.contains(want),
        "{what}: {err}"
    );
    assert!(out.stdout.is_empty(), "{what}: DPDK wrote on stdout");
}

/// Nothing under /var/run/dpdk that was not there `before` (a `dpdk_runtime()` taken then).
pub fn assert_nothing_left(before: &[std::path::PathBuf]) {
    let left: Vec<_> = dpdk_runtime()
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert!(left.is_empty(), "left under /var/run/dpdk: {left:?}");
}

pub fn dpdk_runtime() -> Vec<std::path::PathBuf> {
    std::fs::read_dir("/var/run/dpdk")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Starts ch1's geneflowd on the DPDK backend, with two poll threads (each with its own
/// queue on every port) and no address on its uplink: its own ARP answers for 198.18.0.1.
pub fn start_dpdk(tb: &Testbed, ports: &[&str]) -> Result<Dpdk> {
    start_dpdk_with(tb, "ul", ports, &[])
}

/// `start_dpdk` with the uplink named `uplink` and ports given as DPDK devices
/// (`--dpdk-devargs NAME=DEVARGS`).
pub fn start_dpdk_with(
    tb: &Testbed,
    uplink: &str,
    ports: &[&str],
    devargs: &[(&str, &str)],
) -> Result<Dpdk> {
    let ns1 = tb.chassis[0].ns.clone();
    run(Command::new("ip").args(["-n", &ns1, "addr", "flush", "dev", "ul"]))?;
    let log = tb.dir.join("ch1-dpdk.log");
    let out = std::fs::File::create(&log)?;
    let mut cmd = tb.ns_cmd(&ns1, &tb.bin("geneflowd"));
    cmd.args(["--chassis", "ch1", "--nb", &tb.nb, "--uplink", uplink])
        .arg("--ctl-socket")
        .arg(&tb.chassis[0].socket)
        .args(["--forwarder-cores", "0,1", "--datapath", "dpdk"])
        // The chassis's own arguments (its provider networks).
        .args(&tb.chassis[0].agent_args);
    for p in ports {
        cmd.args(["--dpdk-port", p]);
    }
    for (name, args) in devargs {
        cmd.arg("--dpdk-devargs").arg(format!("{name}={args}"));
    }
    let child = cmd
        .args([
            "--dpdk-eal",
            "-l 0 --no-huge --no-pci --no-shconf -m 512 --log-level error",
        ])
        .stdout(Stdio::null())
        .stderr(out.try_clone()?)
        .spawn()
        .context("starting the DPDK geneflowd")?;
    Ok(Dpdk {
        child: Some(child),
        log,
    })
}
