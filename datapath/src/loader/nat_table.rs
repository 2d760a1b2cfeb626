//! The default-SNAT table (`geneflow_abi::nat`): the slow path writes both directions of a
//! connection's translation at its first packet, the agent expires idle ones.

use super::*;

impl Bpf {
    /// Where the NAT map is pinned (its expiry runs on a handle of its own).
    pub fn nat_pin(&self) -> PathBuf {
        self.pins.map_path("NAT")
    }

    pub fn nat_get(&self, k: &CtKey) -> Option<NatEntry> {
        self.nat.get(k, 0).ok()
    }

    /// Writes both directions of a translation, the inbound half first (a port is taken as
    /// long as its inbound half exists). If the outbound half cannot be written (a full table)
    /// an inbound half written just now (`back_new`) is taken back.
    pub fn nat_insert(
        &mut self,
        out: (&CtKey, &NatEntry),
        back: (&CtKey, &NatEntry),
        back_new: bool,
    ) -> Result<(), LoaderError> {
        self.nat.insert(back.0, back.1, 0).map_err(map_err("NAT"))?;
        let r = self.nat.insert(out.0, out.1, 0).map_err(map_err("NAT"));
        if r.is_err() && back_new {
            let _ = self.nat.remove(back.0);
        }
        r
    }

    /// Rewrites one entry in place.
    pub fn nat_update(&mut self, k: &CtKey, e: &NatEntry) -> Result<(), LoaderError> {
        self.nat.insert(k, e, 0).map_err(map_err("NAT"))
    }

    pub fn nat_remove(&mut self, k: &CtKey) -> bool {
        self.nat.remove(k).is_ok()
    }

    /// Deletes every translation; returns how many entries went.
    pub fn nat_flush(&mut self) -> usize {
        let keys: Vec<CtKey> = self.nat.keys().flatten().collect();
        keys.iter().filter(|k| self.nat.remove(k).is_ok()).count()
    }

    /// Every translation (both directions).
    pub fn nat_entries(&self) -> Vec<(CtKey, NatEntry)> {
        self.nat.iter().flatten().collect()
    }
}

impl Bpf {
    /// Makes `want` (external address -> fixed IP and zone, network byte order) the floating
    /// IPs XDP looks up in conntrack as their VMs see them.
    pub fn set_fip_ct(&mut self, want: &BTreeMap<u32, FipCt>) -> Result<(), LoaderError> {
        let have: Vec<(u32, FipCt)> = self.fip_ct.iter().flatten().collect();
        for (k, v) in &have {
            if want.get(k) != Some(v) {
                let _ = self.fip_ct.remove(k);
            }
        }
        for (k, v) in want {
            if !have.contains(&(*k, *v)) {
                self.fip_ct.insert(k, v, 0).map_err(map_err("FIP_CT"))?;
            }
        }
        Ok(())
    }
}
