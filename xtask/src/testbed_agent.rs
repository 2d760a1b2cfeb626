//! Testbed agents: starting `geneflowd` in each chassis namespace, waiting until it serves,
//! killing and stopping it.

use crate::testbed::*;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

impl Testbed {
    /// Starts `geneflowd` in every chassis namespace and waits until each answers on its
    /// control socket with all its ports attached.
    pub fn start_agents(&mut self) -> Result<()> {
        for i in 0..self.chassis.len() {
            let name = self.chassis[i].name.clone();
            if self.ovs.iter().any(|o| o.chassis == name) {
                continue;
            }
            self.start_agent(i)?;
        }
        Ok(())
    }

    /// The testbed's bpffs (mounted in the host's mount namespace, under the run directory).
    pub fn bpffs(&self) -> PathBuf {
        self.dir.join("bpffs")
    }

    /// Where chassis `name`'s agent pins its fast path.
    pub fn pin_dir(&self, name: &str) -> PathBuf {
        self.bpffs().join(name)
    }

    /// Starts chassis `i`'s agent and waits until it has attached the uplink and every VM
    /// port of the chassis.
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        self.spawn_agent(i)?;
        let name = &self.chassis[i].name;
        let want = self.vms.iter().filter(|v| &v.chassis == name).count() + 1;
        self.wait_agent(i, want)
    }

    /// Starts chassis `i`'s agent and waits only for its uplink (an agent that cannot reach
    /// the NB attaches nothing else).
    pub fn start_agent_uplink_only(&mut self, i: usize) -> Result<()> {
        self.spawn_agent(i)?;
        self.wait_agent(i, 1)
    }

    pub(crate) fn spawn_agent(&mut self, i: usize) -> Result<()> {
        let bin = self.bin("geneflowd");
        let pin_dir = self.pin_dir(&self.chassis[i].name);
        let c = &mut self.chassis[i];
        // Appended, so that a restart keeps the log of the agent before it.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&c.log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &c.ns, &bin])
            .args(["--chassis", &c.name, "--nb", &self.nb, "--uplink", "ul"])
            .arg("--ctl-socket")
            .arg(&c.socket)
            .arg("--pin-dir")
            .arg(&pin_dir)
            .args(&c.agent_args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting geneflowd")?;
        if let Ok(mut l) = LIVE.lock() {
            if let Some(e) = l.get_mut(self.slot) {
                e.pids.push(child.id());
            }
        }
        c.agent = Some(child);
        Ok(())
    }

    /// Waits until chassis `i`'s agent answers with `want` ports attached.
    pub(crate) fn wait_agent(&mut self, i: usize, want: usize) -> Result<()> {
        let name = self.chassis[i].name.clone();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(ch) = self.chassis[i].agent.as_mut() {
                if let Ok(Some(st)) = ch.try_wait() {
                    bail!(
                        "geneflowd on {name} exited with {st}; log:\n{}",
                        std::fs::read_to_string(&self.chassis[i].log).unwrap_or_default()
                    );
                }
            }
            if let Ok(s) = self.stats(&name) {
                if s["ports"].as_array().map(|a| a.len()).unwrap_or(0) >= want {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "geneflowd on {name} not ready; log:\n{}",
                    std::fs::read_to_string(&self.chassis[i].log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills chassis `i`'s agent with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.chassis[i].agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn stop_agent(&mut self, i: usize) {
        if let Some(mut c) = self.chassis[i].agent.take() {
            // SAFETY: plain kill(2) on our child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
