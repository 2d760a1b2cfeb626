//! Testbed NB servers: etcd clusters, Redis and Redis Clusters, and ZeroMQ publishers in their
//! own namespace on the underlay, started, killed and restarted by the tests.

use crate::testbed::*;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

impl Server {
    /// The command line it runs with.
    pub fn args(&self) -> &[String] {
        &self.args
    }
}

impl Testbed {
    /// A testbed whose NB lives in `kind`'s servers (started here, stopped on drop).
    pub fn with_nb(tag: &str, kind: NbKind) -> Result<Testbed> {
        let mut tb = Testbed::new(tag)?;
        match kind {
            NbKind::File => {}
            NbKind::Etcd(n) => tb.start_etcd(n)?,
            NbKind::Redis => tb.start_redis()?,
            NbKind::RedisCluster => tb.start_redis_cluster()?,
            NbKind::EtcdZmq(n) => {
                tb.start_etcd(1)?;
                let ports: Vec<u16> = (0..n as u16).map(|i| PUBLISHER_PORT + 10 * i).collect();
                tb.start_publishers(&ports)?;
            }
        }
        Ok(tb)
    }

    /// Starts a `geneflow-publisher` on each port (agents subscribe there, writers push to
    /// the next port) and points the NB URL at them, plus at `extra` ports that tests fill
    /// with servers of their own (a forger), all on the DB address.
    pub fn start_publishers(&mut self, ports: &[u16]) -> Result<()> {
        self.start_publishers_with(ports, &[])
    }

    pub fn start_publishers_with(&mut self, ports: &[u16], extra: &[u16]) -> Result<()> {
        for &port in ports {
            self.servers.push(Server {
                name: format!("publisher-{port}"),
                args: vec![
                    self.bin("geneflow-publisher"),
                    "--listen".into(),
                    DB_IP.into(),
                    "--port".into(),
                    port.to_string(),
                    "--heartbeat-ms".into(),
                    "200".into(),
                ],
                log: self.dir.join(format!("publisher-{port}.log")),
                child: None,
                client_port: port,
            });
            let i = self.servers.len() - 1;
            self.start_server(i)?;
            self.wait_server_log(i, "publisher up")?;
        }
        let list: Vec<String> = ports
            .iter()
            .chain(extra)
            .map(|p| format!("{DB_IP}:{p}"))
            .collect();
        if !list.is_empty() {
            self.nb = format!("{}?publishers={}", self.nb, list.join(","));
        }
        Ok(())
    }

    /// Starts `gf-zmq-forge` (the tests' faulty publisher) on `port` with `script` on `topic`
    /// and adds it to the NB URL's publishers. It plays the script once the returned file
    /// exists, and logs `sent <script>` when done.
    pub fn add_forger(&mut self, port: u16, script: &str, topic: &str) -> Result<PathBuf> {
        let go = self.dir.join(format!("forge-{port}.go"));
        self.servers.push(Server {
            name: format!("forger-{port}"),
            args: vec![
                self.bin("gf-zmq-forge"),
                "--listen".into(),
                DB_IP.into(),
                "--port".into(),
                port.to_string(),
                "--topic".into(),
                topic.into(),
                "--script".into(),
                script.into(),
                "--go".into(),
                go.display().to_string(),
            ],
            log: self.dir.join(format!("forger-{port}.log")),
            child: None,
            // A writer forger listens nowhere (`port` is the publisher's it pushes to).
            client_port: if script == "push-garbage" { 0 } else { port },
        });
        let i = self.servers.len() - 1;
        self.start_server(i)?;
        if script != "push-garbage" {
            let sep = if self.nb.contains("?publishers=") {
                ","
            } else {
                "?publishers="
            };
            self.nb = format!("{}{sep}{DB_IP}:{port}", self.nb);
        }
        Ok(go)
    }

    /// The index in `servers` of the server listening on `port`.
    pub fn server_on(&self, port: u16) -> Result<usize> {
        self.servers
            .iter()
            .position(|s| s.client_port == port)
            .ok_or_else(|| anyhow!("no server on port {port}"))
    }

    /// Waits until server `i`'s log has `what`.
    pub fn wait_server_log(&self, i: usize, what: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.server_log(i).contains(what) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "{} never logged {what:?}:\n{}",
            self.servers[i].name,
            self.server_log(i)
        )
    }

    pub fn server_log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.servers[i].log).unwrap_or_default()
    }

    /// `etcdctl ARGS` against the first etcd member, from the DB namespace.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let ns = self
            .db_ns
            .clone()
            .ok_or_else(|| anyhow!("no db namespace"))?;
        let s = self
            .servers
            .iter()
            .find(|s| s.name.starts_with("etcd"))
            .ok_or_else(|| anyhow!("no etcd"))?;
        run(Command::new("ip")
            .args(["netns", "exec", &ns, "etcdctl"])
            .args(["--endpoints", &format!("{DB_IP}:{}", s.client_port)])
            .args(args))
    }

    pub(crate) fn add_db_ns(&mut self) -> Result<String> {
        let ns = format!("{}-db", self.prefix);
        self.add_ns(&ns)?;
        self.underlay_port(&ns, "eth0", &format!("{DB_IP}/24"))?;
        self.db_ns = Some(ns.clone());
        Ok(ns)
    }

    pub(crate) fn start_etcd(&mut self, members: usize) -> Result<()> {
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

    pub(crate) fn start_redis(&mut self) -> Result<()> {
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

    /// Six `redis-server --cluster-enabled yes` on ports 7000-7005, joined by `redis-cli
    /// --cluster create --cluster-replicas 1`: three masters (7000-7002 as created), a replica
    /// each. A node is failed after 1 s (`cluster-node-timeout`), so a replica takes over a
    /// killed master within a few seconds.
    pub(crate) fn start_redis_cluster(&mut self) -> Result<()> {
        let ns = self.add_db_ns()?;
        for i in 0..6u16 {
            let port = 7000 + i;
            let dir = self.dir.join(format!("redis-{port}"));
            std::fs::create_dir_all(&dir)?;
            let args = [
                "redis-server",
                "--bind",
                DB_IP,
                "--port",
                &port.to_string(),
                "--dir",
                &dir.display().to_string(),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &dir.join("nodes.conf").display().to_string(),
                "--cluster-node-timeout",
                "1000",
                // A replica's first sync starts at once, not after the default 5 s wait for
                // more replicas: a replica that never synced cannot take over.
                "--repl-diskless-sync-delay",
                "0",
                "--appendonly",
                "yes",
                "--save",
                "",
                "--protected-mode",
                "no",
            ];
            self.servers.push(Server {
                name: format!("redis-{port}"),
                args: args.iter().map(|a| a.to_string()).collect(),
                log: self.dir.join(format!("redis-{port}.log")),
                child: None,
                client_port: port,
            });
            self.start_server(i as usize)?;
        }
        let nodes: Vec<String> = (7000..7006).map(|p| format!("{DB_IP}:{p}")).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !nodes.iter().all(|n| {
            self.redis_cli(n, &["PING"])
                .is_ok_and(|r| r.trim() == "PONG")
        }) {
            if Instant::now() > deadline {
                bail!("redis cluster nodes did not start");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        run(Command::new("ip")
            .args(["netns", "exec", &ns, "redis-cli", "--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "1", "--cluster-yes"]))
        .context("redis-cli --cluster create")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !nodes.iter().all(|n| {
            self.redis_cli(n, &["CLUSTER", "INFO"])
                .is_ok_and(|r| r.contains("cluster_state:ok"))
        }) {
            if Instant::now() > deadline {
                bail!("redis cluster never reached cluster_state:ok");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Every replica in sync with its master, so that any master may be killed.
        while !nodes.iter().all(|n| {
            self.redis_cli(n, &["INFO", "replication"])
                .is_ok_and(|r| r.contains("role:master") || r.contains("master_link_status:up"))
        }) {
            if Instant::now() > deadline {
                bail!("redis cluster replicas never synced");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.nb = format!("redis+cluster://{}", nodes[..3].join(","));
        self.wait_db_healthy()
    }

    /// `redis-cli -h host -p port ARGS` from the NB namespace, for `node` = "host:port".
    pub fn redis_cli(&self, node: &str, args: &[&str]) -> Result<String> {
        let ns = self
            .db_ns
            .clone()
            .ok_or_else(|| anyhow!("no db namespace"))?;
        let (host, port) = node.split_once(':').context("node is host:port")?;
        run(Command::new("ip")
            .args(["netns", "exec", &ns, "redis-cli", "-h", host, "-p", port])
            .args(args))
    }

    /// The index (in `servers`) of the Redis Cluster master serving `key`'s slot, as a live
    /// node's `CLUSTER NODES` says.
    pub fn redis_master_of(&self, key: &str) -> Result<usize> {
        let live = self
            .servers
            .iter()
            .find(|s| s.child.is_some())
            .map(|s| format!("{DB_IP}:{}", s.client_port))
            .context("no live node")?;
        let slot: u32 = self
            .redis_cli(&live, &["CLUSTER", "KEYSLOT", key])?
            .trim()
            .parse()?;
        let nodes = self.redis_cli(&live, &["CLUSTER", "NODES"])?;
        for l in nodes.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let serves = f[8..].iter().any(|r| {
                let (a, b) = r.split_once('-').unwrap_or((r, r));
                matches!((a.parse::<u32>(), b.parse::<u32>()), (Ok(a), Ok(b)) if a <= slot && slot <= b)
            });
            if !serves {
                continue;
            }
            let port: u16 = f[1]
                .split(['@', ':'])
                .nth(1)
                .and_then(|p| p.parse().ok())
                .context("CLUSTER NODES address")?;
            return self
                .servers
                .iter()
                .position(|s| s.client_port == port)
                .context("master not one of ours");
        }
        bail!("no master serves slot {slot} ({key})")
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

    /// The process ids of the NB servers running now.
    pub fn server_pids(&self) -> Vec<u32> {
        self.servers
            .iter()
            .filter_map(|s| s.child.as_ref().map(|c| c.id()))
            .collect()
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
}
