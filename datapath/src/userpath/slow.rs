//! The engine's slow path: the pipeline's verdict on a frame the cache could not settle, in
//! the order the XDP backend's forwarder keeps (`forwarder::forward`): what it learnt, the
//! connections it commits, its answer (rate limited), its outputs, its megaflow.

use super::{PathEvent, Tx, UserPath};
use crate::flowcache::CacheError;
use crate::napt;
use crate::pipeline::rewrite::push_vlan;
use crate::pipeline::{emit_encap, AnswerKind, EncapParams, Megaflow, Napt, Output, Tables};
use geneflow_abi::{act, ctr, flag};
use std::sync::atomic::Ordering;
use std::time::Instant;

impl UserPath {
    /// `ct_state`: the frame's connection state, as found before the cache; `vlan`: the VLAN
    /// a provider frame came on (its tag popped).
    pub(super) fn slow(
        &mut self,
        tables: &Tables,
        frame: &[u8],
        (in_ifindex, ct_state, vlan): (u32, u8, u16),
        list: usize,
        now: Instant,
        tx: &mut dyn Tx,
    ) {
        self.count(ctr::SLOW_RX);
        let mut outputs = std::mem::take(&mut self.outputs);
        let mut txbuf = std::mem::take(&mut self.txbuf);
        let meta = (ct_state, vlan);
        match tables.process_dropping(frame, in_ifindex, meta, &mut outputs, &mut txbuf) {
            Err(dropped) => {
                self.count(dropped.reason.counter());
                if let Some(m) = dropped.megaflow {
                    // A VM forging a new tuple on every frame must not fill the cache with
                    // drop entries: as many per port as the XDP backend allows.
                    if self.drop_installs.allow_key(in_ifindex, now) {
                        self.install(list, m, tables.version);
                    }
                }
            }
            Ok(mut d) => 'd: {
                if let (Some(l), Some(ev)) = (d.learn, &self.events) {
                    // The tables' owner decides; a full queue loses a lesson, not a frame.
                    let _ = ev.try_send(PathEvent::Learn(l));
                }
                let now_ns = self.conntrack.ns(now);
                match d.napt {
                    Some(Napt::Out {
                        external,
                        ifindex,
                        smac,
                        dmac,
                    }) => {
                        if !self.nat_allocs.allow_key(ifindex, now) {
                            self.count(ctr::DROP_RATE_LIMIT);
                            break 'd;
                        }
                        let mut t = self.nat.writer();
                        let back = (ifindex, 0, smac, dmac);
                        if !napt::out(&mut t, frame, &mut txbuf, external, back, now_ns) {
                            drop(t);
                            self.count(ctr::DROP_NO_NAT);
                            break 'd;
                        }
                    }
                    Some(Napt::In) => {
                        let mut t = self.nat.writer();
                        let back = napt::back(&mut t, frame, &mut txbuf, now_ns);
                        drop(t);
                        match back {
                            Some(ix) => {
                                outputs.push(Output::Local { ifindex: ix });
                                d.rewritten = true;
                            }
                            None => self.count(ctr::DROP_NO_NAT),
                        }
                    }
                    None => {}
                }
                // A new connection an ACL allowed: committed for this first packet (the
                // megaflow's action commits the next connections that match it).
                for k in d.ct_commit_keys() {
                    self.conntrack.commit(&k, now_ns);
                    self.count(ctr::CT_COMMITTED);
                }
                if let Some(a) = d.answer {
                    let admitted = self.answers.admit(&a, in_ifindex, now);
                    let (Ok(counted) | Err(counted)) = admitted;
                    for c in counted.iter() {
                        self.count(c);
                    }
                    if admitted.is_err() {
                        break 'd;
                    }
                    if let (AnswerKind::ArpRequest, Some(ev)) = (a.kind, &self.events) {
                        let _ = ev.try_send(PathEvent::Asked(a.source));
                    }
                }
                let payload = d.payload(frame, &txbuf);
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
                    self.install(list, m, tables.version);
                }
            }
        }
        self.outputs = outputs;
        self.txbuf = txbuf;
    }

    /// Installs `m`, decided on the tables of `version`, unless they were replaced since.
    fn install(&mut self, list: usize, m: Megaflow, version: u64) {
        let published = &self.published;
        let current = || published.load(Ordering::Acquire) == version;
        match self.cache.install_megaflow_if(list, &m, current) {
            Ok(()) => self.count(ctr::FLOW_INSTALL),
            // The next frame meets the new tables.
            Err(CacheError::Superseded) => {}
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
            Output::Local { ifindex } | Output::Provider { ifindex, vlan: 0 } => {
                self.send(tx, ifindex, payload)
            }
            Output::Provider { ifindex, vlan } => {
                let mut buf = std::mem::take(&mut self.encap_buf);
                match push_vlan(&mut buf, payload, vlan) {
                    Some(len) => self.send(tx, ifindex, &buf[..len]),
                    None => self.count(ctr::DROP_TOO_BIG),
                }
                self.encap_buf = buf;
            }
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
                let p = EncapParams {
                    src_mac: self.uplink_mac,
                    dst_mac: r.mac.unwrap_or_default(),
                    src_ip,
                    dst_ip: remote,
                    sport: EncapParams::sport_for(flow_hash),
                    vni,
                    meta,
                    udp_csum: self.udp_csum,
                };
                if r.mac.is_none() {
                    // The next hop is being resolved: the frame waits for it (bounded).
                    let Some(mut slot) = self.pending.park(remote) else {
                        self.count(ctr::DROP_NO_NEIGH);
                        return;
                    };
                    match emit_encap(slot.buf(), payload, &p) {
                        Some(len) => slot.commit(len, self.slot as u32, now),
                        None => self.count(ctr::DROP_TOO_BIG),
                    }
                    return;
                }
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

    /// Whether frames wait for a next hop (the poll loop reads no clock otherwise).
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Sends the parked frames whose next hop is now known (see `pending`); those that
    /// waited too long are dropped, counted on the port they came in on.
    pub fn flush_pending(&mut self, now: Instant, tx: &mut dyn Tx) {
        if !self.has_pending() {
            return;
        }
        let up = self.uplink_ifindex;
        let neigh = self.neigh.lock().ok();
        let mut expired = Vec::new();
        self.pending.flush(
            now,
            |ip| neigh.as_ref().and_then(|n| n.get(ip)),
            |bytes, _| tx.send(up, bytes),
            |in_slot| expired.push(in_slot),
        );
        drop(neigh);
        for slot in expired {
            if let Some(x) = self.counters.get_mut(slot as usize) {
                x.add(ctr::DROP_NO_NEIGH, 1);
            }
        }
    }
}
