//! Parsing: the outer Geneve headers of uplink frames, and the (inner) frame into the
//! megaflow key.

use super::*;

/// Validates outer Ethernet/IPv4/UDP/Geneve of a frame on the uplink and returns the offset
/// of the inner Ethernet header. Non-overlay traffic goes to the stack.
#[inline(always)]
pub(super) fn parse_tunnel(
    ctx: &XdpContext,
    slot: Ctr,
    port: &PortConf,
    key: &mut FlowKey,
) -> Result<usize, Verdict> {
    let eth_type = rd_u16(ctx, 12).ok_or(Verdict::Pass)?;
    if eth_type != ETH_P_IPV4.to_be() {
        return Err(Verdict::Pass);
    }
    let vihl = rd_u8(ctx, ETH_LEN).ok_or(Verdict::Pass)?;
    if vihl >> 4 != 4 {
        return Err(Verdict::Pass);
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(Verdict::Pass);
    }
    let proto = rd_u8(ctx, ETH_LEN + 9).ok_or(Verdict::Pass)?;
    let frag = rd_u16(ctx, ETH_LEN + 6).ok_or(Verdict::Pass)?;
    let dst = rd_u32(ctx, ETH_LEN + 16).ok_or(Verdict::Pass)?;
    // Fragments of tunnel traffic are left to the stack (it reassembles, nobody listens).
    if proto != IPPROTO_UDP || dst != port.local_ip || u16::from_be(frag) & 0x3fff != 0 {
        return Err(Verdict::Pass);
    }
    let udp = ETH_LEN + ihl;
    if udp > ETH_LEN + 60 {
        return Err(Verdict::Pass);
    }
    let u = bound(ctx, udp, 8).ok_or(Verdict::Pass)?;
    // SAFETY: [u, u+8) is inside the packet.
    let (dport, ulen) = unsafe { (rd16(u + 2), rd16(u + 4)) };
    if dport != GENEVE_PORT.to_be() {
        return Err(Verdict::Pass);
    }
    // The outer lengths must describe this frame exactly.
    let tot = u16::from_be(rd_u16(ctx, ETH_LEN + 2).ok_or(Verdict::Pass)?) as usize;
    if tot + ETH_LEN != slot.len as usize || u16::from_be(ulen) as usize + ihl != tot {
        return Err(Verdict::Drop(ctr::DROP_BAD_LENGTH));
    }
    // Only chassis of the NB may inject into the overlay.
    let src = rd_u32(ctx, ETH_LEN + 12).ok_or(Verdict::Pass)?;
    let gen = CONFIG.get(0).map(|c| c.peers_gen).unwrap_or(0);
    let tag = (gen as u64) << 32 | src as u64;
    let cache = PEER_CACHE.get_ptr_mut(0);
    // SAFETY: per-CPU slot, this CPU only.
    if cache.map(|c| unsafe { *c }) != Some(tag) {
        // SAFETY: read-only lookup; the value is not used.
        if unsafe { PEERS.get(&src) }.is_none() {
            return Err(Verdict::Drop(ctr::DROP_UNKNOWN_SOURCE));
        }
        if let Some(c) = cache {
            // SAFETY: as above.
            unsafe { *c = tag };
        }
    }
    let gnv = udp + 8;
    // Reads below go through one checked pointer each with constant offsets: the verifier
    // tracks a range per pointer, and re-deriving `data + off` would lose it.
    let g = bound(ctx, gnv, 8).ok_or(Verdict::Drop(ctr::DROP_GENEVE_TRUNCATED))?;
    // SAFETY: [g, g+8) is inside the packet.
    let (b0, proto, vni_word) = unsafe { (rd8(g), rd16(g + 2), rd32(g + 4)) };
    if b0 >> 6 != 0 {
        return Err(Verdict::Drop(ctr::DROP_GENEVE_VERSION));
    }
    if proto != ETH_P_TEB.to_be() {
        return Err(Verdict::Drop(ctr::DROP_GENEVE_PROTOCOL));
    }
    let opt_len = ((b0 & 0x3f) as usize) * 4;
    let opts = gnv + 8;
    let mut off = 0usize;
    let mut meta: Option<u32> = None;
    let mut done = false;
    for _ in 0..MAX_OPTS {
        if off >= opt_len {
            done = true;
            break;
        }
        if off + 4 > opt_len {
            return Err(Verdict::Drop(ctr::DROP_GENEVE_OPT_LEN));
        }
        let o =
            bound(ctx, (opts + off) & 0x1ff, 4).ok_or(Verdict::Drop(ctr::DROP_GENEVE_OPT_LEN))?;
        // SAFETY: [o, o+4) is inside the packet.
        let (class, typ, len) = unsafe { (rd16(o), rd8(o + 2), rd8(o + 3)) };
        let olen = ((len & 0x1f) as usize) * 4;
        if off + 4 + olen > opt_len {
            return Err(Verdict::Drop(ctr::DROP_GENEVE_OPT_LEN));
        }
        if class == OVN_OPT_CLASS.to_be() && typ == OVN_OPT_TYPE && olen == 4 {
            let o = bound(ctx, (opts + off) & 0x1ff, 8)
                .ok_or(Verdict::Drop(ctr::DROP_GENEVE_OPT_LEN))?;
            // SAFETY: [o, o+8) is inside the packet.
            meta = Some(u32::from_be(unsafe { rd32(o + 4) }));
        } else if typ & 0x80 != 0 {
            return Err(Verdict::Drop(ctr::DROP_GENEVE_CRITICAL_OPT));
        }
        off += 4 + olen;
    }
    if !done && off < opt_len {
        // More options than the fast path walks: the slow path's codec has no such limit.
        return Err(Verdict::Slow);
    }
    // Checked after the walk, not before: had LLVM seen it first it would prove the
    // per-option bounds checks redundant and drop them, and the verifier cannot follow.
    if opts + opt_len > ctx.data_end() - ctx.data() {
        return Err(Verdict::Drop(ctr::DROP_GENEVE_OPT_LEN));
    }
    let meta = meta.ok_or(Verdict::Drop(ctr::DROP_GENEVE_NO_METADATA))?;
    let inner = opts + opt_len;
    if inner + ETH_LEN > ctx.data_end() - ctx.data() {
        return Err(Verdict::Drop(ctr::DROP_GENEVE_TRUNCATED));
    }
    key.tun_vni = u32::from_be(vni_word) >> 8;
    key.tun_out_port = (meta & 0xffff) as u16;
    Ok(inner)
}

/// Fills the L2-L4 fields of the key from the (inner) frame at `off`.
#[inline(always)]
pub(super) fn parse_inner(ctx: &XdpContext, off: usize, key: &mut FlowKey) -> Option<()> {
    // Opaque to LLVM: otherwise it proves the bounds checks below redundant with the
    // tunnel parser's length checks, drops them, and the verifier, which learns packet
    // ranges only from pointer comparisons, rejects the reads.
    let off = core::hint::black_box(off);
    if off > 400 {
        return None;
    }
    let e = bound(ctx, off, ETH_LEN)?;
    // SAFETY: [e, e+14) is inside the packet.
    unsafe {
        mac_into(&mut key.eth_dst, e);
        mac_into(&mut key.eth_src, e + 6);
        key.eth_type = rd16(e + 12);
    }
    if key.eth_type == ETH_P_ARP.to_be() {
        parse_arp(ctx, off + ETH_LEN, key);
        return Some(());
    }
    if key.eth_type != ETH_P_IPV4.to_be() {
        return Some(());
    }
    // Whole-header bounds (not per byte): a 1-byte check compiles to `p >= end`, which
    // gives the verifier no range.
    let Some(ip) = bound(ctx, off + ETH_LEN, 20) else {
        return Some(());
    };
    // SAFETY: [ip, ip+20) is inside the packet.
    let (vihl, frag, proto, s, d) = unsafe {
        (
            rd8(ip),
            rd16(ip + 6),
            rd8(ip + 9),
            rd32(ip + 12),
            rd32(ip + 16),
        )
    };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return Some(());
    }
    key.ip_proto = proto;
    key.ip_src = s;
    key.ip_dst = d;
    if (proto == IPPROTO_UDP || proto == IPPROTO_TCP) && u16::from_be(frag) & 0x1fff == 0 {
        if let Some(l4) = bound(ctx, off + ETH_LEN + (ihl & 0x3c), 4) {
            // SAFETY: [l4, l4+4) is inside the packet.
            unsafe {
                key.l4_src = rd16(l4);
                key.l4_dst = rd16(l4 + 2);
            }
        }
        if proto == IPPROTO_TCP {
            // TCP flags, for conntrack only (`pad` is in no mask).
            if let Some(t) = bound(ctx, off + ETH_LEN + (ihl & 0x3c), 14) {
                // SAFETY: [t, t+14) is inside the packet.
                key.pad = unsafe { rd8(t + 13) };
            }
        }
    }
    Some(())
}

/// The MAC address at packet address `p` into `mac`, in three 2-byte copies: a plain copy
/// of the array became a call to a byte loop (memmove).
#[inline(always)]
unsafe fn mac_into(mac: &mut [u8; 6], p: usize) {
    let m = mac.as_mut_ptr() as *mut u16;
    for i in 0..3 {
        // SAFETY: the caller checked [p, p+6) is inside the packet, p is even (see `rd16`);
        // `mac` is a field of the key (repr(C), 4-aligned) at offset 12 or 18, so each of
        // its u16 is aligned.
        unsafe { m.add(i).write(rd16(p + 2 * i)) };
    }
}

/// Keys an ARP frame the way `geneflow_abi::arp` describes (sender/target protocol
/// address in ip_src/ip_dst, opcode in ip_proto with the gratuitous and sender-MAC
/// mismatch bits; 0 when malformed).
#[inline(always)]
pub(super) fn parse_arp(ctx: &XdpContext, off: usize, key: &mut FlowKey) {
    let Some(a) = bound(ctx, off, 28) else {
        return;
    };
    // SAFETY: [a, a+28) is inside the packet.
    let (htype, ptype, hlen, plen, op, spa, tpa) = unsafe {
        (
            rd16(a),
            rd16(a + 2),
            rd8(a + 4),
            rd8(a + 5),
            rd16(a + 6),
            rd32(a + 14),
            rd32(a + 24),
        )
    };
    let op = u16::from_be(op);
    if htype != 1u16.to_be()
        || ptype != ETH_P_IPV4.to_be()
        || hlen != 6
        || plen != 4
        || (op != arp::OP_REQUEST as u16 && op != arp::OP_REPLY as u16)
    {
        return;
    }
    // SAFETY: [a+8, a+14) is inside the packet.
    let sha: [u8; 6] = unsafe { core::ptr::read_unaligned((a + 8) as *const [u8; 6]) };
    key.ip_src = spa;
    key.ip_dst = tpa;
    key.ip_proto = op as u8
        | if spa == tpa { arp::GRATUITOUS } else { 0 }
        | if sha != key.eth_src {
            arp::SHA_MISMATCH
        } else {
            0
        };
}
