//! A megaflow's action run in userspace on a frame, as the XDP program runs it: for the DPDK
//! backend's poll threads, whose buffers have headroom to grow into (DPDK's 128 bytes, more
//! than the 58 of an encapsulation). Sans-IO: a `Frame` is a window on a buffer, and the
//! verdict says where the result goes and which counter moves.
//!
//! Done here: output (with an 802.1Q tag for a provider VLAN), encapsulation with a cached
//! next hop, decapsulation, drop and pass, a router's checks and rewrites, a floating IP's
//! translation, default SNAT both ways, the ARP responder's reply, and the conntrack commit. The state the XDP program
//! keeps in maps (connections, default SNAT's translations) is the caller's (`State`),
//! asked at the points where XDP consults its maps. What the fast path cannot finish (the
//! next hop not resolved yet, a connection without a translation yet) goes to the slow
//! path, as XDP does. The ARP responder's reply is made here too, from the request.

use crate::pipeline::rewrite::{self, martian};
use crate::wire::geneve::{self, OvnMetadata};
use geneflow_abi::{
    act, arp, csum_replace4, ctr, flag, flow_hash, udp_source_port, FlowAction, FlowKey, NatEntry,
    ENCAP_OVERHEAD, GENEVE_PORT, OVN_OPT_CLASS,
};
use std::net::Ipv4Addr;

const ETH_LEN: usize = 14;

/// A frame inside a buffer with room around it: `buf[start..end]`.
pub struct Frame<'a> {
    pub buf: &'a mut [u8],
    pub start: usize,
    pub end: usize,
}

impl Frame<'_> {
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Moves the start by `delta` bytes (negative: grows into the headroom), as
    /// `bpf_xdp_adjust_head`; false when out of the buffer or past the end.
    fn adjust_head(&mut self, delta: isize) -> bool {
        match self.start.checked_add_signed(delta) {
            Some(s) if s <= self.end => {
                self.start = s;
                true
            }
            _ => false,
        }
    }
}

/// What to do with the frame after its action ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Transmit the frame (as it now is) on `ifindex`; counts `ctr::FAST_HIT`.
    Output { ifindex: u32, out_slot: u32 },
    /// Drop, counting this counter.
    Drop(u32),
    /// To the kernel stack (`ctr::PASS`).
    Pass,
    /// To the slow path, unchanged: the pipeline decides (and may answer, e.g. ICMP).
    SlowPath,
}

/// What an action needs of the state the caller keeps (the XDP program keeps it in maps).
pub trait State {
    /// Commits the frame's connection (`flag::CT_COMMIT`).
    fn commit(&mut self);
    /// The outbound default-SNAT translation of `frame` (refreshed); `None`: none yet, the
    /// slow path allocates one.
    fn napt_out(&mut self, frame: &[u8]) -> Option<NatEntry>;
    /// The translation back of the reply `frame` (noted as replied); `None`: dropped.
    fn napt_in(&mut self, frame: &[u8]) -> Option<NatEntry>;
}

/// Runs `a` on `f`. `key` is the frame's flow key (for the outer source port); `inner` is
/// the offset of the inner frame of a Geneve frame (decapsulation).
pub fn execute(
    f: &mut Frame<'_>,
    key: &FlowKey,
    inner: usize,
    a: &FlowAction,
    state: &mut dyn State,
) -> Verdict {
    match a.kind {
        act::ARP_REPLY => return arp_reply(f, a),
        act::UNNAPT => return unnapt(f, state),
        _ => {}
    }
    // Before any rewrite: a connection without a translation yet goes to the slow path as
    // it came.
    let napt = if a.flags & flag::NAPT != 0 {
        match state.napt_out(f.bytes()) {
            Some(e) => Some(e),
            None => return Verdict::SlowPath,
        }
    } else {
        None
    };
    if a.flags & flag::ROUTE != 0 {
        if let Err(v) = route(f, a) {
            return v;
        }
        if let Some(e) = napt {
            let (s, end) = (f.start, f.end);
            if rewrite::napt(&mut f.buf[s..end], true, e.addr, e.port).is_none() {
                return Verdict::Drop(ctr::DROP_MALFORMED);
            }
        }
        if a.flags & (flag::SNAT | flag::DNAT) != 0 && !nat(f, key, a) {
            return Verdict::Drop(ctr::DROP_MALFORMED);
        }
    }
    if a.flags & flag::CT_COMMIT != 0 {
        state.commit();
    }
    match a.kind {
        act::OUTPUT => {
            if a.vlan != 0 && !vlan_push(f, a.vlan) {
                return Verdict::Drop(ctr::DROP_MALFORMED);
            }
            Verdict::Output {
                ifindex: a.out_ifindex,
                out_slot: a.out_slot,
            }
        }
        act::DECAP_OUTPUT => {
            if inner > f.len() || !f.adjust_head(inner as isize) {
                return Verdict::Drop(ctr::DROP_MALFORMED);
            }
            Verdict::Output {
                ifindex: a.out_ifindex,
                out_slot: a.out_slot,
            }
        }
        act::ENCAP => encap(f, key, a),
        act::PASS => Verdict::Pass,
        act::DROP => Verdict::Drop(if a.drop_reason < ctr::COUNT {
            a.drop_reason
        } else {
            ctr::DROP_ACTION
        }),
        _ => Verdict::Drop(ctr::DROP_ACTION),
    }
}

/// `act::ARP_REPLY`: the ARP request becomes the reply of `a.set_smac` and goes back out of
/// the port it came in on (`a.out_ifindex`), tagged for a provider VLAN; the ARP responder's
/// megaflow matched the request's fields (opcode, target address, sender MAC agreeing).
fn arp_reply(f: &mut Frame<'_>, a: &FlowAction) -> Verdict {
    if f.len() < arp::FRAME_LEN {
        return Verdict::Drop(ctr::DROP_MALFORMED_ARP);
    }
    let mac = a.set_smac;
    let s = f.start;
    let b = &mut f.buf[s..s + arp::FRAME_LEN];
    let requester: [u8; 6] = b[6..12].try_into().unwrap_or_default();
    let sha: [u8; 6] = b[22..28].try_into().unwrap_or_default();
    let spa: [u8; 4] = b[28..32].try_into().unwrap_or_default();
    let tpa: [u8; 4] = b[38..42].try_into().unwrap_or_default();
    b[0..6].copy_from_slice(&requester);
    b[6..12].copy_from_slice(&mac);
    b[20..22].copy_from_slice(&u16::from(arp::OP_REPLY).to_be_bytes());
    b[22..28].copy_from_slice(&mac);
    b[28..32].copy_from_slice(&tpa);
    b[32..38].copy_from_slice(&sha);
    b[38..42].copy_from_slice(&spa);
    if a.vlan != 0 && !vlan_push(f, a.vlan) {
        return Verdict::Drop(ctr::DROP_MALFORMED);
    }
    Verdict::Output {
        ifindex: a.out_ifindex,
        out_slot: a.out_slot,
    }
}

/// `act::UNNAPT`: a reply to the chassis' external address goes back, routed, to the VM that
/// opened the connection; an unknown tuple is dropped.
fn unnapt(f: &mut Frame<'_>, state: &mut dyn State) -> Verdict {
    let Some(e) = state.napt_in(f.bytes()) else {
        return Verdict::Drop(ctr::DROP_NO_NAT);
    };
    let a = FlowAction {
        kind: act::OUTPUT,
        flags: flag::ROUTE,
        set_smac: e.smac,
        set_dmac: e.dmac,
        out_ifindex: e.out_ifindex,
        out_slot: e.out_slot,
        ..FlowAction::default()
    };
    if let Err(v) = route(f, &a) {
        return v;
    }
    let (s, end) = (f.start, f.end);
    if rewrite::napt(&mut f.buf[s..end], false, e.addr, e.port).is_none() {
        return Verdict::Drop(ctr::DROP_MALFORMED);
    }
    Verdict::Output {
        ifindex: e.out_ifindex,
        out_slot: e.out_slot,
    }
}

/// A router's admission checks and rewrites (`flag::ROUTE`): plain IPv4 with a good header
/// checksum from a routable source, TTL above 1 (else the slow path sends time exceeded), not
/// too big for the tunnel (with DF the slow path answers fragmentation needed); then the MACs
/// and TTL - 1 with the checksum updated (RFC 1624).
fn route(f: &mut Frame<'_>, a: &FlowAction) -> Result<(), Verdict> {
    let len = f.len();
    let p = f.start;
    if len < ETH_LEN + 20 {
        return Err(Verdict::Drop(ctr::DROP_MALFORMED));
    }
    let b = &mut f.buf[p..p + ETH_LEN + 20];
    let vihl = b[ETH_LEN];
    if vihl != 0x45 {
        return Err(Verdict::Drop(if vihl >> 4 == 4 {
            ctr::DROP_IP_OPTIONS
        } else {
            ctr::DROP_MALFORMED
        }));
    }
    if checksum(&b[ETH_LEN..ETH_LEN + 20]) != 0 {
        return Err(Verdict::Drop(ctr::DROP_IP_CSUM));
    }
    let src = Ipv4Addr::new(b[26], b[27], b[28], b[29]);
    if martian(src) {
        return Err(Verdict::Drop(ctr::DROP_MARTIAN));
    }
    let ttl = b[22];
    if ttl <= 1 {
        return Err(Verdict::SlowPath);
    }
    if a.kind == act::ENCAP && len as u32 > a.max_inner_len {
        let df = b[20] & 0x40 != 0;
        return Err(if df {
            Verdict::SlowPath
        } else {
            Verdict::Drop(ctr::DROP_TOO_BIG)
        });
    }
    b[..6].copy_from_slice(&a.set_dmac);
    b[6..12].copy_from_slice(&a.set_smac);
    // As XDP and Linux's `ip_decrease_ttl`: a sum of 0xffff becomes 0x0000.
    rewrite::dec_ttl(&mut b[ETH_LEN..]);
    Ok(())
}

/// A floating IP's translation (`flag::SNAT`: source to `nat_src`, `flag::DNAT`:
/// destination to `nat_dst`) of the routed IPv4 frame `route` checked (plain 20-byte header),
/// with the IP and the TCP/UDP checksums updated (RFC 1624); a UDP checksum of 0 (none)
/// stays 0, and a later fragment has no L4 header to update. False (nothing written): a
/// first fragment too short to hold its L4 checksum, which XDP drops as malformed.
fn nat(f: &mut Frame<'_>, key: &FlowKey, a: &FlowAction) -> bool {
    let p = f.start;
    let b = &mut f.buf[p..f.end];
    let rd16 = |b: &[u8], o: usize| u16::from_ne_bytes([b[o], b[o + 1]]);
    let first = u16::from_be(rd16(b, 20)) & 0x1fff == 0;
    let l4 = ETH_LEN + 20;
    let at = match key.ip_proto {
        6 if first => Some(l4 + 16),
        17 if first => Some(l4 + 6),
        _ => None,
    };
    if at.is_some_and(|o| o + 2 > b.len()) {
        return false;
    }
    let mut ipc = rd16(b, 24);
    let mut l4c = at.map(|o| rd16(b, o));
    let udp_none = key.ip_proto == 17 && l4c == Some(0);
    for (on, off, new) in [
        (a.flags & flag::SNAT != 0, 26, a.nat_src),
        (a.flags & flag::DNAT != 0, 30, a.nat_dst),
    ] {
        if !on {
            continue;
        }
        let old = u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]]);
        b[off..off + 4].copy_from_slice(&new.to_ne_bytes());
        ipc = csum_replace4(ipc, old, new);
        l4c = l4c.map(|c| csum_replace4(c, old, new));
    }
    b[24..26].copy_from_slice(&ipc.to_ne_bytes());
    if let (Some(o), Some(c), false) = (at, l4c, udp_none) {
        let c = if key.ip_proto == 17 && c == 0 {
            0xffff
        } else {
            c
        };
        b[o..o + 2].copy_from_slice(&c.to_ne_bytes());
    }
    true
}

/// The Internet checksum of `data` (0 when a header with its checksum in place is good).
fn checksum(data: &[u8]) -> u16 {
    let mut s: u32 = data
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Puts the 802.1Q tag of `vlan` (`VLAN_PRESENT | vid`) after the MACs.
fn vlan_push(f: &mut Frame<'_>, vlan: u16) -> bool {
    if f.len() < 12 || !f.adjust_head(-4) {
        return false;
    }
    let s = f.start;
    f.buf.copy_within(s + 4..s + 16, s);
    f.buf[s + 12..s + 14].copy_from_slice(&0x8100u16.to_be_bytes());
    f.buf[s + 14..s + 16].copy_from_slice(&(vlan & 0x0fff).to_be_bytes());
    true
}

/// Outer Ethernet (the cached next hop), IPv4 (DF, TTL 64), UDP to 6081 from the flow's
/// port, Geneve with the OVN option, in the headroom before the frame.
fn encap(f: &mut Frame<'_>, key: &FlowKey, a: &FlowAction) -> Verdict {
    let inner_len = f.len();
    if inner_len as u32 > a.max_inner_len {
        return Verdict::Drop(ctr::DROP_TOO_BIG);
    }
    if a.flags & flag::NH_CACHED == 0 {
        // No next hop resolved yet: the slow path sends and resolves it.
        return Verdict::SlowPath;
    }
    if !f.adjust_head(-(ENCAP_OVERHEAD as isize)) {
        return Verdict::Drop(ctr::DROP_MALFORMED);
    }
    let total = f.len();
    let s = f.start;
    let b = &mut f.buf[s..s + total];
    b[..6].copy_from_slice(&a.nh_dmac);
    b[6..12].copy_from_slice(&a.nh_smac);
    b[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (total - ETH_LEN) as u16;
    let ip = &mut b[ETH_LEN..ETH_LEN + 20];
    ip[0] = 0x45;
    ip[1] = 0;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[4..6].copy_from_slice(&[0, 0]);
    ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[10..12].copy_from_slice(&[0, 0]);
    ip[12..16].copy_from_slice(&a.encap_src.to_ne_bytes());
    ip[16..20].copy_from_slice(&a.encap_dst.to_ne_bytes());
    let c = checksum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let udp_len = ip_len - 20;
    let u = ETH_LEN + 20;
    b[u..u + 2].copy_from_slice(&udp_source_port(flow_hash(key)).to_be_bytes());
    b[u + 2..u + 4].copy_from_slice(&GENEVE_PORT.to_be_bytes());
    b[u + 4..u + 6].copy_from_slice(&udp_len.to_be_bytes());
    b[u + 6..u + 8].copy_from_slice(&[0, 0]);
    let meta = OvnMetadata::from_value(a.ovn_opt);
    let opt = meta.to_option_bytes();
    let repr = geneve::Repr {
        oam: false,
        critical: true,
        protocol: geneve::PROTO_ETHERNET,
        vni: a.vni,
        options: &opt,
        ovn: Some(meta),
    };
    repr.emit(&mut geneve::Packet::new_unchecked(
        &mut b[u + 8..ENCAP_OVERHEAD as usize],
    ));
    debug_assert_eq!(u16::from_be_bytes([opt[0], opt[1]]), OVN_OPT_CLASS);
    if a.flags & flag::UDP_CSUM != 0 {
        // Pseudo-header (addresses, protocol, length) and the UDP header and payload.
        let mut s: u32 = 17 + udp_len as u32;
        for w in [a.encap_src.to_ne_bytes(), a.encap_dst.to_ne_bytes()] {
            s += u16::from_be_bytes([w[0], w[1]]) as u32 + u16::from_be_bytes([w[2], w[3]]) as u32;
        }
        let body = !checksum(&b[u..]) as u32;
        s += body;
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        let c = match !(s as u16) {
            0 => 0xffff,
            c => c,
        };
        b[u + 6..u + 8].copy_from_slice(&c.to_be_bytes());
    }
    Verdict::Output {
        ifindex: a.out_ifindex,
        out_slot: a.out_slot,
    }
}

#[cfg(test)]
mod tests;
