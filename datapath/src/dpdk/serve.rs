//! `geneflowd --datapath dpdk`: the whole datapath in a DPDK poll loop. The EAL starts with
//! the arguments given and an ethdev per interface (a `net_af_packet` vdev on each kernel
//! interface named: the uplink and the VM ports); one run-to-completion loop receives bursts
//! from every port, runs each frame through the userspace engine (`userpath`: the megaflow
//! cache and userspace actions, the pipeline on a miss) and sends bursts out. The control
//! thread's pipelines arrive on a channel and are applied between bursts.
//!
//! Counters (per port, by the XDP counters' names) reach the control socket's `stats` and
//! Prometheus every 100 ms. Not yet: one loop per core with its own queues, the control
//! socket's `flows` and `trace`, provider networks, connection tracking and NAT. A restart costs every
//! megaflow (the cache lives in the process) and the frames in flight; the agent reads the
//! NB again and the first frames of each flow go through the pipeline.

use super::{Burst, DpdkError, Eal, EthPort, Mempool};
use crate::ctl::CtlRequest;
use crate::flowcache::{FlowCache, GenerationTable, Generations};
use crate::metrics::{PortInfo, Shared};
use crate::netdev;
use crate::pipeline::Tables;
use crate::userneigh::UnderlayNeigh;
use crate::userpath::{Counters, Tx, UserPath};
use crossbeam_channel::Receiver;
use geneflow_abi::{ctr, MAX_FLOWS, MAX_PORTS};
use geneflow_control::agent::PipelineUpdate;
use geneflow_control::model::Mac;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Polls without a frame before the loop naps (`IDLE_NAP`), as OVS-DPDK's PMD sleep: a
/// test chassis should not burn a core while nothing moves.
const IDLE_POLLS: u32 = 1024;
const IDLE_NAP: Duration = Duration::from_micros(200);
/// How often the loop's counters are published.
const PUBLISH: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct DpdkConfig {
    /// The EAL's own arguments (`-l 0 --no-huge ...`); vdevs for the ports are added.
    pub eal: Vec<String>,
    pub uplink: String,
    /// The kernel interfaces of the VM ports this chassis serves.
    pub ports: Vec<String>,
    pub encap_ip: Option<Ipv4Addr>,
    pub udp_csum: bool,
}

struct Port<'p> {
    eth: EthPort<'p>,
    ifindex: u32,
    tx: Burst,
    /// What this port received and sent (the engine counts the rest).
    io: Counters,
}

/// The ports' transmit bursts, by interface index.
struct Ports<'p>(Vec<Port<'p>>);

impl Ports<'_> {
    fn flush(&mut self) {
        for p in &mut self.0 {
            if !p.tx.is_empty() {
                p.tx.tx(&p.eth, 0);
            }
        }
    }
}

struct Sender<'a, 'p> {
    ports: &'a mut Ports<'p>,
    pool: &'a Mempool<'p>,
}

impl Tx for Sender<'_, '_> {
    fn send(&mut self, ifindex: u32, frame: &[u8]) -> bool {
        let Some(p) = self.ports.0.iter_mut().find(|p| p.ifindex == ifindex) else {
            return false;
        };
        if p.tx.is_full() {
            p.tx.tx(&p.eth, 0);
        }
        let ok = p.tx.push_copy(self.pool, frame);
        if ok {
            p.io.add(ctr::TX_PACKETS, 1);
            p.io.add(ctr::TX_BYTES, frame.len() as u64);
        }
        ok
    }
}

/// Adds to `shared` what moved since `published` (per port slot): the engine's counts and
/// the ports' own.
fn publish(shared: &Shared, ports: &Ports, path: Option<&UserPath>, published: &mut [Counters]) {
    for (slot, p) in ports.0.iter().enumerate() {
        for c in 0..ctr::COUNT {
            let engine = path
                .and_then(|x| x.counters.get(slot))
                .map_or(0, |x| x.get(c));
            let now = p.io.get(c) + engine;
            let before = published[slot].get(c);
            if now > before {
                shared.count(slot as u32, c, now - before);
                published[slot].add(c, now - before);
            }
        }
    }
    if let Some(p) = path {
        shared
            .megaflows
            .store(p.cache.len() as u64, Ordering::Relaxed);
        shared.masks.store(
            (p.cache.masks(0) + p.cache.masks(1)) as u64,
            Ordering::Relaxed,
        );
    }
}

/// Runs until `stop`; every DPDK resource is released on return, error or not. Control
/// socket requests other than `stats` (which `shared` answers) come on `ctl`.
pub fn serve(
    cfg: DpdkConfig,
    pipelines: Receiver<PipelineUpdate>,
    ctl: Receiver<CtlRequest>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
) -> Result<(), DpdkError> {
    let ifaces: Vec<String> = std::iter::once(cfg.uplink.clone())
        .chain(cfg.ports.iter().cloned())
        .collect();
    if ifaces.len() > MAX_PORTS as usize {
        return Err(DpdkError::NoPort(format!(
            "{}: more than {MAX_PORTS} ports",
            ifaces[MAX_PORTS as usize]
        )));
    }
    let mut ifindexes = Vec::new();
    let mut eal_args = cfg.eal.clone();
    for (i, name) in ifaces.iter().enumerate() {
        let ix = netdev::ifindex(name).ok_or_else(|| DpdkError::NoInterface(name.clone()))?;
        ifindexes.push(ix);
        eal_args.push("--vdev".into());
        eal_args.push(format!("net_af_packet{i},iface={name}"));
    }
    // The ports belong to the overlay: the host's stack must not talk on them.
    for name in &cfg.ports {
        netdev::silence_host_stack(name);
    }
    let eal = Eal::init(&eal_args)?;
    let pool = Mempool::new(&eal, "geneflow", 8191, 2048 + 128)?;
    let mut ports = Ports(Vec::new());
    for (i, name) in ifaces.iter().enumerate() {
        let eth = EthPort::open(&format!("net_af_packet{i}"), 1, 1024, &pool)?;
        info!(iface = %name, port = eth.id, "DPDK port started");
        ports.0.push(Port {
            eth,
            ifindex: ifindexes[i],
            tx: Burst::default(),
            io: Counters::default(),
        });
    }
    let port_infos = |bindings: &dyn Fn(&str) -> Option<String>| -> Vec<PortInfo> {
        ifaces
            .iter()
            .enumerate()
            .map(|(i, name)| PortInfo {
                iface: name.clone(),
                ifindex: ifindexes[i],
                slot: i as u32,
                kind: if i == 0 { "uplink" } else { "vm" },
                port: bindings(name),
            })
            .collect()
    };
    if let Ok(mut g) = shared.ports.lock() {
        *g = port_infos(&|_| None);
    }
    let mut published = vec![Counters::default(); ports.0.len()];
    let mut last_publish = Instant::now();
    let uplink_mac = ports.0[0].eth.mac();
    let uplink_ifindex = ifindexes[0];
    let mtu = netdev::mtu(&cfg.uplink).unwrap_or(1500);
    let gens = Arc::new(Generations::default());
    let mut table = GenerationTable::new(gens.clone());
    let mut path: Option<UserPath> = None;
    let mut tables: Option<Tables> = None;
    let mut rx = Burst::default();
    let mut idle = 0u32;
    info!(ports = ifaces.len(), "DPDK datapath running");
    while !stop.load(Ordering::Relaxed) {
        if let Some(u) = pipelines.try_iter().last() {
            let known: Vec<(String, u32)> = ifaces.iter().cloned().zip(ifindexes.clone()).collect();
            let t = Tables::new(u.pipeline.clone(), uplink_ifindex, mtu, cfg.udp_csum, |n| {
                known.iter().find(|(k, _)| k == n).map(|(_, ix)| *ix)
            });
            if let Err(e) = table.set_generations(&t.fingerprints(uplink_mac)) {
                warn!("pipeline not applied: {e}");
                continue;
            }
            let encap_ip = cfg.encap_ip.or(u.pipeline.encap_ip);
            match (&mut path, encap_ip) {
                (Some(p), _) => p.neigh.set_allowed(u.pipeline.peer_ips.iter().copied()),
                (None, Some(ip)) => {
                    let mut neigh = UnderlayNeigh::new(ip, Mac(uplink_mac));
                    neigh.set_allowed(u.pipeline.peer_ips.iter().copied());
                    let cache = FlowCache::new(gens.clone(), MAX_FLOWS as usize);
                    path = Some(UserPath::new(
                        cache,
                        neigh,
                        ifaces.len(),
                        (uplink_ifindex, uplink_mac),
                        cfg.udp_csum,
                    ));
                }
                (None, None) => warn!("no tunnel address for this chassis in the NB yet"),
            }
            info!(
                datapaths = t.fingerprints(uplink_mac).len(),
                "pipeline applied"
            );
            tables = Some(t);
            if let Ok(mut g) = shared.ports.lock() {
                *g = port_infos(&|n| u.pipeline.bindings.get(n).map(|b| b.port.clone()));
            }
            shared.pipelines_applied.fetch_add(1, Ordering::Relaxed);
        }
        let mut got = 0;
        for i in 0..ports.0.len() {
            rx.rx(&ports.0[i].eth, 0);
            got += rx.len();
            ports.0[i].io.add(ctr::RX_PACKETS, rx.len() as u64);
            for k in 0..rx.len() {
                ports.0[i].io.add(ctr::RX_BYTES, rx.frame(k).len() as u64);
            }
            if let (Some(p), Some(t)) = (path.as_mut(), tables.as_ref()) {
                let now = Instant::now();
                let in_ifindex = ports.0[i].ifindex;
                let mut s = Sender {
                    ports: &mut ports,
                    pool: &pool,
                };
                for k in 0..rx.len() {
                    if rx.segments(k) != 1 {
                        if let Some(c) = p.counters.get_mut(i) {
                            c.add(ctr::DROP_TOO_BIG, 1);
                        }
                        continue;
                    }
                    p.receive(t, rx.frame(k), (in_ifindex, i), now, &mut s);
                }
            }
            rx.clear();
        }
        ports.flush();
        if last_publish.elapsed() >= PUBLISH {
            last_publish = Instant::now();
            publish(&shared, &ports, path.as_ref(), &mut published);
            for req in ctl.try_iter() {
                let _ = req.reply.send(serde_json::json!({
                    "error": format!("{:?} is not served by the DPDK datapath yet", req.cmd)
                }));
            }
        }
        if got == 0 {
            idle += 1;
            if idle >= IDLE_POLLS {
                std::thread::sleep(IDLE_NAP);
            }
        } else {
            idle = 0;
        }
    }
    if let Some(p) = &path {
        info!(
            fast_hits = p.total(ctr::FAST_HIT),
            slow = p.total(ctr::SLOW_RX),
            megaflows = p.cache.len(),
            "DPDK datapath stopping"
        );
    }
    drop(ports);
    drop(pool);
    drop(eal);
    Ok(())
}
