//! `geneflowd --datapath dpdk`: the whole datapath in DPDK poll loops. The EAL starts with
//! the arguments given and an ethdev per port (the uplink, the VM ports, the providers'): a
//! `net_af_packet` vdev on the kernel interface of that name, or the device `--dpdk-devargs`
//! gives it (a PCI NIC, any vdev; see `ports`), with one receive and one transmit queue
//! per poll thread. Each thread (one per core given, pinned) runs to completion: it receives
//! bursts from its queue of every port, runs each frame through its own userspace engine
//! (`userpath`: its megaflow cache and the userspace actions, the pipeline on a miss) and
//! sends bursts on its own transmit queues. No lock on a hit; the neighbour table is shared
//! under a lock taken for ARP and misses only.
//!
//! The calling thread applies the control thread's pipelines (compiled tables published to
//! the poll threads, new generations for the datapaths that changed), answers the control
//! socket and publishes the gauges; each poll thread adds its counters (per port, by the XDP
//! counters' names) to the shared ones every 100 ms, for `stats` and Prometheus, with the
//! time it spent on frames (`busy_ns` / `busy_frames`: the engine's cost per packet, without
//! the ports' receive and transmit, which on af_packet vdevs are the kernel's copies).
//!
//! Connection tracking (`userct`) is shared by the poll threads, each with its own
//! connection cache; the calling thread expires idle entries every second and ends the
//! connections of the zones whose security groups changed. The control socket's `ports`,
//! `flows`, `trace`, `ct` and `ct flush` are answered by `inspect`.
//!
//! Provider interfaces (`providers`) are DPDK ports too; what the poll threads learn there
//! (neighbours from ARP) goes to the calling thread (`control`), which owns the tables.
//!
//! Default-SNAT translations live in a table the poll threads share (`usernat::NatMap`,
//! read without a lock; the XDP backend's allocation and expiry code over it).
//!
//! A restart costs every
//! megaflow, tracked connection and translation (they live in the process) and the frames in
//! flight; the agent reads the NB again, the first frames of each flow go through the
//! pipeline, and connections a security group admits only as established, or that leave by
//! default SNAT, must start again.

use super::control::{Control, PortSet};
use super::inspect::{FlowRequests, Inspect};
use super::ports;
use super::{Burst, DpdkError, Eal, EthPort, Mempool, BURST};
use crate::ctl::CtlRequest;
use crate::flowcache::{FlowCache, GenerationTable, Generations};
use crate::metrics::Shared;
use crate::netdev;
use crate::pipeline::Tables;
use crate::userct::ConnTable;
use crate::usernat::NatMap;
use crate::userneigh::UnderlayNeigh;
use crate::userpath::{Counters, PathConfig, PathEvent, PathShared, Tx, UserPath};
use arc_swap::ArcSwapOption;
use crossbeam_channel::Receiver;
use geneflow_abi::{ct, ctr, MAX_FLOWS, MAX_QUEUES};
use geneflow_control::agent::PipelineUpdate;
use geneflow_control::model::Mac;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Polls without a frame before the loop naps (`IDLE_NAP`), as OVS-DPDK's PMD sleep: a
/// test chassis should not burn a core while nothing moves.
const IDLE_POLLS: u32 = 1024;
const IDLE_NAP: Duration = Duration::from_micros(200);
/// How often counters and gauges are published.
const PUBLISH: Duration = Duration::from_millis(100);
/// How often idle connections are expired (and the connection caches' epoch ends).
const CT_EXPIRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct DpdkConfig {
    /// The EAL's own arguments (`-l 0 --no-huge ...`); the ports' devices are added.
    pub eal: Vec<String>,
    /// The uplink's name: a kernel interface, or a name `devargs` gives a device.
    pub uplink: String,
    /// The VM ports this chassis serves, by the names the NB binds them by: kernel
    /// interfaces, or names `devargs` gives a device.
    pub ports: Vec<String>,
    /// Ports that are DPDK devices, not kernel interfaces: (port name, PCI address or vdev
    /// string), see `ports`.
    pub devargs: Vec<(String, String)>,
    pub encap_ip: Option<Ipv4Addr>,
    pub udp_csum: bool,
    /// One poll thread per core, pinned there; empty: one thread, not pinned.
    pub cores: Vec<usize>,
    /// Provider networks: (physnet, port name), bridged untunnelled.
    pub providers: Vec<(String, String)>,
    /// DHCP answers per second per port.
    pub dhcp_rate: u32,
    /// Light-load sleep cap (OVS-DPDK's pmd-maxsleep); zero: none.
    pub max_sleep: Duration,
}

/// One port as a poll thread sees it: the ethdev, its queue and its transmit burst.
struct Port<'a, 'p> {
    eth: &'a EthPort<'p>,
    ifindex: u32,
    tx: Burst,
    /// What this thread received and sent on the port (the engine counts the rest).
    io: Counters,
}

struct Sender<'a, 'b, 'p> {
    ports: &'a mut [Port<'b, 'p>],
    pool: &'a Mempool<'p>,
    queue: u16,
}

impl Tx for Sender<'_, '_, '_> {
    fn send(&mut self, ifindex: u32, frame: &[u8]) -> bool {
        let q = self.queue;
        let Some(p) = self.ports.iter_mut().find(|p| p.ifindex == ifindex) else {
            return false;
        };
        if p.tx.is_full() {
            p.tx.tx(p.eth, q);
        }
        let ok = p.tx.push_copy(self.pool, frame);
        if ok {
            p.io.add(ctr::TX_PACKETS, 1);
            p.io.add(ctr::TX_BYTES, frame.len() as u64);
        }
        ok
    }
}

/// What the poll threads share.
struct Common<'a, 'p> {
    eths: &'a [EthPort<'p>],
    ifindexes: &'a [u32],
    pool: &'a Mempool<'p>,
    /// The compiled tables, replaced whole when a pipeline is applied.
    tables: &'a ArcSwapOption<Tables>,
    gens: &'a Arc<Generations>,
    state: &'a PathShared,
    events: crossbeam_channel::Sender<PathEvent>,
    /// Frames the calling thread has a poll thread send (gratuitous ARPs): (ifindex, frame).
    inject: Receiver<crate::garp::Garp>,
    dhcp_rate: u32,
    flows: &'a FlowRequests,
    uplink_mac: [u8; 6],
    udp_csum: bool,
    max_sleep: Duration,
    shared: &'a Shared,
    /// Each thread's megaflow count, summed into the gauge.
    megaflows: &'a [AtomicU64],
    stop: &'a AtomicBool,
}

/// Adds to `shared` what moved since `published` (per port slot).
fn publish(shared: &Shared, ports: &[Port], path: &UserPath, published: &mut [Counters]) {
    for (slot, p) in ports.iter().enumerate() {
        for c in 0..ctr::COUNT {
            let engine = path.counters.get(slot).map_or(0, |x| x.get(c));
            let now = p.io.get(c) + engine;
            let before = published[slot].get(c);
            if now > before {
                shared.count(slot as u32, c, now - before);
                published[slot].add(c, now - before);
            }
        }
    }
}

/// One poll thread: queue `q` of every port, until `stop`.
fn poll(c: &Common, q: u16, core: Option<usize>) {
    if let Some(core) = core {
        if let Err(e) = crate::netdev::pin_thread(core) {
            warn!(core, "poll thread not pinned: {e}");
        }
    }
    let mut ports: Vec<Port> = c
        .eths
        .iter()
        .zip(c.ifindexes)
        .map(|(eth, &ifindex)| Port {
            eth,
            ifindex,
            tx: Burst::default(),
            io: Counters::default(),
        })
        .collect();
    let mut path = UserPath::new(
        FlowCache::new(c.gens.clone(), MAX_FLOWS as usize),
        c.state.clone(),
        PathConfig {
            ports: ports.len(),
            uplink: (c.ifindexes[0], c.uplink_mac),
            udp_csum: c.udp_csum,
            dhcp_rate: c.dhcp_rate as f32,
            threads: c.megaflows.len(),
            events: Some(c.events.clone()),
        },
    );
    let mut published = vec![Counters::default(); ports.len()];
    let mut last_publish = Instant::now();
    let mut rx = Burst::default();
    let mut idle = 0u32;
    let mut light = Duration::ZERO;
    // Time on frames and frames, published with the counters.
    let (mut busy_ns, mut busy_frames) = (0u64, 0u64);
    while !c.stop.load(Ordering::Relaxed) {
        let tables = c.tables.load_full();
        for g in c.inject.try_iter() {
            let mut s = Sender {
                ports: &mut ports,
                pool: c.pool,
                queue: q,
            };
            let sent = s.send(g.ifindex, &g.frame);
            let counter = if sent {
                ctr::GARP_SENT
            } else {
                ctr::DROP_TX_FULL
            };
            if let Some(p) = ports.iter_mut().find(|p| p.ifindex == g.ifindex) {
                p.io.add(counter, 1);
            }
            if !sent {
                // Owed again: the control thread offers it on its next round.
                let _ = c.events.try_send(PathEvent::Unsent(g));
            }
        }
        let mut got = 0;
        for i in 0..ports.len() {
            rx.rx(ports[i].eth, q);
            got += rx.len();
            ports[i].io.add(ctr::RX_PACKETS, rx.len() as u64);
            for k in 0..rx.len() {
                ports[i].io.add(ctr::RX_BYTES, rx.frame(k).len() as u64);
            }
            if let (Some(t), false) = (tables.as_deref(), rx.is_empty()) {
                let now = Instant::now();
                let in_ifindex = ports[i].ifindex;
                let mut s = Sender {
                    ports: &mut ports,
                    pool: c.pool,
                    queue: q,
                };
                for k in 0..rx.len() {
                    if rx.segments(k) != 1 {
                        if let Some(x) = path.counters.get_mut(i) {
                            x.add(ctr::DROP_TOO_BIG, 1);
                        }
                        continue;
                    }
                    path.receive(t, rx.frame(k), (in_ifindex, i), now, &mut s);
                }
                busy_ns += now.elapsed().as_nanos() as u64;
                busy_frames += rx.len() as u64;
            }
            rx.clear();
        }
        if path.has_pending() {
            let mut s = Sender {
                ports: &mut ports,
                pool: c.pool,
                queue: q,
            };
            path.flush_pending(Instant::now(), &mut s);
        }
        for p in &mut ports {
            if !p.tx.is_empty() {
                p.tx.tx(p.eth, q);
            }
        }
        if last_publish.elapsed() >= PUBLISH {
            last_publish = Instant::now();
            publish(c.shared, &ports, &path, &mut published);
            c.megaflows[q as usize].store(path.cache.len() as u64, Ordering::Relaxed);
            c.flows.serve(q as usize, &path.cache);
            c.shared.busy_ns.fetch_add(busy_ns, Ordering::Relaxed);
            c.shared
                .busy_frames
                .fetch_add(busy_frames, Ordering::Relaxed);
            (busy_ns, busy_frames) = (0, 0);
        }
        if got == 0 {
            idle += 1;
            if idle >= IDLE_POLLS {
                std::thread::sleep(IDLE_NAP);
            }
        } else {
            idle = 0;
        }
        // Light load (less than half a burst this round): with a cap set, sleep a little
        // longer each such round, as OVS-DPDK's PMDs do with pmd-maxsleep, so that the
        // frames gather into bigger bursts (fewer transmit kicks) and the core is given up
        // for a while; a busy round resets it. Costs up to the cap in latency.
        if !c.max_sleep.is_zero() && got > 0 && got < BURST / 2 {
            light = (light + Duration::from_micros(1)).min(c.max_sleep);
            std::thread::sleep(light);
        } else if got >= BURST / 2 {
            light = Duration::ZERO;
        }
    }
    publish(c.shared, &ports, &path, &mut published);
    info!(
        queue = q,
        fast_hits = path.total(ctr::FAST_HIT),
        slow = path.total(ctr::SLOW_RX),
        megaflows = path.cache.len(),
        "DPDK poll thread stopping"
    );
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
        .chain(cfg.providers.iter().map(|(_, i)| i.clone()))
        .collect();
    let threads = cfg.cores.len().clamp(1, MAX_QUEUES as usize);
    let plan = ports::plan(&ifaces, &cfg.devargs, threads, &netdev::ifindex)?;
    let ifindexes = plan.ifindexes.clone();
    if let Some(slot) = plan.devices.iter().position(|d| ports::is_pci(d)) {
        if cfg.eal.iter().any(|a| a == "--no-pci") {
            return Err(DpdkError::Devargs(format!(
                "{}: a PCI device, but the EAL arguments have --no-pci",
                ifaces[slot]
            )));
        }
    }
    // The kernel interfaces belong to the overlay: the host's stack must not talk on them.
    for (slot, name) in ifaces.iter().enumerate().skip(1) {
        if plan.kernel[slot] {
            netdev::silence_host_stack(name);
        }
    }
    let mut ports = PortSet {
        ifaces: ifaces.clone(),
        ifindexes: ifindexes.clone(),
        physnets: HashMap::new(),
        untagged_only: Vec::new(),
    };
    for (k, (net, iface)) in cfg.providers.iter().enumerate() {
        let slot = 1 + cfg.ports.len() + k;
        let ix = ifindexes[slot];
        // 802.1Q tags in the frames (af_packet puts back a tag the kernel took off; a DPDK
        // driver keeps them, VLAN stripping being off).
        if plan.kernel[slot] && !netdev::keep_vlan_tags(iface) {
            ports.untagged_only.push(ix);
        }
        info!(physnet = %net, %iface, ifindex = ix, "provider network attached");
        ports.physnets.insert(net.clone(), ix);
    }
    let mut eal_args = cfg.eal.clone();
    eal_args.extend(plan.eal.iter().cloned());
    let eal = Eal::init(&eal_args)?;
    let pool = Mempool::new(&eal, "geneflow", 8191 * threads as u32, 2048 + 128)?;
    let mut eths = Vec::new();
    for (slot, name) in ifaces.iter().enumerate() {
        let device = &plan.devices[slot];
        let eth = EthPort::open(device, threads as u16, 1024, &pool)?;
        info!(
            port = %name,
            %device,
            id = eth.id,
            ifindex = ifindexes[slot],
            queues = threads,
            "DPDK port started"
        );
        eths.push(eth);
    }
    let uplink_mac = eths[0].mac();
    let mtu = if plan.kernel[0] {
        netdev::mtu(&cfg.uplink)
    } else {
        eths[0].mtu()
    }
    .unwrap_or(1500);
    let gens = Arc::new(Generations::default());
    let table = GenerationTable::new(gens.clone());
    let tables: ArcSwapOption<Tables> = ArcSwapOption::empty();
    // Learns nothing until the NB gives the tunnel address (and the chassis to learn).
    let neigh = Arc::new(Mutex::new(UnderlayNeigh::new(
        cfg.encap_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
        Mac(uplink_mac),
    )));
    let megaflows: Vec<AtomicU64> = (0..threads).map(|_| AtomicU64::new(0)).collect();
    let conntrack = Arc::new(ConnTable::new(ct::MAX_ENTRIES as usize));
    let nat = Arc::new(NatMap::new(geneflow_abi::nat::MAX_ENTRIES as usize));
    let published = Arc::new(AtomicU64::new(0));
    let state = PathShared {
        neigh: neigh.clone(),
        conntrack: conntrack.clone(),
        nat: nat.clone(),
        published: published.clone(),
    };
    let flows = FlowRequests::new(threads);
    let (events_tx, events) = crossbeam_channel::bounded(1024);
    let (inject_tx, inject) = crossbeam_channel::bounded(1024);
    let mut control = Control {
        cfg: &cfg,
        ports: &ports,
        tables: &tables,
        generations: table,
        neigh: &neigh,
        conntrack: &conntrack,
        nat: &nat,
        published: &published,
        shared: &shared,
        uplink_mac,
        mtu,
        acls: Default::default(),
        arp_asked: Default::default(),
        rounds: 0,
        announcer: Default::default(),
        inject: inject_tx,
    };
    control.publish_ports(&|_| None);
    let common = Common {
        eths: &eths,
        ifindexes: &ifindexes,
        pool: &pool,
        tables: &tables,
        gens: &gens,
        state: &state,
        events: events_tx,
        inject,
        dhcp_rate: cfg.dhcp_rate,
        flows: &flows,
        uplink_mac,
        udp_csum: cfg.udp_csum,
        max_sleep: cfg.max_sleep,
        shared: &shared,
        megaflows: &megaflows,
        stop: &stop,
    };
    info!(ports = ifaces.len(), threads, "DPDK datapath running");
    std::thread::scope(|s| {
        for q in 0..threads {
            let core = cfg.cores.get(q).copied();
            let common = &common;
            let spawned = std::thread::Builder::new()
                .name(format!("gf-poll-{q}"))
                .spawn_scoped(s, move || poll(common, q as u16, core));
            if let Err(e) = spawned {
                warn!("poll thread {q} not started: {e}");
                stop.store(true, Ordering::Relaxed);
            }
        }
        let mut last_expiry = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            crossbeam_channel::select! {
                recv(pipelines) -> u => {
                    if let Ok(u) = u {
                        control.apply(pipelines.try_iter().last().unwrap_or(u));
                    }
                }
                recv(events) -> ev => {
                    if let Ok(ev) = ev {
                        control.event(ev);
                    }
                }
                default(PUBLISH) => {}
            }
            shared.megaflows.store(
                megaflows.iter().map(|m| m.load(Ordering::Relaxed)).sum(),
                Ordering::Relaxed,
            );
            let inspect = Inspect {
                ports: &ports,
                tables: tables.load_full(),
                conntrack: &conntrack,
                flows: &flows,
                shared: &shared,
            };
            for req in ctl.try_iter() {
                let _ = req.reply.send(inspect.answer(&req.cmd, &req.arg));
            }
            if last_expiry.elapsed() >= CT_EXPIRY {
                last_expiry = Instant::now();
                control.expire();
            }
        }
    });
    drop(eths);
    drop(pool);
    drop(eal);
    Ok(())
}
