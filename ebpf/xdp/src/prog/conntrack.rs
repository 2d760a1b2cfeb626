//! Connection tracking in XDP: the per-CPU connection cache, the CT table lookup (and ICMP
//! errors related to a tracked connection), and commits.

use super::*;

/// The conntrack tuple of an IPv4 TCP, UDP or ICMP key in `zone`; `None` for the rest.
#[inline(always)]
pub(super) fn ct_key(key: &FlowKey, zone: u32) -> Option<CtKey> {
    if key.eth_type != ETH_P_IPV4.to_be()
        || !matches!(key.ip_proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMP)
    {
        return None;
    }
    Some(tuple(
        zone,
        (key.ip_src, key.ip_dst),
        (key.l4_src, key.l4_dst),
        key.ip_proto,
    ))
}

/// A conntrack tuple, in five word stores: a struct literal's zero padding became a call
/// to a byte loop (LLVM makes a memset of it, and the BPF backend calls compiler_builtins'
/// one), on every frame of a tracked port.
#[inline(always)]
pub(super) fn tuple(
    zone: u32,
    (src, dst): (u32, u32),
    (sport, dport): (u16, u16),
    proto: u8,
) -> CtKey {
    let ports = if cfg!(target_endian = "little") {
        sport as u32 | (dport as u32) << 16
    } else {
        (sport as u32) << 16 | dport as u32
    };
    let last = if cfg!(target_endian = "little") {
        proto as u32
    } else {
        (proto as u32) << 24
    };
    // SAFETY: CtKey is repr(C), 20 bytes of plain integers (zone, src, dst, the two ports,
    // proto and 3 bytes of padding that must be zero): five u32 in that order.
    unsafe { core::mem::transmute::<[u32; 5], CtKey>([zone, src, dst, ports, last]) }
}

/// The connection cache set of a tuple (multiplicative hashing): its block, and the
/// index of the set's first slot in it.
#[inline(always)]
pub(super) fn ct_set(k: &CtKey) -> (u32, usize) {
    let ports = (k.sport as u32) << 16 | k.dport as u32;
    let h = (k.src ^ k.dst.rotate_left(16) ^ ports ^ k.proto as u32)
        .wrapping_add(k.zone)
        .wrapping_mul(0x9e37_79b1);
    let sets = ct::CACHE_BLOCK_SLOTS as u32 / 2;
    let block = h >> (32 - ct::CACHE_BLOCKS.trailing_zeros());
    let set = (h >> (32 - ct::CACHE_BLOCKS.trailing_zeros() - sets.trailing_zeros())) & (sets - 1);
    (block, set as usize * 2)
}

/// Sets `key.ct_state`: established (the connection's own direction, or its reply), or
/// new. Asks the per-CPU cache first (a tuple found established in this epoch); in CT,
/// refreshes the entry it finds and caches it.
#[inline(always)]
pub(super) fn ct_lookup(key: &mut FlowKey, zone: u32) {
    let Some(k) = ct_key(key, zone) else {
        return;
    };
    // FIN and RST must reach the entry (closing); they skip the cache.
    let closing = k.proto == IPPROTO_TCP && key.pad & (TCP_FIN | TCP_RST) != 0;
    let epoch = CONFIG.get(0).map(|c| c.ct_epoch).unwrap_or(0);
    let (block, first) = ct_set(&k);
    // SAFETY: this CPU's block; nothing else writes it while this program runs.
    let set = CT_CACHE
        .get_ptr_mut(block)
        .and_then(|b| unsafe { (*b).slots.get_mut(first..first + 2) });
    if let Some(set) = set.as_deref() {
        if !closing && epoch != 0 {
            for c in set {
                if c.epoch == epoch && c.key == k {
                    key.ct_state = c.state;
                    return;
                }
            }
        }
    }
    let r = tuple(k.zone, (k.dst, k.src), (k.dport, k.sport), k.proto);
    let (e, state) = match CT.get_ptr_mut(&k) {
        Some(e) => (e, ct::EST),
        None => match CT.get_ptr_mut(&r) {
            Some(e) => (e, ct::EST | ct::REPLY),
            None => {
                key.ct_state = ct::NEW;
                return;
            }
        },
    };
    key.ct_state = state;
    if let Some(set) = set {
        // A free way (stale epoch) if there is one, else the second way: its tenant moves
        // to the first, so the set keeps the two latest tuples.
        let way = if set[0].epoch != epoch || set[0].key == k {
            0
        } else {
            if set[1].epoch == epoch {
                set[0] = set[1];
            }
            1
        };
        set[way] = CtCacheSlot {
            key: k,
            epoch,
            state,
            pad: [0; 7],
        };
    }
    // The entry is written only when its timestamp is a second old (or the connection
    // starts closing), with the coarse clock: a write and a fine clock read per packet
    // cost 0.84x -> see perf/README.md. Expiry works in seconds anyway. A cached tuple
    // comes here once per epoch (about a second), which keeps the timestamp fresh.
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: a live entry of the map; racy updates only lose a timestamp.
    unsafe {
        if now.wrapping_sub((*e).last_seen_ns) > 1_000_000_000 {
            (*e).last_seen_ns = now;
        }
        if closing && (*e).flags & ct::CLOSING == 0 {
            // Closing: expires after ct::CLOSING_TIMEOUT_S (the GC's business).
            (*e).flags |= ct::CLOSING;
        }
    }
}

/// Whether the IPv4 frame at `off` is an ICMP error (destination unreachable, time
/// exceeded, parameter problem) quoting a packet of a connection tracked in `zone`, in
/// either direction: an error from the far end or from a router on the way.
#[inline(always)]
pub(super) fn icmp_error_related(ctx: &XdpContext, off: usize, zone: u32) -> bool {
    let off = core::hint::black_box(off);
    if off > 400 {
        return false;
    }
    let Some(ip) = bound(ctx, off + ETH_LEN, 20) else {
        return false;
    };
    // SAFETY: [ip, ip+20) is inside the packet.
    let (vihl, frag) = unsafe { (rd8(ip), rd16(ip + 6)) };
    if u16::from_be(frag) & 0x1fff != 0 {
        return false;
    }
    let icmp_off = off + ETH_LEN + ((vihl & 0x0f) as usize * 4 & 0x3c);
    // The ICMP header and the quoted IPv4 header.
    let Some(q) = bound(ctx, icmp_off, 8 + 20) else {
        return false;
    };
    // SAFETY: [q, q+28) is inside the packet.
    let (ty, evihl, eproto, esrc, edst) = unsafe {
        (
            rd8(q),
            rd8(q + 8),
            rd8(q + 8 + 9),
            rd32(q + 8 + 12),
            rd32(q + 8 + 16),
        )
    };
    let eihl = (evihl & 0x0f) as usize * 4 & 0x3c;
    if !matches!(ty, 3 | 11 | 12) || evihl >> 4 != 4 || eihl < 20 {
        return false;
    }
    let (sport, dport) = match eproto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let Some(l4) = bound(ctx, icmp_off + 8 + eihl, 4) else {
                return false;
            };
            // SAFETY: [l4, l4+4) is inside the packet.
            unsafe { (rd16(l4), rd16(l4 + 2)) }
        }
        IPPROTO_ICMP => (0, 0),
        _ => return false,
    };
    let k = tuple(zone, (esrc, edst), (sport, dport), eproto);
    let r = tuple(zone, (edst, esrc), (dport, sport), eproto);
    // SAFETY: read-only lookups; the values are not used.
    unsafe { CT.get(&k).is_some() || CT.get(&r).is_some() }
}

/// From a provider network to a floating IP bound here (`FIP_CT`): the conntrack state of
/// the frame as the VM will see it (destination = its fixed IP), in the VM's zone.
#[inline(always)]
pub(super) fn ct_lookup_fip(key: &mut FlowKey) {
    if key.eth_type != ETH_P_IPV4.to_be() {
        return;
    }
    // SAFETY: values are written whole by userspace.
    let Some(f) = (unsafe { FIP_CT.get(&key.ip_dst) }).copied() else {
        return;
    };
    let mut k = *key;
    k.ip_dst = f.fixed;
    ct_lookup(&mut k, f.zone);
    key.ct_state = k.ct_state;
}

/// Commits the key's connection in the action's zones (`flag::CT_COMMIT`); returns how
/// many entries it wrote.
#[inline(always)]
pub(super) fn ct_commit(key: &FlowKey, a: &FlowAction) -> u64 {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let e = CtEntry {
        last_seen_ns: now,
        created_ns: now,
        reserved: 0,
        flags: 0,
        pad: 0,
    };
    let mut n = 0;
    for z in a.ct_zones {
        if z == 0 {
            continue;
        }
        let mut t = *key;
        if z & ct::POST_NAT != 0 {
            if a.flags & flag::SNAT != 0 {
                t.ip_src = a.nat_src;
            }
            if a.flags & flag::DNAT != 0 {
                t.ip_dst = a.nat_dst;
            }
        }
        if let Some(k) = ct_key(&t, z & !ct::POST_NAT) {
            if CT.insert(&k, &e, 0).is_ok() {
                n += 1;
            }
        }
    }
    n
}
