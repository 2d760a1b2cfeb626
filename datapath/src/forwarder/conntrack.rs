//! Conntrack housekeeping: idle entries expire (per protocol, like Cilium's defaults: TCP 6 h,
//! UDP 60 s, others 30 s; a TCP connection that saw a FIN or RST 10 s after it), a
//! change of a zone's security groups ends the connections they allowed (their packets are
//! checked again as new), and `geneflowctl ct` lists and flushes.

use super::*;
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use geneflow_abi::{ct, CtEntry, CtKey, PortCounters};
use std::path::PathBuf;

impl Forwarder {
    /// Ends the connections of the zones whose security groups changed between `old` and the
    /// current pipeline. Returns how many entries went.
    pub(super) fn ct_flush_changed(
        &mut self,
        old: &geneflow_control::compiler::AclsByZone,
    ) -> usize {
        let zones =
            geneflow_control::compiler::changed_acl_zones(old, &self.pipeline.acls_by_zone());
        if zones.is_empty() {
            return 0;
        }
        let n = self.bpf.ct_delete(|k, _| zones.contains(&k.zone));
        self.shared.ended_by_group_change(&zones, n);
        n
    }
}

/// Expires idle entries every 10 s in a thread of its own, on the pinned CT map: walking a
/// full table is two syscalls per entry (a tenth of a second or more for 65,536), which the
/// forwarder thread, the slow path, must not spend. Publishes the entry count and reports a
/// table found full. Ends when `stop` is set.
pub(super) fn spawn_expiry(
    pin: PathBuf,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("gf-ct-expiry".into())
        .spawn(move || {
            let mut map: BpfHashMap<MapData, CtKey, CtEntry> = match MapData::from_pin(&pin)
                .map_err(|e| e.to_string())
                .and_then(|m| {
                    BpfHashMap::try_from(aya::maps::Map::LruHashMap(m)).map_err(|e| e.to_string())
                }) {
                Ok(m) => m,
                Err(e) => {
                    warn!(pin = %pin.display(), "conntrack expiry not running: {e}");
                    return;
                }
            };
            // XDP's commit counts (the pinned per-port counters, beside CT).
            let counters: Option<PerCpuArray<MapData, PortCounters>> =
                MapData::from_pin(pin.with_file_name("COUNTERS"))
                    .ok()
                    .and_then(|m| PerCpuArray::try_from(aya::maps::Map::PerCpuArray(m)).ok());
            if counters.is_none() {
                warn!("conntrack evictions not counted: no pinned COUNTERS map");
            }
            // Default-SNAT translations expire alongside (the NAT map is pinned beside CT).
            let mut nat: Option<BpfHashMap<MapData, CtKey, geneflow_abi::NatEntry>> =
                MapData::from_pin(pin.with_file_name("NAT"))
                    .ok()
                    .and_then(|m| BpfHashMap::try_from(aya::maps::Map::HashMap(m)).ok());
            let mut last = Tally::read(counters.as_ref(), &shared).map(|t| Tally {
                entries: map.iter().flatten().count() as u64,
                ..t
            });
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..100 {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                let before = Tally::read(counters.as_ref(), &shared);
                let left = expire(&mut map, &shared, last.as_ref().zip(before.as_ref()));
                if let Some(n) = nat.as_mut() {
                    crate::napt::expire(n, forward::monotonic_ns());
                }
                last = before.map(|t| Tally { entries: left, ..t });
            }
        })
}

/// What an expiry round leaves for the next one to count evictions: the entries it left,
/// and the commits and flushed entries so far.
#[derive(Clone, Copy)]
struct Tally {
    entries: u64,
    committed: u64,
    flushed: u64,
}

impl Tally {
    /// Commits (XDP's, summed over ports and CPUs, and the slow path's) and flushes so far.
    fn read(xdp: Option<&PerCpuArray<MapData, PortCounters>>, shared: &Shared) -> Option<Tally> {
        let xdp = xdp?;
        let committed: u64 = (0..geneflow_abi::MAX_PORTS)
            .filter_map(|slot| xdp.get(&slot, 0).ok())
            .map(|v| {
                v.iter()
                    .map(|c| c.c[ctr::CT_COMMITTED as usize])
                    .sum::<u64>()
            })
            .sum::<u64>()
            + shared.user_total(ctr::CT_COMMITTED);
        Some(Tally {
            entries: 0,
            committed,
            flushed: shared.conntrack_flushed.load(Ordering::Relaxed),
        })
    }
}

/// Deletes the entries idle for longer than their protocol's timeout (10 s once closing);
/// returns how many are left. With the tallies of the last round and of this one (read
/// before the walk), counts what the table evicted in between: what there was, plus what was
/// committed, less what was flushed, less what the walk finds. Commits during the walk make
/// it count low, never high.
fn expire(
    map: &mut BpfHashMap<MapData, CtKey, CtEntry>,
    shared: &Shared,
    tallies: Option<(&Tally, &Tally)>,
) -> u64 {
    let now = forward::monotonic_ns();
    let mut total = 0u64;
    let doomed: Vec<CtKey> = map
        .iter()
        .flatten()
        .inspect(|_| total += 1)
        .filter(|(k, e)| {
            now.saturating_sub(e.last_seen_ns)
                > ct::idle_timeout_s(k.proto, e.flags) * 1_000_000_000
        })
        .map(|(k, _)| k)
        .collect();
    if let Some((last, now)) = tallies {
        let evicted = (last.entries + now.committed.saturating_sub(last.committed))
            .saturating_sub(now.flushed.saturating_sub(last.flushed))
            .saturating_sub(total);
        shared
            .conntrack_evicted
            .fetch_add(evicted, Ordering::Relaxed);
    }
    let gone = doomed.iter().filter(|k| map.remove(k).is_ok()).count() as u64;
    shared
        .conntrack
        .store(total.saturating_sub(gone), Ordering::Relaxed);
    if gone > 0 {
        tracing::debug!(expired = gone, "conntrack entries expired");
    }
    // An LRU hash evicts a little before it is completely full (per-CPU free lists).
    if total >= ct::MAX_ENTRIES as u64 * 95 / 100 {
        shared.conntrack_full.fetch_add(1, Ordering::Relaxed);
        warn!(
            entries = total,
            capacity = ct::MAX_ENTRIES,
            "conntrack table full: the least recently used connections are evicted"
        );
    }
    total.saturating_sub(gone)
}
