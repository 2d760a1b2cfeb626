//! Testbed traffic: ping and bounded UDP streams between VMs (gf-udp), counted.

use crate::testbed::*;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};

impl Testbed {
    pub fn ping(&self, from: &str, to_ip: &str, count: u32) -> Result<()> {
        let vm = self.vm(from)?;
        run(self.ns_cmd(&vm.ns, "ping").args([
            "-c",
            &count.to_string(),
            "-i",
            "0.05",
            "-W",
            "2",
            "-q",
            to_ip,
        ]))
        .map(|_| ())
        .with_context(|| format!("ping {from} -> {to_ip}"))
    }

    /// Starts a counting UDP receiver in a VM; returns once it is bound.
    pub fn udp_receiver(&self, vm: &str, port: u16, count: u64, idle_s: f64) -> Result<Child> {
        let vm = self.vm(vm)?;
        let mut child = self
            .ns_cmd(&vm.ns, &self.bin("gf-udp"))
            .args([
                "recv",
                "--port",
                &port.to_string(),
                "--count",
                &count.to_string(),
            ])
            .args(["--idle", &idle_s.to_string()])
            .stdout(Stdio::piped())
            .spawn()?;
        self.track_helper(&child);
        let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut r = BufReader::new(out);
        let mut line = String::new();
        r.read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("receiver did not start: {line:?}");
        }
        child.stdout = Some(r.into_inner());
        Ok(child)
    }

    /// Registers a background traffic helper (gf-udp) for cleanup: a test that fails midway
    /// must not leave it running.
    pub(crate) fn track_helper(&self, child: &Child) {
        if let Ok(mut l) = LIVE.lock() {
            if let Some(e) = l.get_mut(self.slot) {
                e.pids.push(child.id());
            }
        }
    }

    /// Starts sending `count` datagrams at `rate`/s from a VM to `dst:port` in the background.
    pub fn udp_sender(
        &self,
        vm: &str,
        dst: &str,
        port: u16,
        count: u64,
        rate: u64,
    ) -> Result<Child> {
        let vm = self.vm(vm)?;
        let child = self
            .ns_cmd(&vm.ns, &self.bin("gf-udp"))
            .args(["send", "--dst", &format!("{dst}:{port}")])
            .args(["--count", &count.to_string(), "--rate", &rate.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .context("starting gf-udp send")?;
        self.track_helper(&child);
        Ok(child)
    }

    pub fn udp_send(&self, vm: &str, dst: &str, port: u16, count: u64, rate: u64) -> Result<()> {
        let st = self.udp_sender(vm, dst, port, count, rate)?.wait()?;
        if !st.success() {
            bail!("gf-udp send from {vm} to {dst}:{port}: {st}");
        }
        Ok(())
    }

    /// Waits for a receiver and returns how many distinct datagrams it got.
    pub fn udp_result(mut child: Child) -> Result<u64> {
        let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        let _ = child.wait();
        let v: Value =
            serde_json::from_str(line.trim()).with_context(|| format!("receiver said {line:?}"))?;
        v["unique"]
            .as_u64()
            .ok_or_else(|| anyhow!("bad receiver output {line:?}"))
    }

    /// Sends `count` datagrams from `from` to `to` and returns how many distinct ones arrived.
    pub fn udp_stream(
        &self,
        from: &str,
        to: &str,
        port: u16,
        count: u64,
        rate: u64,
    ) -> Result<u64> {
        let dst = self.vm(to)?.ip.clone();
        // Counted from the start too: 10 s covers a sender slow to start on a loaded machine
        // (the receiver ends as soon as it has `count`).
        let rx = self.udp_receiver(to, port, count, 10.0)?;
        self.udp_send(from, &dst, port, count, rate)?;
        Self::udp_result(rx)
    }
}
