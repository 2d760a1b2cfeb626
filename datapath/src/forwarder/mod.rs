//! The slow-path forwarder: owns the BPF maps and one AF_XDP socket per attached interface,
//! applies pipeline snapshots from the control thread (attach/detach ports, bump the
//! generations of datapaths whose fingerprint moved), and runs the userspace pipeline on every frame the fast
//! path could not decide: it transmits the frame itself and installs the megaflow so that the
//! following packets stay in XDP. Share-nothing: one thread owns all of this state; with
//! more than one core, the other threads (`worker`) serve the other receive queues and hand
//! it what needs that state.

use crate::loader::{Adopted, Bpf, Install, LoaderError, PortLink, Recorded};
use crate::metrics::{PortInfo, Shared};
use crate::netdev::{self, Neighbours};
use crate::pipeline::{emit_encap, AnswerKind, EncapParams, Megaflow, Output, Tables};
use crate::ratelimit::{AnswerLimits, RateLimiter};
use crate::xsk::{BindMode, Xsk, XskError, BATCH};
use crossbeam_channel::Receiver;
use geneflow_abi::{ctr, port_kind, PortConf, SlowMeta, MAX_PORTS};
use geneflow_control::agent::PipelineUpdate;
use geneflow_control::compiler::Pipeline;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tracing::{info, warn};

mod apply;
mod conntrack;
mod crew;
mod ctl;
mod forward;
mod sockets;
mod worker;

/// Bytes per frame in the receive batch and the frame buffers: the largest frame the slow path
/// takes (a jumbo frame, see `xsk::MAX_FRAME`).
const STRIDE: usize = crate::xsk::MAX_FRAME;
const UPLINK_SLOT: u32 = 0;

#[derive(Debug, Error)]
pub enum ForwarderError {
    #[error(transparent)]
    Bpf(#[from] LoaderError),
    #[error(transparent)]
    Xsk(#[from] XskError),
    #[error("interface {0} does not exist")]
    NoInterface(String),
    #[error("eventfd: {0}")]
    Io(std::io::Error),
}

#[derive(Debug, Clone)]
pub struct ForwarderConfig {
    pub uplink: String,
    pub udp_csum: bool,
    pub bind_mode: BindMode,
    /// Local Geneve endpoint, overriding the NB chassis record when set.
    pub encap_ip: Option<std::net::Ipv4Addr>,
    /// Provider networks: (physnet, interface), bridged untunnelled.
    pub providers: Vec<(String, String)>,
    /// DHCP answers per second per port (bursts as large).
    pub dhcp_rate: u32,
    /// One slow-path thread per core listed, pinned there (the first is the calling
    /// thread, pinned by the caller); empty: one thread, not pinned.
    pub cores: Vec<usize>,
}

struct Port {
    iface: String,
    ifindex: u32,
    slot: u32,
    kind: u32,
    link: Option<PortLink>,
    /// The slow-path sockets, one per receive queue (index = queue); the first also sends.
    xsks: Vec<Xsk>,
    /// The sockets' drop statistics already added to the counters.
    xsk_drops: (u64, u64),
}

impl Port {
    /// The socket this port's frames are sent on.
    fn tx(&mut self) -> &mut Xsk {
        &mut self.xsks[0]
    }
}

pub struct Forwarder {
    cfg: ForwarderConfig,
    bpf: Bpf,
    shared: Arc<Shared>,
    ports: Vec<Port>,
    by_ifindex: HashMap<u32, usize>,
    free_slots: Vec<u32>,
    pipeline: Arc<Pipeline>,
    /// Shared with the other slow-path threads (`worker::View`); copied on write.
    tables: Arc<Tables>,
    neigh: Neighbours,
    uplink_ifindex: u32,
    uplink_mac: [u8; 6],
    uplink_mtu: u32,
    /// Provider networks attached here: physnet -> ifindex.
    physnets: HashMap<String, u32>,
    /// Provider interfaces whose driver keeps VLAN tags out of XDP's sight: no VLAN network
    /// is served on them.
    untagged_only: Vec<u32>,
    /// Floating IPs announced here, so that one that arrives (its port moved here) is
    /// announced with a gratuitous ARP.
    announced: crate::garp::FipAnnouncer,
    outputs: Vec<Output>,
    rxbuf: Vec<u8>,
    rxlen: [usize; BATCH],
    /// The conntrack state XDP sent with each received frame (its `SlowMeta`); `None` for a
    /// frame that came without one (not from our program: dropped).
    /// Each received frame's SlowMeta: (conntrack state, provider VLAN); `None` without one.
    rxct: [Option<(u8, u16)>; BATCH],
    encap_buf: Vec<u8>,
    /// Frames the pipeline writes (routed copies, ARP and ICMP answers).
    txbuf: Vec<u8>,
    /// Tells the conntrack expiry thread to end.
    ct_expiry_stop: Arc<AtomicBool>,
    /// Frames waiting for their remote chassis' next hop.
    pending: crate::pending::Pending,
    /// The budget of generated answers (per source; DHCP per port).
    answers: AnswerLimits,
    /// Per-port budget of new default-SNAT translations.
    nat_allocs: RateLimiter,
    /// Provider next hops this chassis sent an ARP request for, and when: only their replies
    /// are learned.
    arp_asked: crate::arpasked::ArpAsked,
    /// Per-port budget of drop megaflows: a VM forging a new source on every frame would
    /// otherwise fill the megaflow table with drop entries (65,536 in well under a second)
    /// and push everyone's flows to the slow path. Past it, drops stay in the slow path,
    /// where the port gets its fair share.
    drop_installs: RateLimiter,
    pollfds: Vec<libc::pollfd>,
    wake_fd: std::os::fd::OwnedFd,
    /// A pipeline has been applied: until then the slow path installs nothing (it would
    /// decide on an empty pipeline) and pinned state of a previous process is left alone.
    ready: bool,
    /// Megaflows adopted from a previous process, still to be checked against the next hops.
    adopted: Adopted,
    /// The other slow-path threads (none with one core), what they share with this one, and
    /// the version of the last `View` published: only megaflows decided on it are installed
    /// (earlier tables may not hold the current generations).
    crew: Option<Arc<worker::Crew>>,
    hands: Vec<worker::Hand>,
    view_version: u64,
    /// How many masks the other threads were last told of.
    masks_published: usize,
}

/// Wakes the forwarder out of its idle poll (an eventfd in its poll set).
#[derive(Clone)]
pub struct WakeHandle(Arc<std::os::fd::OwnedFd>);

impl WakeHandle {
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: 8-byte write of a u64 to an eventfd we own.
        unsafe {
            libc::write(
                std::os::fd::AsRawFd::as_raw_fd(&*self.0),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
    }
}

impl Forwarder {
    pub fn new(
        cfg: ForwarderConfig,
        mut bpf: Bpf,
        adopted: Adopted,
        shared: Arc<Shared>,
    ) -> Result<Self, ForwarderError> {
        let uplink_ifindex = netdev::ifindex(&cfg.uplink)
            .ok_or_else(|| ForwarderError::NoInterface(cfg.uplink.clone()))?;
        let uplink_mac = netdev::mac(&cfg.uplink).unwrap_or_default();
        if let Err(e) = netdev::enable_forwarding(&cfg.uplink) {
            warn!(uplink = %cfg.uplink, "cannot enable forwarding, the fast path cannot encapsulate: {e}");
        }
        let uplink_mtu = netdev::mtu(&cfg.uplink).unwrap_or(1500);
        // Until the first pipeline names the encap IP, keep the one a previous process left:
        // the fast path decapsulates only what is addressed to it.
        let local_ip = cfg
            .encap_ip
            .map(|ip| u32::from_ne_bytes(ip.octets()))
            .or_else(|| bpf.pinned_port(uplink_ifindex).map(|c| c.local_ip))
            .unwrap_or(0);
        let link = bpf.attach(
            uplink_ifindex,
            PortConf {
                slot: UPLINK_SLOT,
                kind: port_kind::UPLINK,
                local_ip,
                ct_zone: 0,
            },
        )?;
        let xsks = Xsk::open_all(&cfg.uplink, cfg.bind_mode, crate::xsk::FRAMES_WIDE)?;
        for (q, x) in xsks.iter().enumerate() {
            bpf.set_xsk(UPLINK_SLOT, q as u32, &x.fd())?;
        }
        // Encapsulated frames are redirected to the uplink too; if it is a veth (testbeds,
        // containers), its peer must accept XDP frames.
        netdev::prepare_redirect_target(&cfg.uplink);
        info!(uplink = %cfg.uplink, ifindex = uplink_ifindex, mtu = uplink_mtu, adopted = link.pending(), "uplink attached");
        let pipeline = Arc::new(Pipeline::default());
        let tables = Arc::new(Tables::new(
            pipeline.clone(),
            uplink_ifindex,
            uplink_mtu,
            cfg.udp_csum,
            |_| None,
        ));
        let wake_fd = sockets::eventfd()?;
        let dhcp_rate = cfg.dhcp_rate as f32;
        let mut f = Forwarder {
            neigh: Neighbours::new(&cfg.uplink),
            cfg,
            bpf,
            shared,
            ports: Vec::new(),
            by_ifindex: HashMap::new(),
            free_slots: (1..MAX_PORTS).rev().collect(),
            pipeline,
            tables,
            uplink_ifindex,
            uplink_mac,
            uplink_mtu,
            physnets: HashMap::new(),
            untagged_only: Vec::new(),
            announced: Default::default(),
            outputs: Vec::with_capacity(MAX_PORTS as usize * 2),
            rxbuf: vec![0u8; STRIDE * BATCH],
            rxlen: [0; BATCH],
            rxct: [None; BATCH],
            encap_buf: vec![0u8; STRIDE],
            txbuf: Vec::with_capacity(STRIDE),
            pending: crate::pending::Pending::new(STRIDE),
            ct_expiry_stop: Arc::new(AtomicBool::new(false)),
            answers: AnswerLimits::new(dhcp_rate, 1.0),
            arp_asked: Default::default(),
            nat_allocs: RateLimiter::new(
                crate::napt::ALLOC_RATE,
                crate::napt::ALLOC_RATE * 2.0,
                crate::napt::ALLOC_RATE * 20.0,
            ),
            // 1000 new drop entries/s per port (bursts of 2000), 10,000/s in all.
            drop_installs: RateLimiter::new(1000.0, 2000.0, 10_000.0),
            pollfds: Vec::new(),
            wake_fd,
            ready: false,
            adopted,
            crew: None,
            hands: Vec::new(),
            view_version: 0,
            masks_published: 0,
        };
        f.start_workers()?;
        f.add_port(
            f.cfg.uplink.clone(),
            uplink_ifindex,
            UPLINK_SLOT,
            port_kind::UPLINK,
            Some(link),
            xsks,
        );
        for (net, iface) in f.cfg.providers.clone() {
            let tags = netdev::keep_vlan_tags(&iface);
            f.attach_port(&iface, port_kind::PROVIDER)?;
            let ix = f.ports.last().map(|p| p.ifindex).unwrap_or(0);
            if !tags {
                f.untagged_only.push(ix);
            }
            info!(physnet = %net, %iface, ifindex = ix, "provider network attached");
            f.physnets.insert(net, ix);
        }
        if let Err(e) =
            conntrack::spawn_expiry(f.bpf.ct_pin(), f.shared.clone(), f.ct_expiry_stop.clone())
        {
            warn!("conntrack expiry thread: {e}");
        }
        Ok(f)
    }

    fn add_port(
        &mut self,
        iface: String,
        ifindex: u32,
        slot: u32,
        kind: u32,
        link: Option<PortLink>,
        xsks: Vec<Xsk>,
    ) {
        let xsks = self.deal(ifindex, slot, xsks);
        self.by_ifindex.insert(ifindex, self.ports.len());
        self.ports.push(Port {
            iface,
            ifindex,
            slot,
            kind,
            link,
            xsks,
            xsk_drops: (0, 0),
        });
        self.rebuild_index();
    }

    /// A handle the control thread uses to wake this forwarder.
    pub fn waker(&self) -> std::io::Result<WakeHandle> {
        Ok(WakeHandle(Arc::new(self.wake_fd.try_clone()?)))
    }

    fn rebuild_index(&mut self) {
        self.by_ifindex = sockets::positions(self.ports.iter().map(|p| p.ifindex));
        let xsks = self.ports.iter().flat_map(|p| &p.xsks);
        self.pollfds = sockets::poll_set(xsks, std::os::fd::AsRawFd::as_raw_fd(&self.wake_fd));
        let infos = self
            .ports
            .iter()
            .map(|p| PortInfo {
                iface: p.iface.clone(),
                ifindex: p.ifindex,
                slot: p.slot,
                kind: match p.kind {
                    port_kind::UPLINK => "uplink",
                    port_kind::PROVIDER => "provider",
                    _ => "vm",
                },
                port: self.pipeline.bindings.get(&p.iface).map(|b| b.port.clone()),
            })
            .collect();
        if let Ok(mut g) = self.shared.ports.lock() {
            *g = infos;
        }
    }

    /// The conntrack zone of a VM port: its datapath's key once any port here has security
    /// groups (every port then, so that replies toward a port with groups are tracked
    /// whichever port they come from), else 0.
    pub(super) fn ct_zone_of(&self, iface: &str) -> u32 {
        if !self.pipeline.has_acl() {
            return 0;
        }
        self.pipeline
            .bindings
            .get(iface)
            .map(|b| b.tunnel_key)
            .unwrap_or(0)
    }

    fn attach_vm(&mut self, iface: &str) -> Result<(), ForwarderError> {
        self.attach_port(iface, port_kind::VM)
    }

    /// Attaches a VM port or a provider network's interface (`kind`): a counter slot, a
    /// slow-path socket, the XDP program.
    fn attach_port(&mut self, iface: &str, kind: u32) -> Result<(), ForwarderError> {
        let ifindex =
            netdev::ifindex(iface).ok_or_else(|| ForwarderError::NoInterface(iface.into()))?;
        // Keep the slot a previous process gave the interface: its counters continue.
        let pinned = self
            .bpf
            .pinned_port(ifindex)
            .and_then(|c| self.free_slots.iter().position(|s| *s == c.slot));
        let slot = match pinned {
            Some(i) => self.free_slots.remove(i),
            None => match self.free_slots.pop() {
                Some(s) => s,
                None => {
                    warn!(iface, "no free port slot");
                    return Ok(());
                }
            },
        };
        let conf = PortConf {
            slot,
            kind,
            local_ip: 0,
            ct_zone: if kind == port_kind::VM {
                self.ct_zone_of(iface)
            } else {
                0
            },
        };
        // Before the first pipeline a previous process's program keeps serving (see
        // `adopt_finish`); after it, ours goes in at once.
        let ready = self.ready;
        // The slow-path socket is in place before the program sees the port's first frame
        // (its misses would count drop_xsk otherwise).
        let frames = if kind == port_kind::VM {
            crate::xsk::FRAMES_VM
        } else {
            crate::xsk::FRAMES_WIDE
        };
        let xsks = match Xsk::open_all(iface, self.cfg.bind_mode, frames) {
            Ok(x) => x,
            Err(e) => {
                self.free_slots.push(slot);
                return Err(e.into());
            }
        };
        for (q, x) in xsks.iter().enumerate() {
            if let Err(e) = self.bpf.set_xsk(slot, q as u32, &x.fd()) {
                self.free_slots.push(slot);
                return Err(e.into());
            }
        }
        let attached = self.bpf.attach(ifindex, conf).and_then(|l| {
            let adopted = l.pending();
            let l = if ready {
                self.bpf.swap_in(ifindex, l)?
            } else {
                l
            };
            Ok((l, adopted))
        });
        let (link, adopted) = match attached {
            Ok(l) => l,
            Err(e) => {
                self.free_slots.push(slot);
                return Err(e.into());
            }
        };
        netdev::prepare_redirect_target(iface);
        netdev::silence_host_stack(iface);
        let queues = xsks.len();
        info!(iface, ifindex, slot, queues, adopted, kind, "port attached");
        self.add_port(iface.to_string(), ifindex, slot, kind, Some(link), xsks);
        Ok(())
    }

    fn detach_at(&mut self, i: usize) {
        let p = self.ports.remove(i);
        if let Some(link) = p.link {
            self.bpf.detach(p.ifindex, p.slot, link);
        }
        // After the program and the socket map entries are gone: nothing is redirected to
        // the other threads' sockets when they close them.
        for hand in &self.hands {
            let _ = hand
                .tx
                .send(worker::ToWorker::Detach { ifindex: p.ifindex });
            hand.wake.wake();
        }
        self.free_slots.push(p.slot);
        info!(iface = %p.iface, "port detached");
        self.rebuild_index();
    }

    /// Ends the forwarder. With `cleanup` every interface is detached and the pinned state
    /// removed; otherwise the fast path keeps forwarding on the pinned program and maps until
    /// the next `geneflowd` adopts them.
    pub fn shutdown(mut self, cleanup: bool) {
        self.ct_expiry_stop.store(true, Ordering::Relaxed);
        self.stop_workers();
        if cleanup {
            for p in std::mem::take(&mut self.ports) {
                if let Some(link) = p.link {
                    self.bpf.detach(p.ifindex, p.slot, link);
                }
            }
            self.bpf.remove_pins();
        }
    }

    fn tick(&mut self) {
        if self.reconcile() && self.ready {
            let changed = self.regenerate();
            if !changed.is_empty() {
                info!(?changed, "interfaces changed; datapaths regenerated");
            }
            self.publish();
        }
        if self.neigh.refresh() {
            // Encap megaflows carry the next hop's MAC: a changed neighbour makes them stale.
            info!("underlay neighbour changed; invalidating encap megaflows");
            if let Err(e) = self.bpf.invalidate_all() {
                warn!("generation update failed: {e}");
            }
            // The other threads stamp their megaflows with the published generations.
            self.publish();
        }
        if self.announced.owed() {
            self.send_garps();
        }
        for p in self.ports.iter_mut() {
            sockets::count_socket_drops(&self.shared, p.slot, &p.xsks, &mut p.xsk_drops);
        }
        if let Err(e) = self.bpf.bump_ct_epoch() {
            warn!("conntrack cache epoch: {e}");
        }
        match self.bpf.reorder_masks() {
            Ok(true) => tracing::debug!("mask order follows the hits"),
            Ok(false) => {}
            Err(e) => warn!("mask reorder failed: {e}"),
        }
        let n = self.bpf.sweep();
        if n > 0 {
            tracing::debug!(removed = n, "swept stale megaflows");
        }
        self.shared
            .megaflows
            .store(self.bpf.megaflow_count() as u64, Ordering::Relaxed);
        self.shared
            .masks
            .store(self.bpf.mask_count() as u64, Ordering::Relaxed);
    }

    pub fn run(
        &mut self,
        updates: Receiver<PipelineUpdate>,
        ctl: Receiver<crate::ctl::CtlRequest>,
        stop: Arc<AtomicBool>,
    ) {
        let mut last_tick = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            while let Ok(u) = updates.try_recv() {
                self.apply(u);
            }
            while let Ok(r) = ctl.try_recv() {
                let answer = self.answer(&r.cmd, &r.arg);
                let _ = r.reply.send(answer);
            }
            if last_tick.elapsed() > Duration::from_secs(1) {
                last_tick = Instant::now();
                self.tick();
            }
            let mut work = self.handed_over();
            for i in 0..self.ports.len() {
                work += self.service(i);
            }
            if !self.pending.is_empty() {
                self.flush_pending();
            }
            for p in self.ports.iter_mut() {
                p.tx().flush();
            }
            if work == 0 {
                // Frames waiting for a next hop are checked every millisecond.
                let timeout = if self.pending.is_empty() { 20 } else { 1 };
                // SAFETY: pollfds is a live array of pollfd for our own sockets.
                unsafe {
                    libc::poll(
                        self.pollfds.as_mut_ptr(),
                        self.pollfds.len() as libc::nfds_t,
                        timeout,
                    );
                }
                sockets::drain(&self.wake_fd);
            }
        }
    }

    /// Receives and forwards one batch from each receive queue of port `i`.
    fn service(&mut self, i: usize) -> usize {
        self.ports[i].tx().reap();
        let mut work = 0;
        for q in 0..self.ports[i].xsks.len() {
            work += self.service_queue(i, q);
        }
        work
    }

    /// Receives and forwards one batch from receive queue `q` of port `i`.
    fn service_queue(&mut self, i: usize, q: usize) -> usize {
        let Forwarder {
            ports,
            rxbuf,
            rxlen,
            rxct,
            ..
        } = self;
        let n = sockets::receive_batch(&mut ports[i].xsks[q], rxbuf, rxlen, rxct);
        if n == 0 {
            return 0;
        }
        self.shared.slow_thread_frames[0].fetch_add(n as u64, Ordering::Relaxed);
        let (in_ifindex, in_slot) = (self.ports[i].ifindex, self.ports[i].slot);
        let arrived = std::time::Instant::now();
        let mut learned = false;
        for k in 0..n {
            learned |= self.forward(k, in_ifindex, in_slot, arrived);
        }
        if learned && self.ready {
            // Routed entries to a provider network carry their next hop's MAC.
            let changed = self.regenerate();
            info!(
                ?changed,
                "a provider neighbour changed; datapaths regenerated"
            );
            self.publish();
        }
        n
    }
}
