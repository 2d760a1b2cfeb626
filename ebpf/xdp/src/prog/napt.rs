//! Default SNAT in XDP (`flag::NAPT` out, `act::UNNAPT` in): the per-connection translations
//! the slow path wrote in NAT, looked up by the packet's tuple and applied with incremental
//! checksums. ICMP: echo requests out and echo replies in, the echo id standing for the port.

use super::*;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const L4: usize = ETH_LEN + 20;

/// The NAT tuple of a key (TCP/UDP ports; ICMP echo of `icmp_type`: its id as the port on
/// the VM's side); `None` for anything else.
#[inline(always)]
fn nat_key(ctx: &XdpContext, key: &FlowKey, dir: u32) -> Option<CtKey> {
    let (sport, dport) = match key.ip_proto {
        IPPROTO_TCP | IPPROTO_UDP => (key.l4_src, key.l4_dst),
        IPPROTO_ICMP => {
            let p = bound(ctx, L4, 8)?;
            // SAFETY: [p, p+8) is inside the packet.
            let (t, id) = unsafe { (rd8(p), rd16(p + 4)) };
            match (dir, t) {
                (nat::DIR_OUT, ICMP_ECHO_REQUEST) => (id, 0),
                (nat::DIR_IN, ICMP_ECHO_REPLY) => (0, id),
                _ => return None,
            }
        }
        _ => return None,
    };
    let zone = if dir == nat::DIR_OUT {
        nat::out_zone(key.in_ifindex)
    } else {
        dir
    };
    Some(tuple(
        zone,
        (key.ip_src, key.ip_dst),
        (sport, dport),
        key.ip_proto,
    ))
}

/// A TCP FIN or RST: the connection is ending (the expiry gives it seconds, not hours).
#[inline(always)]
fn closing(key: &FlowKey) -> bool {
    key.ip_proto == IPPROTO_TCP && key.pad & (TCP_FIN | TCP_RST) != 0
}

/// The outbound translation of the packet, refreshed; `None`: the slow path allocates one.
#[inline(always)]
pub(super) fn napt_out_lookup(ctx: &XdpContext, key: &FlowKey) -> Option<NatEntry> {
    let k = nat_key(ctx, key, nat::DIR_OUT)?;
    let p = NAT.get_ptr_mut(&k)?;
    // SAFETY: the kernel returned a pointer to the live value; racy stores of a timestamp and
    // a flag only lose an update.
    unsafe {
        (*p).last_seen_ns = bpf_ktime_get_coarse_ns();
        if closing(key) {
            (*p).flags |= nat::CLOSING;
        }
        Some(*p)
    }
}

/// Writes the address at `addr_off` and the port (or echo id) at `port_off` of the packet,
/// fixing the IPv4 checksum and the L4 one (TCP/UDP: both fields are in it; ICMP: only the
/// id is).
#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    proto: u8,
    addr_off: usize,
    port_off: usize,
    addr: u32,
    port: u16,
) -> Option<()> {
    let p = bound(ctx, 0, L4 + 8)?;
    let csum_off = match proto {
        IPPROTO_TCP => {
            bound(ctx, L4 + 18, 0)?;
            L4 + 16
        }
        IPPROTO_UDP => L4 + 6,
        _ => L4 + 2,
    };
    let cp = bound(ctx, csum_off, 2)?;
    // SAFETY: every offset read or written below was checked by `bound` above.
    unsafe {
        let old_addr = rd32(p + addr_off);
        let old_port = rd16(p + port_off);
        let ipc = csum_replace4(rd16(p + ETH_LEN + 10), old_addr, addr);
        wr16(p + ETH_LEN + 10, ipc);
        wr32(p + addr_off, addr);
        wr16(p + port_off, port);
        let c = rd16(cp);
        if proto == IPPROTO_UDP && c == 0 {
            return Some(());
        }
        let mut c = if proto == IPPROTO_ICMP {
            c
        } else {
            csum_replace4(c, old_addr, addr)
        };
        c = csum_replace2(c, old_port, port);
        if proto == IPPROTO_UDP && c == 0 {
            c = 0xffff;
        }
        wr16(cp, c);
    }
    Some(())
}

/// After `route`: source := the entry's address and port (ICMP: the echo id).
#[inline(always)]
pub(super) fn napt_out_apply(ctx: &XdpContext, key: &FlowKey, e: &NatEntry) -> Option<()> {
    let port_off = if key.ip_proto == IPPROTO_ICMP {
        L4 + 4
    } else {
        L4
    };
    rewrite(ctx, key.ip_proto, ETH_LEN + 12, port_off, e.addr, e.port)
}

/// `act::UNNAPT`: a reply to the chassis' external address goes back to the VM that opened
/// the connection; an unknown tuple is dropped.
#[inline(always)]
pub(super) fn unnapt(ctx: &XdpContext, slot: Ctr, key: &FlowKey) -> u32 {
    let Some(k) = nat_key(ctx, key, nat::DIR_IN) else {
        return drop_with(slot, ctr::DROP_NO_NAT);
    };
    let Some(p) = NAT.get_ptr_mut(&k) else {
        return drop_with(slot, ctr::DROP_NO_NAT);
    };
    // SAFETY: the kernel returned a pointer to the live value; racy stores of a timestamp and
    // flags only lose an update.
    let e = unsafe {
        (*p).last_seen_ns = bpf_ktime_get_coarse_ns();
        // CLOSING is taken from the VM's side only: a spoofed FIN or RST from outside must
        // not shorten a live translation.
        (*p).flags |= nat::REPLIED;
        *p
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
    if let Err(v) = route(ctx, slot, key, &a) {
        return v;
    }
    let port_off = if key.ip_proto == IPPROTO_ICMP {
        L4 + 4
    } else {
        L4 + 2
    };
    if rewrite(ctx, key.ip_proto, ETH_LEN + 16, port_off, e.addr, e.port).is_none() {
        return drop_with(slot, ctr::DROP_MALFORMED);
    }
    count(slot, ctr::FAST_HIT, 1);
    redirect(ctx, slot, e.out_ifindex, e.out_slot)
}
