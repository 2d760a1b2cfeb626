//! The userspace datapath engine of the DPDK backend, sans-IO: one frame in, frames out
//! through the caller's `Tx`. It joins the pieces the XDP backend splits between the kernel
//! and the slow path:
//!
//! 1. ARP from the uplink for the tunnel address: answered, the sender learnt (`userneigh`);
//! 2. the frame's key as XDP builds it (`Tables::fast_key`), malformed tunnel frames dropped
//!    with XDP's reasons, and its connection's state (`userct`) where conntrack runs;
//! 3. the megaflow cache (`flowcache`); a hit runs its action (`flowexec`) on a copy of the
//!    frame with headroom and sends the result;
//! 4. a miss (or an action left to the slow path) runs the pipeline (`Tables`), sends its
//!    outputs (Geneve to a chassis whose MAC `userneigh` knows; else the ARP request goes out
//!    and the frame is dropped, counted) and installs its megaflow, with the next hop cached
//!    when known, so the next frames of the flow take step 3.
//!
//! Per poll thread: a hit takes no lock (an established connection is answered by the
//! thread's connection cache, within its epoch); the cache's generations are shared with the
//! thread applying pipelines. The neighbour table is shared by the threads (an ARP reply lands on one
//! queue), under a lock taken only for ARP frames and misses. The buffers are allocated once;
//! a miss may allocate (the pipeline's outputs).

use crate::flowcache::FlowCache;
use crate::flowexec::{execute, Frame, Verdict};
use crate::pipeline::{emit_encap, EncapParams, Output, Tables};
use crate::userct::{self, ConnTable, CtCache};
use crate::userneigh::UnderlayNeigh;
use geneflow_abi::{act, ct, ctr, flag, mask_list};
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

pub struct UserPath {
    pub cache: FlowCache,
    pub neigh: Arc<Mutex<UnderlayNeigh>>,
    pub conntrack: Arc<ConnTable>,
    pub ct_cache: CtCache,
    /// Per port slot (the caller's numbering), what the frames received there came to.
    pub counters: Vec<Counters>,
    /// The port slot of the frame being handled.
    slot: usize,
    uplink_ifindex: u32,
    uplink_mac: [u8; 6],
    udp_csum: bool,
    scratch: Vec<u8>,
    encap_buf: Vec<u8>,
    txbuf: Vec<u8>,
    outputs: Vec<Output>,
}

impl UserPath {
    /// `ports`: how many port slots the caller numbers its ports with.
    pub fn new(
        cache: FlowCache,
        (neigh, conntrack): (Arc<Mutex<UnderlayNeigh>>, Arc<ConnTable>),
        ports: usize,
        (uplink_ifindex, uplink_mac): (u32, [u8; 6]),
        udp_csum: bool,
    ) -> UserPath {
        UserPath {
            cache,
            neigh,
            conntrack,
            ct_cache: CtCache::default(),
            counters: vec![Counters::default(); ports.max(1)],
            slot: 0,
            uplink_ifindex,
            uplink_mac,
            udp_csum,
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
        let list = if uplink {
            mask_list::UPLINK
        } else {
            mask_list::VM
        } as usize;
        let (mut key, inner) = match tables.fast_key(frame, in_ifindex) {
            Err(reason) => {
                self.count(reason.counter());
                return;
            }
            Ok(None) => return self.slow(tables, frame, (in_ifindex, 0), list, now, tx),
            Ok(Some(k)) => k,
        };
        let zone = tables.ct_zone(in_ifindex, &key);
        let now_ns = self.conntrack.ns(now);
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
            return self.slow(tables, frame, (in_ifindex, key.ct_state), list, now, tx);
        };
        let end = HEADROOM + frame.len();
        self.scratch[HEADROOM..end].copy_from_slice(frame);
        let mut f = Frame {
            buf: &mut self.scratch,
            start: HEADROOM,
            end,
        };
        let mut committed = 0;
        let t = &*self.conntrack;
        let verdict = execute(&mut f, &key, inner, &a, &mut || {
            committed += userct::commit(t, &key, &a, now_ns);
        });
        if committed > 0 {
            if let Some(x) = self.counters.get_mut(self.slot) {
                x.add(ctr::CT_COMMITTED, committed);
            }
        }
        match verdict {
            Verdict::Output { ifindex, .. } => {
                let (s, e) = (f.start, f.end);
                self.count(ctr::FAST_HIT);
                if !tx.send(ifindex, &self.scratch[s..e]) {
                    self.count(ctr::DROP_TX_FULL);
                }
            }
            Verdict::Drop(c) => {
                self.count(ctr::FAST_HIT);
                self.count(c);
            }
            // No kernel stack behind a DPDK port: what XDP would pass is dropped, counted.
            Verdict::Pass => self.count(ctr::PASS),
            Verdict::SlowPath => {
                self.slow(tables, frame, (in_ifindex, key.ct_state), list, now, tx)
            }
        }
    }

    /// The pipeline's verdict on a frame the cache could not settle: outputs sent, the
    /// megaflow installed.
    /// `ct_state`: the frame's connection state, as found before the cache.
    fn slow(
        &mut self,
        tables: &Tables,
        frame: &[u8],
        (in_ifindex, ct_state): (u32, u8),
        list: usize,
        now: Instant,
        tx: &mut dyn Tx,
    ) {
        self.count(ctr::SLOW_RX);
        let mut outputs = std::mem::take(&mut self.outputs);
        let mut txbuf = std::mem::take(&mut self.txbuf);
        let meta = (ct_state, 0);
        match tables.process_dropping(frame, in_ifindex, meta, &mut outputs, &mut txbuf) {
            Err(dropped) => {
                self.count(dropped.reason.counter());
                if let Some(m) = dropped.megaflow {
                    self.install(list, m);
                }
            }
            Ok(d) => {
                // A new connection an ACL allowed: committed for this first packet (the
                // megaflow's action commits the next connections that match it).
                let now_ns = self.conntrack.ns(now);
                for k in d.ct_commit_keys() {
                    self.conntrack.commit(&k, now_ns);
                    self.count(ctr::CT_COMMITTED);
                }
                let payload = if d.rewritten {
                    &txbuf[..]
                } else {
                    &frame[d.payload_offset..]
                };
                for o in &outputs {
                    self.output(tables, o, payload, d.flow_hash, now, tx);
                }
                if let Some(mut m) = d.megaflow {
                    if m.action.kind == act::ENCAP {
                        let dst = std::net::Ipv4Addr::from(m.action.encap_dst.to_ne_bytes());
                        let mac = self
                            .neigh
                            .lock()
                            .ok()
                            .and_then(|mut n| n.resolve(dst, now).mac);
                        if let Some(mac) = mac {
                            m.action.nh_dmac = mac;
                            m.action.nh_smac = self.uplink_mac;
                            m.action.flags |= flag::NH_CACHED;
                        }
                    }
                    self.install(list, m);
                }
            }
        }
        self.outputs = outputs;
        self.txbuf = txbuf;
    }

    fn install(&mut self, list: usize, m: crate::pipeline::Megaflow) {
        match self.cache.install_megaflow(list, &m) {
            Ok(()) => self.count(ctr::FLOW_INSTALL),
            Err(_) => self.count(ctr::FLOW_INSTALL_FAIL),
        }
    }

    fn output(
        &mut self,
        tables: &Tables,
        o: &Output,
        payload: &[u8],
        flow_hash: u32,
        now: Instant,
        tx: &mut dyn Tx,
    ) {
        match *o {
            Output::Local { ifindex } => self.send(tx, ifindex, payload),
            // Provider networks need their VLAN handling here first: not yet.
            Output::Provider { .. } => self.count(ctr::DROP_UNKNOWN_PORT),
            Output::Tunnel { remote, vni, meta } => {
                let Some(src_ip) = tables.encap_ip() else {
                    self.count(ctr::DROP_NO_NEIGH);
                    return;
                };
                let Some(r) = self.neigh.lock().ok().map(|mut n| n.resolve(remote, now)) else {
                    return;
                };
                if let Some(req) = r.request {
                    let up = self.uplink_ifindex;
                    self.send(tx, up, &req);
                }
                let Some(dst_mac) = r.mac else {
                    self.count(ctr::DROP_NO_NEIGH);
                    return;
                };
                let p = EncapParams {
                    src_mac: self.uplink_mac,
                    dst_mac,
                    src_ip,
                    dst_ip: remote,
                    sport: EncapParams::sport_for(flow_hash),
                    vni,
                    meta,
                    udp_csum: self.udp_csum,
                };
                let mut buf = std::mem::take(&mut self.encap_buf);
                match emit_encap(&mut buf, payload, &p) {
                    Some(len) => {
                        let up = self.uplink_ifindex;
                        self.send(tx, up, &buf[..len]);
                    }
                    None => self.count(ctr::DROP_TOO_BIG),
                }
                self.encap_buf = buf;
            }
        }
    }
}
