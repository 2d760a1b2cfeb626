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

    /// Writes both directions of a translation.
    pub fn nat_insert(
        &mut self,
        out: (&CtKey, &NatEntry),
        back: (&CtKey, &NatEntry),
    ) -> Result<(), LoaderError> {
        self.nat.insert(back.0, back.1, 0).map_err(map_err("NAT"))?;
        self.nat.insert(out.0, out.1, 0).map_err(map_err("NAT"))
    }

    /// Every translation (both directions).
    pub fn nat_entries(&self) -> Vec<(CtKey, NatEntry)> {
        self.nat.iter().flatten().collect()
    }
}
