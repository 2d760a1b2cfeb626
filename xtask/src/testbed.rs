//! A testbed of network namespaces: an underlay switch (a Linux bridge in its own namespace,
//! 198.18.0.0/24), chassis namespaces each running one `geneflowd` with its uplink on that
//! switch, VM namespaces behind each chassis, and optionally an "injector" namespace on the
//! underlay for raw frames and captures. Everything is named with a per-run prefix and removed
//! on drop, on failure and on Ctrl-C (see `cleanup_all`). Nothing touches the host's own
//! interfaces.

pub use crate::testbed_cleanup::cleanup_all;
use crate::testbed_cleanup::{install_signal_cleanup, sweep_stale, unmount_bpffs};
pub(crate) use crate::testbed_cleanup::{Live, LIVE};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

/// Drops everything arriving on `iface` (in `ns`) at the netdev ingress hook: after AF_PACKET
/// (OVS `system` ports) has seen it, before the namespace's own IP stack does. Otherwise the
/// kernel works on every frame OVS forwards too, and answers Geneve with ICMP port unreachable.
pub(crate) fn keep_stack_out(tb: &Testbed, ns: &str, iface: &str) -> Result<()> {
    let table = format!("gf_{}", iface.replace('-', "_"));
    run(tb
        .ns_cmd(ns, "nft")
        .args(["add", "table", "netdev", &table]))?;
    run(tb.ns_cmd(ns, "nft").args([
        "add",
        "chain",
        "netdev",
        &table,
        "in",
        &format!("{{ type filter hook ingress device \"{iface}\" priority 0; policy drop; }}"),
    ]))?;
    Ok(())
}

/// Where the project's binaries are: $GENEFLOW_BIN_DIR, or next to the running executable.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("GENEFLOW_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut d = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if d.file_name().is_some_and(|n| n == "deps") {
        d.pop();
    }
    d
}

pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

#[derive(Debug, Clone)]
pub struct Vm {
    pub name: String,
    pub ns: String,
    pub chassis: String,
    pub mac: String,
    pub ip: String,
    pub key: u16,
    /// Chassis-side interface.
    pub iface: String,
}

pub struct Chassis {
    pub name: String,
    pub ns: String,
    /// The uplink's peer on the underlay bridge (in the underlay namespace).
    pub bridge_port: String,
    pub ip: String,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// Extra geneflowd flags (e.g. `--cleanup`).
    pub agent_args: Vec<String>,
    pub(crate) agent: Option<Child>,
}

impl Chassis {
    /// A chassis record for topologies built in sibling modules (`testbed_routed`): socket and
    /// log under `dir`, no agent yet.
    pub(crate) fn new(
        name: &str,
        ns: String,
        bridge_port: String,
        ip: String,
        dir: &Path,
    ) -> Chassis {
        Chassis {
            name: name.to_string(),
            ns,
            bridge_port,
            ip,
            socket: dir.join(format!("{name}.sock")),
            log: dir.join(format!("{name}.log")),
            agent_args: Vec::new(),
            agent: None,
        }
    }
}

/// Which NB backend a testbed uses. Servers run in their own namespace on the underlay
/// (198.18.0.200), reached by the agents over their uplinks as over a management network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbKind {
    File,
    /// An etcd cluster of this many members.
    Etcd(usize),
    Redis,
    /// A Redis Cluster of six nodes: three masters, one replica each.
    RedisCluster,
    /// One etcd member, its changes fanned out by this many `geneflow-publisher`s (0: by
    /// the forgers a test adds, `Testbed::add_forger`).
    EtcdZmq(usize),
}

pub const DB_IP: &str = "198.18.0.200";
/// The first ZeroMQ publisher's port (writers push to the next; others 10 apart).
pub const PUBLISHER_PORT: u16 = 6620;

/// A database server process the testbed started (restartable with the same arguments).
pub struct Server {
    pub name: String,
    pub(crate) args: Vec<String>,
    pub(crate) log: PathBuf,
    pub(crate) child: Option<Child>,
    pub client_port: u16,
}

/// An OVS-run chassis of the testbed.
pub struct OvsInfo {
    pub chassis: String,
    pub ns: String,
    pub dir: PathBuf,
    pub ports: crate::testbed_ovs::OvsPorts,
}

pub struct Testbed {
    pub prefix: String,
    pub dir: PathBuf,
    pub bins: PathBuf,
    pub nb: String,
    pub underlay_ns: String,
    pub chassis: Vec<Chassis>,
    pub vms: Vec<Vm>,
    pub injector: Option<String>,
    pub db_ns: Option<String>,
    pub servers: Vec<Server>,
    pub ovs: Vec<OvsInfo>,
    /// Queues of every veth made from now on (VM ports, uplinks, raw pairs): 1 by default.
    pub queues: u32,
    pub(crate) namespaces: Vec<String>,
    pub(crate) slot: usize,
}

impl Testbed {
    /// Creates the underlay switch. `tag` makes names unique between testbeds of one process.
    pub fn new(tag: &str) -> Result<Testbed> {
        install_signal_cleanup();
        sweep_stale();
        let prefix = format!("gf{}x{}", std::process::id(), tag);
        let dir = std::env::temp_dir().join(&prefix);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let nb = format!("file://{}", dir.join("nb.json").display());
        let underlay_ns = format!("{prefix}-ul");
        let mut tb = Testbed {
            prefix,
            dir,
            bins: bin_dir(),
            nb,
            underlay_ns: underlay_ns.clone(),
            chassis: Vec::new(),
            vms: Vec::new(),
            injector: None,
            db_ns: None,
            servers: Vec::new(),
            ovs: Vec::new(),
            queues: 1,
            namespaces: Vec::new(),
            slot: LIVE
                .lock()
                .map(|mut l| {
                    l.push(Live::default());
                    l.len() - 1
                })
                .unwrap_or(0),
        };
        // The agents pin their fast path here. `ip netns exec` hides the host's /sys/fs/bpf,
        // but a mount under /tmp stays visible in every namespace of the run.
        let bpffs = tb.bpffs();
        std::fs::create_dir_all(&bpffs)?;
        run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&bpffs))
            .context("mounting the testbed's bpffs")?;
        if let Ok(mut l) = LIVE.lock() {
            if let Some(e) = l.get_mut(tb.slot) {
                e.mounts.push(bpffs);
            }
        }
        tb.add_ns(&underlay_ns)?;
        ip(&["-n", &underlay_ns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &underlay_ns, "link", "set", "br0", "up"])?;
        Ok(tb)
    }

    pub(crate) fn add_ns(&mut self, ns: &str) -> Result<()> {
        ip(&["netns", "add", ns])?;
        self.namespaces.push(ns.to_string());
        if let Ok(mut l) = LIVE.lock() {
            if let Some(e) = l.get_mut(self.slot) {
                e.namespaces.push(ns.to_string());
            }
        }
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Runs a command inside a namespace.
    pub fn ns_cmd(&self, ns: &str, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, prog]);
        c
    }

    pub fn bin(&self, name: &str) -> String {
        self.bins.join(name).display().to_string()
    }

    /// Plugs a new veth into the underlay bridge; returns the bridge-side name.
    pub(crate) fn underlay_port(&mut self, ns: &str, host_if: &str, addr: &str) -> Result<String> {
        let br_if = format!("u{}", self.namespaces.len());
        self.veth(ns, host_if, &self.underlay_ns, &br_if)?;
        ip(&[
            "-n",
            &self.underlay_ns,
            "link",
            "set",
            &br_if,
            "master",
            "br0",
        ])?;
        ip(&["-n", &self.underlay_ns, "link", "set", &br_if, "up"])?;
        if !addr.is_empty() {
            ip(&["-n", ns, "addr", "add", addr, "dev", host_if])?;
        }
        ip(&["-n", ns, "link", "set", host_if, "up"])?;
        Ok(br_if)
    }

    /// A veth pair `if_a` in `ns_a`, `if_b` in `ns_b`, both with `self.queues` queues.
    fn veth(&self, ns_a: &str, if_a: &str, ns_b: &str, if_b: &str) -> Result<()> {
        let q = self.queues.to_string();
        let queues = ["numtxqueues", &q, "numrxqueues", &q];
        let mut a = vec!["link", "add", if_a, "netns", ns_a];
        a.extend(queues);
        a.extend(["type", "veth", "peer", "name", if_b, "netns", ns_b]);
        a.extend(queues);
        ip(&a)?;
        Ok(())
    }

    /// A bare namespace owned by this testbed (removed with it).
    pub fn add_raw_ns(&mut self, name: &str) -> Result<String> {
        let ns = format!("{}-{name}", self.prefix);
        self.add_ns(&ns)?;
        Ok(ns)
    }

    /// A veth pair between two namespaces, both ends up.
    pub fn raw_veth(&self, ns_a: &str, if_a: &str, ns_b: &str, if_b: &str) -> Result<()> {
        self.veth(ns_a, if_a, ns_b, if_b)?;
        ip(&["-n", ns_a, "link", "set", if_a, "up"])?;
        ip(&["-n", ns_b, "link", "set", if_b, "up"])?;
        Ok(())
    }

    /// Adds a chassis namespace with uplink `ul` at 198.18.0.<n>/24 and registers it in the NB.
    pub fn add_chassis(&mut self, name: &str) -> Result<()> {
        let n = self.chassis.len() + 1;
        let ns = format!("{}-{name}", self.prefix);
        self.add_ns(&ns)?;
        let ipaddr = format!("198.18.0.{n}");
        let bridge_port = self.underlay_port(&ns, "ul", &format!("{ipaddr}/24"))?;
        self.nbctl(&["chassis-add", name, &ipaddr])?;
        self.chassis.push(Chassis {
            name: name.to_string(),
            ns,
            bridge_port,
            ip: ipaddr,
            socket: self.dir.join(format!("{name}.sock")),
            log: self.dir.join(format!("{name}.log")),
            agent_args: Vec::new(),
            agent: None,
        });
        Ok(())
    }

    /// Two chassis whose uplinks are one veth pair (no bridge between them): the fastest
    /// underlay a single machine has, for benchmarks.
    pub fn add_chassis_pair_direct(&mut self, a: &str, b: &str) -> Result<()> {
        let (na, nb) = (
            format!("{}-{a}", self.prefix),
            format!("{}-{b}", self.prefix),
        );
        self.add_ns(&na)?;
        self.add_ns(&nb)?;
        self.raw_veth(&na, "ul", &nb, "ul")?;
        for (name, ns, n) in [(a, &na, 1), (b, &nb, 2)] {
            let ipaddr = format!("198.18.0.{n}");
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ipaddr}/24"),
                "dev",
                "ul",
            ])?;
            self.nbctl(&["chassis-add", name, &ipaddr])?;
            self.chassis.push(Chassis {
                name: name.to_string(),
                ns: ns.clone(),
                bridge_port: String::new(),
                ip: ipaddr,
                socket: self.dir.join(format!("{name}.sock")),
                log: self.dir.join(format!("{name}.log")),
                agent_args: Vec::new(),
                agent: None,
            });
        }
        Ok(())
    }

    /// A raw namespace on the underlay (198.18.0.250) for injecting frames and capturing.
    pub fn add_injector(&mut self) -> Result<String> {
        let ns = format!("{}-inj", self.prefix);
        self.add_ns(&ns)?;
        self.underlay_port(&ns, "eth0", "198.18.0.250/24")?;
        self.injector = Some(ns.clone());
        Ok(ns)
    }

    /// Adds a VM namespace behind `chassis` on logical switch `switch`, as port `name` with
    /// key `key`, MAC 0a:00:00:00:<key>, IP 10.0.<key>.
    pub fn add_vm(&mut self, name: &str, chassis: &str, switch: &str, key: u16) -> Result<()> {
        self.add_vm_unbound(name, chassis, key)?;
        self.register_vm(name, switch)
    }

    /// Adds VM `name`'s port to logical switch `switch` in the NB with its MAC, IP and key, and
    /// binds it to its chassis and interface.
    pub fn register_vm(&self, name: &str, switch: &str) -> Result<()> {
        let vm = self.vm(name)?;
        self.nbctl(&[
            "lsp-add",
            switch,
            name,
            &vm.mac,
            &vm.ip,
            "--key",
            &vm.key.to_string(),
        ])?;
        self.nbctl(&["lsp-bind", name, &vm.chassis, &vm.iface])?;
        Ok(())
    }

    /// Creates the VM namespace and its veth behind `chassis` without touching the NB.
    pub fn add_vm_unbound(&mut self, name: &str, chassis: &str, key: u16) -> Result<()> {
        let ch = self
            .chassis
            .iter()
            .find(|c| c.name == chassis)
            .ok_or_else(|| anyhow!("no chassis {chassis}"))?;
        let ch_ns = ch.ns.clone();
        let ns = format!("{}-{name}", self.prefix);
        self.add_ns(&ns)?;
        // The VMs are IPv4-only, like the NB model: without this their kernels' IPv6 chatter
        // (DAD, MLD, router solicitations) would count as port-security drops.
        run(self.ns_cmd(&ns, "sysctl").args([
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ]))?;
        let iface = format!("vp-{name}");
        let mac = format!("0a:00:00:00:{:02x}:{:02x}", key >> 8, key & 0xff);
        let ipaddr = format!("10.0.{}.{}", key >> 8, key & 0xff);
        self.veth(&ch_ns, &iface, &ns, "eth0")?;
        ip(&[
            "-n", &ns, "link", "set", "eth0", "address", &mac, "mtu", "1442", "up",
        ])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ipaddr}/16"),
            "dev",
            "eth0",
        ])?;
        // Test VMs are veths: their tx checksum offload leaves UDP/TCP checksums partial, which
        // an XDP redirect cannot complete (real VMs on tap/virtio are not affected).
        run(self
            .ns_cmd(&ns, "ethtool")
            .args(["-K", "eth0", "tx", "off"]))?;
        ip(&["-n", &ch_ns, "link", "set", &iface, "up"])?;
        self.vms.push(Vm {
            name: name.to_string(),
            ns,
            chassis: chassis.to_string(),
            mac,
            ip: ipaddr,
            key,
            iface,
        });
        Ok(())
    }

    /// Runs `geneflowctl nb` against the testbed's NB (from the db namespace when the NB is a
    /// server there).
    pub fn nbctl(&self, args: &[&str]) -> Result<String> {
        let mut c = match &self.db_ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, &self.bin("geneflowctl")]);
                c
            }
            None => Command::new(self.bin("geneflowctl")),
        };
        run(c.args(["nb", "--db", &self.nb]).args(args))
    }

    pub fn chassis_index(&self, name: &str) -> Result<usize> {
        self.chassis
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| anyhow!("no chassis {name}"))
    }

    pub fn vm(&self, name: &str) -> Result<&Vm> {
        self.vms
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| anyhow!("no vm {name}"))
    }

    /// The agent's `stats` answer.
    pub fn stats(&self, chassis: &str) -> Result<Value> {
        let c = &self.chassis[self.chassis_index(chassis)?];
        let out = run(Command::new(self.bin("geneflowctl"))
            .args(["stats", "--format", "json", "--socket"])
            .arg(&c.socket))?;
        Ok(serde_json::from_str(&out)?)
    }

    /// `geneflow-pktgen send` arguments for UDP from VM `from` (its eth0) to VM `to`.
    pub fn gen_between(&self, from: &str, to: &str) -> Result<Vec<String>> {
        let (a, b) = (self.vm(from)?, self.vm(to)?);
        Ok(
            ["--iface", "eth0", "--src-mac", &a.mac, "--dst-mac", &b.mac]
                .into_iter()
                .chain(["--src-ip", &a.ip, "--dst-ip", &b.ip])
                .map(str::to_string)
                .collect(),
        )
    }

    /// Runs `change` (an NB write) and waits, at most `timeout`, until `chassis` has applied
    /// a pipeline since (its `pipelines_applied` moved). Returns whether it did.
    pub fn applied_after(
        &self,
        chassis: &str,
        timeout: std::time::Duration,
        change: impl FnOnce() -> Result<()>,
    ) -> Result<bool> {
        let applied = || -> Result<u64> {
            Ok(self.stats(chassis)?["pipelines_applied"]
                .as_u64()
                .unwrap_or(0))
        };
        let a0 = applied()?;
        change()?;
        let t = std::time::Instant::now();
        while applied()? == a0 {
            if t.elapsed() > timeout {
                return Ok(false);
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        Ok(true)
    }

    /// One counter of one interface of a chassis.
    pub fn counter(&self, chassis: &str, iface: &str, name: &str) -> Result<u64> {
        let s = self.stats(chassis)?;
        // A name the agent does not report is an error, not a zero: a misspelt drop counter
        // would otherwise make "no drops" assertions pass whatever happens.
        let port = s["ports"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["iface"] == iface))
            .ok_or_else(|| anyhow!("{chassis} reports no interface {iface}"))?;
        port["counters"][name]
            .as_u64()
            .ok_or_else(|| anyhow!("{chassis} {iface} has no counter {name}"))
    }

    pub fn agent_log(&self, chassis: &str) -> String {
        self.chassis_index(chassis)
            .ok()
            .and_then(|i| std::fs::read_to_string(&self.chassis[i].log).ok())
            .unwrap_or_default()
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for i in 0..self.chassis.len() {
            self.stop_agent(i);
        }
        let pids = LIVE
            .lock()
            .ok()
            .and_then(|l| l.get(self.slot).map(|e| e.pids.clone()))
            .unwrap_or_default();
        for p in pids {
            // Only helpers still running: a reaped pid may belong to someone else by now.
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmd).contains("gf-udp") {
                // SAFETY: plain kill(2) on a helper this testbed started.
                unsafe { libc::kill(p as i32, libc::SIGKILL) };
            }
        }
        for i in 0..self.servers.len() {
            self.kill_server(i);
        }
        for o in &self.ovs {
            for pidf in ["ovs-vswitchd.pid", "ovsdb-server.pid"] {
                if let Ok(p) = std::fs::read_to_string(o.dir.join(pidf)) {
                    if let Ok(pid) = p.trim().parse::<i32>() {
                        // SAFETY: plain kill(2) on a daemon this testbed started.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
        }
        for n in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
        unmount_bpffs(&self.bpffs());
        if let Ok(mut l) = LIVE.lock() {
            if let Some(e) = l.get_mut(self.slot) {
                *e = Live::default();
            }
        }
        if std::env::var_os("GENEFLOW_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
