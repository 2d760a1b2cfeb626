//! The slow path's other threads (`--forwarder-cores` listing more than one core), as OVS's
//! handler threads: thread `w` of `n` owns the AF_XDP sockets of receive queues `q` with
//! `q % n == w` on every port, runs the pipeline on what they receive and sends the outputs
//! on its own socket of the output port. The first thread (the `Forwarder`) keeps everything
//! that must have one owner: the BPF maps, the ports, the answers' budgets, the translations,
//! the frames waiting for a next hop. So another thread hands it
//! - each megaflow to install (with the version of the tables it decided on: one decided on
//!   tables older than the last published ones, which every generation change publishes, is
//!   not installed: it would carry the new generation);
//! - each frame whose verdict needs that state (an answer, a translation, a connection to
//!   commit, a neighbour learnt, a next hop not resolved yet) or a port on which it has no
//!   socket: the first thread runs the whole pipeline on it again.
//!
//! Both go over bounded queues; the frames' buffers come from a fixed pool and go back to
//! it, so nothing is allocated per frame. A full queue drops the frame, counted
//! `drop_slowpath_handoff_full`; a lost megaflow is decided again by the flow's next frame.

use super::forward::{count_sent, tunnel_params, wire};
use super::*;
use arc_swap::ArcSwap;
use crossbeam_channel::{bounded, Sender};
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
    pub punts: (Sender<Punt>, Receiver<Punt>),
    /// Free frame buffers.
    pub spare: (Sender<Vec<u8>>, Receiver<Vec<u8>>),
    /// Wakes the first thread (its eventfd).
    pub owner: WakeHandle,
    pub stop: AtomicBool,
}

impl Crew {
    /// For `others` threads besides the first.
    pub(super) fn new(owner: WakeHandle, view: View, others: usize) -> Crew {
        let frames = HANDOFF_BATCHES * BATCH * others.max(1);
        let spare = bounded(frames);
        for _ in 0..frames {
            let _ = spare.0.try_send(Vec::with_capacity(2048));
        }
        Crew {
            view: ArcSwap::from_pointee(view),
            installs: bounded(HANDOFF_INSTALLS),
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
                        self.request(view.version, m, (in_ifindex, in_slot), arrived, true);
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
            self.request(view.version, m, (in_ifindex, in_slot), arrived, false);
        }
    }

    /// Hands megaflow `m` to the first thread to install.
    fn request(
        &mut self,
        version: u64,
        m: Megaflow,
        (in_ifindex, in_slot): (u32, u32),
        at: Instant,
        drop: bool,
    ) {
        let r = InstallReq {
            m,
            in_ifindex,
            in_slot,
            arrived: at,
            version,
            drop,
        };
        // A full queue loses the entry, not the frame: the flow's next frame decides again.
        if self.crew.installs.0.try_send(r).is_ok() {
            self.handed = true;
        }
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

/// Interface index -> position, for ports listed in this order.
pub(super) fn positions(ifindexes: impl Iterator<Item = u32>) -> HashMap<u32, usize> {
    ifindexes.enumerate().map(|(i, ix)| (ix, i)).collect()
}

/// What a slow-path thread polls: its sockets, then its eventfd `wake`.
pub(super) fn poll_set<'a>(
    xsks: impl Iterator<Item = &'a Xsk>,
    wake: std::os::fd::RawFd,
) -> Vec<libc::pollfd> {
    xsks.map(|x| x.fd())
        .chain([wake])
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect()
}

/// Frames the kernel could not hand to the slow path are drops too: counts, for the port in
/// `slot`, what its sockets `xsks` dropped since `seen` (ring full, other).
pub(super) fn count_socket_drops(shared: &Shared, slot: u32, xsks: &[Xsk], seen: &mut (u64, u64)) {
    let now = xsks
        .iter()
        .map(|x| x.rx_drops())
        .fold((0, 0), |a, d| (a.0 + d.0, a.1 + d.1));
    shared.count(slot, ctr::DROP_XSK_RING_FULL, now.0.saturating_sub(seen.0));
    shared.count(slot, ctr::DROP_XSK_RX, now.1.saturating_sub(seen.1));
    *seen = now;
}

/// Drains an eventfd (nonblocking).
pub(super) fn drain(fd: &OwnedFd) {
    let mut buf = 0u64;
    // SAFETY: reads at most 8 bytes into a live u64 from a nonblocking eventfd we own.
    unsafe { libc::read(fd.as_raw_fd(), &mut buf as *mut u64 as *mut libc::c_void, 8) };
}

/// A nonblocking eventfd.
pub(super) fn eventfd() -> Result<OwnedFd, ForwarderError> {
    // SAFETY: plain eventfd(2); the descriptor is owned right away.
    let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if efd < 0 {
        return Err(ForwarderError::Io(std::io::Error::last_os_error()));
    }
    // SAFETY: efd is a fresh descriptor nobody else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(efd) })
}

/// Receives one batch from `x` into `rxbuf` (frame `k` at `k * STRIDE`), each frame's
/// `SlowMeta` stripped into `rxct` (`None`: the frame came without one). Returns how many.
pub(super) fn receive_batch(
    x: &mut Xsk,
    rxbuf: &mut [u8],
    rxlen: &mut [usize; BATCH],
    rxct: &mut [Option<(u8, u16)>; BATCH],
) -> usize {
    let mut n = 0;
    x.recv(|frame| {
        // Every frame from our XDP program starts with its SlowMeta.
        let meta = (frame.len() >= SlowMeta::LEN
            && u16::from_ne_bytes([frame[0], frame[1]]) == SlowMeta::MAGIC)
            .then(|| (frame[2], u16::from_ne_bytes([frame[4], frame[5]])));
        let frame = if meta.is_some() {
            &frame[SlowMeta::LEN..]
        } else {
            frame
        };
        let len = frame.len().min(STRIDE);
        rxbuf[n * STRIDE..n * STRIDE + len].copy_from_slice(&frame[..len]);
        rxlen[n] = len;
        rxct[n] = meta;
        n += 1;
    });
    n
}
