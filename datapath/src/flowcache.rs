//! The userspace megaflow cache, for the DPDK backend's poll threads (OVS-DPDK's dpcls): the
//! same masks, entries and generation check as the XDP program's `MASKS`, `FLOWS` and `GENS`,
//! so that one pipeline decision installs the same megaflow in either datapath.
//!
//! - Tuple-space search: each of the two mask lists (frames from VM ports, frames from the
//!   uplink) holds up to `MAX_MASKS` masks; a lookup masks the key with each, hottest first,
//!   and looks the result up (the mask's id is part of the key, as in XDP).
//! - Generations: an entry carries its datapath's generation and slot; the slot's live
//!   generation is an atomic shared by every thread, so the thread that applies a new
//!   pipeline makes every thread's entries of a changed datapath stale in O(1). A stale entry
//!   is skipped, not a verdict: a newer entry may sit under another mask.
//! - One cache per poll thread: lookups and installs take no lock.
//!
//! The lookup allocates nothing; an install (a miss that went through the pipeline) may grow
//! the table. The table is hashed with the standard library's keyed SipHash: the keys are
//! whatever a VM puts in its headers, and a fixed hash would let it aim collisions.

use crate::generations::{GenBook, GenError};
use crate::pipeline::Megaflow;
use arc_swap::ArcSwap;
use geneflow_abi::{DpGen, FlowAction, FlowKey, MASK_LISTS, MAX_DATAPATHS, MAX_MASKS};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CacheError {
    #[error("mask list {0} has its {MAX_MASKS} masks already")]
    TooManyMasks(usize),
    #[error("the megaflow cache holds {0} live entries, its capacity")]
    Full(usize),
    #[error("generation slot {0} is beyond the {MAX_DATAPATHS} datapaths")]
    BadSlot(u32),
    #[error("more than {MAX_DATAPATHS} datapaths")]
    TooManyDatapaths,
    #[error("datapath {0} has no generation (not in the applied pipeline)")]
    UnknownDatapath(u32),
    #[error("decided on tables that have been replaced since")]
    Superseded,
}

/// The live generation of each datapath slot (0: a free slot, which no entry carries), and
/// which slot each datapath has, shared by the poll threads (read) and the thread that
/// applies pipelines (`GenerationTable`, the only writer).
pub struct Generations {
    slots: Box<[AtomicU32]>,
    by_dp: ArcSwap<HashMap<u32, u32>>,
}

impl Default for Generations {
    fn default() -> Self {
        Generations {
            slots: (0..MAX_DATAPATHS).map(|_| AtomicU32::new(0)).collect(),
            by_dp: ArcSwap::from_pointee(HashMap::new()),
        }
    }
}

impl Generations {
    pub fn set(&self, slot: u32, generation: u32) -> Result<(), CacheError> {
        self.slots
            .get(slot as usize)
            .ok_or(CacheError::BadSlot(slot))?
            .store(generation, Ordering::Release);
        Ok(())
    }

    pub fn get(&self, slot: u32) -> u32 {
        self.slots
            .get(slot as usize)
            .map_or(0, |g| g.load(Ordering::Acquire))
    }

    /// Gives `a` its datapath's slot and current generation, as the loader does for XDP.
    /// A generation bumped right after makes the entry stale at once: the safe side.
    pub fn stamp(&self, a: &mut FlowAction) -> Result<(), CacheError> {
        let slot = *self
            .by_dp
            .load()
            .get(&a.dp_key)
            .ok_or(CacheError::UnknownDatapath(a.dp_key))?;
        a.gen_slot = slot;
        a.generation = self.get(slot);
        if a.generation == 0 {
            return Err(CacheError::UnknownDatapath(a.dp_key));
        }
        Ok(())
    }
}

/// The writer of `Generations`: a slot per live datapath and a new generation whenever its
/// fingerprint changes (`generations::GenBook`, which the loader keeps for XDP's GENS).
pub struct GenerationTable {
    shared: Arc<Generations>,
    book: GenBook,
}

impl GenerationTable {
    pub fn new(shared: Arc<Generations>) -> GenerationTable {
        GenerationTable {
            shared,
            book: GenBook::default(),
        }
    }

    fn done(&self, r: Result<(), GenError<CacheError>>) -> Result<(), CacheError> {
        r.map_err(|e| match e {
            GenError::Full => CacheError::TooManyDatapaths,
            GenError::Write(e) => e,
        })
    }

    /// Every live datapath's fingerprint: new or changed ones get a new generation (their
    /// entries in every thread go stale), removed ones free their slot. Returns the
    /// datapaths that changed.
    pub fn set_generations(
        &mut self,
        fingerprints: &BTreeMap<u32, u64>,
    ) -> Result<Vec<u32>, CacheError> {
        let shared = self.shared.clone();
        let mut w = |slot: u32, g: DpGen| shared.set(slot, g.generation);
        let r = self.book.set_generations(fingerprints, &mut w);
        let changed = match r {
            Ok(c) => c,
            Err(e) => return self.done(Err(e)).map(|_| Vec::new()),
        };
        if !changed.is_empty() {
            self.shared
                .by_dp
                .store(Arc::new(self.book.slots().collect()));
        }
        Ok(changed)
    }

    /// Makes every entry of every datapath stale (a next hop changed).
    pub fn invalidate_all(&mut self) -> Result<(), CacheError> {
        let shared = self.shared.clone();
        let mut w = |slot: u32, g: DpGen| shared.set(slot, g.generation);
        let r = self.book.invalidate_all(&mut w);
        self.done(r)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Stale entries met (and skipped) by lookups.
    pub stale: u64,
    pub installs: u64,
    /// Stale entries removed by sweeps.
    pub swept: u64,
}

struct Mask {
    mask: FlowKey,
    hits: u64,
}

/// One entry of the cache, as `FlowCache::snapshot` shows it.
#[derive(Debug, Clone, Copy)]
pub struct CachedFlow {
    pub key: FlowKey,
    pub mask: FlowKey,
    pub action: FlowAction,
    pub stale: bool,
}

pub struct FlowCache {
    gens: Arc<Generations>,
    lists: [Vec<Mask>; MASK_LISTS as usize],
    /// Per list, mask indexes hottest first (`reorder`).
    order: [Vec<usize>; MASK_LISTS as usize],
    flows: HashMap<FlowKey, FlowAction>,
    capacity: usize,
    pub stats: CacheStats,
}

impl FlowCache {
    pub fn new(gens: Arc<Generations>, capacity: usize) -> FlowCache {
        FlowCache {
            gens,
            lists: Default::default(),
            order: Default::default(),
            flows: HashMap::new(),
            capacity,
            stats: CacheStats::default(),
        }
    }

    fn keyed(key: &FlowKey, mask: &FlowKey, list: usize, slot: usize) -> FlowKey {
        let mut k = key.masked(mask);
        k.mask_id = (list * MAX_MASKS as usize + slot) as u8;
        k
    }

    /// The live entry matching `key` in mask list `list`, counted on the entry and its mask.
    pub fn lookup(&mut self, key: &FlowKey, list: usize) -> Option<FlowAction> {
        for i in 0..self.order[list].len() {
            let slot = self.order[list][i];
            let k = Self::keyed(key, &self.lists[list][slot].mask, list, slot);
            let Some(e) = self.flows.get_mut(&k) else {
                continue;
            };
            if e.generation == 0 || self.gens.get(e.gen_slot) != e.generation {
                self.stats.stale += 1;
                continue;
            }
            e.hits += 1;
            let a = *e;
            self.lists[list][slot].hits += 1;
            self.stats.hits += 1;
            return Some(a);
        }
        self.stats.misses += 1;
        None
    }

    /// Installs `action` for the frames whose `key` matches under `mask` in list `list`.
    pub fn install(
        &mut self,
        list: usize,
        mask: &FlowKey,
        key: &FlowKey,
        action: FlowAction,
    ) -> Result<(), CacheError> {
        let mut m = *mask;
        m.mask_id = 0;
        let slot = match self.lists[list].iter().position(|x| x.mask == m) {
            Some(s) => s,
            None if self.lists[list].len() < MAX_MASKS as usize => {
                self.lists[list].push(Mask { mask: m, hits: 0 });
                self.order[list].push(self.lists[list].len() - 1);
                self.lists[list].len() - 1
            }
            None => return Err(CacheError::TooManyMasks(list)),
        };
        let k = Self::keyed(key, &m, list, slot);
        if self.flows.len() >= self.capacity && !self.flows.contains_key(&k) {
            self.sweep();
            if self.flows.len() >= self.capacity {
                return Err(CacheError::Full(self.capacity));
            }
        }
        let mut a = action;
        a.hits = 0;
        self.flows.insert(k, a);
        self.stats.installs += 1;
        Ok(())
    }

    /// Installs a megaflow the pipeline decided, stamped with its datapath's generation.
    pub fn install_megaflow(&mut self, list: usize, m: &Megaflow) -> Result<(), CacheError> {
        self.install_megaflow_if(list, m, || true)
    }

    /// `install_megaflow`, if `current` still holds once the generation is read: the
    /// tables the megaflow was decided on are still the published ones. The thread that
    /// publishes tables stores them before it bumps generations; so an entry stamped with a
    /// generation newer than its tables fails this check, and one stamped with an older
    /// generation is stale already. Without it, a decision of the old pipeline could live on
    /// under the new generation.
    pub fn install_megaflow_if(
        &mut self,
        list: usize,
        m: &Megaflow,
        current: impl FnOnce() -> bool,
    ) -> Result<(), CacheError> {
        let mut a = m.action;
        self.gens.stamp(&mut a)?;
        if !current() {
            return Err(CacheError::Superseded);
        }
        self.install(list, &m.mask, &m.key, a)
    }

    /// Removes the stale entries; returns how many.
    pub fn sweep(&mut self) -> usize {
        let gens = self.gens.clone();
        let before = self.flows.len();
        self.flows
            .retain(|_, a| a.generation != 0 && gens.get(a.gen_slot) == a.generation);
        let n = before - self.flows.len();
        self.stats.swept += n as u64;
        n
    }

    /// Orders each list's masks by the hits since the last call, hottest first.
    pub fn reorder(&mut self) {
        for (list, masks) in self.lists.iter_mut().enumerate() {
            let order = &mut self.order[list];
            order.sort_by_key(|&s| std::cmp::Reverse(masks[s].hits));
            for m in masks.iter_mut() {
                m.hits = 0;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Masks in use per list.
    pub fn masks(&self, list: usize) -> usize {
        self.lists[list].len()
    }

    /// Every entry (stale ones included) with its masked key, for inspection.
    pub fn entries(&self) -> impl Iterator<Item = (&FlowKey, &FlowAction)> {
        self.flows.iter()
    }

    /// Every entry for `geneflowctl flows`: its masked key, its mask, its action (with its
    /// hits) and whether it is stale.
    pub fn snapshot(&self) -> Vec<CachedFlow> {
        let per = MAX_MASKS as usize;
        self.flows
            .iter()
            .map(|(k, a)| {
                let (list, slot) = (k.mask_id as usize / per, k.mask_id as usize % per);
                CachedFlow {
                    key: *k,
                    mask: self
                        .lists
                        .get(list)
                        .and_then(|l| l.get(slot))
                        .map_or(FlowKey::zeroed(), |m| m.mask),
                    action: *a,
                    stale: a.generation == 0 || self.gens.get(a.gen_slot) != a.generation,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decision_on_replaced_tables_is_not_installed() {
        let gens = Arc::new(Generations::default());
        let mut table = GenerationTable::new(gens.clone());
        table
            .set_generations(&[(1000u32, 1u64)].into_iter().collect())
            .unwrap();
        let mut c = FlowCache::new(gens, 16);
        let mut m = Megaflow {
            key: key(2, 0),
            mask: FlowKey::zeroed(),
            action: FlowAction::default(),
        };
        m.action.dp_key = 1000;
        let list = geneflow_abi::mask_list::VM as usize;
        assert!(matches!(
            c.install_megaflow_if(list, &m, || false),
            Err(CacheError::Superseded)
        ));
        assert!(c.is_empty());
        c.install_megaflow_if(list, &m, || true).unwrap();
        assert_eq!(c.len(), 1);
    }
    use geneflow_abi::{act, mask_list};

    const VM: usize = mask_list::VM as usize;
    const UPLINK: usize = mask_list::UPLINK as usize;

    fn key(dst_last: u8, ct: u8) -> FlowKey {
        let mut k = FlowKey::zeroed();
        k.in_ifindex = 3;
        k.eth_type = 0x0008;
        k.eth_dst = [0x0a, 0, 0, 0, 0, dst_last];
        k.ip_dst = 0x0100_000a;
        k.ct_state = ct;
        k
    }

    fn l2_mask() -> FlowKey {
        let mut m = FlowKey::zeroed();
        m.in_ifindex = u32::MAX;
        m.eth_dst = [0xff; 6];
        m
    }

    fn ct_mask() -> FlowKey {
        let mut m = l2_mask();
        m.ct_state = 0xff;
        m
    }

    fn action(out: u32, slot: u32, generation: u32) -> FlowAction {
        FlowAction {
            kind: act::OUTPUT,
            out_ifindex: out,
            gen_slot: slot,
            generation,
            ..Default::default()
        }
    }

    fn cache() -> (Arc<Generations>, FlowCache) {
        let g = Arc::new(Generations::default());
        g.set(7, 1).unwrap();
        (g.clone(), FlowCache::new(g, 1000))
    }

    #[test]
    fn an_entry_matches_every_key_equal_under_its_mask() {
        let (_, mut c) = cache();
        c.install(VM, &l2_mask(), &key(4, 0), action(9, 7, 1))
            .unwrap();
        // Another IP, same port and MAC: the same megaflow.
        let mut k = key(4, 0);
        k.ip_dst = 0x0200_000a;
        assert_eq!(c.lookup(&k, VM).map(|a| a.out_ifindex), Some(9));
        assert_eq!(c.lookup(&key(5, 0), VM), None);
        // The other list does not see it.
        assert_eq!(c.lookup(&key(4, 0), UPLINK), None);
        assert_eq!(c.stats.hits, 1);
        assert_eq!(c.stats.misses, 2);
        let hits: u64 = c.entries().map(|(_, a)| a.hits).sum();
        assert_eq!(hits, 1);
    }

    #[test]
    fn a_new_generation_makes_entries_stale_and_a_newer_one_under_another_mask_wins() {
        let (g, mut c) = cache();
        c.install(VM, &l2_mask(), &key(4, 0), action(9, 7, 1))
            .unwrap();
        // The datapath changes (a port joins a security group): its entries go stale at
        // once, and the new megaflow matches ct_state too.
        g.set(7, 2).unwrap();
        assert_eq!(c.lookup(&key(4, 1), VM), None);
        assert_eq!(c.stats.stale, 1);
        c.install(VM, &ct_mask(), &key(4, 1), action(10, 7, 2))
            .unwrap();
        // The stale entry is found first (older mask) and skipped.
        assert_eq!(c.lookup(&key(4, 1), VM).map(|a| a.out_ifindex), Some(10));
        assert_eq!(c.sweep(), 1);
        assert_eq!(c.len(), 1);
        // A freed slot (generation 0) makes its entries stale too.
        g.set(7, 0).unwrap();
        assert_eq!(c.lookup(&key(4, 1), VM), None);
    }

    #[test]
    fn masks_are_bounded_per_list() {
        let (_, mut c) = cache();
        for i in 0..MAX_MASKS {
            let mut m = l2_mask();
            m.l4_dst = i as u16 + 1;
            c.install(UPLINK, &m, &key(1, 0), action(1, 7, 1)).unwrap();
        }
        assert_eq!(c.masks(UPLINK), MAX_MASKS as usize);
        let mut m = l2_mask();
        m.l4_dst = 0xffff;
        assert_eq!(
            c.install(UPLINK, &m, &key(1, 0), action(1, 7, 1)),
            Err(CacheError::TooManyMasks(UPLINK))
        );
        // The other list has its own.
        c.install(VM, &m, &key(1, 0), action(1, 7, 1)).unwrap();
    }

    #[test]
    fn a_full_cache_makes_room_from_stale_entries_only() {
        let g = Arc::new(Generations::default());
        g.set(1, 1).unwrap();
        g.set(2, 1).unwrap();
        let mut c = FlowCache::new(g.clone(), 4);
        for i in 0..4 {
            c.install(VM, &l2_mask(), &key(i, 0), action(1, 1 + (i as u32 % 2), 1))
                .unwrap();
        }
        assert_eq!(
            c.install(VM, &l2_mask(), &key(9, 0), action(1, 1, 1)),
            Err(CacheError::Full(4))
        );
        // Replacing an entry needs no room.
        c.install(VM, &l2_mask(), &key(0, 0), action(2, 1, 1))
            .unwrap();
        g.set(2, 5).unwrap();
        c.install(VM, &l2_mask(), &key(9, 0), action(1, 1, 1))
            .unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c.stats.swept, 2);
    }

    #[test]
    fn the_generation_table_stamps_installs_and_invalidates_changed_datapaths_only() {
        let g = Arc::new(Generations::default());
        let mut t = GenerationTable::new(g.clone());
        let mut c = FlowCache::new(g.clone(), 100);
        let fps: BTreeMap<u32, u64> = [(1000, 1), (2000, 1)].into();
        assert_eq!(t.set_generations(&fps).unwrap(), vec![1000, 2000]);
        let m = |dp: u32, last: u8| Megaflow {
            key: key(last, 0),
            mask: l2_mask(),
            action: FlowAction {
                kind: act::OUTPUT,
                out_ifindex: last as u32,
                dp_key: dp,
                ..Default::default()
            },
        };
        c.install_megaflow(VM, &m(1000, 1)).unwrap();
        c.install_megaflow(VM, &m(2000, 2)).unwrap();
        assert_eq!(
            c.install_megaflow(VM, &m(3000, 3)),
            Err(CacheError::UnknownDatapath(3000))
        );
        // Unchanged fingerprints change nothing; a changed one stales its datapath only.
        assert!(t.set_generations(&fps).unwrap().is_empty());
        let fps2: BTreeMap<u32, u64> = [(1000, 2), (2000, 1)].into();
        assert_eq!(t.set_generations(&fps2).unwrap(), vec![1000]);
        assert_eq!(c.lookup(&key(1, 0), VM), None);
        assert!(c.lookup(&key(2, 0), VM).is_some());
        // A removed datapath: stale, and unknown to new installs.
        let fps3: BTreeMap<u32, u64> = [(1000, 2)].into();
        assert_eq!(t.set_generations(&fps3).unwrap(), vec![2000]);
        assert_eq!(c.lookup(&key(2, 0), VM), None);
        assert!(c.install_megaflow(VM, &m(2000, 2)).is_err());
        c.install_megaflow(VM, &m(1000, 1)).unwrap();
        assert!(c.lookup(&key(1, 0), VM).is_some());
        t.invalidate_all().unwrap();
        assert_eq!(c.lookup(&key(1, 0), VM), None);
    }

    #[test]
    fn the_hottest_mask_is_tried_first_after_a_reorder() {
        let (_, mut c) = cache();
        c.install(VM, &ct_mask(), &key(1, 1), action(1, 7, 1))
            .unwrap();
        c.install(VM, &l2_mask(), &key(2, 0), action(2, 7, 1))
            .unwrap();
        for _ in 0..5 {
            c.lookup(&key(2, 0), VM).unwrap();
        }
        c.reorder();
        assert_eq!(c.order[VM], vec![1, 0]);
        assert_eq!(
            Generations::default().set(MAX_DATAPATHS, 1),
            Err(CacheError::BadSlot(MAX_DATAPATHS))
        );
    }
}
