//! Conntrack housekeeping: idle entries expire (per protocol, like Cilium's defaults: TCP 6 h,
//! UDP 60 s, others 30 s; a TCP connection that saw a FIN or RST 10 s after it), a
//! change of a zone's security groups ends the connections they allowed (their packets are
//! checked again as new), and `geneflowctl ct` lists and flushes.

use super::*;
use aya::maps::{HashMap as BpfHashMap, MapData};
use geneflow_abi::{ct, CtEntry, CtKey};
use geneflow_control::acl::PortAcl;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Idle timeout of an entry, by IP protocol.
fn timeout(proto: u8) -> Duration {
    match proto {
        6 => Duration::from_secs(6 * 3600),
        17 => Duration::from_secs(60),
        _ => Duration::from_secs(30),
    }
}

/// The ACLs of each zone (datapath), to tell which zones' groups changed.
pub(super) fn acls_by_zone(p: &Pipeline) -> BTreeMap<u32, Vec<(u16, PortAcl)>> {
    p.datapaths
        .iter()
        .map(|(k, d)| {
            let acls = d
                .ports
                .values()
                .filter_map(|p| p.acl.clone().map(|a| (p.key, a)))
                .collect();
            (*k, acls)
        })
        .collect()
}

impl Forwarder {
    /// Ends the connections of the zones whose security groups changed between `old` and the
    /// current pipeline. Returns how many entries went.
    pub(super) fn ct_flush_changed(&mut self, old: &BTreeMap<u32, Vec<(u16, PortAcl)>>) -> usize {
        let new = acls_by_zone(&self.pipeline);
        let empty = Vec::new();
        let zones: Vec<u32> = old
            .keys()
            .chain(new.keys())
            .copied()
            .filter(|z| old.get(z).unwrap_or(&empty) != new.get(z).unwrap_or(&empty))
            .collect();
        if zones.is_empty() {
            return 0;
        }
        let n = self.bpf.ct_delete(|k, _| zones.contains(&k.zone));
        if n > 0 {
            info!(
                ?zones,
                ended = n,
                "security groups changed: their connections are checked again"
            );
        }
        n
    }

    pub(super) fn ct_list(&self) -> serde_json::Value {
        let now = forward::monotonic_ns();
        let ip = |v: u32| std::net::Ipv4Addr::from(v.to_ne_bytes()).to_string();
        let entries: Vec<serde_json::Value> = self
            .bpf
            .ct_entries()
            .into_iter()
            .map(|(k, e): (CtKey, CtEntry)| {
                serde_json::json!({
                    "zone": k.zone,
                    "proto": k.proto,
                    "src": format!("{}:{}", ip(k.src), u16::from_be(k.sport)),
                    "dst": format!("{}:{}", ip(k.dst), u16::from_be(k.dport)),
                    "age_s": now.saturating_sub(e.created_ns) as f64 / 1e9,
                    "idle_s": now.saturating_sub(e.last_seen_ns) as f64 / 1e9,
                    "closing": e.flags & geneflow_abi::ct::CLOSING != 0,
                })
            })
            .collect();
        serde_json::json!({ "entries": entries })
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
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..100 {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                expire(&mut map, &shared);
            }
        })
}

/// Deletes the entries idle for longer than their protocol's timeout (10 s once closing).
fn expire(map: &mut BpfHashMap<MapData, CtKey, CtEntry>, shared: &Shared) {
    let now = forward::monotonic_ns();
    let mut total = 0u64;
    let doomed: Vec<CtKey> = map
        .iter()
        .flatten()
        .inspect(|_| total += 1)
        .filter(|(k, e)| {
            let t = if e.flags & ct::CLOSING != 0 {
                Duration::from_secs(ct::CLOSING_TIMEOUT_S)
            } else {
                timeout(k.proto)
            };
            now.saturating_sub(e.last_seen_ns) > t.as_nanos() as u64
        })
        .map(|(k, _)| k)
        .collect();
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
}
