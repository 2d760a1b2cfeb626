//! Default SNAT, the translations' side, for both backends: the first packet of a
//! connection out through the chassis' external address gets a port (the VM's own when free,
//! like Linux; otherwise the next free one for that remote address and port), both
//! directions go into the NAT table (`NatStore`: XDP's BPF map, or the DPDK backend's
//! `usernat::NatMap`), and the packet is rewritten; a reply the fast path could not translate (its
//! megaflow was not installed yet) is checked as XDP would and translated here from the
//! table. Outbound entries are keyed by the VM's port too: VMs of different tenants with the
//! same address never share one. Limits: 64,512 ports per protocol and remote address and
//! port, 131,072 translations in all (a full table refuses new connections, `drop_no_nat`;
//! it never evicts a live one), at most `ALLOC_RATE` new ones per second per port; idle ones
//! expire like conntrack's (TCP 6 h, UDP 60 s, ICMP 30 s), both directions together.

use crate::pipeline::rewrite::{dec_ttl, martian, napt, napt_ports, set_eth};
use geneflow_abi::{ct, nat, CtKey, NatEntry};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::Duration;

/// Where the translations live: the BPF map XDP reads (the XDP backend), or a table in
/// memory (the DPDK backend).
pub trait NatStore {
    fn nat_get(&self, k: &CtKey) -> Option<NatEntry>;
    /// Writes both directions of a translation, the inbound half first (a port is taken as
    /// long as its inbound half exists); if the outbound half cannot be written (a full
    /// table), an inbound half written just now (`back_new`) is taken back. False: not
    /// written.
    fn nat_insert(
        &mut self,
        out: (&CtKey, &NatEntry),
        back: (&CtKey, &NatEntry),
        back_new: bool,
    ) -> bool;
    /// Rewrites one entry in place.
    fn nat_update(&mut self, k: &CtKey, e: &NatEntry);
    fn nat_remove(&mut self, k: &CtKey) -> bool;
    fn nat_entries(&self) -> Vec<(CtKey, NatEntry)>;
}

/// New translations per second per VM port (bursts twice as large): a VM spraying new
/// connections cannot fill the table in less than about a minute.
pub const ALLOC_RATE: f32 = 1000.0;

fn addr(frame: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([frame[at], frame[at + 1], frame[at + 2], frame[at + 3]])
}

/// The NAT key of `frame` in direction `dir`; outbound ones name the VM port `ifindex`.
pub fn key(frame: &[u8], dir: u32, ifindex: u32) -> Option<CtKey> {
    let (proto, sport, dport) = napt_ports(frame, dir == nat::DIR_OUT)?;
    Some(CtKey {
        zone: if dir == nat::DIR_OUT {
            nat::out_zone(ifindex)
        } else {
            dir
        },
        src: addr(frame, 26),
        dst: addr(frame, 30),
        sport,
        dport,
        proto,
        pad: [0; 3],
    })
}

/// Allocates (or finds) the translation of the outbound packet `orig` and applies it to
/// `routed` (its routed copy). `back` is how replies reach the VM: its port's ifindex and
/// counter slot, the router port's MAC and the VM's. `false`: not translatable, no port free,
/// the table full, or a frame too short to rewrite: the packet is dropped.
pub fn out<S: NatStore + ?Sized>(
    bpf: &mut S,
    orig: &[u8],
    routed: &mut [u8],
    external: Ipv4Addr,
    back: (u32, u32, [u8; 6], [u8; 6]),
    now_ns: u64,
) -> bool {
    let Some(k) = key(orig, nat::DIR_OUT, back.0) else {
        return false;
    };
    let ext = u32::from_ne_bytes(external.octets());
    // An outbound half whose inbound half now belongs to someone else (it expired and the
    // port was given away in between) is stale: the connection gets a port afresh.
    let owned = |port: u16| {
        bpf.nat_get(&reply_key(&k, ext, port))
            .is_none_or(|i| i.addr == k.src && i.port == k.sport && i.out_ifindex == back.0)
    };
    let kept = bpf.nat_get(&k).filter(|e| owned(e.port));
    let port = match kept {
        Some(e) => e.port,
        None => match free_port(bpf, &k, ext, back.0) {
            Some(p) => p,
            None => return false,
        },
    };
    // A connection the slow path sees again (its megaflow was regenerated) keeps what XDP
    // noted of it: that it was answered, that it is closing.
    let before = bpf.nat_get(&reply_key(&k, ext, port));
    let (out_flags, in_flags) = (
        kept.map(|e| e.flags).unwrap_or(0),
        before.map(|e| e.flags).unwrap_or(0),
    );
    // Both halves, every time the slow path sees the connection: an inbound half that went
    // (expired or deleted) comes back before the port could be given to anyone else.
    let o = NatEntry {
        addr: ext,
        port,
        flags: out_flags,
        last_seen_ns: now_ns,
        ..Default::default()
    };
    let i = NatEntry {
        addr: k.src,
        port: k.sport,
        out_ifindex: back.0,
        out_slot: back.1,
        smac: back.2,
        dmac: back.3,
        flags: in_flags,
        last_seen_ns: before.map(|e| e.last_seen_ns).unwrap_or(now_ns),
        ..Default::default()
    };
    if !bpf.nat_insert((&k, &o), (&reply_key(&k, ext, port), &i), before.is_none()) {
        return false;
    }
    napt(routed, true, ext, port).is_some()
}

/// The key the reply of `k` (translated to `ext`:`port`) carries.
pub fn reply_key(k: &CtKey, ext: u32, port: u16) -> CtKey {
    CtKey {
        zone: nat::DIR_IN,
        src: k.dst,
        dst: ext,
        sport: if k.proto == 1 { 0 } else { k.dport },
        dport: port,
        proto: k.proto,
        pad: [0; 3],
    }
}

/// The outbound key of the connection whose inbound entry is `(k, e)`.
pub fn out_key(k: &CtKey, e: &NatEntry) -> CtKey {
    CtKey {
        zone: nat::out_zone(e.out_ifindex),
        src: e.addr,
        dst: k.src,
        sport: e.port,
        dport: if k.proto == 1 { 0 } else { k.sport },
        proto: k.proto,
        pad: [0; 3],
    }
}

/// A port of `ext` no other connection to the same remote address and port uses: the VM's
/// own first, then from a hash of the tuple onwards.
fn free_port<S: NatStore + ?Sized>(bpf: &S, k: &CtKey, ext: u32, ifindex: u32) -> Option<u16> {
    let span = u32::from(u16::MAX - nat::PORT_MIN) + 1;
    let own = u16::from_be(k.sport);
    let start = (k.src ^ k.sport as u32 ^ (k.dst.rotate_left(7)) ^ ifindex)
        .wrapping_mul(0x9e37_79b1)
        % span;
    let own_first = (own >= nat::PORT_MIN).then_some(own);
    let candidates = own_first
        .into_iter()
        .chain((0..span).map(|i| nat::PORT_MIN + ((start + i) % span) as u16))
        .take(4096);
    for p in candidates {
        let port = p.to_be();
        let taken = bpf.nat_get(&reply_key(k, ext, port));
        // Free, or the remains of this very connection (its outbound entry went first).
        if taken.is_none_or(|e| e.addr == k.src && e.port == k.sport && e.out_ifindex == ifindex) {
            return Some(port);
        }
    }
    None
}

/// Translates the reply `frame` back from the table into `buf`: the VM's port to send it on,
/// or `None` (dropped): no translation, or a frame XDP's router checks refuse (IPv4 options,
/// lengths, header checksum, martian source, TTL).
pub fn back<S: NatStore + ?Sized>(
    bpf: &mut S,
    frame: &[u8],
    buf: &mut Vec<u8>,
    now_ns: u64,
) -> Option<u32> {
    let ip = etherparse::Ipv4HeaderSlice::from_slice(frame.get(14..)?).ok()?;
    let total = usize::from(ip.total_len());
    let ok = ip.ihl() == 5
        && total >= 20
        && total + 14 <= frame.len()
        && ip.to_header().calc_header_checksum() == ip.header_checksum()
        && !martian(ip.source_addr())
        && ip.ttl() > 1;
    if !ok {
        return None;
    }
    let k = key(frame, nat::DIR_IN, 0)?;
    let mut e = bpf.nat_get(&k)?;
    // A reply, as XDP would note it.
    e.flags |= nat::REPLIED;
    e.last_seen_ns = now_ns;
    bpf.nat_update(&k, &e);
    buf.clear();
    buf.extend_from_slice(frame);
    set_eth(buf, e.smac, e.dmac);
    dec_ttl(&mut buf[14..34]);
    napt(buf, false, e.addr, e.port)?;
    Some(e.out_ifindex)
}

/// Deletes the default-SNAT translations idle for longer than their timeout, both halves of
/// a connection together: conntrack's per protocol, but 10 s once a TCP FIN or RST went
/// through and 60 s for a connection no reply ever came back to (a spray of new connections
/// frees its entries within a minute). A half is deleted with its partner only if that
/// partner points back at it, and each is read again just before it goes (XDP may have used
/// it meanwhile); the outbound half goes first, so a port is never free while its outbound
/// half lives. Returns how many entries went.
pub fn expire<S: NatStore + ?Sized>(map: &mut S, now: u64) -> usize {
    let all: NatSnapshot = map.nat_entries().into_iter().collect();
    let doomed = doomed(&all, now);
    remove(map, &all, doomed)
}

/// The translations as a walk saw them.
pub type NatSnapshot = HashMap<CtKey, NatEntry>;

/// The connections `expire` deletes, from a snapshot: (outbound key, inbound key) of each,
/// lone halves as (key, None). Pure: a caller whose table is shared takes the snapshot under
/// its lock and decides without it.
pub fn doomed(all: &NatSnapshot, now: u64) -> Vec<(CtKey, Option<CtKey>)> {
    let timeout_of = |k: &CtKey, flags: u32| -> u64 {
        let t = if flags & nat::CLOSING != 0 {
            Duration::from_secs(ct::CLOSING_TIMEOUT_S)
        } else if flags & nat::REPLIED == 0 {
            Duration::from_secs(60).min(timeout(k.proto))
        } else {
            timeout(k.proto)
        };
        t.as_nanos() as u64
    };
    let is_out = |k: &CtKey| k.zone & nat::DIR_MASK == nat::DIR_OUT;
    // (outbound key, inbound key) of each doomed connection; lone halves as (key, None).
    let mut doomed: Vec<(CtKey, Option<CtKey>)> = Vec::new();
    for (k, e) in all {
        let (ok, ik) = if is_out(k) {
            (*k, reply_key(k, e.addr, e.port))
        } else {
            (out_key(k, e), *k)
        };
        let (o, i) = (all.get(&ok), all.get(&ik));
        let paired = match (o, i) {
            (Some(o), Some(i)) => reply_key(&ok, o.addr, o.port) == ik && out_key(&ik, i) == ok,
            _ => false,
        };
        if paired {
            // Each pair once, from its outbound half.
            if !is_out(k) {
                continue;
            }
            let (o, i) = (
                o.copied().unwrap_or_default(),
                i.copied().unwrap_or_default(),
            );
            let last = o.last_seen_ns.max(i.last_seen_ns);
            if now.saturating_sub(last) > timeout_of(k, o.flags | i.flags) {
                doomed.push((ok, Some(ik)));
            }
        } else if now.saturating_sub(e.last_seen_ns) > timeout_of(k, e.flags) {
            doomed.push((*k, None));
        }
    }
    doomed
}

/// Deletes what `doomed` picked, each half read again just before it goes (a packet that
/// used it since the snapshot keeps it, and its partner); returns how many went. A packet
/// in the instant between that read and the delete still loses it: readers take no lock,
/// neither XDP's of the BPF map nor the DPDK poll threads' of `usernat::NatMap`.
pub fn remove<S: NatStore + ?Sized>(
    map: &mut S,
    all: &NatSnapshot,
    doomed: Vec<(CtKey, Option<CtKey>)>,
) -> usize {
    let mut gone = 0;
    for (first, second) in doomed {
        for k in std::iter::once(first).chain(second) {
            // Read again: a packet that used it since the walk keeps it (and its partner).
            let walked = all.get(&k).map(|e| e.last_seen_ns);
            let unchanged = map
                .nat_get(&k)
                .is_some_and(|e| Some(e.last_seen_ns) == walked);
            if !unchanged || !map.nat_remove(&k) {
                break;
            }
            gone += 1;
        }
    }
    if gone > 0 {
        tracing::debug!(expired = gone, "default-SNAT translations expired");
    }
    gone
}

/// Idle timeout of a translation by IP protocol (conntrack's).
fn timeout(proto: u8) -> Duration {
    Duration::from_secs(ct::idle_timeout_s(proto, 0))
}

impl NatStore for crate::loader::Bpf {
    fn nat_get(&self, k: &CtKey) -> Option<NatEntry> {
        crate::loader::Bpf::nat_get(self, k)
    }

    fn nat_insert(
        &mut self,
        out: (&CtKey, &NatEntry),
        back: (&CtKey, &NatEntry),
        back_new: bool,
    ) -> bool {
        crate::loader::Bpf::nat_insert(self, out, back, back_new).is_ok()
    }

    fn nat_update(&mut self, k: &CtKey, e: &NatEntry) {
        let _ = crate::loader::Bpf::nat_update(self, k, e);
    }

    fn nat_remove(&mut self, k: &CtKey) -> bool {
        crate::loader::Bpf::nat_remove(self, k)
    }

    fn nat_entries(&self) -> Vec<(CtKey, NatEntry)> {
        crate::loader::Bpf::nat_entries(self)
    }
}

/// The pinned NAT map, as the XDP backend's expiry thread holds it.
impl NatStore for aya::maps::HashMap<aya::maps::MapData, CtKey, NatEntry> {
    fn nat_get(&self, k: &CtKey) -> Option<NatEntry> {
        self.get(k, 0).ok()
    }

    fn nat_insert(
        &mut self,
        out: (&CtKey, &NatEntry),
        back: (&CtKey, &NatEntry),
        back_new: bool,
    ) -> bool {
        if self.insert(back.0, back.1, 0).is_err() {
            return false;
        }
        let ok = self.insert(out.0, out.1, 0).is_ok();
        if !ok && back_new {
            let _ = self.remove(back.0);
        }
        ok
    }

    fn nat_update(&mut self, k: &CtKey, e: &NatEntry) {
        let _ = self.insert(k, e, 0);
    }

    fn nat_remove(&mut self, k: &CtKey) -> bool {
        self.remove(k).is_ok()
    }

    fn nat_entries(&self) -> Vec<(CtKey, NatEntry)> {
        self.iter().flatten().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let b =
            etherparse::PacketBuilder::ethernet2([0x0a, 0, 0, 0, 0, 3], [0x0a, 0, 0, 0, 0xff, 1])
                .ipv4(src, dst, 64)
                .udp(sport, dport);
        let mut out = Vec::new();
        b.write(&mut out, &[7; 16]).unwrap();
        out
    }

    #[test]
    fn a_connection_out_gets_a_port_and_its_replies_come_back() {
        let m = crate::usernat::NatMap::new(4);
        let mut t = m.writer();
        let ext = Ipv4Addr::new(172, 24, 4, 61);
        let orig = udp([10, 0, 0, 3], [172, 24, 4, 100], 5000, 53);
        let mut routed = orig.clone();
        let back_to = (7, 0, [0x0a, 0, 0, 0, 0xff, 1], [0x0a, 0, 0, 0, 0, 3]);
        assert!(out(&mut t, &orig, &mut routed, ext, back_to, 1));
        assert_eq!(m.len(), 2);
        // The VM's own port was free: kept; the source is the external address.
        let p = etherparse::SlicedPacket::from_ethernet(&routed).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
            panic!()
        };
        assert_eq!(ip.header().source(), [172, 24, 4, 61]);
        let Some(etherparse::TransportSlice::Udp(u)) = &p.transport else {
            panic!()
        };
        assert_eq!(u.source_port(), 5000);
        let h = ip.header().to_header();
        assert_eq!(
            u.checksum(),
            u.to_header().calc_checksum_ipv4(&h, u.payload()).unwrap()
        );
        // The reply goes back to the VM's port, to its address and port.
        let reply = udp([172, 24, 4, 100], [172, 24, 4, 61], 53, 5000);
        let mut buf = Vec::new();
        assert_eq!(back(&mut t, &reply, &mut buf, 2), Some(7));
        assert_eq!(&buf[30..34], &[10, 0, 0, 3]);
        assert_eq!(&buf[0..6], &[0x0a, 0, 0, 0, 0, 3]);
        // A reply to another port is not translated; a second VM connection to the same
        // remote port from the same VM port reuses nothing it should not.
        let stray = udp([172, 24, 4, 100], [172, 24, 4, 61], 53, 5001);
        assert_eq!(back(&mut t, &stray, &mut buf, 2), None);
        // A full table refuses a new connection.
        let other = udp([10, 0, 0, 4], [172, 24, 4, 100], 6000, 53);
        let mut r2 = other.clone();
        assert!(out(&mut t, &other, &mut r2, ext, back_to, 3));
        let third = udp([10, 0, 0, 5], [172, 24, 4, 100], 6000, 53);
        let mut r3 = third.clone();
        assert!(!out(&mut t, &third, &mut r3, ext, back_to, 3));
        // Idle translations expire (UDP: 60 s), both halves together.
        expire(&mut t, 62_000_000_000);
        assert!(m.is_empty());
    }
}
