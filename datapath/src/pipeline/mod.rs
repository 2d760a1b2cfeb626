//! The sans-IO userspace pipeline: given a frame, the interface it arrived on and the compiled
//! tables, decide where it goes and which megaflow (key, mask, action) the XDP fast path can use
//! for the packets that follow. No I/O, no allocation per packet (outputs and generated frames
//! go into caller-owned buffers), unit-tested without a kernel.
//!
//! It is a list of stages, one file each, like OVN's logical flow tables. Each stage reads the
//! packet and the compiled tables, narrows the decision or decides, and ORs into the megaflow
//! mask every field it consulted (as OVS accumulates wildcards), so the entry installed for one
//! packet is right for every packet it matches.
//!
//! - from a VM port (logical switch ingress): `port_security` -> `dhcp` (answered locally,
//!   before the ACL: DHCP to the local server is always allowed) -> `acl` -> `arp_responder`
//!   -> `l2_lookup` -> `output`, or through a router:
//! - logical router (`router/`): `admission` -> `ip_input` -> `dnat` -> `routing` ->
//!   `next_hop` -> `snat` -> `output` into the destination switch;
//! - from the uplink: `tunnel_rx` (outer headers, Geneve, datapath and port keys) ->
//!   logical switch egress (`acl`, `port_security`) -> deliver.

mod acl;
mod arp_responder;
mod decision;
mod dhcp;
mod drop;
pub mod encap;
mod fingerprint;
mod icmp;
pub mod key;
mod l2_lookup;
mod output;
mod port_security;
mod provider;
pub mod rewrite;
mod router;
mod run;
mod trace;
mod tunnel_rx;

#[cfg(test)]
mod test_nb;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_acl;
#[cfg(test)]
mod tests_dhcp;
#[cfg(test)]
mod tests_nat;
#[cfg(test)]
mod tests_router;
#[cfg(test)]
mod tests_security;
#[cfg(test)]
mod tests_userpath;

pub use encap::{emit_encap, EncapParams};
pub use key::{describe_action, describe_match, extract_key, flow_json};
pub use trace::{frame_from_spec, trace_answer, Trace};

use geneflow_abi::{act, FlowAction, FlowKey, ENCAP_OVERHEAD, VLAN_PRESENT};
use geneflow_control::compiler::{Datapath, Pipeline};
use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

pub use decision::{Answer, AnswerKind, Decision, Dropped, Learn, Megaflow, Napt, Output};
pub use drop::DropReason;
pub(crate) use run::Run;

/// Provider neighbours kept at most: past this, only the answers to this chassis' own
/// requests are learned (each taking the place of another).
pub const MAX_EXT_NEIGH: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct InPort {
    dp_key: u32,
    port_key: u16,
}

/// The compiled pipeline bound to this host's interfaces (names resolved to ifindexes).
#[derive(Debug, Clone)]
pub struct Tables {
    pub pipeline: Arc<Pipeline>,
    /// Which publication of the tables this is (the DPDK backend's calling thread numbers
    /// them, so that a poll thread can tell that what it decided on is no longer current).
    pub version: u64,
    pub uplink_ifindex: u32,
    pub uplink_mtu: u32,
    pub udp_csum: bool,
    ports: HashMap<u32, InPort>,
    ifindex_by_iface: HashMap<String, u32>,
    /// Provider interfaces and VLANs (`VLAN_PRESENT | vid`, 0 untagged) -> the provider
    /// switch (tunnel key) they carry.
    providers: HashMap<(u32, u16), u32>,
    /// Provider switch (tunnel key) -> its local interface and VLAN.
    provider_out: HashMap<u32, (u32, u16)>,
    /// Every provider interface, whether or not a switch of this chassis uses its physnet.
    provider_ports: Vec<u32>,
    /// Some port bound here has security groups (`Pipeline::has_acl`): conntrack runs.
    has_acl: bool,
    /// See `fip_ct`.
    fip_ct: HashMap<u32, (u32, u32)>,
    /// Neighbours on provider networks, learned from ARP: (switch, address) -> MAC.
    ext_neigh: BTreeMap<(u32, Ipv4Addr), ([u8; 6], bool)>,
}

impl Tables {
    /// Binds `pipeline` to interfaces; `resolve` maps an interface name to its ifindex (ports
    /// whose interface does not exist yet are left out until the next bind).
    pub fn new(
        pipeline: Arc<Pipeline>,
        uplink_ifindex: u32,
        uplink_mtu: u32,
        udp_csum: bool,
        resolve: impl Fn(&str) -> Option<u32>,
    ) -> Tables {
        let mut ports = HashMap::new();
        let mut ifindex_by_iface = HashMap::new();
        for b in pipeline.bindings.values() {
            if let Some(ix) = resolve(&b.iface) {
                ports.insert(
                    ix,
                    InPort {
                        dp_key: b.tunnel_key,
                        port_key: b.key,
                    },
                );
                ifindex_by_iface.insert(b.iface.clone(), ix);
            }
        }
        let mut t = Tables {
            version: 0,
            has_acl: pipeline.has_acl(),
            fip_ct: HashMap::new(),
            pipeline,
            uplink_ifindex,
            uplink_mtu,
            udp_csum,
            ports,
            ifindex_by_iface,
            providers: HashMap::new(),
            provider_out: HashMap::new(),
            provider_ports: Vec::new(),
            ext_neigh: BTreeMap::new(),
        };
        t.fip_ct = t.tracked_fips();
        t
    }

    /// Binds the pipeline's provider switches to this chassis' provider interfaces
    /// (`physnet` -> ifindex). A physnet with no switch here, or a switch whose physnet has
    /// no interface here, is left out (its traffic has nowhere to go).
    /// Interfaces in `untagged_only` serve no VLAN network (their driver hides the tags).
    pub fn with_providers(
        mut self,
        physnets: &HashMap<String, u32>,
        untagged_only: &[u32],
    ) -> Tables {
        self.provider_ports = physnets.values().copied().collect();
        for dp in self.pipeline.datapaths.values() {
            let Some(ix) = dp.provider.as_ref().and_then(|p| physnets.get(p)) else {
                continue;
            };
            let vlan = dp.vlan.map(|v| VLAN_PRESENT | v).unwrap_or(0);
            if vlan != 0 && untagged_only.contains(ix) {
                continue;
            }
            // Two switches on one physnet and VLAN: the first (by key) keeps it.
            if self.providers.contains_key(&(*ix, vlan)) {
                continue;
            }
            self.providers.insert((*ix, vlan), dp.tunnel_key);
            self.provider_out.insert(dp.tunnel_key, (*ix, vlan));
        }
        self
    }

    /// Keeps the provider neighbours learned so far (a new pipeline does not forget them).
    pub fn with_ext_neigh(mut self, n: BTreeMap<(u32, Ipv4Addr), ([u8; 6], bool)>) -> Tables {
        self.ext_neigh = n;
        self
    }

    /// (switch, address) -> (MAC, whether it came as the answer to this chassis' request).
    pub fn ext_neigh(&self) -> &BTreeMap<(u32, Ipv4Addr), ([u8; 6], bool)> {
        &self.ext_neigh
    }

    /// Records that `ip` is at `mac` on provider switch `dp`; whether that changed anything
    /// (then the megaflows routed to it must be regenerated).
    /// `asked`: an answer to this chassis' own request. Only such an answer changes a known
    /// neighbour's MAC (a host on the network cannot redirect a next hop by announcing
    /// itself, as Linux's ARP lock time keeps it from doing), and entries learned otherwise
    /// (from requests this chassis answered) fill at most three quarters of the table, so
    /// asked-for next hops always find room, taking an unasked entry's place if need be.
    /// Whether `learn` with these arguments could change anything (read only: tables shared
    /// with other threads are copied before a change, not before every ARP frame).
    pub fn learns(&self, dp: u32, ip: Ipv4Addr, mac: [u8; 6], asked: bool) -> bool {
        match self.ext_neigh.get(&(dp, ip)) {
            Some(&(m, was_asked)) => asked && (m != mac || !was_asked),
            None => true,
        }
    }

    pub fn learn(&mut self, dp: u32, ip: Ipv4Addr, mac: [u8; 6], asked: bool) -> bool {
        match self.ext_neigh.get(&(dp, ip)).copied() {
            Some((m, was_asked)) => {
                if m == mac || !asked {
                    if asked && !was_asked {
                        self.ext_neigh.insert((dp, ip), (mac, true));
                    }
                    return false;
                }
                self.ext_neigh.insert((dp, ip), (mac, true));
                true
            }
            None => {
                if !asked {
                    let unasked = self.ext_neigh.values().filter(|v| !v.1).count();
                    if unasked >= MAX_EXT_NEIGH * 3 / 4 {
                        return false;
                    }
                } else if self.ext_neigh.len() >= MAX_EXT_NEIGH {
                    match self.ext_neigh.iter().find(|(_, v)| !v.1).map(|(k, _)| *k) {
                        Some(k) => {
                            self.ext_neigh.remove(&k);
                        }
                        None => return false,
                    }
                }
                self.ext_neigh.insert((dp, ip), (mac, asked));
                true
            }
        }
    }

    /// The output to provider switch `dp`: its local interface and VLAN.
    pub fn provider_output(&self, dp: u32) -> Option<Output> {
        self.provider_out
            .get(&dp)
            .map(|&(ifindex, vlan)| Output::Provider { ifindex, vlan })
    }

    pub fn ifindex(&self, iface: &str) -> Option<u32> {
        self.ifindex_by_iface.get(iface).copied()
    }

    /// Largest inner frame (with its Ethernet header) that fits the uplink once encapsulated.
    pub fn max_inner_len(&self) -> u32 {
        self.uplink_mtu + 14 - ENCAP_OVERHEAD
    }

    fn datapath(&self, key: u32) -> Option<&Arc<Datapath>> {
        self.pipeline.datapaths.get(&key)
    }

    /// Runs the logical pipeline on one frame. Frames the pipeline writes itself (routed
    /// copies, answers) go into `buf` (`Decision::rewritten`).
    pub fn process(
        &self,
        frame: &[u8],
        in_ifindex: u32,
        out: &mut Vec<Output>,
        buf: &mut Vec<u8>,
    ) -> Result<Decision, DropReason> {
        self.process_dropping(frame, in_ifindex, (0, 0), out, buf)
            .map_err(|d| d.reason)
    }

    /// `process`, with the drop megaflow of a drop verdict where it has one.
    // The drop verdict carries its megaflow by value as `Decision` does: boxing it would
    // allocate for every dropped frame.
    #[allow(clippy::result_large_err)]
    pub fn process_dropping(
        &self,
        frame: &[u8],
        in_ifindex: u32,
        (ct_state, vlan): (u8, u16),
        out: &mut Vec<Output>,
        buf: &mut Vec<u8>,
    ) -> Result<Decision, Dropped> {
        out.clear();
        let mut r = Run::new(self, frame, in_ifindex, ct_state, None);
        r.vlan = vlan;
        self.stages(&mut r, out, buf).map_err(|reason| {
            out.clear();
            let megaflow = match r.dp_key {
                Some(dp_key) if reason.cacheable() => Some(r.megaflow(FlowAction {
                    kind: act::DROP,
                    drop_reason: reason.counter(),
                    dp_key,
                    ..Default::default()
                })),
                _ => None,
            };
            Dropped { reason, megaflow }
        })
    }

    fn run(
        &self,
        frame: &[u8],
        (in_ifindex, vlan): (u32, u16),
        out: &mut Vec<Output>,
        buf: &mut Vec<u8>,
        trace: Option<&mut Vec<String>>,
    ) -> Result<Decision, DropReason> {
        out.clear();
        let mut r = Run::new(self, frame, in_ifindex, 0, trace);
        r.vlan = vlan;
        self.stages(&mut r, out, buf)
    }

    /// The flow key of `frame` as the XDP program builds it for its megaflow lookup, and
    /// where the frame to act on starts (a tunnel frame's inner frame; 0 otherwise): for the
    /// userspace fast path (`flowcache`, `flowexec`). `Err`: a frame from the underlay that
    /// fails the outer checks, dropped with that reason before any lookup, as in XDP.
    /// `Ok(None)`: left to the pipeline (a provider interface, whose VLAN tag XDP takes off
    /// first; a frame too short for a key). No connection tracking: `ct_state` is 0.
    pub fn fast_key(
        &self,
        frame: &[u8],
        (in_ifindex, vlan): (u32, u16),
    ) -> Result<Option<(FlowKey, usize)>, DropReason> {
        if in_ifindex == self.uplink_ifindex {
            let mut r = Run::new(self, frame, in_ifindex, 0, None);
            let o = tunnel_rx::outer(&mut r)?;
            return Ok(Some((r.key, o.inner_off)));
        }
        // A provider interface's frame comes with its tag popped, its VLAN in the key (as
        // XDP keys it).
        Ok(extract_key(frame, in_ifindex).map(|mut k| {
            if self.provider_ports.contains(&in_ifindex) {
                k.tun_out_port = vlan;
            }
            (k, 0)
        }))
    }

    /// Floating IPs bound here whose port is tracked (`ct_zone` not 0): external address ->
    /// fixed address and zone, both addresses as keys hold them (network byte order). A
    /// frame from a provider network to one is looked up in conntrack as the VM will see it
    /// (XDP's `FIP_CT`).
    pub fn fip_ct(&self) -> &HashMap<u32, (u32, u32)> {
        &self.fip_ct
    }

    fn tracked_fips(&self) -> HashMap<u32, (u32, u32)> {
        let ne = |a: Ipv4Addr| u32::from_ne_bytes(a.octets());
        let mut m = HashMap::new();
        for rt in self.pipeline.routers.values() {
            for f in rt.fips.iter().filter(|f| f.local) {
                let ix = self
                    .pipeline
                    .bindings
                    .values()
                    .find(|b| b.port == f.port)
                    .and_then(|b| self.ifindex(&b.iface));
                let zone = ix.map_or(0, |ix| self.ct_zone(ix, &FlowKey::zeroed()));
                if zone != 0 {
                    m.insert(ne(f.external_ip), (ne(f.logical_ip), zone));
                }
            }
        }
        m
    }

    /// The conntrack zone of frames arriving on `in_ifindex` with key `key`, as the XDP
    /// program picks it (0: not tracked). Once any port here has security groups, every
    /// frame is tracked, so that replies toward a port with groups are known whichever port
    /// they come from: a VM port's in its switch's zone, the uplink's in its VNI's.
    pub fn ct_zone(&self, in_ifindex: u32, key: &FlowKey) -> u32 {
        if !self.has_acl {
            0
        } else if in_ifindex == self.uplink_ifindex {
            key.tun_vni
        } else {
            self.ports.get(&in_ifindex).map_or(0, |p| p.dp_key)
        }
    }

    /// This chassis's tunnel address, if the NB gives it one.
    pub fn encap_ip(&self) -> Option<Ipv4Addr> {
        self.pipeline.encap_ip
    }

    /// Whether `ifindex` is one of this chassis' provider interfaces.
    pub fn is_provider(&self, ifindex: u32) -> bool {
        self.provider_ports.contains(&ifindex)
    }

    fn stages(
        &self,
        r: &mut Run,
        out: &mut Vec<Output>,
        buf: &mut Vec<u8>,
    ) -> Result<Decision, DropReason> {
        if r.in_ifindex == self.uplink_ifindex {
            tunnel_rx::run(r, out)
        } else if let Some(dp) = self.providers.get(&(r.in_ifindex, r.vlan)) {
            provider::ingress(r, *dp, out, buf)
        } else if self.provider_ports.contains(&r.in_ifindex) {
            r.note("provider in", || {
                "no switch of this chassis is on this physical network: dropped".into()
            });
            Err(DropReason::UnknownDatapath)
        } else {
            self.ingress_local(r, out, buf)
        }
    }

    /// Logical switch ingress: a frame from a local VM port.
    fn ingress_local(
        &self,
        r: &mut Run,
        out: &mut Vec<Output>,
        buf: &mut Vec<u8>,
    ) -> Result<Decision, DropReason> {
        let inp = *self
            .ports
            .get(&r.in_ifindex)
            .ok_or(DropReason::UnknownInPort)?;
        r.key = extract_key(r.frame, r.in_ifindex).ok_or(DropReason::Malformed)?;
        r.key.ct_state = r.ct_state;
        r.mask.in_ifindex = u32::MAX;
        let dp = self
            .datapath(inp.dp_key)
            .ok_or(DropReason::UnknownDatapath)?;
        r.dp_key = Some(dp.tunnel_key);
        r.note("ingress", || {
            format!(
                "logical port {} (key {}) on logical switch {} (tunnel key {})",
                dp.ports
                    .get(&inp.port_key)
                    .map(|p| p.name.as_str())
                    .unwrap_or("?"),
                inp.port_key,
                dp.name,
                dp.tunnel_key
            )
        });
        port_security::ingress(r, dp, inp.port_key)?;
        if let Some(d) = dhcp::run(r, dp, inp.port_key, out, buf)? {
            return Ok(d);
        }
        acl::from_lport(r, dp, inp.port_key)?;
        if let Some(d) = arp_responder::run(r, dp, inp.port_key, out, buf)? {
            return Ok(d);
        }
        match l2_lookup::run(r, dp, inp.port_key, out)? {
            l2_lookup::L2::Flooded => Ok(r.decision(0)),
            l2_lookup::L2::Port(port) => output::to_port(r, dp, inp.port_key, port, out, None),
            l2_lookup::L2::Router(att) => router::run(r, dp, att, out, buf),
            l2_lookup::L2::Physical(o) => {
                let Output::Provider { ifindex, vlan } = o else {
                    return Err(DropReason::NoDestination);
                };
                out.push(o);
                let mut d = r.decision(0);
                d.megaflow = Some(r.megaflow(r.with_commit(FlowAction {
                    kind: act::OUTPUT,
                    out_ifindex: ifindex,
                    dp_key: dp.tunnel_key,
                    vlan,
                    ..Default::default()
                })));
                Ok(d)
            }
        }
    }
}
