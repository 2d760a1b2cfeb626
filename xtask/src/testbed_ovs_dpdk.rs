//! OVS-DPDK chassis: Debian's DPDK build of ovs-vswitchd (`openvswitch-switch-dpdk`) with
//! the OVS peer's layout and OVN flows (testbed_ovs.rs, `OvsPorts::Dpdk`), its ports
//! `type=dpdk` on `net_af_packet` vdevs of the testbed's veths. What this file holds is what
//! differs: the EAL and PMD settings, the vdevs, and reading the PMDs' statistics.
//!
//! Nothing is left behind: the EAL keeps no shared config, has no telemetry socket, and its
//! runtime directory (DPDK would use /var/run/dpdk/<prefix>) is `RUNTIME_DIRECTORY` under the
//! chassis's own directory, removed with the testbed; the daemons are killed by pidfile like
//! every OVS chassis's, and the namespaces (veths, nft tables) go with the testbed.

use crate::testbed::*;
use crate::testbed_ovs::OvsPorts;
use anyhow::{anyhow, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The DPDK build of ovs-vswitchd. It is installed beside the plain one without becoming the
/// `ovs-vswitchd` alternative (xtask setup keeps that one the plain build, which the other
/// OVS chassis run from PATH).
pub const OVS_VSWITCHD_DPDK: &str = "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk";

/// The EAL's memory, MB. Without hugepages DPDK touches all of it: an instance's RSS is
/// about 300 MB at 256 (OVS sizes its mempool to fit, 32768 mbufs).
pub const EAL_MEM_MB: u32 = 256;

/// The Open_vSwitch columns set before ovs-vswitchd-dpdk starts: DPDK on, without hugepages
/// (`--no-huge` implies legacy memory, and OVS 3.1 adds `--in-memory`, which the EAL refuses
/// beside it, unless `--legacy-mem` is given), no PCI scan, no shared config, no telemetry,
/// a file prefix of its own; one PMD thread, on `pmd_core`. `pmd-maxsleep` lets an idle PMD
/// sleep up to 100 us: with two PMDs and a generator on two cores, the busy-polling of the
/// one without work would otherwise take the core from the others.
pub(crate) fn other_config(file_prefix: &str, pmd_core: u32) -> Vec<String> {
    vec![
        "other_config:dpdk-init=true".into(),
        format!(
            "other_config:dpdk-extra=--no-huge --legacy-mem -m {EAL_MEM_MB} --no-pci --no-shconf --no-telemetry --file-prefix {file_prefix}"
        ),
        format!("other_config:pmd-cpu-mask=0x{:x}", 1u64 << pmd_core),
        "other_config:pmd-maxsleep=100".into(),
    ]
}

/// The DPDK runtime directory of the chassis whose files are in `dir`.
pub(crate) fn runtime_dir(dir: &Path) -> PathBuf {
    dir.join("dpdk-rt")
}

/// The Interface columns of a DPDK port on kernel interface `iface`: an af_packet vdev,
/// `vdev` unique in its vswitchd.
pub(crate) fn port_settings(iface: &str, vdev: u32) -> Vec<String> {
    vec![
        "type=dpdk".into(),
        format!("options:dpdk-devargs=net_af_packet{vdev},iface={iface}"),
    ]
}

/// The PMD threads' counters of one OVS-DPDK chassis (`dpif-netdev/pmd-stats-show`, summed
/// over the PMD threads; the main thread's are left out).
#[derive(Debug, Default, Clone, Copy)]
pub struct PmdStats {
    pub packets: u64,
    pub processing_cycles: u64,
}

impl PmdStats {
    fn parse(text: &str) -> PmdStats {
        let mut s = PmdStats::default();
        let mut in_pmd = false;
        for line in text.lines() {
            if !line.starts_with(' ') && !line.is_empty() {
                in_pmd = line.starts_with("pmd thread");
                continue;
            }
            if !in_pmd {
                continue;
            }
            let Some((k, v)) = line.trim().split_once(':') else {
                continue;
            };
            let n = v
                .split_whitespace()
                .next()
                .and_then(|x| x.parse::<u64>().ok());
            match (k, n) {
                ("packets received", Some(n)) => s.packets += n,
                ("processing cycles", Some(n)) => s.processing_cycles += n,
                _ => {}
            }
        }
        s
    }
}

impl Testbed {
    /// An OVS-DPDK chassis on the underlay switch (see [`Testbed::add_ovs_chassis`]), its
    /// PMD thread on `pmd_core`.
    pub fn add_ovs_dpdk_chassis(
        &mut self,
        name: &str,
        remote_ip: &str,
        pmd_core: u32,
    ) -> Result<()> {
        self.add_ovs_chassis_with(name, remote_ip, OvsPorts::Dpdk { pmd_core })
    }

    /// Two OVS-DPDK chassis whose uplinks are one veth pair, PMD threads on `cores`.
    pub fn add_ovs_dpdk_pair_direct(&mut self, a: &str, b: &str, cores: [u32; 2]) -> Result<()> {
        self.add_ovs_pair_direct_with(a, b, cores.map(|pmd_core| OvsPorts::Dpdk { pmd_core }))
    }

    /// Runs `ovs-appctl` against OVS chassis `chassis`'s vswitchd.
    pub fn ovs_appctl(&self, chassis: &str, args: &[&str]) -> Result<String> {
        let o = self
            .ovs
            .iter()
            .find(|o| o.chassis == chassis)
            .ok_or_else(|| anyhow!("no OVS chassis {chassis}"))?;
        run(Command::new("ovs-appctl")
            .arg("-t")
            .arg(o.dir.join("ovs-vswitchd.ctl"))
            .args(args))
    }

    /// Runs `ovs-vsctl` against OVS chassis `chassis`'s database.
    pub fn ovs_vsctl(&self, chassis: &str, args: &[&str]) -> Result<String> {
        let o = self
            .ovs
            .iter()
            .find(|o| o.chassis == chassis)
            .ok_or_else(|| anyhow!("no OVS chassis {chassis}"))?;
        let d = o.dir.display().to_string();
        run(Command::new("ovs-vsctl")
            .env("OVS_RUNDIR", &d)
            .arg("--timeout=60")
            .arg(format!("--db=unix:{d}/db.sock"))
            .args(args))
    }

    /// The resident memory of OVS chassis `chassis`'s vswitchd, MB.
    pub fn ovs_vswitchd_rss_mb(&self, chassis: &str) -> Result<f64> {
        let o = self
            .ovs
            .iter()
            .find(|o| o.chassis == chassis)
            .ok_or_else(|| anyhow!("no OVS chassis {chassis}"))?;
        let pid = std::fs::read_to_string(o.dir.join("ovs-vswitchd.pid"))?;
        let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim()))?;
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| anyhow!("no VmRSS for {chassis}'s vswitchd"))?;
        Ok(kb / 1024.0)
    }

    /// Zeroes the PMD counters of OVS-DPDK chassis `chassis`.
    pub fn pmd_stats_clear(&self, chassis: &str) -> Result<()> {
        self.ovs_appctl(chassis, &["dpif-netdev/pmd-stats-clear"])
            .map(|_| ())
    }

    /// The PMD counters of OVS-DPDK chassis `chassis` since the last clear.
    pub fn pmd_stats(&self, chassis: &str) -> Result<PmdStats> {
        let out = self.ovs_appctl(chassis, &["dpif-netdev/pmd-stats-show"])?;
        Ok(PmdStats::parse(&out))
    }
}

/// The entries of /var/run/dpdk (DPDK's default runtime directory), to check that the
/// OVS-DPDK chassis left nothing there.
pub fn var_run_dpdk() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/var/run/dpdk")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The TSC's rate, Hz: what OVS-DPDK counts its PMD cycles in (DPDK's `rte_get_tsc_cycles`).
pub fn tsc_hz() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: rdtsc has no preconditions on x86-64.
        let (c0, t0) = (unsafe { std::arch::x86_64::_rdtsc() }, Instant::now());
        std::thread::sleep(Duration::from_millis(200));
        // SAFETY: as above.
        let c1 = unsafe { std::arch::x86_64::_rdtsc() };
        Some(c1.wrapping_sub(c0) as f64 / t0.elapsed().as_secs_f64())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::PmdStats;

    #[test]
    fn pmd_stats_sum_the_pmd_threads_only() {
        let text = "pmd thread numa_id 0 core_id 1:\n  packets received: 100\n  packet recirculations: 100\n  idle cycles: 5 (1.00%)\n  processing cycles: 6000 (99.00%)\n  avg processing cycles per packet: 60.00 (6000/100)\nmain thread:\n  packets received: 7\n  processing cycles: 9999 (1.00%)\npmd thread numa_id 0 core_id 0:\n  packets received: 50\n  processing cycles: 4000 (90.00%)\n";
        let s = PmdStats::parse(text);
        assert_eq!(s.packets, 150);
        assert_eq!(s.processing_cycles, 10000);
    }
}
