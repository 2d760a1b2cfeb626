//! Underlay next hops of remote chassis, from the kernel's FIB and neighbour table over
//! rtnetlink, event driven.
//!
//! A remote chassis may sit in another IP subnet behind routers, so the MAC an encapsulated
//! frame is sent to is the one of the *next hop* toward the chassis IP: the route's gateway, or
//! the chassis IP itself when it is directly connected. For every remote chassis IP the
//! forwarder uses, a background thread asks the kernel's FIB (`RTM_GETROUTE`, as `ip route get`
//! does), keeps a mirror of the uplink's IPv4 neighbour table (one dump, then `RTNLGRP_NEIGH`
//! events), re-asks the FIB when routes or links change (`RTNLGRP_IPV4_ROUTE`,
//! `RTNLGRP_LINK`), and publishes a snapshot `remote IP -> next-hop MAC`.
//!
//! The forwarder thread never waits for any of this: [`Neighbours::get`] reads the snapshot,
//! [`Neighbours::kick`] hands an address to the thread, [`Neighbours::refresh`] reads a flag.
//!
//! The snapshot is an `arc_swap::ArcSwap<HashMap>`: a read is a few atomic operations on a
//! thread-local slot, with no lock and no allocation, and the writer (this thread) never makes
//! the reader wait. A mutex would be uncontended almost always, but the slow path calls `get`
//! for every frame it encapsulates and a seqlock over a map is not possible without copying it.

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, Sender};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_MULTIPART, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};

/// `NUD_VALID` of include/net/neighbour.h: the states in which the entry's link-layer address
/// is used to send (the kernel's own output path and `bpf_fib_lookup` agree on this set).
const NUD_VALID: u16 = 0x80 /* PERMANENT */ | 0x40 /* NOARP */ | 0x02 /* REACHABLE */
    | 0x10 /* PROBE */ | 0x04 /* STALE */ | 0x08 /* DELAY */;
/// Static entries (PERMANENT, NOARP): configured by someone else, never touched.
const NUD_STATIC: u16 = 0x80 | 0x40;

/// How often at most resolution is triggered again for one next hop.
const RETRIGGER: Duration = Duration::from_secs(1);
/// The FIB is asked again this often even without a route event: the kernel does not announce
/// every route it drops (routes through a link that goes down go silently).
const ROUTE_RECHECK: Duration = Duration::from_secs(5);

type Snapshot = HashMap<Ipv4Addr, [u8; 6]>;

/// One IPv4 neighbour entry on the uplink, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NeighEntry {
    pub state: u16,
    pub mac: Option<[u8; 6]>,
    pub managed: bool,
}

impl NeighEntry {
    /// The MAC to send to, if the kernel would use it.
    fn usable(&self) -> Option<[u8; 6]> {
        if self.state & NUD_VALID != 0 {
            self.mac
        } else {
            None
        }
    }

    /// Whether the entry must be made managed (which also starts its resolution): it is
    /// neither managed yet (then the kernel keeps it resolved on its own) nor static. Entries
    /// the kernel made itself (e.g. from the router's own ARP request) are converted whatever
    /// their state: XDP traffic bypasses the kernel's neighbour confirmation, so nothing would
    /// re-verify them once STALE. Making an entry managed keeps its address and state.
    fn needs_trigger(&self) -> bool {
        !self.managed && self.state & NUD_STATIC == 0
    }
}

/// Where the FIB sends traffic to a remote chassis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// Next hop `nh` (the gateway, or the destination itself) out of interface `oif`.
    Via { nh: Ipv4Addr, oif: u32 },
    /// No usable route (none, unreachable, local, an IPv6 gateway...): the reason.
    Unusable(&'static str),
}

/// The neighbour entry in a `RTM_NEWNEIGH`/`RTM_DELNEIGH` message: (ifindex, IPv4 address,
/// entry). None for other families or a message without a destination.
pub(crate) fn parse_neigh(m: &NeighbourMessage) -> Option<(u32, Ipv4Addr, NeighEntry)> {
    if m.header.family != AddressFamily::Inet {
        return None;
    }
    let mut ip = None;
    let mut mac = None;
    let mut managed = false;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(i)) => ip = Some(*i),
            NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                let mut b = [0u8; 6];
                b.copy_from_slice(l);
                mac = Some(b);
            }
            NeighbourAttribute::ExtFlags(f) => managed = f.contains(NeighbourExtFlags::Managed),
            _ => {}
        }
    }
    Some((
        m.header.ifindex,
        ip?,
        NeighEntry {
            state: u16::from(m.header.state),
            mac,
            managed,
        },
    ))
}

/// The answer of the FIB to `RTM_GETROUTE` for `dst`.
pub(crate) fn parse_route(m: &RouteMessage, dst: Ipv4Addr) -> Route {
    match m.header.kind {
        RouteType::Unicast => {}
        RouteType::Local => return Route::Unusable("the address is local"),
        RouteType::Unreachable | RouteType::BlackHole | RouteType::Prohibit => {
            return Route::Unusable("the route rejects it")
        }
        _ => return Route::Unusable("not a unicast route"),
    }
    let mut nh = dst;
    let mut oif = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => nh = *g,
            RouteAttribute::Gateway(_) | RouteAttribute::Via(_) => {
                return Route::Unusable("the gateway is not IPv4")
            }
            RouteAttribute::Oif(o) => oif = Some(*o),
            _ => {}
        }
    }
    match oif {
        Some(oif) => Route::Via { nh, oif },
        None => Route::Unusable("the route has no output interface"),
    }
}

#[derive(Debug, Default)]
struct Wanted {
    route: Option<Route>,
}

/// The resolver's state without any I/O: the uplink's neighbour mirror, the routes of the
/// remote chassis, and what was last published.
#[derive(Debug)]
pub(crate) struct Table {
    uplink_ix: u32,
    neigh: HashMap<Ipv4Addr, NeighEntry>,
    wanted: HashMap<Ipv4Addr, Wanted>,
    triggered: HashMap<Ipv4Addr, Instant>,
    published: Arc<Snapshot>,
}

impl Table {
    pub(crate) fn new(uplink_ix: u32) -> Table {
        Table {
            uplink_ix,
            neigh: HashMap::new(),
            wanted: HashMap::new(),
            triggered: HashMap::new(),
            published: Arc::new(HashMap::new()),
        }
    }

    /// A new or updated (`Some`) or deleted (`None`) neighbour entry.
    pub(crate) fn neigh_event(&mut self, ifindex: u32, ip: Ipv4Addr, e: Option<NeighEntry>) {
        if ifindex != self.uplink_ix {
            return;
        }
        match e {
            Some(e) => {
                self.neigh.insert(ip, e);
            }
            None => {
                self.neigh.remove(&ip);
            }
        }
    }

    /// Starts following `ip`; true if it is new.
    pub(crate) fn want(&mut self, ip: Ipv4Addr) -> bool {
        if self.wanted.contains_key(&ip) {
            return false;
        }
        self.wanted.insert(ip, Wanted::default());
        true
    }

    /// Follows exactly `ips`; returns the new ones.
    pub(crate) fn track(&mut self, ips: &HashSet<Ipv4Addr>) -> Vec<Ipv4Addr> {
        self.wanted.retain(|ip, _| ips.contains(ip));
        ips.iter().copied().filter(|ip| self.want(*ip)).collect()
    }

    pub(crate) fn wanted(&self) -> Vec<Ipv4Addr> {
        self.wanted.keys().copied().collect()
    }

    /// Records the FIB's answer for `ip`; returns the previous one if it changed.
    pub(crate) fn set_route(&mut self, ip: Ipv4Addr, r: Route) -> Option<Option<Route>> {
        let uplink_ix = self.uplink_ix;
        let w = self.wanted.get_mut(&ip)?;
        let r = match r {
            Route::Via { oif, .. } if oif != uplink_ix => {
                Route::Unusable("the route leaves by another interface than the uplink")
            }
            r => r,
        };
        (w.route != Some(r)).then(|| w.route.replace(r))
    }

    /// The uplink changed (recreated): forget its neighbours, they are dumped again.
    pub(crate) fn reset_uplink(&mut self, uplink_ix: u32) {
        self.uplink_ix = uplink_ix;
        self.neigh.clear();
        for w in self.wanted.values_mut() {
            w.route = None;
        }
    }

    /// Next hops to make the kernel resolve now: (remote, next hop, ifindex). At most one
    /// trigger per next hop every `RETRIGGER`.
    pub(crate) fn due_triggers(&mut self, now: Instant) -> Vec<(Ipv4Addr, Ipv4Addr, u32)> {
        let mut out: Vec<(Ipv4Addr, Ipv4Addr, u32)> = Vec::new();
        for (ip, w) in &self.wanted {
            let Some(Route::Via { nh, oif }) = w.route else {
                continue;
            };
            if out.iter().any(|(_, n, _)| *n == nh) {
                continue;
            }
            let due = self.neigh.get(&nh).is_none_or(NeighEntry::needs_trigger)
                && self
                    .triggered
                    .get(&nh)
                    .is_none_or(|t| now.duration_since(*t) >= RETRIGGER);
            if due {
                out.push((*ip, nh, oif));
            }
        }
        for (_, nh, _) in &out {
            self.triggered.insert(*nh, now);
        }
        let neigh = &self.neigh;
        self.triggered
            .retain(|nh, _| neigh.get(nh).is_none_or(NeighEntry::needs_trigger));
        out
    }

    /// The snapshot `remote -> next-hop MAC` if it differs from the last published one, and
    /// whether a MAC that was published for a still-followed remote changed or went away
    /// (a megaflow may carry it).
    pub(crate) fn publish(&mut self) -> Option<(Arc<Snapshot>, bool)> {
        let mut next = HashMap::with_capacity(self.wanted.len());
        for (ip, w) in &self.wanted {
            if let Some(Route::Via { nh, .. }) = w.route {
                if let Some(mac) = self.neigh.get(&nh).and_then(NeighEntry::usable) {
                    next.insert(*ip, mac);
                }
            }
        }
        if next == *self.published {
            return None;
        }
        let changed = self
            .published
            .iter()
            .any(|(ip, mac)| self.wanted.contains_key(ip) && next.get(ip) != Some(mac));
        self.published = Arc::new(next);
        Some((self.published.clone(), changed))
    }

    /// The next hop and its MAC for `ip`, for logs.
    fn describe(&self, ip: Ipv4Addr) -> (Option<Route>, Option<NeighEntry>) {
        let r = self.wanted.get(&ip).and_then(|w| w.route);
        let e = match r {
            Some(Route::Via { nh, .. }) => self.neigh.get(&nh).copied(),
            _ => None,
        };
        (r, e)
    }
}

enum Cmd {
    Want(Ipv4Addr),
    Track(HashSet<Ipv4Addr>),
}

/// The underlay neighbour cache of the forwarder: next-hop MACs toward remote chassis,
/// maintained by a background thread from the kernel's FIB and neighbour table (see the
/// module documentation). No method blocks on the kernel.
pub struct Neighbours {
    snap: Arc<ArcSwap<Snapshot>>,
    changed: Arc<AtomicBool>,
    /// Addresses already handed to the thread (which then follows them on its own).
    requested: HashSet<Ipv4Addr>,
    tx: Sender<Cmd>,
    /// Commands sent to the thread, and (shared) commands it has fully handled.
    sent: u64,
    done: Arc<AtomicU64>,
    wake: Arc<OwnedFd>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    dead_reported: bool,
}

impl Neighbours {
    /// Starts the resolver thread for uplink `uplink` (in the calling thread's network
    /// namespace). If it cannot start, every lookup misses and the reason is logged.
    pub fn new(uplink: &str) -> Neighbours {
        let snap = Arc::new(ArcSwap::from_pointee(HashMap::new()));
        let changed = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let (tx, rx) = crossbeam_channel::unbounded();
        let wake = Arc::new(eventfd().unwrap_or_else(|e| {
            error!("eventfd: {e}; the neighbour resolver cannot be woken");
            // A descriptor that is never readable: the resolver still runs on its timer.
            std::fs::File::open("/dev/null")
                .map(OwnedFd::from)
                .expect("/dev/null")
        }));
        let thread = match Resolver::open(uplink) {
            Ok(r) => {
                let shared = Published {
                    snap: snap.clone(),
                    changed: changed.clone(),
                    done: done.clone(),
                };
                let (stop, wake) = (stop.clone(), wake.clone());
                std::thread::Builder::new()
                    .name("gf-neigh".into())
                    .spawn(move || r.run(rx, wake, shared, stop))
                    .map_err(|e| error!("cannot start the neighbour resolver: {e}"))
                    .ok()
            }
            Err(e) => {
                error!(
                    uplink,
                    "cannot open rtnetlink: {e}; underlay next hops cannot be resolved"
                );
                None
            }
        };
        Neighbours {
            snap,
            changed,
            requested: HashSet::new(),
            tx,
            sent: 0,
            done,
            wake,
            stop,
            thread,
            dead_reported: false,
        }
    }

    /// The MAC of the underlay next hop toward remote chassis `ip`, from the published
    /// snapshot (lock-free, no allocation, no syscall: the per-packet path).
    pub fn get(&self, ip: Ipv4Addr) -> Option<[u8; 6]> {
        self.snap.load().get(&ip).copied()
    }

    /// `get`, and on a miss `kick`: never blocks (at most one eventfd write, once per address).
    pub fn resolve(&mut self, ip: Ipv4Addr) -> Option<[u8; 6]> {
        let m = self.get(ip);
        if m.is_none() {
            self.kick(ip);
        }
        m
    }

    /// Starts resolving the next hop toward `ip` in the background, if not already followed.
    /// Nonblocking; the result shows in `get` as soon as the kernel has it.
    pub fn kick(&mut self, ip: Ipv4Addr) {
        if self.requested.insert(ip) {
            debug!(%ip, "following underlay next hop");
            self.send(Cmd::Want(ip));
        }
    }

    /// Follows exactly the remote chassis `ips` (a pipeline's): starts resolving the new ones
    /// and stops following the others. Nonblocking.
    pub fn track(&mut self, ips: impl IntoIterator<Item = Ipv4Addr>) {
        let set: HashSet<Ipv4Addr> = ips.into_iter().collect();
        if set == self.requested {
            return;
        }
        self.requested = set.clone();
        self.send(Cmd::Track(set));
    }

    /// Waits (at most `timeout`) until the thread has handled every `kick` and `track` so far:
    /// asked the FIB for the new addresses and published what the kernel's neighbour table
    /// already holds for them. It does not wait for any ARP exchange, so it is short (a few
    /// netlink round trips), but it does block: meant for start-up (e.g. checking adopted
    /// megaflows' cached next hops right after the first pipeline), not for the packet path.
    /// Returns whether the thread caught up.
    pub fn sync(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.done.load(Ordering::Acquire) < self.sent {
            if self.thread.as_ref().is_none_or(|t| t.is_finished()) || Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }

    fn send(&mut self, c: Cmd) {
        if self.tx.send(c).is_ok() {
            self.sent += 1;
        }
        self.ring();
    }

    /// True once after a next-hop MAC that `get` returned changed or went away (megaflows
    /// carrying it are stale). Newly resolved next hops do not count: nothing cached them.
    /// Nonblocking: the background thread has already applied the kernel's events.
    pub fn refresh(&mut self) -> bool {
        if !self.dead_reported && self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            error!("the neighbour resolver thread ended; next hops are no longer updated");
            self.dead_reported = true;
        }
        self.changed.swap(false, Ordering::AcqRel)
    }

    fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: 8-byte write of a u64 from a live local to an eventfd we own (nonblocking).
        unsafe {
            libc::write(
                self.wake.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
    }
}

impl Drop for Neighbours {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.ring();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: plain eventfd(2); the descriptor is owned right away.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What the thread publishes to `Neighbours`.
struct Published {
    snap: Arc<ArcSwap<Snapshot>>,
    changed: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
}

/// The background thread's side: two rtnetlink sockets (requests, and multicast events).
struct Resolver {
    uplink: String,
    req: Socket,
    events: Socket,
    seq: u32,
    buf: Vec<u8>,
    table: Table,
    /// Managed neighbour entries work (kernel >= 5.16); otherwise a datagram triggers ARP.
    managed_ok: bool,
    probe: Option<UdpSocket>,
}

impl Resolver {
    fn open(uplink: &str) -> std::io::Result<Resolver> {
        let mut events = Socket::new(NETLINK_ROUTE)?;
        events.bind_auto()?;
        for g in [
            libc::RTNLGRP_NEIGH,
            libc::RTNLGRP_IPV4_ROUTE,
            libc::RTNLGRP_LINK,
        ] {
            events.add_membership(g)?;
        }
        let _ = events.set_rx_buf_sz(1 << 20);
        events.set_non_blocking(true)?;
        let req = request_socket(Duration::from_secs(1))?;
        let ix = super::ifindex(uplink).unwrap_or(0);
        Ok(Resolver {
            uplink: uplink.to_string(),
            req,
            events,
            seq: 0,
            buf: vec![0u8; 1 << 16],
            table: Table::new(ix),
            managed_ok: true,
            probe: UdpSocket::bind("0.0.0.0:0")
                .and_then(|s| s.set_nonblocking(true).map(|_| s))
                .ok(),
        })
    }

    fn run(mut self, rx: Receiver<Cmd>, wake: Arc<OwnedFd>, out: Published, stop: Arc<AtomicBool>) {
        // The event socket is subscribed before the dump: nothing falls between them.
        self.dump_neighbours();
        let mut last_routes = Instant::now();
        let mut handled = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let mut fds = [
                libc::pollfd {
                    fd: self.events.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: fds is a live array of two pollfd for descriptors we own.
            unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
            let mut drain = 0u64;
            // SAFETY: drains the nonblocking eventfd into an 8-byte local.
            unsafe {
                libc::read(
                    wake.as_raw_fd(),
                    &mut drain as *mut u64 as *mut libc::c_void,
                    8,
                )
            };
            let mut lookup: Vec<Ipv4Addr> = Vec::new();
            while let Ok(c) = rx.try_recv() {
                handled += 1;
                match c {
                    Cmd::Want(ip) => {
                        if self.table.want(ip) {
                            lookup.push(ip);
                        }
                    }
                    Cmd::Track(set) => lookup.extend(self.table.track(&set)),
                }
            }
            let all_routes = self.drain_events() || last_routes.elapsed() >= ROUTE_RECHECK;
            if all_routes {
                last_routes = Instant::now();
                lookup = self.table.wanted();
            }
            for ip in lookup {
                self.lookup_route(ip);
            }
            for (remote, nh, oif) in self.table.due_triggers(Instant::now()) {
                self.trigger(remote, nh, oif);
            }
            if let Some((next, moved)) = self.table.publish() {
                out.snap.store(next);
                if moved {
                    out.changed.store(true, Ordering::Release);
                }
            }
            out.done.store(handled, Ordering::Release);
        }
    }

    /// Applies every pending event; true if routes or links changed (or events were lost),
    /// so every remote's route must be asked again.
    fn drain_events(&mut self) -> bool {
        let mut routes = false;
        loop {
            let n = match self.events.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    warn!("rtnetlink events overran; reading the neighbour table again");
                    self.dump_neighbours();
                    routes = true;
                    continue;
                }
                Err(e) => {
                    warn!("rtnetlink events: {e}");
                    break;
                }
            };
            let mut off = 0;
            while off < n.min(self.buf.len()) {
                let Ok(m) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[off..n])
                else {
                    break;
                };
                let len = m.header.length as usize;
                match m.payload {
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(nm)) => {
                        if let Some((ix, ip, e)) = parse_neigh(&nm) {
                            self.table.neigh_event(ix, ip, Some(e));
                        }
                    }
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(nm)) => {
                        if let Some((ix, ip, _)) = parse_neigh(&nm) {
                            self.table.neigh_event(ix, ip, None);
                        }
                    }
                    NetlinkPayload::InnerMessage(
                        RouteNetlinkMessage::NewRoute(_) | RouteNetlinkMessage::DelRoute(_),
                    ) => routes = true,
                    NetlinkPayload::InnerMessage(
                        RouteNetlinkMessage::NewLink(_) | RouteNetlinkMessage::DelLink(_),
                    ) => {
                        routes = true;
                        let ix = super::ifindex(&self.uplink).unwrap_or(0);
                        if ix != self.table.uplink_ix {
                            info!(uplink = %self.uplink, ifindex = ix, "uplink ifindex changed");
                            self.table.reset_uplink(ix);
                            self.dump_neighbours();
                        }
                    }
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                off += align4(len);
            }
        }
        routes
    }

    fn dump_neighbours(&mut self) {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet;
        let uplink_ix = self.table.uplink_ix;
        let got = self.request(
            RouteNetlinkMessage::GetNeighbour(m),
            NLM_F_REQUEST | NLM_F_DUMP,
        );
        match got {
            Ok(list) => {
                self.table.neigh.clear();
                for r in list {
                    if let RouteNetlinkMessage::NewNeighbour(nm) = r {
                        if let Some((ix, ip, e)) = parse_neigh(&nm) {
                            if ix == uplink_ix {
                                self.table.neigh_event(ix, ip, Some(e));
                            }
                        }
                    }
                }
            }
            Err(e) => warn!("cannot dump the neighbour table: {e}"),
        }
    }

    /// Asks the FIB where `ip` goes (as `ip route get`) and records the answer.
    fn lookup_route(&mut self, ip: Ipv4Addr) {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.destination_prefix_length = 32;
        m.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(ip)));
        let r = match self.request(RouteNetlinkMessage::GetRoute(m), NLM_F_REQUEST) {
            Ok(list) => list
                .iter()
                .find_map(|r| match r {
                    RouteNetlinkMessage::NewRoute(rm) => Some(parse_route(rm, ip)),
                    _ => None,
                })
                .unwrap_or(Route::Unusable("the FIB gave no answer")),
            Err(e) if e.raw_os_error() == Some(libc::ENETUNREACH) => Route::Unusable("no route"),
            Err(e) => {
                debug!(%ip, "route lookup: {e}");
                Route::Unusable("the route lookup failed")
            }
        };
        if let Some(before) = self.table.set_route(ip, r) {
            let (route, _) = self.table.describe(ip);
            match route {
                Some(Route::Via { nh, oif }) if nh == ip => {
                    info!(remote = %ip, ifindex = oif, "remote chassis is directly connected")
                }
                Some(Route::Via { nh, oif }) => {
                    info!(remote = %ip, via = %nh, ifindex = oif, "remote chassis is routed")
                }
                Some(Route::Unusable(why)) => {
                    warn!(remote = %ip, uplink = %self.uplink, "no underlay next hop toward remote chassis: {why}")
                }
                None => {}
            }
            debug!(remote = %ip, ?before, "route changed");
        }
    }

    /// Makes the kernel resolve next hop `nh` on `oif`, without waiting for it. The entry is
    /// created (or turned, keeping its address and state) *managed* (`NTF_EXT_MANAGED`, as `ip neigh replace NH dev UPLINK
    /// managed`): the kernel resolves it at once and then keeps it resolved on its own, which
    /// the fast path needs because its traffic never passes the kernel's neighbour code (an
    /// ordinary entry would stay STALE forever, never re-verified, and would be garbage
    /// collected). It also sends nothing to the remote chassis. Static entries (PERMANENT,
    /// NOARP) are never touched (the request would drop their PERMANENT state). On a kernel without managed entries (< 5.16), one empty UDP datagram to the
    /// discard port of the remote chassis makes the kernel route it and resolve the next hop.
    fn trigger(&mut self, remote: Ipv4Addr, nh: Ipv4Addr, oif: u32) {
        if self.managed_ok {
            let mut m = NeighbourMessage::default();
            m.header.family = AddressFamily::Inet;
            m.header.ifindex = oif;
            m.header.state = NeighbourState::None;
            m.attributes
                .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(nh)));
            m.attributes
                .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
            match self.request(
                RouteNetlinkMessage::NewNeighbour(m),
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            ) {
                Ok(_) => {
                    debug!(%remote, %nh, "resolving underlay next hop (managed neighbour)");
                    return;
                }
                Err(e) => {
                    warn!(%nh, "cannot create a managed neighbour entry ({e}); probing with datagrams instead");
                    self.managed_ok = false;
                }
            }
        }
        if let Some(s) = &self.probe {
            debug!(%remote, %nh, "probing underlay next hop");
            let _ = s.send_to(&[], (remote, 9));
        }
    }

    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> std::io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        request(&self.req, &mut self.buf, self.seq, msg, flags)
    }
}

/// Sends one rtnetlink request on connected socket `sock` and collects its answers (until the
/// end of a dump, an ACK or an error, or the single answer of a plain request). Blocks at most
/// the socket's receive timeout.
pub(crate) fn request(
    sock: &Socket,
    buf: &mut [u8],
    seq: u32,
    msg: RouteNetlinkMessage,
    flags: u16,
) -> std::io::Result<Vec<RouteNetlinkMessage>> {
    let mut hdr = NetlinkHeader::default();
    hdr.flags = flags;
    hdr.sequence_number = seq;
    let mut req = NetlinkMessage::new(hdr, NetlinkPayload::from(msg));
    req.finalize();
    let mut out = vec![0u8; req.buffer_len()];
    req.serialize(&mut out);
    sock.send(&out, 0)?;
    let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
    let ack = flags & NLM_F_ACK != 0;
    let mut got = Vec::new();
    loop {
        let n = sock.recv(&mut &mut buf[..], 0)?;
        let mut off = 0;
        while off < n.min(buf.len()) {
            let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[off..n])
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            let len = m.header.length as usize;
            if m.header.sequence_number == seq {
                let multi = m.header.flags & NLM_F_MULTIPART != 0;
                match m.payload {
                    NetlinkPayload::Done(_) => return Ok(got),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(got),
                            Some(_) => Err(e.to_io()),
                        }
                    }
                    NetlinkPayload::InnerMessage(i) => {
                        got.push(i);
                        if !dump && !ack && !multi {
                            return Ok(got);
                        }
                    }
                    _ => {}
                }
            }
            if len == 0 {
                break;
            }
            off += align4(len);
        }
    }
}

/// A connected rtnetlink socket for requests, with a receive timeout.
pub(crate) fn request_socket(timeout: Duration) -> std::io::Result<Socket> {
    let mut req = Socket::new(NETLINK_ROUTE)?;
    req.bind_auto()?;
    req.connect(&SocketAddr::new(0, 0))?;
    set_rcv_timeout(&req, timeout)?;
    Ok(req)
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn set_rcv_timeout(s: &Socket, d: Duration) -> std::io::Result<()> {
    let tv = libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt on a socket we own, with a pointer to a live timeval and its size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::route::RouteHeader;

    const UL: u32 = 7;
    const MAC_R: [u8; 6] = [2, 0, 0, 0, 0, 0xfe];
    const MAC_R2: [u8; 6] = [2, 0, 0, 0, 0, 0xfd];

    /// A message as the kernel sends it: serialized, then parsed back from the bytes.
    fn wire(m: RouteNetlinkMessage) -> RouteNetlinkMessage {
        let mut nl = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(m));
        nl.finalize();
        let mut b = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut b);
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&b)
            .unwrap()
            .payload
        {
            NetlinkPayload::InnerMessage(i) => i,
            p => panic!("{p:?}"),
        }
    }

    fn neigh_msg(
        ix: u32,
        ip: Ipv4Addr,
        state: NeighbourState,
        mac: Option<[u8; 6]>,
    ) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.ifindex = ix;
        m.header.state = state;
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        if let Some(mac) = mac {
            m.attributes
                .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        }
        match wire(RouteNetlinkMessage::NewNeighbour(m)) {
            RouteNetlinkMessage::NewNeighbour(m) => m,
            o => panic!("{o:?}"),
        }
    }

    fn route_msg(kind: RouteType, gw: Option<Ipv4Addr>, oif: u32) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.kind = kind;
        if let Some(g) = gw {
            m.attributes
                .push(RouteAttribute::Gateway(RouteAddress::Inet(g)));
        }
        m.attributes.push(RouteAttribute::Oif(oif));
        match wire(RouteNetlinkMessage::NewRoute(m)) {
            RouteNetlinkMessage::NewRoute(m) => m,
            o => panic!("{o:?}"),
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_neighbour_entries() {
        let m = neigh_msg(
            UL,
            ip("198.18.1.254"),
            NeighbourState::Reachable,
            Some(MAC_R),
        );
        let (ix, a, e) = parse_neigh(&m).unwrap();
        assert_eq!((ix, a), (UL, ip("198.18.1.254")));
        assert_eq!(e.usable(), Some(MAC_R));
        assert!(e.needs_trigger(), "made managed");
        let m = neigh_msg(
            UL,
            ip("198.18.1.254"),
            NeighbourState::Permanent,
            Some(MAC_R),
        );
        let e = parse_neigh(&m).unwrap().2;
        assert_eq!(e.usable(), Some(MAC_R));
        assert!(!e.needs_trigger(), "a static entry is never touched");
        let m = neigh_msg(UL, ip("198.18.1.9"), NeighbourState::Incomplete, None);
        let (_, _, e) = parse_neigh(&m).unwrap();
        assert_eq!(e.usable(), None);
        assert!(e.needs_trigger());
        // A failed entry may still carry its old address: it is not used.
        let m = neigh_msg(UL, ip("198.18.1.9"), NeighbourState::Failed, Some(MAC_R));
        assert_eq!(parse_neigh(&m).unwrap().2.usable(), None);
        // STALE is usable, and made managed too.
        let m = neigh_msg(UL, ip("198.18.1.9"), NeighbourState::Stale, Some(MAC_R));
        let e = parse_neigh(&m).unwrap().2;
        assert_eq!(e.usable(), Some(MAC_R));
        assert!(e.needs_trigger());
        let mut m = neigh_msg(UL, ip("198.18.1.9"), NeighbourState::Stale, Some(MAC_R));
        m.attributes
            .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        let e = parse_neigh(&m).unwrap().2;
        assert!(e.managed && !e.needs_trigger());
        let mut m6 = m.clone();
        m6.header.family = AddressFamily::Inet6;
        assert!(parse_neigh(&m6).is_none());
    }

    #[test]
    fn parses_fib_answers() {
        let dst = ip("198.18.2.1");
        let gw = ip("198.18.1.254");
        assert_eq!(
            parse_route(&route_msg(RouteType::Unicast, Some(gw), UL), dst),
            Route::Via { nh: gw, oif: UL }
        );
        assert_eq!(
            parse_route(&route_msg(RouteType::Unicast, None, UL), dst),
            Route::Via { nh: dst, oif: UL }
        );
        assert!(matches!(
            parse_route(&route_msg(RouteType::Local, None, 1), dst),
            Route::Unusable(_)
        ));
        assert!(matches!(
            parse_route(&route_msg(RouteType::Unreachable, None, UL), dst),
            Route::Unusable(_)
        ));
    }

    #[test]
    fn routed_remote_resolves_to_the_gateway_mac_and_changes_are_flagged() {
        let mut t = Table::new(UL);
        let (remote, gw) = (ip("198.18.2.1"), ip("198.18.1.254"));
        assert!(t.want(remote));
        assert!(t
            .set_route(remote, Route::Via { nh: gw, oif: UL })
            .is_some());
        assert!(t.publish().is_none(), "nothing resolved yet");
        let now = Instant::now();
        assert_eq!(t.due_triggers(now), vec![(remote, gw, UL)]);
        assert!(t.due_triggers(now).is_empty(), "rate-limited");
        // The kernel creates the managed entry, then resolves it.
        let inc = parse_neigh(&neigh_msg(UL, gw, NeighbourState::Incomplete, None)).unwrap();
        t.neigh_event(
            UL,
            gw,
            Some(NeighEntry {
                managed: true,
                ..inc.2
            }),
        );
        assert!(
            t.due_triggers(now + RETRIGGER).is_empty(),
            "the kernel handles managed entries"
        );
        let e = parse_neigh(&neigh_msg(UL, gw, NeighbourState::Reachable, Some(MAC_R))).unwrap();
        t.neigh_event(e.0, e.1, Some(e.2));
        let (snap, moved) = t.publish().unwrap();
        assert_eq!(snap.get(&remote), Some(&MAC_R));
        assert!(!moved, "a new resolution is not a change");
        // The same state again publishes nothing.
        t.neigh_event(e.0, e.1, Some(e.2));
        assert!(t.publish().is_none());
        // The router's MAC changes: flagged.
        t.neigh_event(
            UL,
            gw,
            Some(NeighEntry {
                mac: Some(MAC_R2),
                ..e.2
            }),
        );
        let (snap, moved) = t.publish().unwrap();
        assert_eq!(snap.get(&remote), Some(&MAC_R2));
        assert!(moved);
        // The entry goes away: flagged, and resolution is triggered again.
        t.neigh_event(UL, gw, None);
        let (snap, moved) = t.publish().unwrap();
        assert!(snap.is_empty() && moved);
        assert_eq!(t.due_triggers(now + RETRIGGER * 2), vec![(remote, gw, UL)]);
        // Entries of other interfaces are ignored.
        t.neigh_event(UL + 1, gw, Some(e.2));
        assert!(t.publish().is_none());
    }

    #[test]
    fn routes_through_another_interface_are_not_used() {
        let mut t = Table::new(UL);
        let remote = ip("198.18.2.1");
        t.want(remote);
        t.set_route(
            remote,
            Route::Via {
                nh: remote,
                oif: UL + 1,
            },
        );
        assert!(matches!(t.describe(remote).0, Some(Route::Unusable(_))));
        assert!(t.due_triggers(Instant::now()).is_empty());
    }

    #[test]
    fn a_route_change_moves_the_next_hop() {
        let mut t = Table::new(UL);
        let (remote, gw1, gw2) = (ip("198.18.2.1"), ip("198.18.1.254"), ip("198.18.1.253"));
        t.want(remote);
        for (g, m) in [(gw1, MAC_R), (gw2, MAC_R2)] {
            t.neigh_event(
                UL,
                g,
                Some(NeighEntry {
                    state: 0x02,
                    mac: Some(m),
                    managed: true,
                }),
            );
        }
        t.set_route(remote, Route::Via { nh: gw1, oif: UL });
        assert!(!t.publish().unwrap().1);
        t.set_route(remote, Route::Via { nh: gw2, oif: UL });
        let (snap, moved) = t.publish().unwrap();
        assert_eq!(snap.get(&remote), Some(&MAC_R2));
        assert!(moved);
        // No longer followed: gone from the snapshot, but not a change megaflows must see.
        t.track(&HashSet::new());
        let (snap, moved) = t.publish().unwrap();
        assert!(snap.is_empty() && !moved);
    }

    #[test]
    fn remotes_sharing_a_gateway_trigger_it_once() {
        let mut t = Table::new(UL);
        let gw = ip("198.18.1.254");
        let ips: HashSet<Ipv4Addr> = [ip("198.18.2.1"), ip("198.18.3.1")].into();
        assert_eq!(t.track(&ips).len(), 2);
        for r in &ips {
            t.set_route(*r, Route::Via { nh: gw, oif: UL });
        }
        assert_eq!(t.due_triggers(Instant::now()).len(), 1);
    }
}
