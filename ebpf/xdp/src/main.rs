//! The geneflow XDP fast path. It owns nothing but the per-packet work: parse, build the
//! megaflow key, walk the bounded mask list (tuple-space search), check the entry's logical
//! datapath generation and run its action (output, Geneve encap + FIB lookup + redirect, decap +
//! redirect, drop, pass). Anything it cannot decide goes to the AF_XDP slow path via XSKMAP.
//! Every drop is counted under a reason in a per-CPU array.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{
        bindings::{bpf_fib_lookup as FibParams, xdp_action, BPF_F_MMAPABLE},
        helpers::generated::{
            bpf_fib_lookup, bpf_ktime_get_coarse_ns, bpf_redirect, bpf_xdp_adjust_head,
        },
        macros::{map, xdp},
        maps::{Array, HashMap, LruHashMap, PerCpuArray, XskMap},
        programs::XdpContext,
    };
    use geneflow_abi::{
        act, arp, ct, ctr, flag, flow_hash, mask_list, port_kind, udp_source_port, Config,
        CtCacheBlock, CtCacheSlot, CtEntry, CtKey, DpGen, FlowAction, FlowKey, PortConf,
        PortCounters, SlowMeta, ENCAP_OVERHEAD, FLOW_KEY_WORDS, GENEVE_PORT, MASK_LISTS,
        MAX_DATAPATHS, MAX_FLOWS, MAX_MASKS, MAX_PEERS, MAX_PORTS, OVN_OPT_CLASS, OVN_OPT_TYPE,
    };

    #[map]
    static FLOWS: HashMap<FlowKey, FlowAction> = HashMap::with_max_entries(MAX_FLOWS, 0);
    #[map]
    static MASKS: Array<FlowKey> = Array::with_max_entries(MAX_MASKS * MASK_LISTS, 0);
    #[map]
    static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
    /// Packets that hit an entry of each mask (list * MAX_MASKS + slot), for the mask order.
    #[map]
    static MASK_HITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_MASKS * MASK_LISTS, 0);
    #[map]
    static PORTS: HashMap<u32, PortConf> = HashMap::with_max_entries(MAX_PORTS, 0);
    #[map]
    static GENS: HashMap<u32, DpGen> = HashMap::with_max_entries(MAX_DATAPATHS, 0);
    /// Encap IPv4 addresses (network byte order) of the chassis Geneve is accepted from.
    #[map]
    static PEERS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_PEERS, 0);
    /// Connection tracking (see `geneflow_abi::ct`): the least recently used entry makes room.
    #[map]
    static CT: LruHashMap<CtKey, CtEntry> = LruHashMap::with_max_entries(ct::MAX_ENTRIES, 0);
    /// Per CPU: the last outer source found in PEERS, tagged with `Config::peers_gen`
    /// (gen << 32 | address). Frames come in bursts from few chassis: this saves the hash
    /// lookup (measured: decap 183-189 -> 220-226 ns/pkt with a lookup per frame).
    #[map]
    static PEER_CACHE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
    /// Per CPU, 2-way set associative: established tuples recently found in CT (see
    /// `geneflow_abi::CtCacheSlot`), valid for the epoch they were found in.
    #[map]
    static CT_CACHE: PerCpuArray<CtCacheBlock> = PerCpuArray::with_max_entries(ct::CACHE_BLOCKS, 0);
    #[map]
    static COUNTERS: PerCpuArray<PortCounters> = PerCpuArray::with_max_entries(MAX_PORTS, 0);
    #[map]
    static XSKS: XskMap = XskMap::with_max_entries(MAX_PORTS, 0);
    /// The slow path's counters (slot x reason, like COUNTERS), never touched here: userspace
    /// maps it into memory (BPF_F_MMAPABLE) and counts with plain atomics, and being a pinned
    /// map it outlives the process like the XDP counters do, so every total stays monotonic
    /// across restarts.
    #[map]
    static SLOW_COUNTERS: Array<u64> =
        Array::with_max_entries(MAX_PORTS * ctr::COUNT, BPF_F_MMAPABLE as u32);

    const ETH_LEN: usize = 14;
    const ETH_P_IPV4: u16 = 0x0800;
    const ETH_P_TEB: u16 = 0x6558;
    const ETH_P_ARP: u16 = 0x0806;
    const IPPROTO_ICMP: u8 = 1;
    const TCP_FIN: u8 = 0x01;
    const TCP_RST: u8 = 0x04;
    const IPPROTO_TCP: u8 = 6;
    const IPPROTO_UDP: u8 = 17;
    const AF_INET: u8 = 2;
    const FIB_SUCCESS: i64 = 0;
    /// Geneve options the fast path walks before leaving the frame to the slow path.
    const MAX_OPTS: usize = 8;
    /// 4-byte words summed for the outer UDP checksum: a full 1500-byte inner frame.
    const CSUM_WORDS: usize = 384;

    /// The counters of one interface on this CPU, looked up once per packet.
    #[derive(Clone, Copy)]
    struct Ctr {
        slot: u32,
        p: Option<*mut PortCounters>,
    }

    impl Ctr {
        #[inline(always)]
        fn new(slot: u32) -> Ctr {
            Ctr {
                slot,
                p: COUNTERS.get_ptr_mut(slot),
            }
        }
    }

    #[inline(always)]
    fn count(slot: Ctr, idx: u32, n: u64) {
        if idx >= ctr::COUNT {
            return;
        }
        if let Some(p) = slot.p {
            // SAFETY: per-CPU value returned by the kernel for this CPU; no concurrent writer;
            // idx bounded above.
            // `get_mut`, not indexing: a bounds-check panic path would be an unverifiable
            // call to a function that never returns.
            if let Some(c) = unsafe { (*p).c.get_mut(idx as usize) } {
                *c += n;
            }
        }
    }

    #[inline(always)]
    fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*const T> {
        let start = ctx.data();
        let end = ctx.data_end();
        if start + off + core::mem::size_of::<T>() > end {
            return None;
        }
        Some((start + off) as *const T)
    }

    /// Returns `data + off` once `len` bytes from there are known to be inside the packet.
    #[inline(always)]
    fn bound(ctx: &XdpContext, off: usize, len: usize) -> Option<usize> {
        let p = ctx.data() + off;
        if p + len > ctx.data_end() {
            return None;
        }
        Some(p)
    }

    /// Unchecked reads for pointers returned by `bound`.
    #[inline(always)]
    unsafe fn rd8(p: usize) -> u8 {
        // SAFETY: caller checked the range with `bound`.
        unsafe { *(p as *const u8) }
    }

    #[inline(always)]
    unsafe fn rd16(p: usize) -> u16 {
        // SAFETY: caller checked the range with `bound`.
        unsafe { core::ptr::read_unaligned(p as *const u16) }
    }

    #[inline(always)]
    unsafe fn rd32(p: usize) -> u32 {
        // SAFETY: caller checked the range with `bound`.
        unsafe { core::ptr::read_unaligned(p as *const u32) }
    }

    #[inline(always)]
    fn rd_u8(ctx: &XdpContext, off: usize) -> Option<u8> {
        // SAFETY: ptr_at checked the byte lies inside the packet.
        ptr_at::<u8>(ctx, off).map(|p| unsafe { *p })
    }

    #[inline(always)]
    fn rd_u16(ctx: &XdpContext, off: usize) -> Option<u16> {
        // SAFETY: bounds checked by ptr_at; packet data may be unaligned.
        ptr_at::<u16>(ctx, off).map(|p| unsafe { core::ptr::read_unaligned(p) })
    }

    #[inline(always)]
    fn rd_u32(ctx: &XdpContext, off: usize) -> Option<u32> {
        // SAFETY: bounds checked by ptr_at; packet data may be unaligned.
        ptr_at::<u32>(ctx, off).map(|p| unsafe { core::ptr::read_unaligned(p) })
    }

    #[xdp]
    pub fn geneflow(ctx: XdpContext) -> u32 {
        let ifindex = ctx.ingress_ifindex() as u32;
        // SAFETY: PORTS is only updated by userspace with whole-value writes.
        let port = match unsafe { PORTS.get(&ifindex) } {
            Some(p) => *p,
            None => return xdp_action::XDP_PASS,
        };
        let slot = Ctr::new(port.slot);
        count(slot, ctr::RX_PACKETS, 1);
        count(slot, ctr::RX_BYTES, (ctx.data_end() - ctx.data()) as u64);
        let mut key = FlowKey::zeroed();
        key.in_ifindex = ifindex;
        let inner = if port.kind == port_kind::UPLINK {
            match parse_tunnel(&ctx, &port, &mut key) {
                Ok(off) => off,
                Err(Verdict::Pass) => {
                    count(slot, ctr::PASS, 1);
                    return xdp_action::XDP_PASS;
                }
                Err(Verdict::Drop(reason)) => {
                    count(slot, reason, 1);
                    return xdp_action::XDP_DROP;
                }
                Err(Verdict::Slow) => return to_slow_path(&ctx, slot, 0),
            }
        } else {
            0
        };
        if parse_inner(&ctx, inner, &mut key).is_none() {
            count(slot, ctr::DROP_MALFORMED, 1);
            return xdp_action::XDP_DROP;
        }
        let list = if port.kind == port_kind::UPLINK {
            mask_list::UPLINK
        } else {
            mask_list::VM
        };
        let zone = if port.kind == port_kind::UPLINK {
            match CONFIG.get(0) {
                Some(c) if c.ct_uplink != 0 => key.tun_vni,
                _ => 0,
            }
        } else {
            port.ct_zone
        };
        if zone != 0 {
            ct_lookup(&mut key, zone);
            if key.ct_state == ct::NEW
                && key.ip_proto == IPPROTO_ICMP
                && icmp_error_related(&ctx, inner, zone)
            {
                key.ct_state = ct::RELATED;
            }
        }
        let action = match lookup(&key, list) {
            Some(a) => a,
            None => return to_slow_path(&ctx, slot, key.ct_state),
        };
        run_action(&ctx, slot, inner, &key, &action)
    }

    /// The conntrack tuple of an IPv4 TCP, UDP or ICMP key in `zone`; `None` for the rest.
    #[inline(always)]
    fn ct_key(key: &FlowKey, zone: u32) -> Option<CtKey> {
        if key.eth_type != ETH_P_IPV4.to_be()
            || !matches!(key.ip_proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMP)
        {
            return None;
        }
        Some(CtKey {
            zone,
            src: key.ip_src,
            dst: key.ip_dst,
            sport: key.l4_src,
            dport: key.l4_dst,
            proto: key.ip_proto,
            pad: [0; 3],
        })
    }

    /// The connection cache set of a tuple (multiplicative hashing): its block, and the
    /// index of the set's first slot in it.
    #[inline(always)]
    fn ct_set(k: &CtKey) -> (u32, usize) {
        let ports = (k.sport as u32) << 16 | k.dport as u32;
        let h = (k.src ^ k.dst.rotate_left(16) ^ ports ^ k.proto as u32)
            .wrapping_add(k.zone)
            .wrapping_mul(0x9e37_79b1);
        let sets = ct::CACHE_BLOCK_SLOTS as u32 / 2;
        let block = h >> (32 - ct::CACHE_BLOCKS.trailing_zeros());
        let set =
            (h >> (32 - ct::CACHE_BLOCKS.trailing_zeros() - sets.trailing_zeros())) & (sets - 1);
        (block, set as usize * 2)
    }

    /// Sets `key.ct_state`: established (the connection's own direction, or its reply), or
    /// new. Asks the per-CPU cache first (a tuple found established in this epoch); in CT,
    /// refreshes the entry it finds and caches it.
    #[inline(always)]
    fn ct_lookup(key: &mut FlowKey, zone: u32) {
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
        let r = CtKey {
            src: k.dst,
            dst: k.src,
            sport: k.dport,
            dport: k.sport,
            ..k
        };
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
    fn icmp_error_related(ctx: &XdpContext, off: usize, zone: u32) -> bool {
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
        let k = CtKey {
            zone,
            src: esrc,
            dst: edst,
            sport,
            dport,
            proto: eproto,
            pad: [0; 3],
        };
        let r = CtKey {
            src: edst,
            dst: esrc,
            sport: dport,
            dport: sport,
            ..k
        };
        // SAFETY: read-only lookups; the values are not used.
        unsafe { CT.get(&k).is_some() || CT.get(&r).is_some() }
    }

    /// Commits the key's connection in the action's zones (`flag::CT_COMMIT`); returns how
    /// many entries it wrote.
    #[inline(always)]
    fn ct_commit(key: &FlowKey, a: &FlowAction) -> u64 {
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
            if let Some(k) = ct_key(key, z) {
                if CT.insert(&k, &e, 0).is_ok() {
                    n += 1;
                }
            }
        }
        n
    }

    enum Verdict {
        Pass,
        Drop(u32),
        Slow,
    }

    /// Hands the frame to the slow path, prefixed with a `SlowMeta` (the connection state
    /// XDP found); dropped and counted if that does not fit.
    #[inline(always)]
    fn to_slow_path(ctx: &XdpContext, slot: Ctr, ct_state: u8) -> u32 {
        // SAFETY: helper call on the live context; the headroom check is the helper's.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(SlowMeta::LEN as i32)) } != 0 {
            count(slot, ctr::DROP_XSK, 1);
            return xdp_action::XDP_DROP;
        }
        let Some(m) = bound(ctx, 0, SlowMeta::LEN) else {
            count(slot, ctr::DROP_XSK, 1);
            return xdp_action::XDP_DROP;
        };
        let meta = SlowMeta {
            magic: SlowMeta::MAGIC,
            ct_state,
            pad: [0; 5],
        };
        // SAFETY: [m, m+8) is inside the packet.
        unsafe { core::ptr::write_unaligned(m as *mut SlowMeta, meta) };
        match XSKS.redirect(slot.slot, 0) {
            Ok(a) => {
                count(slot, ctr::MISS, 1);
                a
            }
            Err(_) => {
                count(slot, ctr::DROP_XSK, 1);
                xdp_action::XDP_DROP
            }
        }
    }

    /// Validates outer Ethernet/IPv4/UDP/Geneve of a frame on the uplink and returns the offset
    /// of the inner Ethernet header. Non-overlay traffic goes to the stack.
    #[inline(always)]
    fn parse_tunnel(
        ctx: &XdpContext,
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
        if tot + ETH_LEN != ctx.data_end() - ctx.data() || u16::from_be(ulen) as usize + ihl != tot
        {
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
            let o = bound(ctx, (opts + off) & 0x1ff, 4)
                .ok_or(Verdict::Drop(ctr::DROP_GENEVE_OPT_LEN))?;
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
    fn parse_inner(ctx: &XdpContext, off: usize, key: &mut FlowKey) -> Option<()> {
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
            key.eth_dst = core::ptr::read_unaligned(e as *const [u8; 6]);
            key.eth_src = core::ptr::read_unaligned((e + 6) as *const [u8; 6]);
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

    /// Keys an ARP frame the way `geneflow_abi::arp` describes (sender/target protocol
    /// address in ip_src/ip_dst, opcode in ip_proto with the gratuitous and sender-MAC
    /// mismatch bits; 0 when malformed).
    #[inline(always)]
    fn parse_arp(ctx: &XdpContext, off: usize, key: &mut FlowKey) {
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

    /// Tuple-space search over the active masks of the port kind's list, hottest first
    /// (`Config::order`); stale entries (generation moved on) miss.
    #[inline(always)]
    fn lookup(key: &FlowKey, list: u32) -> Option<FlowAction> {
        let c = CONFIG.get(0)?;
        let l = if list == mask_list::UPLINK { 1 } else { 0 };
        let n = c.n_masks[l];
        let base = l as u32 * MAX_MASKS;
        let kw = key.to_words();
        for i in 0..MAX_MASKS as usize {
            if i as u32 >= n {
                break;
            }
            let slot = c.order[l][i] as u32;
            if slot >= n {
                // Mid-update (a torn read of the order): at worst this packet misses.
                continue;
            }
            let Some(m) = MASKS.get(base + slot) else {
                break;
            };
            let mw = m.to_words();
            let mut w = [0u64; FLOW_KEY_WORDS];
            for j in 0..FLOW_KEY_WORDS {
                w[j] = kw[j] & mw[j];
            }
            // SAFETY: FlowKey is repr(C), 40 bytes, plain integers: any bit pattern is valid.
            let mut k: FlowKey = unsafe { core::mem::transmute(w) };
            k.mask_id = (base + slot) as u8;
            // SAFETY: values are written whole by userspace; a torn read only yields a stale
            // action for one packet, which the generation check below bounds.
            if let Some(p) = FLOWS.get_ptr_mut(&k) {
                // SAFETY: the kernel returned a pointer to the live value.
                let a = unsafe { *p };
                // SAFETY: as above.
                let live = unsafe { GENS.get(&a.dp_key) }.map(|g| g.generation);
                if live != Some(a.generation) {
                    return None;
                }
                // SAFETY: as above; a racy increment only loses counts, never corrupts.
                unsafe { (*p).hits += 1 };
                if let Some(h) = MASK_HITS.get_ptr_mut(base + slot) {
                    // SAFETY: per-CPU slot, this CPU only.
                    unsafe { *h += 1 };
                }
                return Some(a);
            }
        }
        None
    }

    #[inline(always)]
    fn drop_with(slot: Ctr, reason: u32) -> u32 {
        count(slot, reason, 1);
        xdp_action::XDP_DROP
    }

    /// A source address no router forwards from (host byte order): this network, loopback,
    /// link-local, multicast, reserved and broadcast. Same list as the slow path's.
    #[inline(always)]
    fn martian(a: u32) -> bool {
        let top = a >> 24;
        top == 0 || top == 127 || top >= 224 || a >> 16 == 0xa9fe
    }

    /// The checks and rewrites of a routed packet (`flag::ROUTE`); `Err` carries the verdict
    /// when the packet does not go on.
    #[inline(always)]
    fn route(ctx: &XdpContext, slot: Ctr, key: &FlowKey, a: &FlowAction) -> Result<(), u32> {
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
            return Err(to_slow_path(ctx, slot, key.ct_state));
        }
        if a.kind == act::ENCAP && (ctx.data_end() - ctx.data()) as u32 > a.max_inner_len {
            if u16::from_be(frag) & 0x4000 != 0 {
                // DF: the slow path answers with ICMP fragmentation needed (PMTUD).
                return Err(to_slow_path(ctx, slot, key.ct_state));
            }
            return Err(drop_with(slot, ctr::DROP_TOO_BIG));
        }
        let b = p as *mut u8;
        // SAFETY: [p, p+34) is inside the packet; unaligned writes.
        unsafe {
            core::ptr::write_unaligned(b as *mut [u8; 6], a.set_dmac);
            core::ptr::write_unaligned(b.add(6) as *mut [u8; 6], a.set_smac);
            core::ptr::write_unaligned(b.add(22), ttl - 1);
            // RFC 1624 incremental update for TTL - 1 (as Linux's ip_decrease_ttl): the
            // checksum grows by 0x0100 in network order, with end-around carry.
            let c = core::ptr::read_unaligned(b.add(24) as *const u16) as u32
                + 0x0100u16.to_be() as u32;
            let c = c + (c >= 0xffff) as u32;
            core::ptr::write_unaligned(b.add(24) as *mut u16, c as u16);
        }
        Ok(())
    }

    /// Turns the ARP request in the frame into the reply of `a.set_smac` and sends it back out of
    /// the port it came in on (`a.out_ifindex`).
    #[inline(always)]
    fn arp_reply(ctx: &XdpContext, slot: Ctr, a: &FlowAction) -> u32 {
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
        count(slot, ctr::FAST_HIT, 1);
        count(slot, ctr::ARP_REPLY, 1);
        // A redirect to the port it came in on rather than XDP_TX: on a veth, XDP_TX of a
        // frame that arrived from the peer's stack (an skb) never reached the peer here (the
        // VM saw no reply), while the redirect takes the path decap outputs take.
        redirect(ctx, slot, a.out_ifindex, a.out_slot)
    }

    #[inline(always)]
    fn run_action(ctx: &XdpContext, slot: Ctr, inner: usize, key: &FlowKey, a: &FlowAction) -> u32 {
        if a.flags & flag::ROUTE != 0 {
            if let Err(v) = route(ctx, slot, key, a) {
                return v;
            }
        }
        if a.flags & flag::CT_COMMIT != 0 {
            count(slot, ctr::CT_COMMITTED, ct_commit(key, a));
        }
        match a.kind {
            act::ARP_REPLY => arp_reply(ctx, slot, a),
            act::OUTPUT => {
                count(slot, ctr::FAST_HIT, 1);
                redirect(ctx, slot, a.out_ifindex, a.out_slot)
            }
            act::DECAP_OUTPUT => {
                // SAFETY: helper call on the live context; inner <= frame length was checked.
                if unsafe { bpf_xdp_adjust_head(ctx.ctx, inner as i32) } != 0 {
                    count(slot, ctr::DROP_MALFORMED, 1);
                    return xdp_action::XDP_DROP;
                }
                count(slot, ctr::FAST_HIT, 1);
                redirect(ctx, slot, a.out_ifindex, a.out_slot)
            }
            act::ENCAP => encap(ctx, slot, key, a),
            act::PASS => {
                count(slot, ctr::PASS, 1);
                xdp_action::XDP_PASS
            }
            act::DROP => {
                count(slot, ctr::FAST_HIT, 1);
                count(
                    slot,
                    if a.drop_reason < ctr::COUNT {
                        a.drop_reason
                    } else {
                        ctr::DROP_ACTION
                    },
                    1,
                );
                xdp_action::XDP_DROP
            }
            _ => {
                count(slot, ctr::DROP_ACTION, 1);
                xdp_action::XDP_DROP
            }
        }
    }

    #[inline(always)]
    fn redirect(ctx: &XdpContext, slot: Ctr, ifindex: u32, out_slot: u32) -> u32 {
        // SAFETY: plain helper call.
        let r = unsafe { bpf_redirect(ifindex, 0) } as u32;
        if r != xdp_action::XDP_REDIRECT {
            count(slot, ctr::REDIRECT_FAIL, 1);
        } else {
            let out = Ctr::new(out_slot);
            count(out, ctr::TX_PACKETS, 1);
            count(out, ctr::TX_BYTES, (ctx.data_end() - ctx.data()) as u64);
        }
        r
    }

    #[inline(always)]
    fn fold(mut s: u64) -> u16 {
        s = (s & 0xffff_ffff) + (s >> 32);
        s = (s & 0xffff_ffff) + (s >> 32);
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        s as u16
    }

    #[inline(always)]
    fn encap(ctx: &XdpContext, slot: Ctr, key: &FlowKey, a: &FlowAction) -> u32 {
        let inner_len = (ctx.data_end() - ctx.data()) as u32;
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
                return to_slow_path(ctx, slot, key.ct_state);
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
        let b = start as *mut u8;
        // SAFETY: [start, start+58) is inside the packet (checked above); writes are unaligned.
        unsafe {
            core::ptr::write_unaligned(b as *mut [u8; 6], dmac);
            core::ptr::write_unaligned(b.add(6) as *mut [u8; 6], smac);
            core::ptr::write_unaligned(b.add(12) as *mut u16, ETH_P_IPV4.to_be());
            core::ptr::write_unaligned(b.add(14) as *mut u16, w0);
            core::ptr::write_unaligned(b.add(16) as *mut u16, w1);
            core::ptr::write_unaligned(b.add(18) as *mut u16, ip_id);
            core::ptr::write_unaligned(b.add(20) as *mut u16, w3);
            core::ptr::write_unaligned(b.add(22) as *mut u16, w4);
            core::ptr::write_unaligned(b.add(24) as *mut u16, ip_csum);
            core::ptr::write_unaligned(b.add(26) as *mut u32, a.encap_src);
            core::ptr::write_unaligned(b.add(30) as *mut u32, a.encap_dst);
            core::ptr::write_unaligned(b.add(34) as *mut u16, sport.to_be());
            core::ptr::write_unaligned(b.add(36) as *mut u16, GENEVE_PORT.to_be());
            core::ptr::write_unaligned(b.add(38) as *mut u16, udp_len.to_be());
            core::ptr::write_unaligned(b.add(40) as *mut u16, 0);
            // Geneve: ver 0, opt len 2 words; C bit set (the OVN option is critical).
            core::ptr::write_unaligned(b.add(42) as *mut u16, 0x0240u16.to_be());
            core::ptr::write_unaligned(b.add(44) as *mut u16, ETH_P_TEB.to_be());
            core::ptr::write_unaligned(b.add(46) as *mut u32, (a.vni << 8).to_be());
            core::ptr::write_unaligned(b.add(50) as *mut u16, OVN_OPT_CLASS.to_be());
            core::ptr::write_unaligned(
                b.add(52) as *mut u16,
                ((OVN_OPT_TYPE as u16) << 8 | 1).to_be(),
            );
            core::ptr::write_unaligned(b.add(54) as *mut u32, a.ovn_opt.to_be());
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
            let mut p = start + ENCAP_OVERHEAD as usize;
            for _ in 0..CSUM_WORDS {
                if p + 4 > end {
                    break;
                }
                // SAFETY: 4 bytes at p are inside the packet (checked just above).
                s += unsafe { core::ptr::read_unaligned(p as *const u32) } as u64;
                p += 4;
            }
            if p + 2 <= end {
                // SAFETY: bounds checked.
                s += unsafe { core::ptr::read_unaligned(p as *const u16) } as u64;
                p += 2;
            }
            if p < end {
                // SAFETY: bounds checked; a trailing odd byte is padded with zero.
                s += unsafe { *(p as *const u8) } as u64;
            }
            let mut c = !fold(s);
            if c == 0 {
                c = 0xffff;
            }
            if start + 42 <= end {
                // SAFETY: checked above.
                unsafe { core::ptr::write_unaligned((start + 40) as *mut u16, c) };
            }
        }
        count(slot, ctr::FAST_HIT, 1);
        redirect(ctx, slot, out_ifindex, a.out_slot)
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
