//! `geneflowd --datapath dpdk`: the whole datapath in a DPDK poll loop. The EAL starts with
//! the arguments given and an ethdev per interface (a `net_af_packet` vdev on each kernel
//! interface named: the uplink and the VM ports); one run-to-completion loop receives bursts
//! from every port, runs each frame through the userspace engine (`userpath`: the megaflow
//! cache and userspace actions, the pipeline on a miss) and sends bursts out. The control
//! thread's pipelines arrive on a channel and are applied between bursts.
//!
//! Not yet: one loop per core with its own queues, counters on the control socket and
//! Prometheus, provider networks, connection tracking and NAT. A restart costs every
//! megaflow (the cache lives in the process) and the frames in flight; the agent reads the
//! NB again and the first frames of each flow go through the pipeline.

use super::{Burst, DpdkError, Eal, EthPort, Mempool};
use crate::flowcache::{FlowCache, GenerationTable, Generations};
use crate::netdev;
use crate::pipeline::Tables;
use crate::userneigh::UnderlayNeigh;
use crate::userpath::{Tx, UserPath};
use crossbeam_channel::Receiver;
use geneflow_abi::MAX_FLOWS;
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
        p.tx.push_copy(self.pool, frame)
    }
}

/// Runs until `stop`; every DPDK resource is released on return, error or not.
pub fn serve(
    cfg: DpdkConfig,
    pipelines: Receiver<PipelineUpdate>,
    stop: Arc<AtomicBool>,
) -> Result<(), DpdkError> {
    let ifaces: Vec<String> = std::iter::once(cfg.uplink.clone())
        .chain(cfg.ports.iter().cloned())
        .collect();
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
        });
    }
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
                        uplink_ifindex,
                        uplink_mac,
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
        }
        let mut got = 0;
        for i in 0..ports.0.len() {
            rx.rx(&ports.0[i].eth, 0);
            got += rx.len();
            if let (Some(p), Some(t)) = (path.as_mut(), tables.as_ref()) {
                let now = Instant::now();
                let in_ifindex = ports.0[i].ifindex;
                let mut s = Sender {
                    ports: &mut ports,
                    pool: &pool,
                };
                for k in 0..rx.len() {
                    if rx.segments(k) != 1 {
                        p.counters.add(geneflow_abi::ctr::DROP_TOO_BIG, 1);
                        continue;
                    }
                    p.receive(t, rx.frame(k), in_ifindex, now, &mut s);
                }
            }
            rx.clear();
        }
        ports.flush();
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
            fast_hits = p.counters.get(geneflow_abi::ctr::FAST_HIT),
            slow = p.counters.get(geneflow_abi::ctr::SLOW_RX),
            megaflows = p.cache.len(),
            "DPDK datapath stopping"
        );
    }
    drop(ports);
    drop(pool);
    drop(eal);
    Ok(())
}
