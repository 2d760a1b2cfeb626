//! The default-SNAT translations of the DPDK backend, in memory its poll threads share: what
//! the BPF map is to the XDP backend. As with the map, a lookup takes no lock (a lock-free
//! hash table, `papaya`; a frame refreshes its entry's time and flags with atomic stores),
//! and the writers (a new translation, a reply that came before its megaflow, the expiry)
//! take one lock, through `NatMap::writer`, which is what `napt` works on. Bounded like the
//! map: a full table refuses new translations, it never evicts a live one.

use crate::napt::NatStore;
#[cfg(test)]
use geneflow_abi::nat;
use geneflow_abi::{CtKey, NatEntry};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// A translation: `NatEntry` with the fields a frame moves as atomics.
struct Slot {
    entry: NatEntry,
    last_seen_ns: AtomicU64,
    flags: AtomicU32,
}

impl Slot {
    fn new(e: &NatEntry) -> Slot {
        Slot {
            entry: *e,
            last_seen_ns: AtomicU64::new(e.last_seen_ns),
            flags: AtomicU32::new(e.flags),
        }
    }

    fn entry(&self) -> NatEntry {
        NatEntry {
            last_seen_ns: self.last_seen_ns.load(Ordering::Relaxed),
            flags: self.flags.load(Ordering::Relaxed),
            ..self.entry
        }
    }

    /// Whether `e` is this translation, its time and flags aside.
    fn same(&self, e: &NatEntry) -> bool {
        let bare = |x: &NatEntry| NatEntry {
            last_seen_ns: 0,
            flags: 0,
            ..*x
        };
        bare(&self.entry) == bare(e)
    }
}

pub struct NatMap {
    map: papaya::HashMap<CtKey, Slot>,
    /// One writer at a time: a port is chosen and both halves written as one step.
    write: Mutex<()>,
    capacity: usize,
}

impl NatMap {
    pub fn new(capacity: usize) -> NatMap {
        NatMap {
            map: papaya::HashMap::with_capacity(capacity),
            write: Mutex::new(()),
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The translation of `k`, refreshed as a frame that uses it: last seen `now`, `flags`
    /// added. Takes no lock.
    pub fn refresh(&self, k: &CtKey, now: u64, flags: u32) -> Option<NatEntry> {
        let m = self.map.pin();
        let s = m.get(k)?;
        s.last_seen_ns.store(now, Ordering::Relaxed);
        if flags != 0 {
            s.flags.fetch_or(flags, Ordering::Relaxed);
        }
        Some(s.entry())
    }

    /// The writers' handle (one at a time); lookups go on meanwhile.
    pub fn writer(&self) -> NatWriter<'_> {
        NatWriter {
            map: self,
            // A poisoned lock (a panicked thread) guards consistent entries.
            _w: self.write.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }
}

/// `NatMap` to one writer.
pub struct NatWriter<'a> {
    map: &'a NatMap,
    _w: MutexGuard<'a, ()>,
}

impl NatWriter<'_> {
    /// Writes `e` under `k`. The same translation is merged into the live slot (flags
    /// added, the later time kept): what a poll thread noted in it meanwhile (a FIN's
    /// CLOSING, a reply) stays. A changed translation replaces it.
    fn put(&self, k: &CtKey, e: &NatEntry) {
        let m = self.map.map.pin();
        match m.get(k) {
            Some(s) if s.same(e) => {
                s.last_seen_ns.fetch_max(e.last_seen_ns, Ordering::Relaxed);
                s.flags.fetch_or(e.flags, Ordering::Relaxed);
            }
            _ => {
                m.insert(*k, Slot::new(e));
            }
        }
    }
}

impl NatStore for NatWriter<'_> {
    fn nat_get(&self, k: &CtKey) -> Option<NatEntry> {
        self.map.map.pin().get(k).map(Slot::entry)
    }

    fn nat_insert(
        &mut self,
        out: (&CtKey, &NatEntry),
        back: (&CtKey, &NatEntry),
        _back_new: bool,
    ) -> bool {
        let m = self.map.map.pin();
        let new = [out.0, back.0]
            .iter()
            .filter(|k| !m.contains_key(**k))
            .count();
        // Exact: papaya's count is a sum that no other writer moves meanwhile.
        if m.len() + new > self.map.capacity {
            return false;
        }
        self.put(back.0, back.1);
        self.put(out.0, out.1);
        true
    }

    fn nat_update(&mut self, k: &CtKey, e: &NatEntry) {
        if self.map.map.pin().contains_key(k) {
            self.put(k, e);
        }
    }

    fn nat_remove(&mut self, k: &CtKey) -> bool {
        self.map.map.pin().remove(k).is_some()
    }

    fn nat_entries(&self) -> Vec<(CtKey, NatEntry)> {
        let m = self.map.map.pin();
        m.iter().map(|(k, s)| (*k, s.entry())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> CtKey {
        CtKey {
            zone: 1,
            src: 1,
            dst: 2,
            sport: port,
            dport: 53,
            proto: 17,
            pad: [0; 3],
        }
    }

    #[test]
    fn a_full_table_refuses_and_lookups_take_no_lock_while_a_writer_works() {
        let m = std::sync::Arc::new(NatMap::new(2));
        let e = NatEntry {
            addr: 9,
            port: 7,
            ..NatEntry::default()
        };
        let mut w = m.writer();
        assert!(w.nat_insert((&key(1), &e), (&key(2), &e), true));
        assert!(!w.nat_insert((&key(3), &e), (&key(4), &e), true));
        assert_eq!(m.len(), 2);
        // The writer's lock is still held: a frame's lookup does not wait for it.
        let (tx, rx) = std::sync::mpsc::channel();
        let m2 = m.clone();
        std::thread::spawn(move || {
            let _ = tx.send((
                m2.refresh(&key(1), 5, nat::REPLIED),
                m2.refresh(&key(3), 5, 0),
            ));
        });
        let (hit, miss) = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("a lookup waited for the writer");
        assert_eq!(miss, None);
        let hit = hit.expect("the translation");
        assert_eq!((hit.addr, hit.port, hit.last_seen_ns), (9, 7, 5));
        assert_eq!(w.nat_get(&key(1)).unwrap().flags, nat::REPLIED);
        // The slow path writes the same translation again from what it read before the
        // lookup's refresh (a regenerated megaflow): the refresh is not lost.
        let before = NatEntry {
            last_seen_ns: 1,
            ..e
        };
        w.nat_update(&key(1), &before);
        let after = w.nat_get(&key(1)).unwrap();
        assert_eq!((after.flags, after.last_seen_ns), (nat::REPLIED, 5));
        // Another translation under the key replaces it.
        w.nat_update(&key(1), &NatEntry { port: 8, ..e });
        assert_eq!(w.nat_get(&key(1)).unwrap(), NatEntry { port: 8, ..e });
        assert!(w.nat_remove(&key(1)));
        assert_eq!(w.nat_entries().len(), 1);
    }
}
