//! The generation bookkeeping of the megaflow caches, for both backends: each live logical
//! datapath has a slot, and a generation that changes whenever the datapath's fingerprint
//! does; an entry carries its datapath's slot and generation, so a bump makes every entry of
//! that datapath stale in O(1). Generations only grow (a datapath removed and added back
//! never revives its old entries); a removed datapath's slot reads 0 until reused. Where the
//! slots live is the caller's: XDP's GENS map (`loader`) or the DPDK backend's atomics
//! (`flowcache::Generations`); `GenBook` says what to write where.

use geneflow_abi::{DpGen, MAX_DATAPATHS};
use std::collections::{BTreeMap, HashMap};

/// Why the generations could not be set.
#[derive(Debug)]
pub enum GenError<E> {
    /// Every slot is taken.
    Full,
    /// The caller's write failed.
    Write(E),
}

pub struct GenBook {
    /// Per live datapath: its slot and generation.
    live: HashMap<u32, (u32, DpGen)>,
    /// Free slots, lowest last.
    free: Vec<u32>,
    next: u32,
}

impl Default for GenBook {
    fn default() -> Self {
        GenBook {
            live: HashMap::new(),
            free: (0..MAX_DATAPATHS).rev().collect(),
            next: 1,
        }
    }
}

impl GenBook {
    /// The slot and generation of datapath `dp`, if live.
    pub fn get(&self, dp: u32) -> Option<(u32, DpGen)> {
        self.live.get(&dp).copied()
    }

    /// Every live datapath's slot and generation.
    pub fn snapshot(&self) -> HashMap<u32, (u32, DpGen)> {
        self.live.clone()
    }

    pub fn generation(&self, dp: u32) -> Option<u32> {
        self.live.get(&dp).map(|(_, g)| g.generation)
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Every live datapath's slot.
    pub fn slots(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.live.iter().map(|(&dp, &(slot, _))| (dp, slot))
    }

    /// Takes over the slots a previous process left (`slot`, its contents); the first of two
    /// slots claiming one datapath wins, empty and duplicate slots are free.
    pub fn adopt(&mut self, slots: impl IntoIterator<Item = (u32, DpGen)>) {
        self.live.clear();
        let mut taken = vec![false; MAX_DATAPATHS as usize];
        let mut top = 0;
        for (slot, g) in slots {
            // Entries may carry the generation of a slot that is not kept: none is reused.
            top = top.max(g.generation);
            if g.generation != 0 && (slot as usize) < taken.len() {
                if let std::collections::hash_map::Entry::Vacant(e) = self.live.entry(g.dp_key) {
                    e.insert((slot, g));
                    taken[slot as usize] = true;
                }
            }
        }
        self.free = (0..MAX_DATAPATHS)
            .rev()
            .filter(|s| !taken[*s as usize])
            .collect();
        self.raise_next(top);
    }

    /// The next generation handed out is above `top` (entries adopted from a previous
    /// process carry generations up to it).
    pub fn raise_next(&mut self, top: u32) {
        if top >= self.next {
            self.next = top.wrapping_add(1).max(1);
        }
    }

    /// A new generation for `dp` (a slot if it has none), written with `write`.
    fn bump<E>(
        &mut self,
        dp: u32,
        fingerprint: u64,
        write: &mut dyn FnMut(u32, DpGen) -> Result<(), E>,
    ) -> Result<(), GenError<E>> {
        let (slot, fresh) = match self.live.get(&dp) {
            Some(&(s, _)) => (s, false),
            None => (self.free.pop().ok_or(GenError::Full)?, true),
        };
        let g = DpGen {
            generation: self.next,
            dp_key: dp,
            fingerprint,
        };
        self.next = self.next.wrapping_add(1).max(1);
        // Noted only once written: a failed write leaves the datapath as it was, so the
        // next call tries again.
        match write(slot, g) {
            Ok(()) => {
                self.live.insert(dp, (slot, g));
                Ok(())
            }
            Err(e) => {
                if fresh {
                    self.free.push(slot);
                }
                Err(GenError::Write(e))
            }
        }
    }

    /// Brings the generations in line with every live datapath's fingerprint: a new or
    /// changed one gets a new generation, a removed one frees its slot (written empty).
    /// Returns the datapaths that changed.
    pub fn set_generations<E>(
        &mut self,
        fingerprints: &BTreeMap<u32, u64>,
        write: &mut dyn FnMut(u32, DpGen) -> Result<(), E>,
    ) -> Result<Vec<u32>, GenError<E>> {
        let mut changed = Vec::new();
        for (&dp, &fp) in fingerprints {
            if self.live.get(&dp).map(|(_, g)| g.fingerprint) != Some(fp) {
                self.bump(dp, fp, write)?;
                changed.push(dp);
            }
        }
        let gone: Vec<u32> = self
            .live
            .keys()
            .copied()
            .filter(|dp| !fingerprints.contains_key(dp))
            .collect();
        for dp in gone {
            if let Some((slot, _)) = self.live.remove(&dp) {
                self.free.push(slot);
                // A failed write leaves stale entries that match nothing live: harmless.
                let _ = write(slot, DpGen::default());
            }
            changed.push(dp);
        }
        Ok(changed)
    }

    /// A new generation for every live datapath (e.g. a next hop changed).
    pub fn invalidate_all<E>(
        &mut self,
        write: &mut dyn FnMut(u32, DpGen) -> Result<(), E>,
    ) -> Result<(), GenError<E>> {
        let all: Vec<(u32, u64)> = self
            .live
            .iter()
            .map(|(&dp, (_, g))| (dp, g.fingerprint))
            .collect();
        for (dp, fp) in all {
            self.bump(dp, fp, write)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fps(v: &[(u32, u64)]) -> BTreeMap<u32, u64> {
        v.iter().copied().collect()
    }

    #[test]
    fn changes_bump_removals_free_and_generations_only_grow() {
        let mut b = GenBook::default();
        let slots = std::cell::RefCell::new(HashMap::<u32, DpGen>::new());
        let mut w = |s: u32, g: DpGen| -> Result<(), ()> {
            slots.borrow_mut().insert(s, g);
            Ok(())
        };
        assert_eq!(
            b.set_generations(&fps(&[(10, 1), (20, 2)]), &mut w)
                .unwrap(),
            vec![10, 20]
        );
        let (s10, g10) = b.get(10).unwrap();
        assert!(b
            .set_generations(&fps(&[(10, 1), (20, 2)]), &mut w)
            .unwrap()
            .is_empty());
        assert_eq!(
            b.set_generations(&fps(&[(10, 9), (20, 2)]), &mut w)
                .unwrap(),
            vec![10]
        );
        let (s10b, g10b) = b.get(10).unwrap();
        assert_eq!(s10, s10b);
        assert!(g10b.generation > g10.generation);
        // 20 goes: its slot reads empty, and a datapath taking it later has a newer
        // generation than any entry of 20's.
        let (s20, g20) = b.get(20).unwrap();
        assert_eq!(
            b.set_generations(&fps(&[(10, 9)]), &mut w).unwrap(),
            vec![20]
        );
        assert_eq!(slots.borrow()[&s20], DpGen::default());
        b.set_generations(&fps(&[(10, 9), (30, 3)]), &mut w)
            .unwrap();
        let (s30, g30) = b.get(30).unwrap();
        assert_eq!(s30, s20);
        assert!(g30.generation > g20.generation);
        b.invalidate_all(&mut w).unwrap();
        assert!(b.generation(10).unwrap() > g10b.generation);
        // A failed write changes nothing: the next call tries again.
        let before = b.get(10).unwrap();
        let mut fail = |_: u32, _: DpGen| -> Result<(), ()> { Err(()) };
        assert!(b
            .set_generations(&fps(&[(10, 11), (30, 3)]), &mut fail)
            .is_err());
        assert_eq!(b.get(10).unwrap(), before);
        assert_eq!(
            b.set_generations(&fps(&[(10, 11), (30, 3)]), &mut w)
                .unwrap(),
            vec![10]
        );
    }

    #[test]
    fn adopted_slots_stay_and_new_generations_are_above_theirs() {
        let mut b = GenBook::default();
        let g = |generation, dp_key| DpGen {
            generation,
            dp_key,
            fingerprint: 7,
        };
        b.adopt([(3, g(40, 10)), (5, g(41, 10)), (6, g(0, 0))]);
        assert_eq!(b.len(), 1);
        assert_eq!(b.get(10).map(|(s, _)| s), Some(3));
        let mut w = |_: u32, _: DpGen| -> Result<(), ()> { Ok(()) };
        // Unchanged: kept across the restart.
        assert!(b
            .set_generations(&fps(&[(10, 7)]), &mut w)
            .unwrap()
            .is_empty());
        b.set_generations(&fps(&[(10, 7), (11, 1)]), &mut w)
            .unwrap();
        let (s11, g11) = b.get(11).unwrap();
        assert!(g11.generation > 41 && s11 != 3);
    }
}
