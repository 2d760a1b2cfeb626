//! The state a megaflow's action consults on a cache hit (`flowexec::State`): the shared
//! connection table for commits, the shared default-SNAT table for translations, as the XDP
//! program consults its CT and NAT maps.

use crate::napt::{self, NatMap, NatStore};
use crate::userct::{self, ConnTable};
use geneflow_abi::{nat, FlowAction, FlowKey, NatEntry};
use std::sync::Mutex;

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

pub(super) struct HitState<'a> {
    pub conntrack: &'a ConnTable,
    pub nat: &'a Mutex<NatMap>,
    pub key: &'a FlowKey,
    pub action: &'a FlowAction,
    pub now_ns: u64,
    /// Entries the commits wrote.
    pub committed: u64,
}

impl HitState<'_> {
    fn table(&self) -> std::sync::MutexGuard<'_, NatMap> {
        // A poisoned table (a panicked thread) still holds consistent entries.
        self.nat.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl crate::flowexec::State for HitState<'_> {
    fn commit(&mut self) {
        self.committed += userct::commit(self.conntrack, self.key, self.action, self.now_ns);
    }

    fn napt_out(&mut self, frame: &[u8]) -> Option<NatEntry> {
        let k = napt::key(frame, nat::DIR_OUT, self.key.in_ifindex)?;
        let mut t = self.table();
        let mut e = t.nat_get(&k)?;
        e.last_seen_ns = self.now_ns;
        if self.key.ip_proto == 6 && self.key.pad & (TCP_FIN | TCP_RST) != 0 {
            e.flags |= nat::CLOSING;
        }
        t.nat_update(&k, &e);
        Some(e)
    }

    fn napt_in(&mut self, frame: &[u8]) -> Option<NatEntry> {
        let k = napt::key(frame, nat::DIR_IN, 0)?;
        let mut t = self.table();
        let mut e = t.nat_get(&k)?;
        e.last_seen_ns = self.now_ns;
        // CLOSING is taken from the VM's side only: a spoofed FIN or RST from outside must
        // not shorten a live translation.
        e.flags |= nat::REPLIED;
        t.nat_update(&k, &e);
        Some(e)
    }
}
