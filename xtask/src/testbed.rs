//! A testbed of network namespaces: an underlay switch (a Linux bridge in its own namespace,
//! 198.18.0.0/24), chassis namespaces each running one `geneflowd` with its uplink on that
//! switch, VM namespaces behind each chassis, and optionally an "injector" namespace on the
//! underlay for raw frames and captures. Everything is named with a per-run prefix and removed
//! on drop, on failure and on Ctrl-C (see `cleanup_all`). Nothing touches the host's own
//! interfaces.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Namespaces, agent pids and bpffs mounts of every live testbed of this process, for the
/// Ctrl-C handler.
static LIVE: Mutex<Vec<Live>> = Mutex::new(Vec::new());

#[derive(Default)]
struct Live {
    namespaces: Vec<String>,
    pids: Vec<u32>,
    mounts: Vec<PathBuf>,
}

/// Removes everything every live testbed made. Safe to call from a signal handler thread.
pub fn cleanup_all() {
    let live = match LIVE.lock() {
        Ok(mut l) => std::mem::take(&mut *l),
        Err(_) => return,
    };
    for Live {
        namespaces: ns,
        pids,
        mounts,
    } in live
    {
        for p in pids {
            // SAFETY: plain kill(2) on a pid we spawned.
            unsafe { libc::kill(p as i32, libc::SIGKILL) };
        }
        for n in ns {
            let _ = Command::new("ip").args(["netns", "del", &n]).status();
        }
        for m in mounts {
            unmount_bpffs(&m);
        }
    }
}

/// Drops everything arriving on `iface` (in `ns`) at the netdev ingress hook: after AF_PACKET
/// (OVS `system` ports) has seen it, before the namespace's own IP stack does. Otherwise the
/// kernel works on every frame OVS forwards too, and answers Geneve with ICMP port unreachable.
fn keep_stack_out(tb: &Testbed, ns: &str, iface: &str) -> Result<()> {
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

/// Removes the pins of a testbed's bpffs and unmounts it (the pinned maps and links die with
/// the last reference).
fn unmount_bpffs(m: &Path) {
    if let Ok(rd) = std::fs::read_dir(m) {
        for e in rd.flatten() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let _ = Command::new("umount").arg("-l").arg(m).status();
}

/// Installs a Ctrl-C/SIGTERM handler that cleans up and exits (once per process).
pub fn install_signal_cleanup() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            eprintln!("interrupted: removing testbed namespaces");
            cleanup_all();
            std::process::exit(130);
        });
    });
}

/// Removes namespaces left by earlier runs whose process is gone (a run killed with SIGKILL
/// cannot clean up after itself). Only touches names of the form `gf<pid>x...`.
pub fn sweep_stale() {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if of_dead_run(name) {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    // bpffs mounts of dead runs: /tmp/gf<pid>x<tag>/bpffs.
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (Some(_), Some(at), Some("bpf")) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let run = at
            .strip_suffix("/bpffs")
            .and_then(|dir| Path::new(dir).file_name())
            .and_then(|n| n.to_str());
        if run.is_some_and(of_dead_run) {
            unmount_bpffs(Path::new(at));
        }
    }
}

/// Whether `name` is of the form `gf<pid>x...` for a process that no longer exists.
fn of_dead_run(name: &str) -> bool {
    name.strip_prefix("gf")
        .and_then(|r| r.split_once('x'))
        .and_then(|(pid, _)| pid.parse::<i32>().ok())
        .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
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

fn ip(args: &[&str]) -> Result<String> {
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
    agent: Option<Child>,
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
}

pub const DB_IP: &str = "198.18.0.200";

/// A database server process the testbed started (restartable with the same arguments).
pub struct Server {
    pub name: String,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    pub client_port: u16,
}

/// An OVS-run chassis of the testbed.
pub struct OvsInfo {
    pub chassis: String,
    pub ns: String,
    pub dir: PathBuf,
    pub port_type: &'static str,
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
    namespaces: Vec<String>,
    slot: usize,
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

    /// A testbed whose NB lives in `kind`'s servers (started here, stopped on drop).
    pub fn with_nb(tag: &str, kind: NbKind) -> Result<Testbed> {
        let mut tb = Testbed::new(tag)?;
        match kind {
            NbKind::File => {}
            NbKind::Etcd(n) => tb.start_etcd(n)?,
            NbKind::Redis => tb.start_redis()?,
        }
        Ok(tb)
    }

    fn add_db_ns(&mut self) -> Result<String> {
        let ns = format!("{}-db", self.prefix);
        self.add_ns(&ns)?;
        self.underlay_port(&ns, "eth0", &format!("{DB_IP}/24"))?;
        self.db_ns = Some(ns.clone());
        Ok(ns)
    }

    fn start_etcd(&mut self, members: usize) -> Result<()> {
        self.add_db_ns()?;
        let cluster: Vec<String> = (0..members)
            .map(|i| format!("m{i}=http://{DB_IP}:{}", 2380 + 10 * i))
            .collect();
        for i in 0..members {
            let (cp, pp) = (2379 + 10 * i as u16, 2380 + 10 * i as u16);
            let dir = self.dir.join(format!("etcd-m{i}"));
            let args = vec![
                "etcd".to_string(),
                "--name".into(),
                format!("m{i}"),
                "--data-dir".into(),
                dir.display().to_string(),
                "--listen-client-urls".into(),
                format!("http://{DB_IP}:{cp}"),
                "--advertise-client-urls".into(),
                format!("http://{DB_IP}:{cp}"),
                "--listen-peer-urls".into(),
                format!("http://{DB_IP}:{pp}"),
                "--initial-advertise-peer-urls".into(),
                format!("http://{DB_IP}:{pp}"),
                "--initial-cluster".into(),
                cluster.join(","),
                "--initial-cluster-state".into(),
                "new".into(),
                "--initial-cluster-token".into(),
                self.prefix.clone(),
                "--heartbeat-interval".into(),
                "50".into(),
                "--election-timeout".into(),
                "500".into(),
            ];
            self.servers.push(Server {
                name: format!("etcd-m{i}"),
                args,
                log: self.dir.join(format!("etcd-m{i}.log")),
                child: None,
                client_port: cp,
            });
        }
        for i in 0..members {
            self.start_server(i)?;
        }
        let eps: Vec<String> = self
            .servers
            .iter()
            .map(|s| format!("{DB_IP}:{}", s.client_port))
            .collect();
        self.nb = format!("etcd://{}", eps.join(","));
        self.wait_db_healthy()
    }

    fn start_redis(&mut self) -> Result<()> {
        self.add_db_ns()?;
        let dir = self.dir.join("redis");
        std::fs::create_dir_all(&dir)?;
        self.servers.push(Server {
            name: "redis".into(),
            args: vec![
                "redis-server".into(),
                "--bind".into(),
                DB_IP.into(),
                "--port".into(),
                "6379".into(),
                "--dir".into(),
                dir.display().to_string(),
                "--appendonly".into(),
                "yes".into(),
                "--save".into(),
                "".into(),
                "--protected-mode".into(),
                "no".into(),
            ],
            log: self.dir.join("redis.log"),
            child: None,
            client_port: 6379,
        });
        self.start_server(0)?;
        self.nb = format!("redis://{DB_IP}:6379");
        self.wait_db_healthy()
    }

    /// (Re)starts server `i` with its original arguments (and data directory).
    pub fn start_server(&mut self, i: usize) -> Result<()> {
        let ns = self
            .db_ns
            .clone()
            .ok_or_else(|| anyhow!("no db namespace"))?;
        let s = &mut self.servers[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&s.log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns])
            .args(&s.args)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", s.name))?;
        if let Ok(mut l) = LIVE.lock() {
            if let Some(e) = l.get_mut(self.slot) {
                e.pids.push(child.id());
            }
        }
        s.child = Some(child);
        Ok(())
    }

    /// Kills server `i` (SIGKILL: as a crash or a pulled cable would).
    pub fn kill_server(&mut self, i: usize) {
        if let Some(mut c) = self.servers[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until the NB answers (a read through geneflowctl).
    pub fn wait_db_healthy(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.nbctl(&["show"]) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e.context("NB server not ready")),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Index of the current etcd leader.
    pub fn etcd_leader(&self) -> Result<usize> {
        let ns = self
            .db_ns
            .clone()
            .ok_or_else(|| anyhow!("no db namespace"))?;
        for (i, s) in self.servers.iter().enumerate() {
            if s.child.is_none() {
                continue;
            }
            let out = run(Command::new("ip")
                .args(["netns", "exec", &ns, "etcdctl"])
                .args([
                    "--endpoints",
                    &format!("{DB_IP}:{}", s.client_port),
                    "endpoint",
                    "status",
                    "-w",
                    "json",
                ]))?;
            let v: Value = serde_json::from_str(&out)?;
            let st = &v[0]["Status"];
            if st["leader"] == st["header"]["member_id"] && !st["leader"].is_null() {
                return Ok(i);
            }
        }
        bail!("no etcd leader found")
    }

    fn add_ns(&mut self, ns: &str) -> Result<()> {
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
    fn underlay_port(&mut self, ns: &str, host_if: &str, addr: &str) -> Result<String> {
        let br_if = format!("u{}", self.namespaces.len());
        ip(&[
            "link",
            "add",
            host_if,
            "netns",
            ns,
            "type",
            "veth",
            "peer",
            "name",
            &br_if,
            "netns",
            &self.underlay_ns,
        ])?;
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

    /// A chassis run by Open vSwitch's userspace datapath instead of geneflow, laid out as OVS
    /// userspace tunneling wants it: `br-phy` (netdev) holding the underlay veth, with the
    /// underlay address on the bridge, and `br-int` (netdev) with the VM ports and a Geneve
    /// port to `remote_ip`, the OVN option mapped to tun_metadata0. `afxdp` makes the ports
    /// `type=afxdp` (AF_XDP) instead of the default `system` (AF_PACKET).
    pub fn add_ovs_chassis(&mut self, name: &str, remote_ip: &str, afxdp: bool) -> Result<()> {
        let n = self.chassis.len() + 1;
        let ns = format!("{}-{name}", self.prefix);
        self.add_ns(&ns)?;
        let ipaddr = format!("198.18.0.{n}");
        let bridge_port = self.underlay_port(&ns, "ul", "")?;
        self.setup_ovs(name, &ns, &ipaddr, bridge_port, remote_ip, afxdp)
    }

    /// Two OVS chassis whose uplinks are one veth pair (198.18.0.1 and .2), for benchmarks.
    pub fn add_ovs_pair_direct(&mut self, a: &str, b: &str, afxdp: bool) -> Result<()> {
        let (na, nb) = (
            format!("{}-{a}", self.prefix),
            format!("{}-{b}", self.prefix),
        );
        self.add_ns(&na)?;
        self.add_ns(&nb)?;
        self.raw_veth(&na, "ul", &nb, "ul")?;
        self.setup_ovs(a, &na, "198.18.0.1", String::new(), "198.18.0.2", afxdp)?;
        self.setup_ovs(b, &nb, "198.18.0.2", String::new(), "198.18.0.1", afxdp)
    }

    fn setup_ovs(
        &mut self,
        name: &str,
        ns: &str,
        ipaddr: &str,
        bridge_port: String,
        remote_ip: &str,
        afxdp: bool,
    ) -> Result<()> {
        let ns = ns.to_string();
        let ipaddr = ipaddr.to_string();
        // The underlay address lives on br-phy; the kernel must not answer ARP on ul itself.
        run(self
            .ns_cmd(&ns, "sysctl")
            .args(["-qw", "net.ipv4.conf.ul.arp_ignore=1"]))?;
        let dir = self.dir.join(format!("ovs-{name}"));
        std::fs::create_dir_all(&dir)?;
        let d = dir.display().to_string();
        let env = |c: &mut Command| {
            c.env("OVS_RUNDIR", &d)
                .env("OVS_DBDIR", &d)
                .env("OVS_LOGDIR", &d)
                .env("OVS_SYSCONFDIR", &d);
        };
        let mut c = Command::new("ovsdb-tool");
        c.args([
            "create",
            &format!("{d}/conf.db"),
            "/usr/share/openvswitch/vswitch.ovsschema",
        ]);
        run(&mut c)?;
        let mut c = self.ns_cmd(&ns, "ovsdb-server");
        env(&mut c);
        c.args([
            &format!("{d}/conf.db"),
            &format!("--remote=punix:{d}/db.sock"),
            &format!("--pidfile={d}/ovsdb-server.pid"),
            &format!("--unixctl={d}/ovsdb-server.ctl"),
            &format!("--log-file={d}/ovsdb-server.log"),
            "--detach",
        ]);
        run(&mut c)?;
        let vsctl = |args: &[&str]| -> Result<String> {
            let mut c = Command::new("ovs-vsctl");
            env(&mut c);
            c.arg(format!("--db=unix:{d}/db.sock")).args(args);
            run(&mut c)
        };
        vsctl(&["--no-wait", "init"])?;
        let mut c = self.ns_cmd(&ns, "ovs-vswitchd");
        env(&mut c);
        c.args([
            &format!("unix:{d}/db.sock"),
            &format!("--pidfile={d}/ovs-vswitchd.pid"),
            &format!("--unixctl={d}/ovs-vswitchd.ctl"),
            &format!("--log-file={d}/ovs-vswitchd.log"),
            "--detach",
        ]);
        run(&mut c)?;
        for pidf in ["ovsdb-server.pid", "ovs-vswitchd.pid"] {
            if let Ok(p) = std::fs::read_to_string(dir.join(pidf)) {
                if let (Ok(pid), Ok(mut l)) = (p.trim().parse::<u32>(), LIVE.lock()) {
                    if let Some(e) = l.get_mut(self.slot) {
                        e.pids.push(pid);
                    }
                }
            }
        }
        let port_type = if afxdp { "afxdp" } else { "system" };
        if !afxdp {
            keep_stack_out(self, &ns, "ul")?;
        }
        vsctl(&[
            "add-br",
            "br-int",
            "--",
            "set",
            "bridge",
            "br-int",
            "datapath_type=netdev",
        ])?;
        vsctl(&[
            "add-br",
            "br-phy",
            "--",
            "set",
            "bridge",
            "br-phy",
            "datapath_type=netdev",
        ])?;
        vsctl(&[
            "add-port",
            "br-phy",
            "ul",
            "--",
            "set",
            "interface",
            "ul",
            &format!("type={port_type}"),
        ])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ipaddr}/24"),
            "dev",
            "br-phy",
        ])?;
        ip(&["-n", &ns, "link", "set", "br-phy", "up"])?;
        vsctl(&[
            "add-port",
            "br-int",
            "gnv0",
            "--",
            "set",
            "interface",
            "gnv0",
            "type=geneve",
            &format!("options:remote_ip={remote_ip}"),
            "options:key=flow",
            "options:csum=true",
        ])?;
        self.nbctl(&["chassis-add", name, &ipaddr])?;
        self.ovs.push(OvsInfo {
            chassis: name.to_string(),
            ns: ns.clone(),
            dir: dir.clone(),
            port_type,
        });
        self.chassis.push(Chassis {
            name: name.to_string(),
            ns,
            bridge_port,
            ip: ipaddr,
            socket: self.dir.join(format!("{name}.sock")),
            log: dir.join("ovs-vswitchd.log"),
            agent_args: Vec::new(),
            agent: None,
        });
        Ok(())
    }

    /// Runs ovs-ofctl (OpenFlow 1.5 for tunnel metadata) against an OVS chassis's br-int.
    pub fn ofctl(&self, chassis: &str, args: &[&str]) -> Result<String> {
        let o = self
            .ovs
            .iter()
            .find(|o| o.chassis == chassis)
            .ok_or_else(|| anyhow!("no OVS chassis {chassis}"))?;
        let d = o.dir.display().to_string();
        run(Command::new("ovs-ofctl")
            .env("OVS_RUNDIR", &d)
            .args(["-O", "OpenFlow15"])
            .args(args))
    }

    /// Adds a VM behind an OVS chassis on `switch` (VNI `vni`) with the flows that give it
    /// OVN semantics: to a remote MAC -> tunnel with (ingress key, egress key); floods ->
    /// egress 32768; from the tunnel with egress = its key (or a flood) -> the VM.
    pub fn add_ovs_vm(
        &mut self,
        name: &str,
        chassis: &str,
        switch: &str,
        vni: u32,
        key: u16,
        remotes: &[(String, u16)],
    ) -> Result<()> {
        self.add_vm_unbound(name, chassis, key)?;
        let vm = self.vm(name)?;
        let (mac, ipaddr, iface) = (vm.mac.clone(), vm.ip.clone(), vm.iface.clone());
        let o = self
            .ovs
            .iter()
            .find(|o| o.chassis == chassis)
            .ok_or_else(|| anyhow!("no OVS chassis {chassis}"))?;
        let d = o.dir.display().to_string();
        let pt = o.port_type;
        // No GRO here: it would hand AF_PACKET (system ports) 64 KB TCP aggregates that OVS
        // cannot forward. The XDP generator's frames need it; the benchmark turns it on itself.
        let ovs_ns = o.ns.clone();
        if pt == "system" {
            keep_stack_out(self, &ovs_ns, &iface)?;
        }
        let mut c = Command::new("ovs-vsctl");
        c.env("OVS_RUNDIR", &d)
            .arg(format!("--db=unix:{d}/db.sock"))
            .args([
                "add-port",
                "br-int",
                &iface,
                "--",
                "set",
                "interface",
                &iface,
                &format!("type={pt}"),
            ]);
        run(&mut c)?;
        self.ofctl(
            chassis,
            &[
                "add-tlv-map",
                "br-int",
                "{class=0x0102,type=0x80,len=4}->tun_metadata0",
            ],
        )
        .or_else(|e| {
            if e.to_string().contains("already") {
                Ok(String::new())
            } else {
                Err(e)
            }
        })?;
        let meta = |egress: u16| format!("0x{:08x}", ((key as u32) << 16) | egress as u32);
        for (rmac, rkey) in remotes {
            self.ofctl(chassis, &["add-flow", "br-int", &format!(
                "in_port={iface},dl_dst={rmac},actions=set_field:{vni}->tun_id,set_field:{}->tun_metadata0,output:gnv0",
                meta(*rkey)
            )])?;
        }
        self.ofctl(chassis, &["add-flow", "br-int", &format!(
            "in_port={iface},dl_dst=01:00:00:00:00:00/01:00:00:00:00:00,actions=set_field:{vni}->tun_id,set_field:{}->tun_metadata0,output:gnv0",
            meta(0x8000)
        )])?;
        for egress in [key, 0x8000] {
            self.ofctl(
                chassis,
                &[
                    "add-flow",
                    "br-int",
                    &format!(
                "in_port=gnv0,tun_id={vni},tun_metadata0=0x{egress:x}/0xffff,actions=output:{iface}"
            ),
                ],
            )?;
        }
        self.nbctl(&[
            "lsp-add",
            switch,
            name,
            &mac,
            &ipaddr,
            "--key",
            &key.to_string(),
        ])?;
        self.nbctl(&["lsp-bind", name, chassis, &iface])?;
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
        ip(&[
            "link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b,
        ])?;
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
        let iface = format!("vp-{name}");
        let mac = format!("0a:00:00:00:{:02x}:{:02x}", key >> 8, key & 0xff);
        let ipaddr = format!("10.0.{}.{}", key >> 8, key & 0xff);
        ip(&[
            "link", "add", &iface, "netns", &ch_ns, "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ])?;
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

    fn spawn_agent(&mut self, i: usize) -> Result<()> {
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
    fn wait_agent(&mut self, i: usize, want: usize) -> Result<()> {
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

    /// One counter of one interface of a chassis (0 if absent).
    pub fn counter(&self, chassis: &str, iface: &str, name: &str) -> Result<u64> {
        let s = self.stats(chassis)?;
        Ok(s["ports"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["iface"] == iface))
            .and_then(|p| p["counters"][name].as_u64())
            .unwrap_or(0))
    }

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
    fn track_helper(&self, child: &Child) {
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
        let rx = self.udp_receiver(to, port, count, 2.0)?;
        self.udp_send(from, &dst, port, count, rate)?;
        Self::udp_result(rx)
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
