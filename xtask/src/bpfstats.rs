//! The XDP program's own cost per packet, from the kernel's BPF run-time statistics
//! (`bpf_stats`): while a [`StatsOn`] is held the kernel accounts each program's run count and
//! run time; [`prog_on`] finds the program attached to an interface and [`ProgStats`] reads
//! its counters, so a scenario's ns/packet is the difference over its measurement window.
//!
//! Statistics are switched on with the `BPF_ENABLE_STATS` command rather than the
//! `kernel.bpf_stats_enabled` sysctl: they stay on only while the returned descriptor is open,
//! so nothing is left enabled on the host if the benchmark dies.

use crate::testbed::run;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Command;

/// `BPF_ENABLE_STATS` from `include/uapi/linux/bpf.h`.
const BPF_ENABLE_STATS: libc::c_long = 32;
/// `BPF_STATS_RUN_TIME`.
const BPF_STATS_RUN_TIME: u32 = 0;

/// Run-time statistics are on while this is alive.
pub struct StatsOn(#[allow(dead_code)] OwnedFd);

impl StatsOn {
    pub fn enable() -> Result<Self> {
        // The `enable_stats` member of `union bpf_attr` is one u32; the rest stays zero.
        let mut attr = [0u8; 16];
        attr[..4].copy_from_slice(&BPF_STATS_RUN_TIME.to_ne_bytes());
        // SAFETY: bpf(2) reads `attr.len()` bytes from a live, initialised buffer.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                attr.as_ptr(),
                attr.len() as libc::c_uint,
            )
        };
        if fd < 0 {
            bail!(
                "BPF_ENABLE_STATS: {} (kernel 5.8+ and CAP_SYS_ADMIN needed)",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: the kernel returned a new descriptor that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }
}

/// The id of the XDP program attached to `iface` in namespace `ns`.
pub fn prog_on(ns: &str, iface: &str) -> Result<u32> {
    let out = run(Command::new("ip").args(["-n", ns, "-j", "-d", "link", "show", "dev", iface]))?;
    let v: Value = serde_json::from_str(&out)?;
    let xdp = &v[0]["xdp"];
    xdp["prog"]["id"]
        .as_u64()
        .or_else(|| xdp["attached"][0]["prog"]["id"].as_u64())
        .map(|id| id as u32)
        .with_context(|| format!("no XDP program on {iface} in {ns}"))
}

/// One reading of a program's counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProgStats {
    pub run_cnt: u64,
    pub run_time_ns: u64,
}

impl ProgStats {
    pub fn read(id: u32) -> Result<Self> {
        let out = run(Command::new("bpftool").args(["-j", "prog", "show", "id", &id.to_string()]))?;
        let v: Value = serde_json::from_str(&out)?;
        // bpftool leaves both fields out while they are zero.
        Ok(Self {
            run_cnt: v["run_cnt"].as_u64().unwrap_or(0),
            run_time_ns: v["run_time_ns"].as_u64().unwrap_or(0),
        })
    }

    /// ns per run between `self` (earlier) and `later`; None without runs in between.
    pub fn ns_per_run(&self, later: &Self) -> Option<f64> {
        let n = later.run_cnt.checked_sub(self.run_cnt)?;
        let t = later.run_time_ns.checked_sub(self.run_time_ns)?;
        (n > 0).then(|| t as f64 / n as f64)
    }
}
