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
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};
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

/// The published next hops, read by a slow-path thread that does not own `Neighbours`.
#[derive(Clone)]
pub struct NeighReader(Arc<ArcSwap<Snapshot>>);

impl NeighReader {
    /// As `Neighbours::get`: lock-free, no allocation, no syscall.
    pub fn get(&self, ip: Ipv4Addr) -> Option<[u8; 6]> {
        self.0.load().get(&ip).copied()
    }
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

    /// A read-only view of the snapshot for another thread (`get` without `kick`).
    pub fn reader(&self) -> NeighReader {
        NeighReader(self.snap.clone())
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

mod resolver;
use resolver::*;

#[cfg(test)]
mod tests;
