//! One frame through the slow path: run the pipeline, count, transmit its outputs (encap in
//! userspace where needed) and install the megaflow, or the drop megaflow, that repeats the
//! verdict in XDP.

use super::*;
use crate::pipeline::Napt;

/// CLOCK_MONOTONIC_COARSE in ns: the clock of the XDP program's `bpf_ktime_get_coarse_ns`.
pub(super) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into a live local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The Geneve header of a frame to a remote chassis: (local, remote) encap IPs, (our,
/// next hop's) MACs, (VNI, OVN metadata).
pub(super) fn tunnel_params(
    (src_ip, dst_ip): (std::net::Ipv4Addr, std::net::Ipv4Addr),
    (src_mac, dst_mac): ([u8; 6], [u8; 6]),
    (vni, meta): (u32, crate::wire::geneve::OvnMetadata),
    flow_hash: u32,
    udp_csum: bool,
) -> EncapParams {
    EncapParams {
        src_mac,
        dst_mac,
        src_ip,
        dst_ip,
        sport: EncapParams::sport_for(flow_hash),
        vni,
        meta,
        udp_csum,
    }
}

/// What output `o` puts on the wire: (interface index, bytes), built in `buf` where it takes
/// a header (a VLAN tag; Geneve with `tunnel`, which a tunnel output must have); or the
/// reason it is dropped.
pub(super) fn wire<'a>(
    o: &Output,
    payload: &'a [u8],
    buf: &'a mut [u8],
    tunnel: Option<EncapParams>,
    uplink_ifindex: u32,
) -> Result<(u32, &'a [u8]), u32> {
    match *o {
        Output::Local { ifindex } | Output::Provider { ifindex, vlan: 0 } => Ok((ifindex, payload)),
        Output::Provider { ifindex, vlan } => {
            crate::pipeline::rewrite::push_vlan(buf, payload, vlan)
                .map(|len| (ifindex, &buf[..len]))
                .ok_or(ctr::DROP_TOO_BIG)
        }
        Output::Tunnel { .. } => {
            let p = tunnel.ok_or(ctr::DROP_NO_NEIGH)?;
            emit_encap(buf, payload, &p)
                .map(|len| (uplink_ifindex, &buf[..len]))
                .ok_or(ctr::DROP_TOO_BIG)
        }
    }
}

/// Counts a frame sent (`ok`) on, or refused by, the port in `slot`.
pub(super) fn count_sent(shared: &Shared, slot: u32, len: usize, ok: bool) {
    if ok {
        shared.count(slot, ctr::SLOW_TX, 1);
        shared.count(slot, ctr::TX_PACKETS, 1);
        shared.count(slot, ctr::TX_BYTES, len as u64);
    } else {
        shared.count(slot, ctr::DROP_TX_FULL, 1);
    }
}

/// Completes megaflow `m` with what the thread that installs it knows: the next hop's MAC of
/// an encap entry (from `neigh`; without it XDP looks the next hop up itself), the output
/// port's slot.
pub(super) fn complete(
    m: &mut Megaflow,
    neigh: impl Fn(std::net::Ipv4Addr) -> Option<[u8; 6]>,
    uplink_mac: [u8; 6],
    out_slot: u32,
) {
    if m.action.kind == geneflow_abi::act::ENCAP {
        if let Some(mac) = neigh(std::net::Ipv4Addr::from(m.action.encap_dst.to_ne_bytes())) {
            m.action.nh_dmac = mac;
            m.action.nh_smac = uplink_mac;
            m.action.flags |= geneflow_abi::flag::NH_CACHED;
        }
    }
    m.action.out_slot = out_slot;
}

impl Forwarder {
    /// Installs megaflow `m`, decided here or by another slow-path thread, with what only
    /// this thread knows: the next hop's MAC of an encap entry, the output port's slot.
    pub(super) fn install_decided(
        &mut self,
        mut m: Megaflow,
        in_ifindex: u32,
        in_slot: u32,
        arrived: Option<Instant>,
    ) {
        let out_slot = self
            .by_ifindex
            .get(&m.action.out_ifindex)
            .map(|&j| self.ports[j].slot)
            .unwrap_or(UPLINK_SLOT);
        complete(&mut m, |ip| self.neigh.get(ip), self.uplink_mac, out_slot);
        Self::install(
            &mut self.bpf,
            &self.shared,
            &m,
            in_ifindex,
            self.uplink_ifindex,
            in_slot,
            arrived,
        );
    }

    pub(super) fn forward(
        &mut self,
        k: usize,
        in_ifindex: u32,
        in_slot: u32,
        arrived: std::time::Instant,
    ) -> bool {
        let Forwarder {
            tables,
            ports,
            by_ifindex,
            bpf,
            neigh,
            shared,
            outputs,
            rxbuf,
            rxlen,
            rxct,
            encap_buf,
            txbuf,
            answers,
            nat_allocs,
            arp_asked,
            drop_installs,
            uplink_ifindex,
            uplink_mac,
            cfg,
            pipeline,
            ready,
            pending,
            ..
        } = self;
        let frame = &rxbuf[k * STRIDE..k * STRIDE + rxlen[k]];
        shared.count(in_slot, ctr::SLOW_RX, 1);
        let Some(meta) = rxct[k] else {
            shared.count(in_slot, ctr::DROP_MALFORMED, 1);
            return false;
        };
        let d = match tables.process_dropping(frame, in_ifindex, meta, outputs, txbuf) {
            Ok(d) => d,
            Err(dropped) => {
                shared.count(in_slot, dropped.reason.counter(), 1);
                // A drop entry repeats the verdict in XDP for the frames that follow.
                if let (true, Some(m)) = (*ready, dropped.megaflow) {
                    if drop_installs.allow_key(in_ifindex, arrived) {
                        Self::install(bpf, shared, &m, in_ifindex, *uplink_ifindex, in_slot, None);
                    }
                }
                return false;
            }
        };
        // ARP seen on a provider network: its sender is a neighbour there.
        // A reply is kept only if this chassis asked that host (within 5 s).
        let learned = d.learn.is_some_and(|l| {
            arp_asked.admit(&l, arrived).is_some_and(|asked| {
                tables.learns(l.dp, l.ip, l.mac, asked)
                    && Arc::make_mut(tables).learn(l.dp, l.ip, l.mac, asked)
            })
        });
        let mut d = d;
        match d.napt {
            Some(Napt::Out {
                external,
                ifindex,
                smac,
                dmac,
            }) => {
                if !nat_allocs.allow_key(ifindex, arrived) {
                    shared.count(in_slot, ctr::DROP_RATE_LIMIT, 1);
                    return learned;
                }
                let slot = by_ifindex
                    .get(&ifindex)
                    .map(|&j| ports[j].slot)
                    .unwrap_or(0);
                let back = (ifindex, slot, smac, dmac);
                if !crate::napt::out(bpf, frame, txbuf, external, back, monotonic_ns()) {
                    shared.count(in_slot, ctr::DROP_NO_NAT, 1);
                    return learned;
                }
            }
            Some(Napt::In) => match crate::napt::back(bpf, frame, txbuf, monotonic_ns()) {
                Some(ix) => {
                    outputs.push(Output::Local { ifindex: ix });
                    d.rewritten = true;
                }
                None => shared.count(in_slot, ctr::DROP_NO_NAT, 1),
            },
            None => {}
        }
        // A new connection an ACL allowed: commit it here for this first packet (the
        // megaflow's action commits the next connections that match it).
        for key in d.ct_commit_keys() {
            match bpf.ct_commit(&key, monotonic_ns()) {
                Ok(()) => shared.count(in_slot, ctr::CT_COMMITTED, 1),
                Err(e) => tracing::debug!("conntrack commit failed: {e}"),
            }
        }
        if let Some(a) = d.answer {
            let admitted = answers.admit(&a, in_ifindex, arrived);
            let (Ok(counted) | Err(counted)) = admitted;
            for c in counted.iter() {
                shared.count(in_slot, c, 1);
            }
            if admitted.is_err() {
                return learned;
            }
            if a.kind == AnswerKind::ArpRequest {
                // The request goes out: its answer will be welcome.
                arp_asked.asking(a.source, arrived);
            }
        }
        let payload = d.payload(frame, txbuf);
        for o in outputs.iter() {
            let params = match *o {
                Output::Tunnel { remote, vni, meta } => {
                    let Some(src_ip) = pipeline.encap_ip else {
                        shared.count(in_slot, ctr::DROP_NO_NEIGH, 1);
                        continue;
                    };
                    let dst_mac = neigh.resolve(remote);
                    let p = tunnel_params(
                        (src_ip, remote),
                        (*uplink_mac, dst_mac.unwrap_or_default()),
                        (vni, meta),
                        d.flow_hash,
                        cfg.udp_csum,
                    );
                    if dst_mac.is_none() {
                        // The next hop is being resolved: the frame waits for it (bounded).
                        let Some(mut slot) = pending.park(remote) else {
                            shared.count(in_slot, ctr::DROP_NO_NEIGH, 1);
                            continue;
                        };
                        match emit_encap(slot.buf(), payload, &p) {
                            Some(len) => slot.commit(len, in_slot, arrived),
                            None => shared.count(in_slot, ctr::DROP_TOO_BIG, 1),
                        }
                        continue;
                    }
                    Some(p)
                }
                _ => None,
            };
            let (target, bytes) = match wire(o, payload, encap_buf, params, *uplink_ifindex) {
                Ok(w) => w,
                Err(reason) => {
                    shared.count(in_slot, reason, 1);
                    continue;
                }
            };
            let Some(&j) = by_ifindex.get(&target) else {
                shared.count(in_slot, ctr::DROP_UNKNOWN_PORT, 1);
                continue;
            };
            let out = &mut ports[j];
            count_sent(shared, out.slot, bytes.len(), out.tx().send(bytes));
        }
        if let (true, Some(m)) = (*ready, d.megaflow) {
            self.install_decided(m, in_ifindex, in_slot, Some(arrived));
        }
        learned
    }

    /// Sends the parked frames whose next hop is now known (see `pending`).
    pub(super) fn flush_pending(&mut self) {
        let Some(&j) = self.by_ifindex.get(&self.uplink_ifindex) else {
            return;
        };
        let Forwarder {
            pending,
            ports,
            neigh,
            shared,
            ..
        } = self;
        let up = &mut ports[j];
        let slot = up.slot;
        pending.flush(
            Instant::now(),
            |ip| neigh.get(ip),
            |bytes, _| {
                let ok = up.tx().send(bytes);
                if ok {
                    count_sent(shared, slot, bytes.len(), true);
                }
                ok
            },
            |in_slot| shared.count(in_slot, ctr::DROP_NO_NEIGH, 1),
        );
    }

    /// Installs `m` for frames arriving on `in_ifindex`; `arrived` (the frame's arrival)
    /// records the flow-setup time.
    pub(super) fn install(
        bpf: &mut Bpf,
        shared: &Shared,
        m: &Megaflow,
        in_ifindex: u32,
        uplink_ifindex: u32,
        in_slot: u32,
        arrived: Option<std::time::Instant>,
    ) {
        match bpf.install(m, mask_list_of(in_ifindex, uplink_ifindex)) {
            Ok(Install::Installed) => installed(bpf, shared, in_slot, arrived),
            Ok(Install::AlreadyPresent) => {}
            Ok(Install::Refused) | Err(_) => shared.count(in_slot, ctr::FLOW_INSTALL_FAIL, 1),
        }
    }
}

/// The mask list (`mask_list::*`) of the megaflows for frames arriving on `in_ifindex`.
pub(super) fn mask_list_of(in_ifindex: u32, uplink_ifindex: u32) -> u32 {
    if in_ifindex == uplink_ifindex {
        geneflow_abi::mask_list::UPLINK
    } else {
        geneflow_abi::mask_list::VM
    }
}

/// Counts a megaflow that went into the table (by this thread, or by another one and now in
/// the mirror): the install, the table's gauges, the flow-setup time from `arrived` (the
/// first frame's arrival; none for a drop entry).
pub(super) fn installed(bpf: &Bpf, shared: &Shared, in_slot: u32, arrived: Option<Instant>) {
    shared.count(in_slot, ctr::FLOW_INSTALL, 1);
    shared
        .megaflows
        .store(bpf.megaflow_count() as u64, Ordering::Relaxed);
    shared
        .masks
        .store(bpf.mask_count() as u64, Ordering::Relaxed);
    if let Some(t) = arrived {
        shared
            .last_flow_setup_ns
            .store(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}
