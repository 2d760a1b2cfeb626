//! The DPDK datapath's calling thread, between the control thread and the poll threads: it
//! binds each pipeline to the ports (compiled tables published whole with arc-swap, new
//! generations for the datapaths that changed), learns the provider neighbours the poll
//! threads report (`PathEvent`, kept only if asked for, see `arpasked`), ends the
//! connections of the zones whose security groups changed, expires idle connections and
//! translations, and announces the floating IPs newly bound here (a poll thread sends).

use super::serve::DpdkConfig;
use crate::arpasked::ArpAsked;
use crate::flowcache::GenerationTable;
use crate::garp::FipAnnouncer;
use crate::metrics::{PortInfo, Shared};
use crate::napt::NatStore;
use crate::pipeline::Tables;
use crate::userct::ConnTable;
use crate::usernat::NatMap;
use crate::userneigh::UnderlayNeigh;
use crate::userpath::PathEvent;
use arc_swap::ArcSwapOption;
use crossbeam_channel::Sender;
use geneflow_control::agent::PipelineUpdate;
use geneflow_control::compiler::{changed_acl_zones, AclsByZone};
use geneflow_control::model::Mac;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tracing::{info, warn};

/// The DPDK ports as the calling thread knows them, by port slot.
pub struct PortSet {
    /// Port names (kernel interfaces, or names `--dpdk-devargs` gives a device): the uplink
    /// first, then the VM ports, then the providers'.
    pub ifaces: Vec<String>,
    pub ifindexes: Vec<u32>,
    /// Provider networks: physnet -> ifindex.
    pub physnets: HashMap<String, u32>,
    /// Provider interfaces whose driver hides VLAN tags (no VLAN network on them).
    pub untagged_only: Vec<u32>,
}

impl PortSet {
    pub fn kind(&self, slot: usize) -> &'static str {
        if slot == 0 {
            "uplink"
        } else if self.physnets.values().any(|&ix| ix == self.ifindexes[slot]) {
            "provider"
        } else {
            "vm"
        }
    }

    fn infos(&self, binding: &dyn Fn(&str) -> Option<String>) -> Vec<PortInfo> {
        self.ifaces
            .iter()
            .enumerate()
            .map(|(i, name)| PortInfo {
                iface: name.clone(),
                ifindex: self.ifindexes[i],
                slot: i as u32,
                kind: self.kind(i),
                port: binding(name),
            })
            .collect()
    }
}

pub struct Control<'a> {
    pub cfg: &'a DpdkConfig,
    pub ports: &'a PortSet,
    pub tables: &'a ArcSwapOption<Tables>,
    pub generations: GenerationTable,
    pub neigh: &'a Mutex<UnderlayNeigh>,
    pub conntrack: &'a ConnTable,
    pub nat: &'a NatMap,
    /// The version of the tables last published (`Tables::version`).
    pub published: &'a AtomicU64,
    pub shared: &'a Shared,
    pub uplink_mac: [u8; 6],
    pub mtu: u32,
    pub acls: AclsByZone,
    pub arp_asked: ArpAsked,
    /// Expiry rounds so far (default-SNAT translations expire every tenth).
    pub rounds: u64,
    pub announcer: FipAnnouncer,
    /// Gratuitous ARPs for a poll thread to send; one it cannot send comes back as
    /// `PathEvent::Unsent`.
    pub inject: Sender<crate::garp::Garp>,
}

impl Control<'_> {
    pub fn publish_ports(&self, binding: &dyn Fn(&str) -> Option<String>) {
        if let Ok(mut g) = self.shared.ports.lock() {
            *g = self.ports.infos(binding);
        }
    }

    /// Publishes `t`, then new generations for the datapaths whose fingerprints moved: in
    /// that order, so that a poll thread never stamps a decision of the old tables with a
    /// new generation (`FlowCache::install_megaflow_if`). If the generations cannot be set,
    /// every entry goes stale.
    fn publish(&mut self, mut t: Tables) -> Result<usize, String> {
        let fps = t.fingerprints(self.uplink_mac);
        let version = self.published.load(Ordering::Relaxed) + 1;
        t.version = version;
        self.tables.store(Some(Arc::new(t)));
        self.published.store(version, Ordering::Release);
        if let Err(e) = self.generations.set_generations(&fps) {
            let _ = self.generations.invalidate_all();
            return Err(e.to_string());
        }
        Ok(fps.len())
    }

    pub fn apply(&mut self, mut u: PipelineUpdate) {
        u.pipeline = u.pipeline.with_encap_ip(self.cfg.encap_ip);
        let p = &self.ports;
        let learned = self
            .tables
            .load()
            .as_ref()
            .map(|t| t.ext_neigh().clone())
            .unwrap_or_default();
        let t = Tables::new(
            u.pipeline.clone(),
            p.ifindexes[0],
            self.mtu,
            self.cfg.udp_csum,
            |n| p.ifaces.iter().position(|k| k == n).map(|i| p.ifindexes[i]),
        )
        .with_providers(&p.physnets, &p.untagged_only)
        .with_ext_neigh(learned);
        let datapaths = match self.publish(t) {
            Ok(n) => n,
            Err(e) => {
                warn!("pipeline not applied: {e}");
                return;
            }
        };
        match u.pipeline.encap_ip {
            Some(ip) => {
                if let Ok(mut n) = self.neigh.lock() {
                    if n.ip() != ip {
                        *n = UnderlayNeigh::new(ip, Mac(self.uplink_mac));
                    }
                    n.set_allowed(u.pipeline.peer_ips.iter().copied());
                }
            }
            None => warn!("no tunnel address for this chassis in the NB yet"),
        }
        // The connections of zones whose security groups changed are checked again.
        let acls = u.pipeline.acls_by_zone();
        let zones = changed_acl_zones(&self.acls, &acls);
        self.acls = acls;
        if !zones.is_empty() {
            let n = self.conntrack.delete(|k, _| zones.contains(&k.zone));
            self.shared.ended_by_group_change(&zones, n);
        }
        // Floating IPs newly bound here are announced on their provider networks.
        self.send_garps();
        self.publish_ports(&|n| u.pipeline.bindings.get(n).map(|b| b.port.clone()));
        self.shared
            .pipelines_applied
            .fetch_add(1, Ordering::Relaxed);
        info!(datapaths, "pipeline applied");
    }

    /// Hands the gratuitous ARPs due (see `garp`) to a poll thread; one that finds the
    /// queue full is owed and handed over again on the next expiry round.
    fn send_garps(&mut self) {
        let Some(t) = self.tables.load_full() else {
            return;
        };
        for g in self.announcer.due(&t) {
            let ip = g.ip;
            match self.inject.try_send(g) {
                Ok(()) => info!(floating_ip = %ip, "gratuitous ARP sent"),
                Err(e) => self.announcer.unsent(&e.into_inner()),
            }
        }
    }

    /// What a poll thread reported.
    pub fn event(&mut self, ev: PathEvent) {
        let now = Instant::now();
        match ev {
            PathEvent::Asked(ip) => self.arp_asked.asking(ip, now),
            PathEvent::Unsent(g) => {
                tracing::debug!(floating_ip = %g.ip, "gratuitous ARP not sent; again in a second");
                self.announcer.unsent(&g);
            }
            PathEvent::Learn(l) => {
                let Some(asked) = self.arp_asked.admit(&l, now) else {
                    return;
                };
                let Some(cur) = self.tables.load_full() else {
                    return;
                };
                let mut t = (*cur).clone();
                if !t.learn(l.dp, l.ip, l.mac, asked) {
                    return;
                }
                // Routed entries to a provider network carry their next hop's MAC.
                match self.publish(t) {
                    Ok(_) => {
                        info!(ip = %l.ip, "a provider neighbour changed; datapaths regenerated")
                    }
                    Err(e) => warn!("provider neighbour not applied: {e}"),
                }
            }
        }
    }

    /// Ends the epoch of the poll threads' connection caches (their established tuples are
    /// refreshed in the table once per epoch) and deletes the idle connections; publishes
    /// the table's gauges. Every tenth round (10 s, as the XDP backend), the idle
    /// default-SNAT translations go too.
    pub fn expire(&mut self) {
        if self.announcer.owed() {
            self.send_garps();
        }
        let ct = self.conntrack;
        ct.bump_epoch();
        let now = ct.ns(Instant::now());
        self.rounds += 1;
        if self.rounds.is_multiple_of(10) {
            // The walk works on a copy: the writers' lock is held to copy it and to delete,
            // not while deciding (new translations wait for it; lookups never do).
            let all: crate::napt::NatSnapshot =
                self.nat.writer().nat_entries().into_iter().collect();
            let doomed = crate::napt::doomed(&all, now);
            if !doomed.is_empty() && crate::napt::remove(&mut self.nat.writer(), &all, doomed) > 0 {
                // The poll threads' cached translations are read again.
                ct.bump_epoch();
            }
        }
        let (gone, left) = ct.expire(now);
        if gone > 0 {
            tracing::debug!(expired = gone, "conntrack entries expired");
        }
        let shared = self.shared;
        shared.conntrack.store(left as u64, Ordering::Relaxed);
        shared
            .conntrack_evicted
            .store(ct.evicted.load(Ordering::Relaxed), Ordering::Relaxed);
        if left >= ct.capacity() * 95 / 100 {
            shared.conntrack_full.fetch_add(1, Ordering::Relaxed);
            warn!(
                entries = left,
                capacity = ct.capacity(),
                "conntrack table full: the least recently seen connections are evicted"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flowcache::Generations;
    use geneflow_control::compiler::Pipeline;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    /// `--encap-ip` stands in for the NB's tunnel address in the tables the poll threads
    /// read (megaflows, the slow path's encapsulation, which ARP is answered) and in the
    /// neighbour table, as on an XDP chassis.
    #[test]
    fn the_configured_tunnel_address_overrides_the_nbs() {
        let ours: Ipv4Addr = "198.18.0.7".parse().unwrap();
        let mac = [2, 0, 0, 0, 0, 1];
        let cfg = DpdkConfig {
            eal: vec![],
            uplink: "up".into(),
            ports: vec![],
            devargs: vec![],
            encap_ip: Some(ours),
            udp_csum: true,
            cores: vec![],
            providers: vec![],
            dhcp_rate: 20,
            max_sleep: Duration::ZERO,
        };
        let ports = PortSet {
            ifaces: vec!["up".into()],
            ifindexes: vec![1],
            physnets: HashMap::new(),
            untagged_only: vec![],
        };
        let tables = ArcSwapOption::empty();
        let neigh = Mutex::new(UnderlayNeigh::new(ours, Mac(mac)));
        let (conntrack, nat) = (ConnTable::new(16), NatMap::new(16));
        let published = AtomicU64::new(0);
        let shared = Shared::new("ch", crate::metrics::heap_counters());
        let (inject, _sent) = crossbeam_channel::bounded(1);
        let mut c = Control {
            cfg: &cfg,
            ports: &ports,
            tables: &tables,
            generations: GenerationTable::new(Arc::new(Generations::default())),
            neigh: &neigh,
            conntrack: &conntrack,
            nat: &nat,
            published: &published,
            shared: &shared,
            uplink_mac: mac,
            mtu: 1500,
            acls: Default::default(),
            arp_asked: Default::default(),
            rounds: 0,
            announcer: Default::default(),
            inject,
        };
        let nb = Pipeline {
            chassis: "ch".into(),
            encap_ip: Some("198.18.0.9".parse().unwrap()),
            ..Default::default()
        };
        c.apply(PipelineUpdate {
            pipeline: Arc::new(nb),
            noticed: Instant::now(),
            compile_time: Duration::ZERO,
        });
        let t = tables.load_full().expect("tables published");
        assert_eq!(t.encap_ip(), Some(ours));
        assert_eq!(neigh.lock().unwrap().ip(), ours);
    }
}
