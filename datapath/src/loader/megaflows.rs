//! The megaflow table: datapath generations, installs, the mask lists and their order,
//! sweeps and inspection.

use super::*;
use aya::maps::IterableMap;

impl Bpf {
    /// Writes one slot of GENS.
    fn gens_writer(
        gens: &mut Array<MapData, DpGen>,
    ) -> impl FnMut(u32, DpGen) -> Result<(), LoaderError> + '_ {
        |slot, g| gens.set(slot, g, 0).map_err(map_err("GENS"))
    }

    /// The live generations of a pinned GENS (a previous process's), with their slots.
    pub(super) fn adopt_gens(&mut self) {
        let slots: Vec<(u32, DpGen)> = (0..MAX_DATAPATHS)
            .rev()
            .filter_map(|slot| self.gens.get(&slot, 0).ok().map(|g| (slot, g)))
            .collect();
        self.book.adopt(slots);
    }

    /// Brings the generations in line with the datapaths' fingerprints (`fingerprints` holds
    /// every live datapath): a datapath whose fingerprint changed, or that is new, gets a new
    /// generation, which makes all its entries stale in O(1); removed datapaths are forgotten.
    /// Datapaths whose fingerprint is unchanged keep their entries, across restarts too.
    /// Returns the datapaths that changed.
    pub fn set_generations(
        &mut self,
        fingerprints: &BTreeMap<u32, u64>,
    ) -> Result<Vec<u32>, LoaderError> {
        let mut w = Self::gens_writer(&mut self.gens);
        self.book
            .set_generations(fingerprints, &mut w)
            .map_err(gen_err)
    }

    /// Orders each mask list by the packets its masks matched since the last call, most
    /// first (ties keep install order): the tuple-space search then finds most packets'
    /// entries with its first probe. CONFIG is written only when the order changes; a packet
    /// that reads it mid-write at worst misses once (the slow path answers the same).
    pub fn reorder_masks(&mut self) -> Result<bool, LoaderError> {
        let mut hits = [0u64; (MAX_MASKS * MASK_LISTS) as usize];
        for (i, h) in hits.iter_mut().enumerate() {
            *h = self
                .mask_hits
                .get(&(i as u32), 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0);
        }
        let mut changed = false;
        for l in 0..MASK_LISTS as usize {
            let base = l * MAX_MASKS as usize;
            let n = self.mask_lists[l].len();
            let delta = |s: u8| {
                hits[base + s as usize].saturating_sub(self.last_mask_hits[base + s as usize])
            };
            let mut order: Vec<u8> = (0..n as u8).collect();
            order.sort_by_key(|&s| std::cmp::Reverse(delta(s)));
            if order[..] != self.order[l][..n] {
                self.order[l][..n].copy_from_slice(&order);
                changed = true;
            }
        }
        self.last_mask_hits = hits;
        if changed {
            self.write_config()?;
        }
        Ok(changed)
    }

    /// Makes every entry of every datapath stale (e.g. a next hop changed).
    pub fn invalidate_all(&mut self) -> Result<(), LoaderError> {
        let mut w = Self::gens_writer(&mut self.gens);
        self.book.invalidate_all(&mut w).map_err(gen_err)
    }

    /// Deletes the entries whose action `keep` rejects. Returns how many went.
    pub fn retain(&mut self, keep: impl Fn(&FlowAction) -> bool) -> usize {
        let doomed: Vec<FlowKey> = self
            .installed
            .iter()
            .filter(|(_, (a, _))| !keep(a))
            .map(|(k, _)| *k)
            .collect();
        for k in &doomed {
            let _ = self.flows.remove(k);
            self.installed.remove(k);
        }
        doomed.len()
    }

    /// Installs a megaflow for frames arriving on a port of mask list `list` (`mask_list::*`).
    pub fn install(&mut self, m: &Megaflow, list: u32) -> Result<Install, LoaderError> {
        let Some((gen_slot, g)) = self.book.get(m.action.dp_key) else {
            return Ok(Install::Refused);
        };
        let l = (list as usize).min(MASK_LISTS as usize - 1);
        let base = l as u32 * MAX_MASKS;
        let id = match mask_id(&self.mask_lists, list, &m.mask) {
            Some(id) => id,
            None => {
                if self.mask_lists[l].len() >= MAX_MASKS as usize {
                    return Ok(Install::Refused);
                }
                let id = base + self.mask_lists[l].len() as u32;
                self.masks.set(id, m.mask, 0).map_err(map_err("MASKS"))?;
                self.mask_lists[l].push(m.mask);
                // A new mask goes last in the order until its hits move it up.
                let n = self.mask_lists[l].len();
                self.order[l][n - 1] = (n - 1) as u8;
                self.write_config()?;
                id
            }
        };
        let (key, action) = entry(m, id, (gen_slot, g));
        if self.installed.get(&key).map(|(a, _)| a) == Some(&action) {
            return Ok(Install::AlreadyPresent);
        }
        if self.installed.len() >= MAX_FLOWS as usize {
            self.sweep();
            if self.installed.len() >= MAX_FLOWS as usize {
                return Ok(Install::Refused);
            }
        }
        self.flows
            .insert(key, action, 0)
            .map_err(map_err("FLOWS"))?;
        self.installed
            .insert(key, (action, std::time::Instant::now()));
        Ok(Install::Installed)
    }

    /// Takes into the mirror an entry another slow-path thread put in FLOWS itself (see
    /// `FlowWriter`). One whose datapath's generation moved on since it was decided is
    /// deleted at once: no sweep would find it. A key the mirror already holds was written
    /// over by this thread's own install, whose action the map holds: nothing to do. One no
    /// longer in the map was deleted here since (a retain after this thread wrote over it):
    /// it stays out of the mirror, which must never claim an entry the map lacks (an install
    /// of the same entry would then be skipped). This thread is the only one that deletes,
    /// so the lookup is exact.
    pub fn record(&mut self, key: FlowKey, action: FlowAction) -> Recorded {
        if self.installed.contains_key(&key) {
            return Recorded::Known;
        }
        if self.book.generation(action.dp_key) != Some(action.generation) {
            let _ = self.flows.remove(&key);
            return Recorded::Stale;
        }
        if self.flows.get(&key, 0).is_err() {
            return Recorded::Gone;
        }
        self.installed
            .insert(key, (action, std::time::Instant::now()));
        Recorded::Installed
    }

    /// The masks of both lists, for the other slow-path threads (see `FlowWriter`).
    pub fn mask_lists(&self) -> [Vec<FlowKey>; MASK_LISTS as usize] {
        self.mask_lists.clone()
    }

    /// Every live datapath's generation slot and generation, for the other slow-path threads.
    pub fn generations(&self) -> StdHashMap<u32, (u32, DpGen)> {
        self.book.snapshot()
    }

    /// A second handle on FLOWS, for another slow-path thread.
    pub fn flow_writer(&self) -> Result<FlowWriter, LoaderError> {
        let fd = self
            .flows
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| LoaderError::Dup("FLOWS", e))?;
        let data = MapData::from_fd(fd).map_err(map_err("FLOWS"))?;
        let map = HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(map_err("FLOWS"))?;
        Ok(FlowWriter { map })
    }

    /// Deletes entries whose datapath generation moved on. Returns how many were removed.
    pub fn sweep(&mut self) -> usize {
        let book = std::mem::take(&mut self.book);
        let n = self.retain(|a| book.generation(a.dp_key) == Some(a.generation));
        self.book = book;
        n
    }

    /// Every installed megaflow with its mask, XDP hit count and age.
    pub fn flows(&self) -> Vec<FlowInfo> {
        let mut out: Vec<FlowInfo> = self
            .installed
            .iter()
            .map(|(k, (a, t))| FlowInfo {
                key: *k,
                mask: self
                    .mask_lists
                    .get(k.mask_id as usize / MAX_MASKS as usize)
                    .and_then(|l| l.get(k.mask_id as usize % MAX_MASKS as usize))
                    .copied()
                    .unwrap_or_default(),
                action: *a,
                hits: self.flows.get(k, 0).map(|v| v.hits).unwrap_or(0),
                age: t.elapsed(),
                stale: self.book.generation(a.dp_key) != Some(a.generation),
            })
            .collect();
        out.sort_by_key(|f| std::cmp::Reverse(f.hits));
        out
    }

    pub fn megaflow_count(&self) -> usize {
        self.installed.len()
    }

    pub fn mask_count(&self) -> usize {
        self.mask_lists.iter().map(Vec::len).sum()
    }
}

/// What `Bpf::record` did with an entry another thread installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Installed,
    /// Already in the mirror (this thread installed the key too).
    Known,
    /// Decided on generations that moved on: deleted.
    Stale,
    /// Deleted here since.
    Gone,
}

/// The id of `mask` in list `list` (`mask_list::*`) of `lists`, if it is there. Masks are
/// only ever appended to a list, so an id stays the mask's for the life of the process.
pub fn mask_id(
    lists: &[Vec<FlowKey>; MASK_LISTS as usize],
    list: u32,
    mask: &FlowKey,
) -> Option<u32> {
    let l = (list as usize).min(MASK_LISTS as usize - 1);
    let i = lists[l].iter().position(|k| k == mask)?;
    Some(l as u32 * MAX_MASKS + i as u32)
}

/// Megaflow `m`'s entry as XDP looks it up: the key masked and tagged with its mask's id, the
/// action stamped with its datapath's generation and that generation's slot.
pub fn entry(m: &Megaflow, mask_id: u32, (gen_slot, g): (u32, DpGen)) -> (FlowKey, FlowAction) {
    let mut key = m.key.masked(&m.mask);
    key.mask_id = mask_id as u8;
    let mut action = m.action;
    action.generation = g.generation;
    action.gen_slot = gen_slot;
    (key, action)
}

/// Another slow-path thread's handle on FLOWS. It only adds entries whose key is not there
/// (BPF_NOEXIST): replacing one, and keeping the mirror of the table (sweeps, listings), are
/// the first thread's, which it tells of every entry it adds (`Bpf::record`).
pub struct FlowWriter {
    map: HashMap<MapData, FlowKey, FlowAction>,
}

impl FlowWriter {
    /// Adds the entry unless its key is there or the map is full.
    pub fn add(&mut self, key: &FlowKey, action: &FlowAction) -> bool {
        const BPF_NOEXIST: u64 = 1;
        self.map.insert(key, action, BPF_NOEXIST).is_ok()
    }
}

/// A generation error as the loader's.
fn gen_err(e: crate::generations::GenError<LoaderError>) -> LoaderError {
    match e {
        crate::generations::GenError::Full => LoaderError::Full("GENS", MAX_DATAPATHS),
        crate::generations::GenError::Write(e) => e,
    }
}
