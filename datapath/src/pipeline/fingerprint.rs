//! Per-datapath fingerprints: a hash of everything a datapath's megaflows are computed from,
//! so that only datapaths whose fingerprint moved get a new generation (their entries miss in
//! O(1)), and a restarted agent keeps the entries of unchanged ones.

use super::Tables;
use geneflow_control::compiler::Datapath;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

/// FNV-1a: a hash that, unlike std's, is fixed across Rust releases, so fingerprints stored
/// by one build compare equal in the next.
#[derive(Default)]
struct Fnv1a(Option<u64>);

impl Hasher for Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        let mut h = self.0.unwrap_or(0xcbf2_9ce4_8422_2325);
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = Some(h);
    }

    fn finish(&self) -> u64 {
        self.0.unwrap_or(0xcbf2_9ce4_8422_2325)
    }
}

impl Tables {
    fn hash_datapath(&self, dp: &Datapath, h: &mut Fnv1a) {
        dp.hash(h);
        for (_, iface) in dp.local_ports() {
            self.ifindex(iface).hash(h);
        }
    }

    /// One fingerprint per logical datapath of everything its megaflows are computed from: the
    /// compiled datapath, the interfaces its local ports are attached as, the routers attached
    /// to it and every switch they reach (routed entries belong to the switch the packet
    /// entered), the uplink and its next-hop source MAC (`uplink_mac`), the encap IP and
    /// options, and this build. Equal fingerprints mean the installed entries are still exact,
    /// so a restarted agent keeps them.
    pub fn fingerprints(&self, uplink_mac: [u8; 6]) -> BTreeMap<u32, u64> {
        self.pipeline
            .datapaths
            .iter()
            .map(|(key, dp)| {
                let mut h = Fnv1a::default();
                geneflow_abi::ABI_VERSION.hash(&mut h);
                env!("CARGO_PKG_VERSION").hash(&mut h);
                self.hash_datapath(dp, &mut h);
                self.pipeline.encap_ip.hash(&mut h);
                (
                    self.uplink_ifindex,
                    self.uplink_mtu,
                    self.udp_csum,
                    uplink_mac,
                )
                    .hash(&mut h);
                // Routed entries to a provider network carry its interface and the learned
                // MAC of their next hop.
                let mut prov: Vec<(u32, (u32, u16))> =
                    self.provider_out.iter().map(|(a, b)| (*a, *b)).collect();
                prov.sort_unstable();
                prov.hash(&mut h);
                self.pipeline.external_ip.hash(&mut h);
                for att in dp.router_ports.values() {
                    let Some(r) = self.pipeline.routers.get(&att.router) else {
                        continue;
                    };
                    r.hash(&mut h);
                    // Only the neighbours of the network this router's gateway is on.
                    if let Some(gw) = r.gateway.map(|g| r.ports[g].switch) {
                        for e in self
                            .ext_neigh
                            .range((gw, std::net::Ipv4Addr::UNSPECIFIED)..)
                        {
                            if e.0 .0 != gw {
                                break;
                            }
                            e.hash(&mut h);
                        }
                    }
                    for p in &r.ports {
                        if let Some(other) = self.pipeline.datapaths.get(&p.switch) {
                            self.hash_datapath(other, &mut h);
                        }
                    }
                }
                (*key, h.finish())
            })
            .chain(std::iter::once((
                geneflow_abi::DP_KEY_HOSTED,
                self.hosted_fingerprint(),
            )))
            .collect()
    }

    /// The fingerprint of the generation slot `DP_KEY_HOSTED`: the set of datapaths this
    /// chassis hosts, which the drop entries of unknown VNIs (a negative cache) depend on.
    fn hosted_fingerprint(&self) -> u64 {
        let mut h = Fnv1a::default();
        geneflow_abi::ABI_VERSION.hash(&mut h);
        env!("CARGO_PKG_VERSION").hash(&mut h);
        self.uplink_ifindex.hash(&mut h);
        for k in self.pipeline.datapaths.keys() {
            k.hash(&mut h);
        }
        h.finish()
    }
}
