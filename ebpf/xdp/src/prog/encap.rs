//! Geneve encapsulation: the outer Ethernet/IPv4/UDP/Geneve headers with the OVN option, the
//! underlay next hop (cached in the action, or `bpf_fib_lookup`), the outer UDP checksum.
//!
//! The outer UDP checksum covers the whole inner frame. Summing it word by word cost a loop
//! over every byte (about a quarter of the encap program's time on a full 1500-byte frame,
//! and impossible past the first buffer of a jumbo frame). Like the kernel's local checksum
//! offload (Documentation/networking/checksum-offloads.rst), it is derived instead: an IPv4
//! TCP, UDP or ICMP segment whose own checksum is right sums to the complement of its pseudo
//! header (ICMP: to zero), so the inner frame sums to its Ethernet and IP headers plus that.
//! Only those headers are read, whatever the frame's size. If the inner checksum is wrong the
//! outer one is wrong by the same amount, and the receiver drops a frame that its VM would
//! have dropped anyway. Frames this cannot cover (not IPv4 TCP/UDP/ICMP, UDP without a
//! checksum, IP fragments, Ethernet padding) are summed word by word when they sit in one
//! buffer and are at most `CSUM_WORDS` words long, and so are small frames (`SMALL_WORDS`),
//! for which that is cheaper; otherwise the outer checksum is 0, which
//! for IPv4 means "none" (RFC 768, RFC 8926 section 3.3), never a wrong one.

use super::*;

#[inline(always)]
pub(super) fn encap(ctx: &XdpContext, slot: Ctr, key: &FlowKey, a: &FlowAction) -> u32 {
    let inner_len = frame_len(ctx, slot) as u32;
    if inner_len > a.max_inner_len {
        count(slot, ctr::DROP_TOO_BIG, 1);
        return xdp_action::XDP_DROP;
    }
    let ip_len = inner_len + ENCAP_OVERHEAD - ETH_LEN as u32;
    let (dmac, smac, out_ifindex) = if a.flags & flag::NH_CACHED != 0 {
        (a.nh_dmac, a.nh_smac, a.out_ifindex)
    } else {
        // SAFETY: bpf_fib_lookup is a plain C struct; all-zero is its initial state.
        let mut fib: FibParams = unsafe { core::mem::zeroed() };
        fib.family = AF_INET;
        fib.l4_protocol = IPPROTO_UDP;
        fib.ifindex = a.out_ifindex;
        fib.__bindgen_anon_1.tot_len = ip_len as u16;
        fib.__bindgen_anon_3.ipv4_src = a.encap_src;
        fib.__bindgen_anon_4.ipv4_dst = a.encap_dst;
        // SAFETY: helper call with a stack struct of the size we pass.
        let rc = unsafe {
            bpf_fib_lookup(
                ctx.ctx as *mut _,
                &mut fib as *mut FibParams,
                core::mem::size_of::<FibParams>() as i32,
                0,
            )
        };
        if rc != FIB_SUCCESS {
            // No neighbour yet (or no route): the slow path transmits and lets the kernel
            // resolve the next hop.
            count(slot, ctr::FIB_MISS, 1);
            return to_slow_path(ctx, slot, key.ct_state, key.tun_out_port);
        }
        (fib.dmac, fib.smac, fib.ifindex)
    };
    // SAFETY: helper call on the live context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(ENCAP_OVERHEAD as i32)) } != 0 {
        count(slot, ctr::DROP_MALFORMED, 1);
        return xdp_action::XDP_DROP;
    }
    let start = ctx.data();
    let end = ctx.data_end();
    if start + ENCAP_OVERHEAD as usize > end {
        count(slot, ctr::DROP_MALFORMED, 1);
        return xdp_action::XDP_DROP;
    }
    let sport: u16 = udp_source_port(flow_hash(key));
    let udp_len = (ip_len - 20) as u16;
    let ip_id: u16 = 0;
    // IPv4 header checksum from the values we write (network byte order words).
    let w0 = 0x4500u16.to_be();
    let w1 = (ip_len as u16).to_be();
    let w3 = 0x4000u16.to_be();
    let w4 = 0x4011u16.to_be();
    let mut s: u64 = w0 as u64 + w1 as u64 + ip_id as u64 + w3 as u64 + w4 as u64;
    s += (a.encap_src & 0xffff) as u64 + (a.encap_src >> 16) as u64;
    s += (a.encap_dst & 0xffff) as u64 + (a.encap_dst >> 16) as u64;
    let ip_csum = !fold(s);
    // SAFETY: [start, start+58) is inside the packet (checked above); start is even.
    unsafe {
        core::ptr::write_unaligned(start as *mut [u8; 6], dmac);
        core::ptr::write_unaligned((start + 6) as *mut [u8; 6], smac);
        wr16(start + 12, ETH_P_IPV4.to_be());
        wr16(start + 14, w0);
        wr16(start + 16, w1);
        wr16(start + 18, ip_id);
        wr16(start + 20, w3);
        wr16(start + 22, w4);
        wr16(start + 24, ip_csum);
        wr32(start + 26, a.encap_src);
        wr32(start + 30, a.encap_dst);
        wr16(start + 34, sport.to_be());
        wr16(start + 36, GENEVE_PORT.to_be());
        wr16(start + 38, udp_len.to_be());
        wr16(start + 40, 0);
        // Geneve: ver 0, opt len 2 words; C bit set (the OVN option is critical).
        wr16(start + 42, 0x0240u16.to_be());
        wr16(start + 44, ETH_P_TEB.to_be());
        wr32(start + 46, (a.vni << 8).to_be());
        wr16(start + 50, OVN_OPT_CLASS.to_be());
        wr16(start + 52, ((OVN_OPT_TYPE as u16) << 8 | 1).to_be());
        wr32(start + 54, a.ovn_opt.to_be());
    }
    if a.flags & flag::UDP_CSUM != 0 {
        // Pseudo header + UDP header + Geneve header/option from the values we wrote,
        // then the inner frame word by word.
        let mut s: u64 = (a.encap_src & 0xffff) as u64 + (a.encap_src >> 16) as u64;
        s += (a.encap_dst & 0xffff) as u64 + (a.encap_dst >> 16) as u64;
        s += (IPPROTO_UDP as u16).to_be() as u64 + udp_len.to_be() as u64 * 2;
        s += sport.to_be() as u64 + GENEVE_PORT.to_be() as u64;
        s += 0x0240u16.to_be() as u64 + ETH_P_TEB.to_be() as u64;
        let v = (a.vni << 8).to_be();
        s += (v & 0xffff) as u64 + (v >> 16) as u64;
        s += OVN_OPT_CLASS.to_be() as u64 + ((OVN_OPT_TYPE as u16) << 8 | 1).to_be() as u64;
        let o = a.ovn_opt.to_be();
        s += (o & 0xffff) as u64 + (o >> 16) as u64;
        let inner = start + ENCAP_OVERHEAD as usize;
        // (Not `inner_len == end - inner`: LLVM then turns the loop's bounds checks against
        // `end` into ones against `inner_len`, which the verifier cannot follow.)
        let linear = slot.frags == 0;
        let sum = if linear && inner_len as usize <= SMALL_WORDS * 4 {
            summed::<SMALL_WORDS>(inner, end)
        } else {
            match derived_sum(inner, end, inner_len as usize) {
                Some(v) => Some(v),
                None if linear => summed::<CSUM_WORDS>(inner, end),
                None => None,
            }
        };
        let c = match sum {
            Some(v) => {
                let c = !fold(s + v);
                if c == 0 {
                    0xffff
                } else {
                    c
                }
            }
            None => 0,
        };
        if start + 42 <= end {
            // SAFETY: checked above.
            unsafe { wr16(start + 40, c) };
        }
    }
    count(slot, ctr::FAST_HIT, 1);
    redirect(ctx, slot, out_ifindex, a.out_slot)
}

/// The inner frame's ones' complement sum from its headers and its own L4 checksum (see the
/// module's comment); `None` where that does not hold. `inner..end` is the first buffer,
/// `len` the whole inner frame.
#[inline(always)]
fn derived_sum(inner: usize, end: usize, len: usize) -> Option<u64> {
    if inner + ETH_LEN + 20 > end {
        return None;
    }
    // SAFETY: [inner, inner+34) is inside the first buffer (checked above).
    let (et, vihl, tot, frag, proto) = unsafe {
        (
            rd16(inner + 12),
            rd8(inner + 14),
            u16::from_be(rd16(inner + 16)) as usize,
            u16::from_be(rd16(inner + 20)),
            rd8(inner + 23),
        )
    };
    let ihl = 20;
    if et != ETH_P_IPV4.to_be() || vihl != 0x45 || frag & 0x3fff != 0 {
        return None;
    }
    // No padding after the IP packet, nothing missing: the L4 checksum covers the rest.
    if ETH_LEN + tot != len || tot < ihl {
        return None;
    }
    let l4 = inner + ETH_LEN + ihl;
    let field = match proto {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        IPPROTO_ICMP => 2,
        _ => return None,
    };
    if l4 + field + 2 > end {
        return None;
    }
    // SAFETY: the checksum field is inside the first buffer (checked above).
    if proto == IPPROTO_UDP && unsafe { rd16(l4 + field) } == 0 {
        return None;
    }
    let mut s: u64 = 0;
    // Ethernet header: 7 words.
    for i in 0..7 {
        // SAFETY: [inner, inner+14) checked above.
        s += unsafe { rd16(inner + i * 2) } as u64;
    }
    // The IP header (options are rare: those frames take the word-by-word sum; a loop over
    // them here multiplied the verifier's states past its limit).
    let ip = inner + ETH_LEN;
    for i in 0..5 {
        // SAFETY: [ip, ip+20) checked above.
        s += unsafe { rd32(ip + i * 4) } as u64;
    }
    if proto != IPPROTO_ICMP {
        // SAFETY: [ip, ip+20) checked above.
        let (src, dst) = unsafe { (rd32(ip + 12), rd32(ip + 16)) };
        let mut p: u64 = (src & 0xffff) as u64 + (src >> 16) as u64;
        p += (dst & 0xffff) as u64 + (dst >> 16) as u64;
        p += (proto as u16).to_be() as u64 + ((tot - ihl) as u16).to_be() as u64;
        s += (!fold(p)) as u64;
    }
    Some(s)
}

/// Inner frames of at most this many words are summed word by word: cheaper than deriving
/// the sum (encap of 64-byte frames: 243-244 ns/packet summed, 253-258 derived).
const SMALL_WORDS: usize = 32;

/// The inner frame summed word by word, when it lies in the first buffer and is at most `N`
/// words long.
#[inline(always)]
fn summed<const N: usize>(inner: usize, end: usize) -> Option<u64> {
    let mut s: u64 = 0;
    let mut p = inner;
    for _ in 0..N {
        if p + 4 > end {
            break;
        }
        // SAFETY: 4 bytes at p are inside the packet (checked just above); p is even.
        s += unsafe { rd16(p) as u64 + rd16(p + 2) as u64 };
        p += 4;
    }
    if p + 4 <= end {
        // Longer than the loop covers.
        return None;
    }
    if p + 2 <= end {
        // SAFETY: bounds checked.
        s += unsafe { rd16(p) } as u64;
        p += 2;
    }
    if p < end {
        // SAFETY: bounds checked; a trailing odd byte is padded with zero.
        s += unsafe { *(p as *const u8) } as u64;
    }
    Some(s)
}
