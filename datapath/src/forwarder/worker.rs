//! The slow path's other threads (`--forwarder-cores` listing more than one core), as OVS's
//! handler threads: thread `w` of `n` owns the AF_XDP sockets of receive queues `q` with
//! `q % n == w` on every port, runs the pipeline on what they receive and sends the outputs
//! on its own socket of the output port. The first thread (the `Forwarder`) keeps everything
//! that must have one owner: the mirror of the megaflow table, the other BPF maps, the ports,
//! the answers' budgets, the translations, the frames waiting for a next hop.
//!
//! A megaflow under a mask the first thread has published, for a port this thread serves,
//! goes into the XDP table from here (`Worker::add`), as OVS's handler threads install their
//! own flows: the entry carries the generation of the tables it was decided on (every
//! generation change publishes them), so one decided just before a change is stale in XDP at
//! once. It is only added where its key is free, and the first thread is told of it
//! (`Added`) to keep its mirror: it deletes at once one that went stale meanwhile, as no
//! sweep would. Otherwise another thread hands the first
//! - the megaflow to install (with the version of the tables it decided on: one decided on
//!   tables older than the last published ones is not installed: it would carry the new
//!   generation);
//! - each frame whose verdict needs that state (an answer, a translation, a connection to
//!   commit, a neighbour learnt, a next hop not resolved yet) or a port on which it has no
//!   socket: the first thread runs the whole pipeline on it again.
//!
//! Both go over bounded queues; the frames' buffers come from a fixed pool and go back to
//! it, so nothing is allocated per frame. A full queue drops the frame, counted
//! `drop_slowpath_handoff_full`; a lost megaflow is decided again by the flow's next frame.

use super::forward::{complete, count_sent, mask_list_of, tunnel_params, wire};
use super::sockets::{count_socket_drops, drain, eventfd, poll_set, positions, receive_batch};
use super::*;
use crate::loader::{entry, mask_id, FlowWriter};
use arc_swap::ArcSwap;
use crossbeam_channel::{bounded, Sender};
use geneflow_abi::{DpGen, FlowAction, FlowKey, MASK_LISTS};
use std::os::fd::{AsRawFd, OwnedFd};

/// Frame buffers in flight from each other thread to the first: a VM port with one queue
/// is served by the first thread only, so every frame for it that arrives on another
/// thread's queue is handed over. Each buffer starts at 2 KB and grows once to the largest
/// frame it carries.
const HANDOFF_BATCHES: usize = 4;
/// Megaflows in flight from the other threads to the first.
const HANDOFF_INSTALLS: usize = 4096;

/// What the other threads see of the first thread's state, published on every change.
pub(super) struct View {
    pub version: u64,
    pub tables: Arc<Tables>,
    /// A pipeline has been applied (until then nothing is installed).
    pub ready: bool,
    /// Every live datapath's generation slot and generation, for these tables.
    pub gens: Arc<HashMap<u32, (u32, DpGen)>>,
}

/// A megaflow another thread put in the XDP table itself, for the first thread's mirror.
pub(super) struct Added {
    pub key: FlowKey,
    pub action: FlowAction,
    pub in_slot: u32,
    /// The first frame's arrival (the flow-setup time); none for a drop entry.
    pub arrived: Option<Instant>,
}

pub(super) enum ToWorker {
    /// The sockets of port `ifindex` for this thread's queues.
    Attach {
        ifindex: u32,
        slot: u32,
        xsks: Vec<Xsk>,
    },
    Detach {
        ifindex: u32,
    },
}

/// A megaflow decided by another thread, for the first to install.
pub(super) struct InstallReq {
    pub m: Megaflow,
    pub in_ifindex: u32,
    pub in_slot: u32,
    pub arrived: Instant,
    /// The `View::version` it was decided on.
    pub version: u64,
    /// A drop entry (installed as decided, without a next hop or an output slot).
    pub drop: bool,
}

/// A frame handed to the first thread: the pipeline runs on it there.
pub(super) struct Punt {
    pub buf: Vec<u8>,
    pub meta: Option<(u8, u16)>,
    pub in_ifindex: u32,
    pub in_slot: u32,
    pub arrived: Instant,
}

/// What the threads share.
pub(super) struct Crew {
    pub view: ArcSwap<View>,
    pub installs: (Sender<InstallReq>, Receiver<InstallReq>),
    /// Per other thread (thread `w` at `w - 1`), the entries it added. Each has one sender,
    /// which adds an entry only while its queue has room: the note then always goes.
    pub added: Vec<(Sender<Added>, Receiver<Added>)>,
    /// The mask lists, as the first thread last published them.
    pub masks: ArcSwap<[Vec<FlowKey>; MASK_LISTS as usize]>,
    pub punts: (Sender<Punt>, Receiver<Punt>),
    /// Free frame buffers.
    pub spare: (Sender<Vec<u8>>, Receiver<Vec<u8>>),
    /// Wakes the first thread (its eventfd).
    pub owner: WakeHandle,
    pub stop: AtomicBool,
}

impl Crew {
    /// For `others` threads besides the first.
    pub(super) fn new(
        owner: WakeHandle,
        view: View,
        masks: [Vec<FlowKey>; MASK_LISTS as usize],
        others: usize,
    ) -> Crew {
        let frames = HANDOFF_BATCHES * BATCH * others.max(1);
        let spare = bounded(frames);
        for _ in 0..frames {
            let _ = spare.0.try_send(Vec::with_capacity(2048));
        }
        Crew {
            view: ArcSwap::from_pointee(view),
            installs: bounded(HANDOFF_INSTALLS),
            added: (0..others).map(|_| bounded(HANDOFF_INSTALLS)).collect(),
            masks: ArcSwap::from_pointee(masks),
            punts: bounded(frames),
            spare,
            owner,
            stop: AtomicBool::new(false),
        }
    }
}

/// The first thread's handle on another.
pub(super) struct Hand {
    pub tx: Sender<ToWorker>,
    pub wake: WakeHandle,
    pub join: Option<std::thread::JoinHandle<()>>,
}

struct WPort {
    ifindex: u32,
    slot: u32,
    /// This thread's sockets on the port; the first also sends.
    xsks: Vec<Xsk>,
    drops: (u64, u64),
}

/// What a thread is started with.
pub(super) struct WorkerSetup {
    pub id: usize,
    pub core: Option<usize>,
    pub crew: Arc<Crew>,
    pub flows: FlowWriter,
    pub shared: Arc<Shared>,
    pub neigh: crate::netdev::NeighReader,
    pub uplink: (u32, [u8; 6]),
    pub udp_csum: bool,
    /// Its share of the chassis's budget of drop entries (each thread keeps the per-port
    /// rate: a port's frames on one queue meet one thread's budget).
    pub share: f32,
}

pub(super) struct Worker {
    id: usize,
    crew: Arc<Crew>,
    flows: FlowWriter,
    /// The entry this thread added last, in the batch it is serving.
    last_added: Option<(FlowKey, FlowAction)>,
    shared: Arc<Shared>,
    neigh: crate::netdev::NeighReader,
    uplink: (u32, [u8; 6]),
    udp_csum: bool,
    view: Arc<View>,
    ports: Vec<WPort>,
    /// Interface index -> position in `ports`.
    by_ifindex: HashMap<u32, usize>,
    inbox: Receiver<ToWorker>,
    wake_fd: Arc<OwnedFd>,
    pollfds: Vec<libc::pollfd>,
    rxbuf: Vec<u8>,
    rxlen: [usize; BATCH],
    rxct: [Option<(u8, u16)>; BATCH],
    outputs: Vec<Output>,
    txbuf: Vec<u8>,
    encap_buf: Vec<u8>,
    drop_installs: RateLimiter,
    /// Something was handed to the first thread since it was last woken.
    handed: bool,
}

/// Starts thread `s.id`; its sockets come later, by `ToWorker::Attach`.
pub(super) fn spawn(s: WorkerSetup) -> Result<Hand, ForwarderError> {
    let wake_fd = Arc::new(eventfd()?);
    let (tx, inbox) = crossbeam_channel::unbounded();
    let wake = WakeHandle(wake_fd.clone());
    let w = Worker {
        id: s.id,
        view: s.crew.view.load_full(),
        crew: s.crew,
        flows: s.flows,
        last_added: None,
        shared: s.shared,
        neigh: s.neigh,
        uplink: s.uplink,
        udp_csum: s.udp_csum,
        ports: Vec::new(),
        by_ifindex: HashMap::new(),
        inbox,
        wake_fd,
        pollfds: Vec::new(),
        rxbuf: vec![0u8; STRIDE * BATCH],
        rxlen: [0; BATCH],
        rxct: [None; BATCH],
        outputs: Vec::with_capacity(MAX_PORTS as usize * 2),
        txbuf: Vec::with_capacity(STRIDE),
        encap_buf: vec![0u8; STRIDE],
        drop_installs: RateLimiter::new(1000.0, 2000.0, 10_000.0 * s.share),
        handed: false,
    };
    let core = s.core;
    let join = std::thread::Builder::new()
        .name(format!("gf-slow{}", s.id))
        .spawn(move || {
            if let Some(c) = core {
                if let Err(e) = netdev::pin_thread(c) {
                    warn!(
                        thread = w.id,
                        core = c,
                        "cannot pin the slow-path thread: {e}"
                    );
                }
            }
            w.run()
        })
        .map_err(ForwarderError::Io)?;
    Ok(Hand {
        tx,
        wake,
        join: Some(join),
    })
}

impl Worker {
    fn run(mut self) {
        self.rebuild();
        let mut last_tick = Instant::now();
        while !self.crew.stop.load(Ordering::Relaxed) {
            while let Ok(m) = self.inbox.try_recv() {
                self.handle(m);
            }
            if self.crew.view.load().version != self.view.version {
                self.view = self.crew.view.load_full();
            }
            if last_tick.elapsed() > Duration::from_secs(1) {
                last_tick = Instant::now();
                self.count_socket_drops();
            }
            let mut work = 0;
            for i in 0..self.ports.len() {
                self.ports[i].xsks[0].reap();
                for q in 0..self.ports[i].xsks.len() {
                    work += self.service(i, q);
                }
            }
            for p in self.ports.iter_mut() {
                p.xsks[0].flush();
            }
            if std::mem::take(&mut self.handed) {
                self.crew.owner.wake();
            }
            if work == 0 {
                // SAFETY: pollfds is a live array of pollfd for this thread's descriptors.
                unsafe {
                    libc::poll(
                        self.pollfds.as_mut_ptr(),
                        self.pollfds.len() as libc::nfds_t,
                        20,
                    );
                }
                drain(&self.wake_fd);
            }
        }
    }

    fn handle(&mut self, m: ToWorker) {
        match m {
            ToWorker::Attach {
                ifindex,
                slot,
                xsks,
            } => {
                self.ports.retain(|p| p.ifindex != ifindex);
                self.ports.push(WPort {
                    ifindex,
                    slot,
                    xsks,
                    drops: (0, 0),
                });
            }
            ToWorker::Detach { ifindex } => self.ports.retain(|p| p.ifindex != ifindex),
        }
        self.rebuild();
    }

    fn rebuild(&mut self) {
        self.by_ifindex = positions(self.ports.iter().map(|p| p.ifindex));
        let xsks = self.ports.iter().flat_map(|p| &p.xsks);
        self.pollfds = poll_set(xsks, self.wake_fd.as_raw_fd());
    }

    fn count_socket_drops(&mut self) {
        for p in self.ports.iter_mut() {
            count_socket_drops(&self.shared, p.slot, &p.xsks, &mut p.drops);
        }
    }

    /// Receives and forwards one batch from this thread's socket `q` on port `i`.
    fn service(&mut self, i: usize, q: usize) -> usize {
        let Worker {
            ports,
            rxbuf,
            rxlen,
            rxct,
            ..
        } = self;
        let n = receive_batch(&mut ports[i].xsks[q], rxbuf, rxlen, rxct);
        if n == 0 {
            return 0;
        }
        self.shared.slow_thread_frames[self.id].fetch_add(n as u64, Ordering::Relaxed);
        let (ifindex, slot) = (self.ports[i].ifindex, self.ports[i].slot);
        let arrived = Instant::now();
        let view = self.view.clone();
        self.last_added = None;
        for k in 0..n {
            self.forward(&view, k, (ifindex, slot), arrived);
        }
        n
    }

    /// Whether this thread can carry decision `d` out itself: nothing in it needs the first
    /// thread's state, and it has a socket on every port the frame goes out on.
    fn can_finish(&self, view: &View, d: &crate::pipeline::Decision) -> bool {
        if d.learn.is_some() || d.napt.is_some() || d.answer.is_some() {
            return false;
        }
        if d.ct_commit_keys().next().is_some() {
            return false;
        }
        let has = |ix: u32| self.by_ifindex.contains_key(&ix);
        self.outputs.iter().all(|o| match *o {
            Output::Local { ifindex } | Output::Provider { ifindex, .. } => has(ifindex),
            Output::Tunnel { remote, .. } => {
                view.tables.encap_ip().is_some()
                    && self.neigh.get(remote).is_some()
                    && has(self.uplink.0)
            }
        })
    }

    fn forward(
        &mut self,
        view: &View,
        k: usize,
        (in_ifindex, in_slot): (u32, u32),
        arrived: Instant,
    ) {
        let frame = &self.rxbuf[k * STRIDE..k * STRIDE + self.rxlen[k]];
        let Some(meta) = self.rxct[k] else {
            self.shared.count(in_slot, ctr::SLOW_RX, 1);
            self.shared.count(in_slot, ctr::DROP_MALFORMED, 1);
            return;
        };
        let decided = view.tables.process_dropping(
            frame,
            in_ifindex,
            meta,
            &mut self.outputs,
            &mut self.txbuf,
        );
        let d = match decided {
            Ok(d) => d,
            Err(dropped) => {
                self.shared.count(in_slot, ctr::SLOW_RX, 1);
                self.shared.count(in_slot, dropped.reason.counter(), 1);
                if let (true, Some(m)) = (view.ready, dropped.megaflow) {
                    if self.drop_installs.allow_key(in_ifindex, arrived) {
                        self.request(view, m, (in_ifindex, in_slot), arrived, true);
                    }
                }
                return;
            }
        };
        if !self.can_finish(view, &d) {
            self.punt(k, (in_ifindex, in_slot), arrived);
            return;
        }
        self.shared.count(in_slot, ctr::SLOW_RX, 1);
        let Worker {
            rxbuf,
            rxlen,
            outputs,
            txbuf,
            encap_buf,
            ports,
            by_ifindex,
            shared,
            neigh,
            uplink,
            udp_csum,
            ..
        } = self;
        let frame = &rxbuf[k * STRIDE..k * STRIDE + rxlen[k]];
        let payload = d.payload(frame, txbuf);
        for o in outputs.iter() {
            let params = match *o {
                // The next hop was known in `can_finish`; one that went since (a new
                // snapshot) drops the frame, counted, never sends it to a zero MAC.
                Output::Tunnel { remote, vni, meta } => view
                    .tables
                    .encap_ip()
                    .zip(neigh.get(remote))
                    .map(|(src, dst_mac)| {
                        tunnel_params(
                            (src, remote),
                            (uplink.1, dst_mac),
                            (vni, meta),
                            d.flow_hash,
                            *udp_csum,
                        )
                    }),
                _ => None,
            };
            let (target, bytes) = match wire(o, payload, encap_buf, params, uplink.0) {
                Ok(w) => w,
                Err(reason) => {
                    shared.count(in_slot, reason, 1);
                    continue;
                }
            };
            let Some(out) = by_ifindex.get(&target).map(|&j| &mut ports[j]) else {
                shared.count(in_slot, ctr::DROP_UNKNOWN_PORT, 1);
                continue;
            };
            count_sent(shared, out.slot, bytes.len(), out.xsks[0].send(bytes));
        }
        if let (true, Some(m)) = (view.ready, d.megaflow) {
            self.request(view, m, (in_ifindex, in_slot), arrived, false);
        }
    }

    /// Puts megaflow `m` in the XDP table, or hands it to the first thread to install.
    fn request(
        &mut self,
        view: &View,
        m: Megaflow,
        (in_ifindex, in_slot): (u32, u32),
        at: Instant,
        drop: bool,
    ) {
        if self.add(view, m, (in_ifindex, in_slot), at, drop) {
            return;
        }
        let r = InstallReq {
            m,
            in_ifindex,
            in_slot,
            arrived: at,
            version: view.version,
            drop,
        };
        // A full queue loses the entry, not the frame: the flow's next frame decides again.
        if self.crew.installs.0.try_send(r).is_ok() {
            self.handed = true;
        }
    }

    /// Puts megaflow `m` in the XDP table itself, completed as the first thread would (the
    /// next hop's MAC of an encap entry, the output port's slot; a drop entry as decided),
    /// if its mask is published, its datapath live in `view`, its output port one of this
    /// thread's, its key free and its report to the first thread (for the mirror) sure to go.
    fn add(
        &mut self,
        view: &View,
        mut m: Megaflow,
        (in_ifindex, in_slot): (u32, u32),
        at: Instant,
        drop: bool,
    ) -> bool {
        if !drop {
            let Some(&j) = self.by_ifindex.get(&m.action.out_ifindex) else {
                return false;
            };
            let slot = self.ports[j].slot;
            complete(&mut m, |ip| self.neigh.get(ip), self.uplink.1, slot);
        }
        let list = mask_list_of(in_ifindex, self.uplink.0);
        let Some(id) = mask_id(&self.crew.masks.load(), list, &m.mask) else {
            return false;
        };
        let Some(&g) = view.gens.get(&m.action.dp_key) else {
            return false;
        };
        let (key, action) = entry(&m, id, g);
        // The frames of a flow that wait in one batch all decide its megaflow: the first
        // adds it, the others need nothing (a request would make the first thread write it
        // over).
        if self.last_added == Some((key, action)) {
            return true;
        }
        // This thread is its queue's only sender: with room now, the note below goes. (An
        // entry taken back after a failed note could be one the first thread wrote over in
        // between, which its mirror would then claim while the map lacks it.)
        let Some((notes, _)) = self.crew.added.get(self.id - 1) else {
            return false;
        };
        if notes.is_full() || !self.flows.add(&key, &action) {
            return false;
        }
        let a = Added {
            key,
            action,
            in_slot,
            arrived: (!drop).then_some(at),
        };
        // Fails only once the first thread is gone (shutting down): the next process
        // rebuilds its mirror from the pinned map.
        let _ = notes.try_send(a);
        self.shared.slow_thread_installs[self.id].fetch_add(1, Ordering::Relaxed);
        self.last_added = Some((key, action));
        self.handed = true;
        true
    }

    /// Hands received frame `k` to the first thread.
    fn punt(&mut self, k: usize, (in_ifindex, in_slot): (u32, u32), arrived: Instant) {
        let Ok(mut buf) = self.crew.spare.1.try_recv() else {
            self.shared.count(in_slot, ctr::SLOW_RX, 1);
            self.shared.count(in_slot, ctr::DROP_HANDOFF_FULL, 1);
            return;
        };
        let len = self.rxlen[k];
        buf.clear();
        buf.extend_from_slice(&self.rxbuf[k * STRIDE..k * STRIDE + len]);
        let p = Punt {
            buf,
            meta: self.rxct[k],
            in_ifindex,
            in_slot,
            arrived,
        };
        match self.crew.punts.0.try_send(p) {
            Ok(()) => {
                self.shared.count(in_slot, ctr::SLOW_HANDOFF, 1);
                self.handed = true;
            }
            Err(e) => {
                let _ = self.crew.spare.0.try_send(e.into_inner().buf);
                self.shared.count(in_slot, ctr::SLOW_RX, 1);
                self.shared.count(in_slot, ctr::DROP_HANDOFF_FULL, 1);
            }
        }
    }
}
