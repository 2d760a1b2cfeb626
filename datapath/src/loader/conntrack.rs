//! The conntrack table and the validity epoch of XDP's per-CPU connection cache.

use super::*;

impl Bpf {
    /// Where the CT map is pinned (its expiry runs on a handle of its own).
    pub fn ct_pin(&self) -> PathBuf {
        self.pins.map_path("CT")
    }

    /// Conntrack for frames from the uplink on or off.
    pub fn set_ct_uplink(&mut self, on: bool) -> Result<(), LoaderError> {
        if self.ct_uplink != on {
            self.ct_uplink = on;
            self.write_config()?;
        }
        Ok(())
    }

    /// Commits a connection the slow path allowed (its first packet; XDP commits the rest).
    pub fn ct_commit(&mut self, k: &CtKey, now_ns: u64) -> Result<(), LoaderError> {
        let e = CtEntry {
            last_seen_ns: now_ns,
            created_ns: now_ns,
            reserved: 0,
            flags: 0,
            pad: 0,
        };
        self.ct.insert(k, e, 0).map_err(map_err("CT"))
    }

    /// Every conntrack entry.
    pub fn ct_entries(&self) -> Vec<(CtKey, CtEntry)> {
        self.ct.iter().flatten().collect()
    }

    /// Deletes the entries `doomed` picks; returns how many went.
    pub fn ct_delete(&mut self, doomed: impl Fn(&CtKey, &CtEntry) -> bool) -> usize {
        let keys: Vec<CtKey> = self
            .ct
            .iter()
            .flatten()
            .filter(|(k, e)| doomed(k, e))
            .map(|(k, _)| k)
            .collect();
        let n = keys.iter().filter(|k| self.ct.remove(k).is_ok()).count();
        if n > 0 {
            // No CPU may keep a deleted connection in its cache.
            if let Err(e) = self.bump_ct_epoch() {
                tracing::warn!("conntrack cache not invalidated: {e}");
            }
        }
        n
    }

    pub(super) fn next_ct_epoch(&mut self) {
        self.ct_epoch = self.ct_epoch.wrapping_add(1).max(1);
    }

    /// Starts a new epoch of the XDP connection cache: every CPU looks its tuples up in CT
    /// again (refreshing their timestamps). Called about once a second and after deletions.
    pub fn bump_ct_epoch(&mut self) -> Result<(), LoaderError> {
        self.next_ct_epoch();
        self.write_config()
    }
}
