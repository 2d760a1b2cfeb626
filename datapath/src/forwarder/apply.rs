//! Applying a pipeline snapshot: attach and detach ports, bind the tables, new generations
//! for the datapaths whose fingerprint moved, the accepted underlay sources, and, once, the
//! adoption of a previous process's fast path.

use super::*;

impl Forwarder {
    /// Conntrack on or off, and each VM port's zone, as the pipeline's security groups want.
    pub(super) fn sync_conntrack(&mut self) {
        if let Err(e) = self.bpf.set_ct_uplink(self.pipeline.has_acl()) {
            warn!("cannot switch conntrack on the uplink: {e}");
        }
        for i in 0..self.ports.len() {
            if self.ports[i].kind != port_kind::VM {
                continue;
            }
            let zone = self.ct_zone_of(&self.ports[i].iface.clone());
            let p = &self.ports[i];
            let conf = PortConf {
                slot: p.slot,
                kind: port_kind::VM,
                local_ip: 0,
                ct_zone: zone,
            };
            if let Err(e) = self.bpf.update_port(p.ifindex, conf) {
                warn!(iface = %p.iface, "cannot set the conntrack zone: {e}");
            }
        }
    }

    /// Brings attached ports in line with the pipeline's local bindings and rebinds tables.
    /// Returns whether an interface was attached or detached.
    pub(super) fn reconcile(&mut self) -> bool {
        let before: Vec<u32> = self.ports.iter().map(|p| p.ifindex).collect();
        let wanted: Vec<String> = self.pipeline.bindings.keys().cloned().collect();
        let mut i = 0;
        while i < self.ports.len() {
            let p = &self.ports[i];
            let gone = p.kind == port_kind::VM
                && (!wanted.contains(&p.iface) || netdev::ifindex(&p.iface) != Some(p.ifindex));
            if gone {
                self.detach_at(i);
            } else {
                i += 1;
            }
        }
        for iface in wanted {
            if self.ports.iter().any(|p| p.iface == iface) || netdev::ifindex(&iface).is_none() {
                continue;
            }
            if let Err(e) = self.attach_vm(&iface) {
                warn!(%iface, "cannot attach port: {e}");
            }
        }
        let attached: HashMap<String, u32> = self
            .ports
            .iter()
            .map(|p| (p.iface.clone(), p.ifindex))
            .collect();
        let learned = self.tables.ext_neigh().clone();
        self.tables = Arc::new(
            Tables::new(
                self.pipeline.clone(),
                self.uplink_ifindex,
                self.uplink_mtu,
                self.cfg.udp_csum,
                |n| attached.get(n).copied(),
            )
            .with_providers(&self.physnets, &self.untagged_only)
            .with_ext_neigh(learned),
        );
        self.rebuild_index();
        self.ports.iter().map(|p| p.ifindex).ne(before)
    }

    /// Floating IPs bound here: their tracked ports go into `FIP_CT` (XDP looks frames to
    /// them up in conntrack as the VM sees them), and those newly bound here are announced
    /// (`garp`).
    pub(super) fn announce_fips(&mut self) {
        let fip_ct = self
            .tables
            .fip_ct()
            .iter()
            .map(|(&ext, &(fixed, zone))| (ext, geneflow_abi::FipCt { fixed, zone }))
            .collect();
        if let Err(e) = self.bpf.set_fip_ct(&fip_ct) {
            warn!("cannot set the tracked floating IPs: {e}");
        }
        self.send_garps();
    }

    /// Sends the gratuitous ARPs due (see `garp`); one that finds its ring full is owed and
    /// sent again on the next tick.
    pub(super) fn send_garps(&mut self) {
        for g in self.announced.due(&self.tables) {
            let Some(&j) = self.by_ifindex.get(&g.ifindex) else {
                continue;
            };
            let p = &mut self.ports[j];
            if p.tx().send(&g.frame) {
                self.shared.count(p.slot, ctr::GARP_SENT, 1);
                self.shared.count(p.slot, ctr::TX_PACKETS, 1);
                self.shared
                    .count(p.slot, ctr::TX_BYTES, g.frame.len() as u64);
                info!(floating_ip = %g.ip, "gratuitous ARP sent");
            } else {
                self.shared.count(p.slot, ctr::DROP_TX_FULL, 1);
                self.announced.unsent(&g);
            }
        }
    }

    /// New generations for the datapaths whose fingerprint moved (see `Tables::fingerprints`).
    pub(super) fn regenerate(&mut self) -> Vec<u32> {
        let fps = self.tables.fingerprints(self.uplink_mac);
        match self.bpf.set_generations(&fps) {
            Ok(c) => c,
            Err(e) => {
                warn!("generation update failed: {e}");
                Vec::new()
            }
        }
    }

    pub(super) fn apply(&mut self, upd: PipelineUpdate) {
        let old_ip = self.pipeline.encap_ip;
        let old_external = self.pipeline.external_ip;
        let old_acls = self.pipeline.acls_by_zone();
        self.pipeline = upd.pipeline.with_encap_ip(self.cfg.encap_ip);
        if self.pipeline.encap_ip != old_ip {
            let ip = self
                .pipeline
                .encap_ip
                .map(|i| u32::from_ne_bytes(i.octets()))
                .unwrap_or(0);
            if let Err(e) = self.bpf.update_port(
                self.uplink_ifindex,
                PortConf {
                    slot: UPLINK_SLOT,
                    kind: port_kind::UPLINK,
                    local_ip: ip,
                    ct_zone: 0,
                },
            ) {
                warn!("cannot set uplink encap IP: {e}");
            }
        }
        self.reconcile();
        self.sync_conntrack();
        if self.pipeline.external_ip != old_external && old_external.is_some() {
            // The translations of the old address would take replies meant for whoever has
            // it now.
            let n = self.bpf.nat_flush();
            info!(
                flushed = n,
                "external address changed; default-SNAT translations flushed"
            );
        }
        match self.bpf.set_peers(&self.pipeline.peer_ips) {
            Ok(()) => self
                .shared
                .underlay_peers
                .store(self.pipeline.peer_ips.len() as u64, Ordering::Relaxed),
            Err(e) => warn!("cannot update the accepted underlay sources: {e}"),
        }
        let changed = self.regenerate();
        self.ct_flush_changed(&old_acls);
        self.announce_fips();
        // Follow the underlay next hops of the pipeline's remote chassis: resolution runs in
        // the background (netdev::Neighbours, over netlink).
        let remotes: Vec<std::net::Ipv4Addr> = self
            .pipeline
            .datapaths
            .values()
            .flat_map(|dp| dp.remote_chassis.iter().map(|(_, ip)| *ip))
            .collect();
        self.neigh.track(remotes.iter().copied());
        if !self.ready {
            // At start-up only (the previous program, if any, is still serving and this
            // process forwards nothing yet): give the first resolutions up to 200 ms so the
            // VMs' first floods are not dropped for want of a next hop. Later NB changes never
            // wait; a new remote chassis's first frames may then count drop_no_neighbour.
            let deadline = Instant::now() + Duration::from_millis(200);
            while !remotes.iter().all(|ip| self.neigh.get(*ip).is_some())
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            self.ready = true;
            // Adopted megaflows are checked against the next hops: look them up first (a few
            // netlink round trips, never an ARP wait).
            if self.adopted.megaflows > 0 && !self.neigh.sync(Duration::from_millis(50)) {
                warn!("underlay next hops not looked up in time; adopted megaflows may be dropped");
            }
            self.adopt_finish();
        }
        self.publish();
        self.shared
            .nb_version
            .store(self.pipeline.nb_version, Ordering::Relaxed);
        self.shared
            .pipelines_applied
            .fetch_add(1, Ordering::Relaxed);
        info!(
            nb_version = self.pipeline.nb_version,
            changed = ?changed,
            apply_us = upd.noticed.elapsed().as_micros() as u64,
            "pipeline applied"
        );
    }

    /// After the first pipeline is applied: swap this process's program into the links a
    /// previous process left (its program served the fast path until now), drop what that
    /// process left that this one does not serve (links and port entries of interfaces no
    /// longer bound here), and adopted encap megaflows whose cached next hop is no longer the
    /// underlay neighbour.
    pub(super) fn adopt_finish(&mut self) {
        let mut swapped = 0;
        for p in self.ports.iter_mut() {
            let Some(link) = p.link.take() else { continue };
            let pending = link.pending();
            match self.bpf.swap_in(p.ifindex, link) {
                Ok(l) => {
                    swapped += usize::from(pending);
                    p.link = Some(l);
                }
                Err(e) => warn!(iface = %p.iface, "cannot attach the program: {e}"),
            }
        }
        let keep: Vec<u32> = self.ports.iter().map(|p| p.ifindex).collect();
        let gone = self.bpf.forget_ports_except(&keep);
        if !gone.is_empty() {
            info!(ifindexes = ?gone, "removed the pinned state of interfaces no longer served");
        }
        if swapped > 0 {
            info!(
                links = swapped,
                "program swapped into the links of the previous process"
            );
        }
        if self.adopted.megaflows == 0 {
            return;
        }
        let (neigh, smac) = (&self.neigh, self.uplink_mac);
        let moved = self.bpf.retain(|a| {
            let dst = std::net::Ipv4Addr::from(a.encap_dst.to_ne_bytes());
            a.kind != geneflow_abi::act::ENCAP
                || a.flags & geneflow_abi::flag::NH_CACHED == 0
                || (a.nh_smac == smac && neigh.get(dst) == Some(a.nh_dmac))
        });
        info!(
            megaflows = self.adopted.megaflows,
            masks = self.adopted.masks,
            datapaths = self.adopted.datapaths,
            next_hop_moved = moved,
            "adopted the fast-path state of the previous process"
        );
    }
}
