//! Connection tracking in userspace, for the DPDK backend: the XDP program's conntrack
//! (`ebpf/xdp/src/prog/conntrack.rs`) with the same keys, states and timeouts, over memory
//! the poll threads share instead of BPF maps.
//!
//! - `ConnTable`: the table every poll thread and the control thread share (a connection's
//!   two directions may land on different threads). As the BPF map: lookups take no lock (a
//!   lock-free hash table, `papaya`, whose entries a frame refreshes with atomic stores),
//!   writers do (a commit, an expiry, a flush: one lock per shard). Sharded by a hash keyed
//!   per process (nobody can aim tuples at one shard); bounded (`ct::MAX_ENTRIES`): a full
//!   shard evicts its least recently seen entry, counted, as the LRU map does. The eviction
//!   is per shard (1024 entries), not global like the LRU map's: a tenant filling the table
//!   evicts others' entries sooner.
//! - `CtCache`: per poll thread, XDP's per-CPU connection cache: 2-way sets of the last
//!   established tuples, valid for one epoch of the table (bumped about once a second and
//!   after any deletion), so that an established connection costs no hash lookup, and its
//!   entry's timestamp is refreshed once an epoch.
//! - `lookup`, `icmp_error_related`, `commit`: the frame-side operations, sans-IO.
//!
//! Expiry, zone flushes and listing are the control thread's (`expire`, `delete`,
//! `entries`).

use geneflow_abi::{ct, flag, CtCacheSlot, CtEntry, CtKey, FlowAction, FlowKey};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

const SHARDS: usize = 64;
/// Slots of a poll thread's connection cache (XDP's per-CPU cache has as many).
const CACHE_SLOTS: usize = ct::CACHE_BLOCKS as usize * ct::CACHE_BLOCK_SLOTS;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
const NS: u64 = 1_000_000_000;

/// The conntrack tuple of an IPv4 TCP, UDP or ICMP key in `zone`; `None` for the rest.
pub fn ct_key(key: &FlowKey, zone: u32) -> Option<CtKey> {
    if key.eth_type != 0x0800u16.to_be() || !matches!(key.ip_proto, 1 | 6 | 17) {
        return None;
    }
    Some(CtKey {
        zone,
        src: key.ip_src,
        dst: key.ip_dst,
        sport: key.l4_src,
        dport: key.l4_dst,
        proto: key.ip_proto,
        pad: [0; 3],
    })
}

/// The other direction of `k`.
fn reversed(k: &CtKey) -> CtKey {
    CtKey {
        src: k.dst,
        dst: k.src,
        sport: k.dport,
        dport: k.sport,
        ..*k
    }
}

/// Multiplicative hash of a tuple, for picking a thread's cache set (cheap, per packet). A
/// VM aiming its tuples at one set only makes lookups go to the table; the shards are picked
/// with a keyed hash (`ConnTable::shard`), since a full shard evicts.
pub(crate) fn spread(k: &CtKey) -> u32 {
    let ports = (k.sport as u32) << 16 | k.dport as u32;
    (k.src ^ k.dst.rotate_left(16) ^ ports ^ k.proto as u32)
        .wrapping_add(k.zone)
        .wrapping_mul(0x9e37_79b1)
}

/// A connection: `CtEntry` with the fields a frame moves as atomics, so that a lookup
/// refreshes it without a lock (a racing refresh only loses a timestamp, as in the BPF map).
struct Conn {
    created_ns: u64,
    last_seen_ns: AtomicU64,
    flags: AtomicU32,
}

impl Conn {
    fn new(now: u64) -> Conn {
        Conn {
            created_ns: now,
            last_seen_ns: AtomicU64::new(now),
            flags: AtomicU32::new(0),
        }
    }

    fn entry(&self) -> CtEntry {
        CtEntry {
            last_seen_ns: self.last_seen_ns.load(Ordering::Relaxed),
            created_ns: self.created_ns,
            flags: self.flags.load(Ordering::Relaxed),
            ..CtEntry::default()
        }
    }
}

struct Shard {
    /// Readers never block (papaya: lock-free reads, memory reclaimed by epochs).
    map: papaya::HashMap<CtKey, Conn>,
    /// Serialises the writers of the shard: the size bound and the eviction need one at a
    /// time (under it, the map's count is exact). Never taken by a lookup.
    write: Mutex<()>,
}

impl Shard {
    fn new(capacity: usize) -> Shard {
        Shard {
            map: papaya::HashMap::with_capacity(capacity),
            write: Mutex::new(()),
        }
    }

    /// The writers' lock; a poisoned one (a panicked thread) guards consistent entries.
    fn write(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The shared connection table.
pub struct ConnTable {
    shards: Box<[Shard]>,
    /// Keyed per process: nobody outside can aim tuples at one shard to make it evict
    /// another tenant's connections.
    hasher: std::collections::hash_map::RandomState,
    per_shard: usize,
    /// Validity epoch of the poll threads' caches; never 0 (an unwritten slot).
    epoch: AtomicU32,
    base: Instant,
    /// Entries a full shard evicted.
    pub evicted: AtomicU64,
}

impl ConnTable {
    /// A table of at most `capacity` entries (at least one per shard).
    pub fn new(capacity: usize) -> ConnTable {
        let per_shard = capacity.div_ceil(SHARDS).max(1);
        ConnTable {
            shards: (0..SHARDS).map(|_| Shard::new(per_shard)).collect(),
            hasher: Default::default(),
            per_shard,
            epoch: AtomicU32::new(1),
            base: Instant::now(),
            evicted: AtomicU64::new(0),
        }
    }

    /// The table's clock: nanoseconds since it was made.
    pub fn ns(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.base).as_nanos() as u64
    }

    fn shard(&self, k: &CtKey) -> &Shard {
        use std::hash::BuildHasher;
        &self.shards[self.hasher.hash_one(k) as usize % SHARDS]
    }

    pub fn epoch(&self) -> u32 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// Ends the current epoch: every cached tuple is looked up in the table again.
    pub fn bump_epoch(&self) {
        let _ = self
            .epoch
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |e| {
                Some(e.wrapping_add(1).max(1))
            });
    }

    /// Looks `k` up, refreshing its timestamp (once it is a second old) and marking it
    /// closing if `closing`; whether it is there.
    fn touch(&self, k: &CtKey, now: u64, closing: bool) -> bool {
        let m = self.shard(k).map.pin();
        let Some(c) = m.get(k) else {
            return false;
        };
        if now.saturating_sub(c.last_seen_ns.load(Ordering::Relaxed)) > NS {
            c.last_seen_ns.store(now, Ordering::Relaxed);
        }
        if closing {
            c.flags.fetch_or(ct::CLOSING, Ordering::Relaxed);
        }
        true
    }

    pub fn contains(&self, k: &CtKey) -> bool {
        self.shard(k).map.pin().contains_key(k)
    }

    /// Writes `k` as a new connection (replacing any entry, as the BPF map's insert does);
    /// a full shard first evicts its least recently seen entry.
    pub fn commit(&self, k: &CtKey, now: u64) {
        let s = self.shard(k);
        let _w = s.write();
        let m = s.map.pin();
        if m.len() >= self.per_shard && !m.contains_key(k) {
            let oldest = m
                .iter()
                .min_by_key(|(_, c)| c.last_seen_ns.load(Ordering::Relaxed))
                .map(|(k, _)| *k);
            if let Some(o) = oldest {
                if m.remove(&o).is_some() {
                    self.evicted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        m.insert(*k, Conn::new(now));
    }

    /// Deletes the entries idle longer than their timeout; returns (deleted, left). A
    /// deletion ends the epoch.
    pub fn expire(&self, now: u64) -> (usize, usize) {
        let gone = self.delete(|k, e| {
            now.saturating_sub(e.last_seen_ns) > ct::idle_timeout_s(k.proto, e.flags) * NS
        });
        (gone, self.len())
    }

    /// Deletes the entries `doomed` picks; returns how many. A deletion ends the epoch, so
    /// that no thread keeps passing a connection from its cache.
    pub fn delete(&self, doomed: impl Fn(&CtKey, &CtEntry) -> bool) -> usize {
        let mut n = 0;
        for s in self.shards.iter() {
            let _w = s.write();
            let m = s.map.pin();
            let before = m.len();
            m.retain(|k, c| !doomed(k, &c.entry()));
            n += before - m.len();
        }
        if n > 0 {
            self.bump_epoch();
        }
        n
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.map.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.per_shard * SHARDS
    }

    /// Every entry, for `geneflowctl ct`.
    pub fn entries(&self) -> Vec<(CtKey, CtEntry)> {
        let mut v = Vec::new();
        for s in self.shards.iter() {
            v.extend(s.map.pin().iter().map(|(k, c)| (*k, c.entry())));
        }
        v
    }
}

/// A poll thread's connection cache (see the module's comment).
pub struct CtCache {
    slots: Box<[CtCacheSlot]>,
    /// Lookups the cache answered, and those that went to the table.
    pub hits: u64,
    pub misses: u64,
}

impl Default for CtCache {
    fn default() -> Self {
        CtCache {
            slots: vec![CtCacheSlot::default(); CACHE_SLOTS].into_boxed_slice(),
            hits: 0,
            misses: 0,
        }
    }
}

impl CtCache {
    /// Index of the first of the two slots of `k`'s set.
    fn set(k: &CtKey) -> usize {
        (spread(k) as usize % (CACHE_SLOTS / 2)) * 2
    }
}

/// Sets `key.ct_state` for a frame tracked in `zone`: established (its connection's own
/// direction, or the reply), else new. The thread's cache first; in the table, the entry
/// found is refreshed and cached. A TCP FIN or RST always reaches the entry (closing).
pub fn lookup(table: &ConnTable, cache: &mut CtCache, key: &mut FlowKey, zone: u32, now: u64) {
    let Some(k) = ct_key(key, zone) else {
        return;
    };
    let closing = k.proto == 6 && key.pad & (TCP_FIN | TCP_RST) != 0;
    let epoch = table.epoch();
    let first = CtCache::set(&k);
    if !closing {
        for c in &cache.slots[first..first + 2] {
            if c.epoch == epoch && c.key == k {
                key.ct_state = c.state;
                cache.hits += 1;
                return;
            }
        }
    }
    cache.misses += 1;
    let state = if table.touch(&k, now, closing) {
        ct::EST
    } else if table.touch(&reversed(&k), now, closing) {
        ct::EST | ct::REPLY
    } else {
        key.ct_state = ct::NEW;
        return;
    };
    key.ct_state = state;
    // A free way (stale epoch) if there is one, else the second: its tenant moves to the
    // first, so the set keeps the two latest tuples.
    let set = &mut cache.slots[first..first + 2];
    let way = if set[0].epoch != epoch || set[0].key == k {
        0
    } else {
        if set[1].epoch == epoch {
            set[0] = set[1];
        }
        1
    };
    set[way] = CtCacheSlot {
        key: k,
        epoch,
        state,
        pad: [0; 7],
    };
}

/// Whether the IPv4 frame at `frame[off..]` (Ethernet first) is an ICMP error (destination
/// unreachable, time exceeded, parameter problem) quoting a packet of a connection tracked
/// in `zone`, either way: an error from the far end or from a router on the way.
pub fn icmp_error_related(table: &ConnTable, frame: &[u8], off: usize, zone: u32) -> bool {
    let Some(ip) = frame.get(off + 14..) else {
        return false;
    };
    if ip.len() < 20 || u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
        return false;
    }
    // A header length the frame does not hold (a forged IHL) is no error of ours.
    let Some(icmp) = ip.get((ip[0] & 0x0f) as usize * 4..) else {
        return false;
    };
    // The ICMP header and the quoted IPv4 header.
    if icmp.len() < 8 + 20 || !matches!(icmp[0], 3 | 11 | 12) {
        return false;
    }
    let q = &icmp[8..];
    let qihl = (q[0] & 0x0f) as usize * 4;
    if q[0] >> 4 != 4 || qihl < 20 {
        return false;
    }
    let (sport, dport) = match q[9] {
        6 | 17 => match q.get(qihl..qihl + 4) {
            Some(l4) => (
                u16::from_ne_bytes([l4[0], l4[1]]),
                u16::from_ne_bytes([l4[2], l4[3]]),
            ),
            None => return false,
        },
        1 => (0, 0),
        _ => return false,
    };
    let k = CtKey {
        zone,
        src: u32::from_ne_bytes([q[12], q[13], q[14], q[15]]),
        dst: u32::from_ne_bytes([q[16], q[17], q[18], q[19]]),
        sport,
        dport,
        proto: q[9],
        pad: [0; 3],
    };
    table.contains(&k) || table.contains(&reversed(&k))
}

/// Commits the key's connection in the action's zones (`flag::CT_COMMIT`), translated for a
/// `ct::POST_NAT` zone; returns how many entries it wrote.
pub fn commit(table: &ConnTable, key: &FlowKey, a: &FlowAction, now: u64) -> u64 {
    let mut n = 0;
    for z in a.ct_zones {
        if z == 0 {
            continue;
        }
        let mut t = *key;
        if z & ct::POST_NAT != 0 {
            if a.flags & flag::SNAT != 0 {
                t.ip_src = a.nat_src;
            }
            if a.flags & flag::DNAT != 0 {
                t.ip_dst = a.nat_dst;
            }
        }
        if let Some(k) = ct_key(&t, z & !ct::POST_NAT) {
            table.commit(&k, now);
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests;
