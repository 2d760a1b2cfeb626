//! The state a megaflow's action consults on a cache hit (`flowexec::State`): the shared
//! connection table for commits, the shared default-SNAT table for translations, as the XDP
//! program consults its CT and NAT maps. Neither table takes a lock to be read. A thread's
//! own `NatCache` answers the translations of established connections within an epoch of the
//! connection table (about a second, and ended by any deletion of a translation), so that
//! they cost no hash lookup; the shared entry is refreshed once an epoch, and a TCP FIN or
//! RST always reaches it.

use crate::napt;
use crate::userct::{self, ConnTable};
use crate::usernat::NatMap;
use geneflow_abi::{nat, CtKey, FlowAction, FlowKey, NatEntry};

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
/// Slots of a thread's translation cache (2-way sets).
const NAT_CACHE_SLOTS: usize = 4096;

#[derive(Clone, Copy, Default)]
struct NatSlot {
    key: CtKey,
    entry: NatEntry,
    /// The connection table's epoch it was read in (0: never written).
    epoch: u32,
}

/// A poll thread's cache of default-SNAT translations, both directions.
pub struct NatCache {
    slots: Box<[NatSlot]>,
    pub hits: u64,
    pub misses: u64,
}

impl Default for NatCache {
    fn default() -> Self {
        NatCache {
            slots: vec![NatSlot::default(); NAT_CACHE_SLOTS].into_boxed_slice(),
            hits: 0,
            misses: 0,
        }
    }
}

impl NatCache {
    fn set(k: &CtKey) -> usize {
        (userct::spread(k) as usize % (NAT_CACHE_SLOTS / 2)) * 2
    }

    fn get(&mut self, k: &CtKey, epoch: u32) -> Option<NatEntry> {
        let i = Self::set(k);
        let hit = self.slots[i..i + 2]
            .iter()
            .find(|s| s.epoch == epoch && s.key == *k)
            .map(|s| s.entry);
        if hit.is_some() {
            self.hits += 1;
        } else {
            self.misses += 1;
        }
        hit
    }

    /// Keeps the two latest tuples of the set.
    fn put(&mut self, k: &CtKey, entry: NatEntry, epoch: u32) {
        let i = Self::set(k);
        let set = &mut self.slots[i..i + 2];
        let way = if set[0].epoch != epoch || set[0].key == *k {
            0
        } else {
            if set[1].epoch == epoch {
                set[0] = set[1];
            }
            1
        };
        set[way] = NatSlot {
            key: *k,
            entry,
            epoch,
        };
    }
}

pub(super) struct HitState<'a> {
    pub conntrack: &'a ConnTable,
    pub nat: &'a NatMap,
    pub nat_cache: &'a mut NatCache,
    pub key: &'a FlowKey,
    pub action: &'a FlowAction,
    pub now_ns: u64,
    /// Entries the commits wrote.
    pub committed: u64,
}

impl HitState<'_> {
    /// The translation of `k`: from the thread's cache, or from the shared table, refreshed
    /// there (last seen now, `flags` added) and cached.
    fn translation(&mut self, k: &CtKey, from_cache: bool, flags: u32) -> Option<NatEntry> {
        let epoch = self.conntrack.epoch();
        if from_cache {
            if let Some(e) = self.nat_cache.get(k, epoch) {
                return Some(e);
            }
        }
        let e = self.nat.refresh(k, self.now_ns, flags)?;
        self.nat_cache.put(k, e, epoch);
        Some(e)
    }
}

impl crate::flowexec::State for HitState<'_> {
    fn commit(&mut self) {
        self.committed += userct::commit(self.conntrack, self.key, self.action, self.now_ns);
    }

    fn napt_out(&mut self, frame: &[u8]) -> Option<NatEntry> {
        let k = napt::key(frame, nat::DIR_OUT, self.key.in_ifindex)?;
        // FIN and RST must reach the entry (closing): they skip the cache.
        let closing = self.key.ip_proto == 6 && self.key.pad & (TCP_FIN | TCP_RST) != 0;
        let flags = if closing { nat::CLOSING } else { 0 };
        self.translation(&k, !closing, flags)
    }

    fn napt_in(&mut self, frame: &[u8]) -> Option<NatEntry> {
        let k = napt::key(frame, nat::DIR_IN, 0)?;
        // CLOSING is taken from the VM's side only: a spoofed FIN or RST from outside must
        // not shorten a live translation.
        self.translation(&k, true, nat::REPLIED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flowexec::State;
    use crate::napt::NatStore;

    #[test]
    fn established_translations_come_from_the_cache_within_an_epoch() {
        let ct = ConnTable::new(64);
        let nat = NatMap::new(16);
        let ext = std::net::Ipv4Addr::new(172, 24, 4, 61);
        let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 3], [2, 0, 0, 0, 0, 1])
            .ipv4([10, 0, 0, 3], [172, 24, 4, 100], 64)
            .udp(5000, 53);
        let mut frame = Vec::new();
        b.write(&mut frame, &[0; 8]).unwrap();
        let mut routed = frame.clone();
        let back = (7, 0, [2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 3]);
        assert!(napt::out(
            &mut nat.writer(),
            &frame,
            &mut routed,
            ext,
            back,
            1
        ));
        let mut cache = NatCache::default();
        let mut key = crate::pipeline::extract_key(&frame, 7).unwrap();
        key.in_ifindex = 7;
        let a = FlowAction::default();
        let mut st = HitState {
            conntrack: &ct,
            nat: &nat,
            nat_cache: &mut cache,
            key: &key,
            action: &a,
            now_ns: 5,
            committed: 0,
        };
        for _ in 0..3 {
            assert_eq!(
                st.napt_out(&frame).map(|e| e.addr),
                Some(u32::from_ne_bytes(ext.octets()))
            );
        }
        assert_eq!((st.nat_cache.hits, st.nat_cache.misses), (2, 1));
        // The table was refreshed on the miss.
        let k = napt::key(&frame, nat::DIR_OUT, 7).unwrap();
        assert_eq!(nat.writer().nat_get(&k).unwrap().last_seen_ns, 5);
        // A new epoch (a deletion, a second gone): the table is asked again.
        ct.bump_epoch();
        st.napt_out(&frame);
        assert_eq!(st.nat_cache.misses, 2);
    }
}
