//! Default SNAT in the slow path: the first packet of a connection out through the chassis'
//! external address gets a port (the VM's own when free, like Linux; otherwise the next free
//! one for that remote address and port), both directions go into the NAT table for XDP, and
//! the packet is rewritten; a reply XDP could not translate (its megaflow was not installed
//! yet) is checked as XDP would and translated here from the table. Outbound entries are keyed
//! by the VM's port too: VMs of different tenants with the same address never share one.
//! Limits: 64,512 ports per protocol and remote address and port, 131,072 translations in all
//! (a full table refuses new connections, `drop_no_nat`; it never evicts a live one), at most
//! `ALLOC_RATE` new ones per second per port; idle ones expire like conntrack's (TCP 6 h, UDP
//! 60 s, ICMP 30 s), both directions together.

use crate::loader::Bpf;
use crate::pipeline::rewrite::{dec_ttl, martian, napt, napt_ports, set_eth};
use geneflow_abi::{nat, CtKey, NatEntry};
use std::net::Ipv4Addr;

/// New translations per second per VM port (bursts twice as large): a VM spraying new
/// connections cannot fill the table in less than about a minute.
pub(super) const ALLOC_RATE: f32 = 1000.0;

fn addr(frame: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([frame[at], frame[at + 1], frame[at + 2], frame[at + 3]])
}

/// The NAT key of `frame` in direction `dir`; outbound ones name the VM port `ifindex`.
fn key(frame: &[u8], dir: u32, ifindex: u32) -> Option<CtKey> {
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
pub(super) fn out(
    bpf: &mut Bpf,
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
    if bpf
        .nat_insert((&k, &o), (&reply_key(&k, ext, port), &i), before.is_none())
        .is_err()
    {
        return false;
    }
    napt(routed, true, ext, port).is_some()
}

/// The key the reply of `k` (translated to `ext`:`port`) carries.
pub(super) fn reply_key(k: &CtKey, ext: u32, port: u16) -> CtKey {
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
pub(super) fn out_key(k: &CtKey, e: &NatEntry) -> CtKey {
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
fn free_port(bpf: &Bpf, k: &CtKey, ext: u32, ifindex: u32) -> Option<u16> {
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
pub(super) fn back(bpf: &mut Bpf, frame: &[u8], buf: &mut Vec<u8>, now_ns: u64) -> Option<u32> {
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
    let _ = bpf.nat_update(&k, &e);
    buf.clear();
    buf.extend_from_slice(frame);
    set_eth(buf, e.smac, e.dmac);
    dec_ttl(&mut buf[14..34]);
    napt(buf, false, e.addr, e.port)?;
    Some(e.out_ifindex)
}
