//! The header rewrites of the actions: a router's (MACs, TTL, with its admission checks), a
//! floating IP's one-to-one NAT, 802.1Q tags off and on at provider interfaces, and the ARP
//! responder's reply.

use super::*;

/// A source address no router forwards from (host byte order): this network, loopback,
/// link-local, multicast, reserved and broadcast. Same list as the slow path's.
#[inline(always)]
pub(super) fn martian(a: u32) -> bool {
    let top = a >> 24;
    top == 0 || top == 127 || top >= 224 || a >> 16 == 0xa9fe
}

/// The checks and rewrites of a routed packet (`flag::ROUTE`); `Err` carries the verdict
/// when the packet does not go on.
#[inline(always)]
pub(super) fn route(ctx: &XdpContext, slot: Ctr, key: &FlowKey, a: &FlowAction) -> Result<(), u32> {
    let p = bound(ctx, 0, ETH_LEN + 20).ok_or_else(|| drop_with(slot, ctr::DROP_MALFORMED))?;
    // SAFETY: [p, p+34) is inside the packet.
    let vihl = unsafe { rd8(p + ETH_LEN) };
    if vihl != 0x45 {
        return Err(drop_with(
            slot,
            if vihl >> 4 == 4 {
                ctr::DROP_IP_OPTIONS
            } else {
                ctr::DROP_MALFORMED
            },
        ));
    }
    let mut sum: u64 = 0;
    for i in 0..10 {
        // SAFETY: 2 bytes inside [p+14, p+34).
        sum += unsafe { rd16(p + ETH_LEN + 2 * i) } as u64;
    }
    if fold(sum) != 0xffff {
        return Err(drop_with(slot, ctr::DROP_IP_CSUM));
    }
    // SAFETY: inside [p, p+34).
    let (frag, ttl, src) = unsafe { (rd16(p + 20), rd8(p + 22), rd32(p + 26)) };
    if martian(u32::from_be(src)) {
        return Err(drop_with(slot, ctr::DROP_MARTIAN));
    }
    if ttl <= 1 {
        // ICMP time exceeded comes from the slow path.
        return Err(to_slow_path(ctx, slot, key.ct_state, key.tun_out_port));
    }
    if a.kind == act::ENCAP && frame_len(ctx, slot) as u32 > a.max_inner_len {
        if u16::from_be(frag) & 0x4000 != 0 {
            // DF: the slow path answers with ICMP fragmentation needed (PMTUD).
            return Err(to_slow_path(ctx, slot, key.ct_state, key.tun_out_port));
        }
        return Err(drop_with(slot, ctr::DROP_TOO_BIG));
    }
    // SAFETY: [p, p+34) is inside the packet; p is even (see `rd16`).
    unsafe {
        wr_mac(p, a.set_dmac);
        wr_mac(p + 6, a.set_smac);
        *((p + 22) as *mut u8) = ttl - 1;
        // RFC 1624 incremental update for TTL - 1 (as Linux's ip_decrease_ttl): the
        // checksum grows by 0x0100 in network order, with end-around carry.
        let c = rd16(p + 24) as u32 + 0x0100u16.to_be() as u32;
        let c = c + (c >= 0xffff) as u32;
        wr16(p + 24, c as u16);
    }
    Ok(())
}

/// A frame from a provider interface with an 802.1Q tag: the tag comes off (the MACs move
/// up 4 bytes) and its VLAN id goes into the key (`tun_out_port`, `VLAN_PRESENT | vid`),
/// which the megaflows of VLAN networks match on. `None`: the frame could not be moved.
#[inline(always)]
pub(super) fn vlan_pop(ctx: &XdpContext, key: &mut FlowKey) -> Option<()> {
    let Some(p) = bound(ctx, 0, ETH_LEN + 4) else {
        return Some(());
    };
    // SAFETY: [p, p+18) is inside the packet.
    let (tpid, tci, macs) = unsafe {
        (
            rd16(p + 12),
            u16::from_be(rd16(p + 14)),
            core::ptr::read_unaligned(p as *const [u8; 12]),
        )
    };
    if tpid != 0x8100u16.to_be() {
        return Some(());
    }
    // SAFETY: helper call on the live context; the kernel checks the new head.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, 4) } != 0 {
        return None;
    }
    let q = bound(ctx, 0, 12)?;
    // SAFETY: [q, q+12) is inside the packet.
    unsafe { core::ptr::write_unaligned(q as *mut [u8; 12], macs) };
    key.tun_out_port = VLAN_PRESENT | (tci & 0x0fff);
    Some(())
}

/// Puts the 802.1Q tag of `vlan` (`VLAN_PRESENT | vid`) on the frame, before output to a
/// provider interface.
#[inline(always)]
pub(super) fn vlan_push(ctx: &XdpContext, vlan: u16) -> Option<()> {
    let p = bound(ctx, 0, 12)?;
    // SAFETY: [p, p+12) is inside the packet.
    let macs = unsafe { core::ptr::read_unaligned(p as *const [u8; 12]) };
    // SAFETY: helper call on the live context; the headroom check is the helper's.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -4) } != 0 {
        return None;
    }
    let q = bound(ctx, 0, 16)?;
    let b = q as *mut u8;
    // SAFETY: [q, q+16) is inside the packet; unaligned writes.
    unsafe {
        core::ptr::write_unaligned(b as *mut [u8; 12], macs);
        wr16(q + 12, 0x8100u16.to_be());
        wr16(q + 14, (vlan & 0x0fff).to_be());
    }
    Some(())
}

/// One-to-one address translation after `route` (which checked a 20-byte IPv4 header):
/// source and/or destination rewritten, checksums updated incrementally. TCP and UDP
/// checksums cover the addresses (pseudo header), ICMP's do not; a non-first fragment
/// has no L4 header; a zero UDP checksum means none and stays so.
#[inline(always)]
pub(super) fn nat(ctx: &XdpContext, key: &FlowKey, a: &FlowAction) -> Option<()> {
    let p = bound(ctx, 0, ETH_LEN + 20)?;
    // SAFETY: [p, p+34) is inside the packet (route checked it; re-checked above).
    let (frag, mut ipc) = unsafe { (rd16(p + 20), rd16(p + 24)) };
    let first = u16::from_be(frag) & 0x1fff == 0;
    let l4 = ETH_LEN + 20;
    let l4_csum_at = match key.ip_proto {
        IPPROTO_TCP if first => Some(l4 + 16),
        IPPROTO_UDP if first => Some(l4 + 6),
        _ => None,
    };
    let l4p = match l4_csum_at {
        Some(off) => Some(bound(ctx, off, 2)?),
        None => None,
    };
    // SAFETY: 2 bytes at l4p were checked by `bound`.
    let mut l4c = l4p.map(|q| unsafe { rd16(q) });
    let udp_none = key.ip_proto == IPPROTO_UDP && l4c == Some(0);
    for (on, off, new) in [
        (a.flags & flag::SNAT != 0, 26usize, a.nat_src),
        (a.flags & flag::DNAT != 0, 30usize, a.nat_dst),
    ] {
        if !on {
            continue;
        }
        // SAFETY: the address lies inside [p, p+34).
        let old = unsafe { rd32(p + off) };
        // SAFETY: as above.
        unsafe { wr32(p + off, new) };
        ipc = csum_replace4(ipc, old, new);
        if let Some(c) = l4c {
            l4c = Some(csum_replace4(c, old, new));
        }
    }
    // SAFETY: inside [p, p+34).
    unsafe { wr16(p + 24, ipc) };
    if let (Some(q), Some(c)) = (l4p, l4c) {
        if !udp_none {
            let c = if key.ip_proto == IPPROTO_UDP && c == 0 {
                0xffff
            } else {
                c
            };
            // SAFETY: 2 bytes at q were checked by `bound`.
            unsafe { wr16(q, c) };
        }
    }
    Some(())
}

/// Turns the ARP request in the frame into the reply of `a.set_smac` and sends it back out of
/// the port it came in on (`a.out_ifindex`).
#[inline(always)]
pub(super) fn arp_reply(ctx: &XdpContext, slot: Ctr, a: &FlowAction) -> u32 {
    let mac = a.set_smac;
    let Some(p) = bound(ctx, 0, arp::FRAME_LEN) else {
        return drop_with(slot, ctr::DROP_MALFORMED_ARP);
    };
    let b = p as *mut u8;
    // SAFETY: [p, p+42) is inside the packet; unaligned reads and writes.
    unsafe {
        let requester: [u8; 6] = core::ptr::read_unaligned(b.add(6) as *const [u8; 6]);
        let sha: [u8; 6] = core::ptr::read_unaligned(b.add(22) as *const [u8; 6]);
        let spa = rd32(p + 28);
        let tpa = rd32(p + 38);
        core::ptr::write_unaligned(b as *mut [u8; 6], requester);
        core::ptr::write_unaligned(b.add(6) as *mut [u8; 6], mac);
        core::ptr::write_unaligned(b.add(20) as *mut u16, (arp::OP_REPLY as u16).to_be());
        core::ptr::write_unaligned(b.add(22) as *mut [u8; 6], mac);
        core::ptr::write_unaligned(b.add(28) as *mut u32, tpa);
        core::ptr::write_unaligned(b.add(32) as *mut [u8; 6], sha);
        core::ptr::write_unaligned(b.add(38) as *mut u32, spa);
    }
    if a.vlan != 0 && vlan_push(ctx, a.vlan).is_none() {
        return drop_with(slot, ctr::DROP_MALFORMED);
    }
    count(slot, ctr::FAST_HIT, 1);
    count(slot, ctr::ARP_REPLY, 1);
    // A redirect to the port it came in on rather than XDP_TX: on a veth, XDP_TX of a
    // frame that arrived from the peer's stack (an skb) never reached the peer here (the
    // VM saw no reply), while the redirect takes the path decap outputs take.
    redirect(ctx, slot, a.out_ifindex, a.out_slot)
}
