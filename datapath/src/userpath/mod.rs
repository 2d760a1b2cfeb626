//! The userspace datapath engine of the DPDK backend, sans-IO: one frame in, frames out
//! through the caller's `Tx`. It joins the pieces the XDP backend splits between the kernel
//! and the slow path:
//!
//! 1. ARP from the uplink for the tunnel address: answered, the sender learnt (`userneigh`);
//! 2. the frame's key as XDP builds it (`Tables::fast_key`), malformed tunnel frames dropped
//!    with XDP's reasons, and its connection's state (`userct`) where conntrack runs;
//! 3. the megaflow cache (`flowcache`); a hit runs its action (`flowexec`) on a copy of the
//!    frame with headroom and sends the result;
//! 4. a miss (or an action left to the slow path) runs the pipeline (`Tables`) in `slow`,
//!    sends its outputs (Geneve to a chassis whose MAC `userneigh` knows; else the ARP
//!    request goes out and the frame waits for the reply in `pending`, bounded, as the XDP
//!    backend's frames wait) and its answers (rate limited as
//!    the XDP slow path limits them), and installs its megaflow, with the next hop cached
//!    when known, so the next frames of the flow take step 3.
//!
//! A provider network's frame has its 802.1Q tag popped first (into a buffer of the
//! thread's), its VLAN in the key, as XDP does; frames to a tracked floating IP are looked
//! up in conntrack as the VM will see them. What the pipeline learns there (provider
//! neighbours from ARP) goes to the thread that owns the tables (`PathEvent`).
//!
//! Per poll thread: a hit takes no lock (an established connection is answered by the
//! thread's connection cache, within its epoch); the cache's generations are shared with the
//! thread applying pipelines. The neighbour table is shared by the threads (an ARP reply lands on one
//! queue), under a lock taken only for ARP frames and misses. The buffers are allocated once;
//! a miss may allocate (the pipeline's outputs).

mod slow;
mod state;

use crate::flowcache::FlowCache;
use crate::flowexec::{execute, Frame, Verdict};
use crate::pipeline::{DropReason, Learn, Output, Tables};
use crate::ratelimit::AnswerLimits;
use crate::ratelimit::RateLimiter;
use crate::userct::{self, ConnTable, CtCache};
use crate::usernat::NatMap;
use crate::userneigh::UnderlayNeigh;
use crossbeam_channel::Sender;
use geneflow_abi::{act, ct, ctr, mask_list, VLAN_PRESENT};
use state::HitState;
pub use state::NatCache;
use std::net::Ipv4Addr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Room before a frame for the headers an action pushes (Geneve's 58 bytes, a VLAN tag).
pub const HEADROOM: usize = 128;
/// The largest frame handled (jumbo underlays: 9000 bytes of IP plus Ethernet).
pub const MAX_FRAME: usize = 9216;

/// Where frames leave: the port with this interface index.
pub trait Tx {
    /// False when the port did not take the frame (queue full, unknown port).
    fn send(&mut self, ifindex: u32, frame: &[u8]) -> bool;
}

/// Frames counted by reason, as the XDP program counts them (`ctr::*`).
#[derive(Debug, Clone)]
pub struct Counters(pub [u64; ctr::COUNT as usize]);

impl Default for Counters {
    fn default() -> Self {
        Counters([0; ctr::COUNT as usize])
    }
}

impl Counters {
    pub fn add(&mut self, c: u32, n: u64) {
        if let Some(x) = self.0.get_mut(c as usize) {
            *x += n;
        }
    }

    pub fn get(&self, c: u32) -> u64 {
        self.0.get(c as usize).copied().unwrap_or(0)
    }
}

/// What a poll thread tells the thread that owns the tables: a provider neighbour the
/// pipeline learnt from ARP, and the next hops this thread asked for (only their replies are
/// learnt, see `arpasked`); a gratuitous ARP it could not send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathEvent {
    Learn(Learn),
    Asked(Ipv4Addr),
    /// A gratuitous ARP a poll thread could not send: owed again (`garp`).
    Unsent(crate::garp::Garp),
}

/// How an engine is set up.
pub struct PathConfig {
    /// How many port slots the caller numbers its ports with.
    pub ports: usize,
    /// The uplink's interface index and MAC.
    pub uplink: (u32, [u8; 6]),
    pub udp_csum: bool,
    /// DHCP answers per second per port.
    pub dhcp_rate: f32,
    /// How many engines share the chassis's budgets (answers, translations, drop entries).
    pub threads: usize,
    /// Where `PathEvent`s go (none: dropped).
    pub events: Option<Sender<PathEvent>>,
}

/// What the poll threads share: the underlay neighbours, the connections, the default-SNAT
/// translations.
#[derive(Clone)]
pub struct PathShared {
    pub neigh: Arc<Mutex<UnderlayNeigh>>,
    pub conntrack: Arc<ConnTable>,
    pub nat: Arc<NatMap>,
    /// The version of the tables last published (`Tables::version`): a megaflow decided on
    /// older tables is not installed.
    pub published: Arc<AtomicU64>,
}

pub struct UserPath {
    pub cache: FlowCache,
    pub neigh: Arc<Mutex<UnderlayNeigh>>,
    pub conntrack: Arc<ConnTable>,
    pub nat: Arc<NatMap>,
    published: Arc<AtomicU64>,
    /// New default-SNAT translations per VM port.
    nat_allocs: RateLimiter,
    /// New drop megaflows per port.
    drop_installs: RateLimiter,
    /// This thread's translations of established connections.
    pub nat_cache: NatCache,
    pub ct_cache: CtCache,
    /// Per port slot (the caller's numbering), what the frames received there came to.
    pub counters: Vec<Counters>,
    /// The port slot of the frame being handled.
    slot: usize,
    uplink_ifindex: u32,
    uplink_mac: [u8; 6],
    udp_csum: bool,
    answers: AnswerLimits,
    events: Option<Sender<PathEvent>>,
    /// A provider frame with its tag popped.
    popped: Vec<u8>,
    /// Frames waiting for their remote chassis' next hop.
    pending: crate::pending::Pending,
    scratch: Vec<u8>,
    encap_buf: Vec<u8>,
    txbuf: Vec<u8>,
    outputs: Vec<Output>,
}

impl UserPath {
    pub fn new(cache: FlowCache, shared: PathShared, cfg: PathConfig) -> UserPath {
        let rate = crate::napt::ALLOC_RATE;
        // Each thread has its share of the budgets the XDP backend's one forwarder has.
        let share = 1.0 / cfg.threads.max(1) as f32;
        UserPath {
            cache,
            neigh: shared.neigh,
            conntrack: shared.conntrack,
            nat: shared.nat,
            published: shared.published,
            nat_allocs: RateLimiter::new(rate * share, rate * 2.0 * share, rate * 20.0 * share),
            // 1000 new drop entries/s per port (bursts of 2000), 10,000/s in all, as the XDP
            // backend's forwarder.
            drop_installs: RateLimiter::new(1000.0 * share, 2000.0 * share, 10_000.0 * share),
            nat_cache: NatCache::default(),
            ct_cache: CtCache::default(),
            counters: vec![Counters::default(); cfg.ports.max(1)],
            slot: 0,
            uplink_ifindex: cfg.uplink.0,
            uplink_mac: cfg.uplink.1,
            udp_csum: cfg.udp_csum,
            answers: AnswerLimits::new(cfg.dhcp_rate, share),
            events: cfg.events,
            popped: Vec::with_capacity(MAX_FRAME),
            pending: crate::pending::Pending::new(MAX_FRAME + HEADROOM),
            scratch: vec![0; HEADROOM + MAX_FRAME],
            encap_buf: vec![0; MAX_FRAME + HEADROOM],
            txbuf: Vec::with_capacity(MAX_FRAME),
            outputs: Vec::with_capacity(64),
        }
    }

    /// Counts `c` for the port the frame came in on.
    fn count(&mut self, c: u32) {
        if let Some(x) = self.counters.get_mut(self.slot) {
            x.add(c, 1);
        }
    }

    /// `c` over every port.
    pub fn total(&self, c: u32) -> u64 {
        self.counters.iter().map(|x| x.get(c)).sum()
    }

    /// Transmit counts are the `Tx`'s (per output port); a frame it refuses counts here.
    fn send(&mut self, tx: &mut dyn Tx, ifindex: u32, frame: &[u8]) {
        if !tx.send(ifindex, frame) {
            self.count(ctr::DROP_TX_FULL);
        }
    }

    /// One frame received on `in_ifindex`, the caller's port slot `in_slot`.
    pub fn receive(
        &mut self,
        tables: &Tables,
        frame: &[u8],
        (in_ifindex, in_slot): (u32, usize),
        now: Instant,
        tx: &mut dyn Tx,
    ) {
        self.slot = in_slot;
        if frame.len() > MAX_FRAME {
            self.count(ctr::DROP_TOO_BIG);
            return;
        }
        let uplink = in_ifindex == self.uplink_ifindex;
        if uplink && frame.get(12..14) == Some(&[0x08, 0x06]) {
            // Only ARP for the tunnel address concerns the neighbour table: the underlay's
            // other ARP (broadcast to every host on it) goes without taking the table's lock.
            let target = frame.get(38..42).and_then(|t| <[u8; 4]>::try_from(t).ok());
            if target.map(Ipv4Addr::from) != tables.encap_ip() {
                return;
            }
            let reply = self
                .neigh
                .lock()
                .ok()
                .and_then(|mut n| n.on_arp(frame, now));
            if let Some(reply) = reply {
                self.send(tx, in_ifindex, &reply);
            }
            return;
        }
        if tables.is_provider(in_ifindex) {
            let mut popped = std::mem::take(&mut self.popped);
            let vlan = pop_vlan(frame, &mut popped);
            self.handle(tables, &popped, (in_ifindex, vlan), now, tx);
            self.popped = popped;
        } else {
            self.handle(tables, frame, (in_ifindex, 0), now, tx);
        }
    }

    /// A frame (a provider's with its tag popped, its VLAN `vlan`) after the checks of its
    /// port: conntrack, the cache, the slow path.
    fn handle(
        &mut self,
        tables: &Tables,
        frame: &[u8],
        (in_ifindex, vlan): (u32, u16),
        now: Instant,
        tx: &mut dyn Tx,
    ) {
        let list = if in_ifindex == self.uplink_ifindex {
            mask_list::UPLINK
        } else {
            mask_list::VM
        } as usize;
        let (mut key, inner) = match tables.fast_key(frame, (in_ifindex, vlan)) {
            // Not Geneve to this chassis (the underlay's own traffic: IPv6 neighbour
            // discovery, ...): what XDP passes to the kernel; no kernel stack behind a DPDK
            // port, so dropped, counted as passed.
            Err(DropReason::NotOverlay) => return self.count(ctr::PASS),
            Err(reason) => return self.count(reason.counter()),
            Ok(None) => return self.slow(tables, frame, (in_ifindex, 0, vlan), list, now, tx),
            Ok(Some(k)) => k,
        };
        let ipv4 = key.eth_type == 0x0800u16.to_be();
        let provider = tables.is_provider(in_ifindex);
        // DHCP from a VM (to a server, or posing as one) is the slow path's to answer or
        // refuse, before any megaflow: no megaflow of other traffic consults UDP ports for it
        // (as in XDP).
        let dhcp = ipv4
            && key.ip_proto == 17
            && (key.l4_dst == 67u16.to_be() || key.l4_dst == 68u16.to_be());
        if dhcp && in_ifindex != self.uplink_ifindex && !provider {
            return self.slow(tables, frame, (in_ifindex, 0, vlan), list, now, tx);
        }
        let zone = tables.ct_zone(in_ifindex, &key);
        let now_ns = self.conntrack.ns(now);
        // To a tracked floating IP from a provider network: the state as the VM sees it.
        if provider && ipv4 {
            if let Some(&(fixed, fzone)) = tables.fip_ct().get(&key.ip_dst) {
                let mut k = key;
                k.ip_dst = fixed;
                userct::lookup(&self.conntrack, &mut self.ct_cache, &mut k, fzone, now_ns);
                key.ct_state = k.ct_state;
            }
        }
        if zone != 0 {
            let t = &*self.conntrack;
            userct::lookup(t, &mut self.ct_cache, &mut key, zone, now_ns);
            if key.ct_state == ct::NEW
                && key.ip_proto == 1
                && userct::icmp_error_related(t, frame, inner, zone)
            {
                key.ct_state = ct::RELATED;
            }
        }
        let Some(a) = self.cache.lookup(&key, list) else {
            return self.slow(
                tables,
                frame,
                (in_ifindex, key.ct_state, vlan),
                list,
                now,
                tx,
            );
        };
        let end = HEADROOM + frame.len();
        self.scratch[HEADROOM..end].copy_from_slice(frame);
        let mut f = Frame {
            buf: &mut self.scratch,
            start: HEADROOM,
            end,
        };
        let mut state = HitState {
            conntrack: &self.conntrack,
            nat: &self.nat,
            nat_cache: &mut self.nat_cache,
            key: &key,
            action: &a,
            now_ns,
            committed: 0,
        };
        let verdict = execute(&mut f, &key, inner, &a, &mut state);
        let committed = state.committed;
        if committed > 0 {
            if let Some(x) = self.counters.get_mut(self.slot) {
                x.add(ctr::CT_COMMITTED, committed);
            }
        }
        match verdict {
            Verdict::Output { ifindex, .. } => {
                let (s, e) = (f.start, f.end);
                self.count(ctr::FAST_HIT);
                if a.kind == act::ARP_REPLY {
                    self.count(ctr::ARP_REPLY);
                }
                if !tx.send(ifindex, &self.scratch[s..e]) {
                    self.count(ctr::DROP_TX_FULL);
                }
            }
            Verdict::Drop(c) => {
                // As XDP: a drop megaflow is a hit; a frame its action refuses (a router's
                // checks, a translation) is only a drop.
                if a.kind == act::DROP {
                    self.count(ctr::FAST_HIT);
                }
                self.count(c);
            }
            // No kernel stack behind a DPDK port: what XDP would pass is dropped, counted.
            Verdict::Pass => self.count(ctr::PASS),
            Verdict::SlowPath => self.slow(
                tables,
                frame,
                (in_ifindex, key.ct_state, vlan),
                list,
                now,
                tx,
            ),
        }
    }
}

/// `frame` into `out` without its 802.1Q tag, if it has one; the tag's VLAN
/// (`VLAN_PRESENT | vid`), or 0.
fn pop_vlan(frame: &[u8], out: &mut Vec<u8>) -> u16 {
    out.clear();
    if frame.len() >= 18 && frame[12..14] == [0x81, 0x00] {
        out.extend_from_slice(&frame[..12]);
        out.extend_from_slice(&frame[16..]);
        VLAN_PRESENT | (u16::from_be_bytes([frame[14], frame[15]]) & 0x0fff)
    } else {
        out.extend_from_slice(frame);
        0
    }
}
