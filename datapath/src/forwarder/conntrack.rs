//! Conntrack housekeeping: idle entries expire (per protocol, like Cilium's defaults: TCP 6 h,
//! UDP 60 s, others 30 s; a TCP connection that saw a FIN or RST 10 s after it), a
//! change of a zone's security groups ends the connections they allowed (their packets are
//! checked again as new), and `geneflowctl ct` lists and flushes.

use super::*;
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use geneflow_abi::{ct, CtEntry, CtKey, PortCounters};
use std::path::PathBuf;

/// Idle timeout of an entry, by IP protocol.
fn timeout(proto: u8) -> Duration {
    Duration::from_secs(ct::idle_timeout_s(proto, 0))
}

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
        self.shared
            .conntrack_flushed
            .fetch_add(n as u64, Ordering::Relaxed);
        if n > 0 {
            info!(
                ?zones,
                ended = n,
                "security groups changed: their connections are checked again"
            );
        }
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
                    expire_nat(n);
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

/// Deletes the default-SNAT translations idle for longer than their timeout, both halves of
/// a connection together: conntrack's per protocol, but 10 s once a TCP FIN or RST went
/// through and 60 s for a connection no reply ever came back to (a spray of new connections
/// frees its entries within a minute). A half is deleted with its partner only if that
/// partner points back at it, and each is read again just before it goes (XDP may have used
/// it meanwhile); the outbound half goes first, so a port is never free while its outbound
/// half lives.
fn expire_nat(map: &mut BpfHashMap<MapData, CtKey, geneflow_abi::NatEntry>) {
    use geneflow_abi::nat;
    let now = forward::monotonic_ns();
    let all: HashMap<CtKey, geneflow_abi::NatEntry> = map.iter().flatten().collect();
    let timeout_of = |k: &CtKey, flags: u32| -> u64 {
        let t = if flags & nat::CLOSING != 0 {
            Duration::from_secs(ct::CLOSING_TIMEOUT_S)
        } else if flags & nat::REPLIED == 0 {
            Duration::from_secs(60).min(timeout(k.proto))
        } else {
            timeout(k.proto)
        };
        t.as_nanos() as u64
    };
    let is_out = |k: &CtKey| k.zone & nat::DIR_MASK == nat::DIR_OUT;
    // (outbound key, inbound key) of each doomed connection; lone halves as (key, None).
    let mut doomed: Vec<(CtKey, Option<CtKey>)> = Vec::new();
    for (k, e) in &all {
        let (ok, ik) = if is_out(k) {
            (*k, super::napt::reply_key(k, e.addr, e.port))
        } else {
            (super::napt::out_key(k, e), *k)
        };
        let (o, i) = (all.get(&ok), all.get(&ik));
        let paired = match (o, i) {
            (Some(o), Some(i)) => {
                super::napt::reply_key(&ok, o.addr, o.port) == ik
                    && super::napt::out_key(&ik, i) == ok
            }
            _ => false,
        };
        if paired {
            // Each pair once, from its outbound half.
            if !is_out(k) {
                continue;
            }
            let (o, i) = (
                o.copied().unwrap_or_default(),
                i.copied().unwrap_or_default(),
            );
            let last = o.last_seen_ns.max(i.last_seen_ns);
            if now.saturating_sub(last) > timeout_of(k, o.flags | i.flags) {
                doomed.push((ok, Some(ik)));
            }
        } else if now.saturating_sub(e.last_seen_ns) > timeout_of(k, e.flags) {
            doomed.push((*k, None));
        }
    }
    let mut gone = 0;
    for (first, second) in doomed {
        for k in std::iter::once(first).chain(second) {
            // Read again: a packet that used it since the walk keeps it (and its partner).
            let walked = all.get(&k).map(|e| e.last_seen_ns);
            let unchanged = map
                .get(&k, 0)
                .is_ok_and(|e: geneflow_abi::NatEntry| Some(e.last_seen_ns) == walked);
            if !unchanged || map.remove(&k).is_err() {
                break;
            }
            gone += 1;
        }
    }
    if gone > 0 {
        tracing::debug!(expired = gone, "default-SNAT translations expired");
    }
}
