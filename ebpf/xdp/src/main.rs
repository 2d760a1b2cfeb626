//! The geneflow XDP fast path. It owns nothing but the per-packet work: parse, build the
//! megaflow key, walk the bounded mask list (tuple-space search), check the entry's logical
//! datapath generation and run its action (output, Geneve encap + FIB lookup + redirect, decap +
//! redirect, drop, pass). Anything it cannot decide goes to the AF_XDP slow path via XSKMAP.
//! Every drop is counted under a reason in a per-CPU array.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{
        bindings::{bpf_fib_lookup as FibParams, xdp_action, BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
        helpers::generated::{
            bpf_fib_lookup, bpf_ktime_get_coarse_ns, bpf_redirect, bpf_xdp_adjust_head,
            bpf_xdp_get_buff_len,
        },
        macros::{map, xdp},
        maps::{Array, HashMap, LruHashMap, PerCpuArray, XskMap},
        programs::XdpContext,
    };
    use geneflow_abi::{
        act, arp, csum_replace2, csum_replace4, ct, ctr, flag, flow_hash, mask_list, nat,
        port_kind, udp_source_port, Config, CtCacheBlock, CtCacheSlot, CtEntry, CtKey, DpGen,
        FipCt, FlowAction, FlowKey, NatEntry, PortConf, PortCounters, SlowMeta, ENCAP_OVERHEAD,
        FLOW_KEY_WORDS, GENEVE_PORT, MASK_LISTS, MAX_DATAPATHS, MAX_FIPS, MAX_FLOWS, MAX_MASKS,
        MAX_PEERS, MAX_PORTS, MAX_QUEUES, OVN_OPT_CLASS, OVN_OPT_TYPE, VLAN_PRESENT,
    };

    mod access;
    mod conntrack;
    mod encap;
    mod napt;
    mod parse;
    mod rewrite;
    use access::*;
    use conntrack::*;
    use encap::*;
    use napt::*;
    use parse::*;
    use rewrite::*;

    #[map]
    static FLOWS: HashMap<FlowKey, FlowAction> =
        HashMap::with_max_entries(MAX_FLOWS, BPF_F_NO_PREALLOC as u32);
    #[map]
    static MASKS: Array<FlowKey> = Array::with_max_entries(MAX_MASKS * MASK_LISTS, 0);
    #[map]
    static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
    /// Packets that hit an entry of each mask (list * MAX_MASKS + slot), for the mask order.
    #[map]
    static MASK_HITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_MASKS * MASK_LISTS, 0);
    #[map]
    static PORTS: HashMap<u32, PortConf> = HashMap::with_max_entries(MAX_PORTS, 0);
    /// Per CPU: the configuration of the last interface a frame came in on, tagged
    /// `Config::ports_gen << 32 | ifindex`. Frames arrive in bursts per interface (a NAPI
    /// poll): this saves a hash lookup per frame.
    #[map]
    static PORT_CACHE: PerCpuArray<PortCacheSlot> = PerCpuArray::with_max_entries(1, 0);
    #[map]
    static GENS: Array<DpGen> = Array::with_max_entries(MAX_DATAPATHS, 0);
    /// Encap IPv4 addresses (network byte order) of the chassis Geneve is accepted from.
    #[map]
    static PEERS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_PEERS, 0);
    /// Connection tracking (see `geneflow_abi::ct`): the least recently used entry makes room.
    #[map]
    static CT: LruHashMap<CtKey, CtEntry> = LruHashMap::with_max_entries(ct::MAX_ENTRIES, 0);
    /// Default SNAT translations (see `geneflow_abi::nat`).
    #[map]
    static NAT: HashMap<CtKey, NatEntry> = HashMap::with_max_entries(nat::MAX_ENTRIES, 0);
    /// Floating IPs bound here whose port is tracked (see `geneflow_abi::FipCt`).
    #[map]
    static FIP_CT: HashMap<u32, FipCt> = HashMap::with_max_entries(MAX_FIPS, 0);
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
    static XSKS: XskMap = XskMap::with_max_entries(MAX_PORTS * MAX_QUEUES, 0);
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
    /// 4-byte words the outer UDP checksum sums over the inner frame when it cannot be
    /// derived from the inner checksums (see `encap::inner_sum`): a full 1500-byte frame.
    const CSUM_WORDS: usize = 384;

    /// The counters of one interface on this CPU, looked up once per packet; the frame's
    /// length as it arrived and its bytes beyond the first buffer (see `frame_len`).
    #[derive(Clone, Copy)]
    #[repr(C)]
    pub struct PortCacheSlot {
        tag: u64,
        conf: PortConf,
    }

    /// The configuration of interface `ifindex`, from this CPU's cache or PORTS.
    #[inline(always)]
    fn port_conf(ifindex: u32) -> Option<PortConf> {
        let gen = CONFIG.get(0).map(|c| c.ports_gen).unwrap_or(0);
        let tag = (gen as u64) << 32 | ifindex as u64;
        let cache = PORT_CACHE.get_ptr_mut(0);
        if let Some(c) = cache {
            // SAFETY: per-CPU slot, this CPU only.
            if unsafe { (*c).tag } == tag {
                // SAFETY: as above.
                return Some(unsafe { (*c).conf });
            }
        }
        // SAFETY: PORTS is only updated by userspace with whole-value writes.
        let p = *unsafe { PORTS.get(&ifindex) }?;
        if let Some(c) = cache {
            // SAFETY: per-CPU slot, this CPU only.
            unsafe { *c = PortCacheSlot { tag, conf: p } };
        }
        Some(p)
    }

    #[derive(Clone, Copy)]
    struct Ctr {
        slot: u32,
        p: Option<*mut PortCounters>,
        len: u32,
        frags: u32,
    }

    impl Ctr {
        #[inline(always)]
        fn new(slot: u32) -> Ctr {
            Ctr {
                slot,
                p: COUNTERS.get_ptr_mut(slot),
                len: 0,
                frags: 0,
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

    /// The whole frame's length. The program is frags-aware (XDP multi-buffer, so it can
    /// attach to interfaces with a jumbo MTU): `data..data_end` is only the first buffer,
    /// which holds every header the program reads or writes; the rest may be in fragments,
    /// whose length the entry of `geneflow_mb` asks the kernel once (`bpf_xdp_get_buff_len`)
    /// and keeps in `slot.frags`.
    #[inline(always)]
    fn frame_len(ctx: &XdpContext, slot: Ctr) -> usize {
        let lin = ctx.data_end() - ctx.data();
        if slot.frags == 0 {
            // Always so in the plain program (a constant there).
            return lin;
        }
        // A volatile read of the difference, so that LLVM cannot reassociate the sum into
        // (data_end + frags) - data, which the verifier refuses (arithmetic on a packet
        // pointer with a scalar).
        // SAFETY: a read of a local.
        let lin = unsafe { core::ptr::read_volatile(&lin) };
        lin + slot.frags as usize
    }

    /// The program for interfaces with a standard MTU: every frame is in one buffer.
    #[xdp]
    pub fn geneflow(ctx: XdpContext) -> u32 {
        run::<false>(ctx)
    }

    /// The multi-buffer (frags-aware) program, for interfaces with a larger MTU: a kernel
    /// refuses a plain program where a frame may not fit one page (ERANGE at MTU 9000 on
    /// veth). It asks the kernel for the frame's length, which costs a helper call per packet
    /// that the plain program saves (decap 234-244 against 254-270 ns/packet, quick runs).
    #[xdp(frags)]
    pub fn geneflow_mb(ctx: XdpContext) -> u32 {
        run::<true>(ctx)
    }

    #[inline(always)]
    fn run<const MB: bool>(ctx: XdpContext) -> u32 {
        let ifindex = ctx.ingress_ifindex() as u32;
        let Some(port) = port_conf(ifindex) else {
            return xdp_action::XDP_PASS;
        };
        let mut slot = Ctr::new(port.slot);
        let len = if MB {
            // SAFETY: helper call on the live context.
            let len = unsafe { bpf_xdp_get_buff_len(ctx.ctx) } as usize;
            slot.frags = len.saturating_sub(ctx.data_end() - ctx.data()) as u32;
            len
        } else {
            ctx.data_end() - ctx.data()
        };
        slot.len = len as u32;
        count(slot, ctr::RX_PACKETS, 1);
        count(slot, ctr::RX_BYTES, len as u64);
        // Five word stores. `FlowKey::zeroed()` became a call to a byte loop (LLVM makes a
        // memset of any zeroing it sees, and the BPF backend calls compiler_builtins' one):
        // the zero is opaque to it.
        let z = core::hint::black_box(0u64);
        // SAFETY: FlowKey is repr(C), 40 bytes of plain integers: all zeros is a valid value.
        let mut key: FlowKey = unsafe { core::mem::transmute([z; FLOW_KEY_WORDS]) };
        key.in_ifindex = ifindex;
        let inner = if port.kind == port_kind::UPLINK {
            match parse_tunnel(&ctx, slot, &port, &mut key) {
                Ok(off) => off,
                Err(Verdict::Pass) => {
                    count(slot, ctr::PASS, 1);
                    return xdp_action::XDP_PASS;
                }
                Err(Verdict::Drop(reason)) => {
                    count(slot, reason, 1);
                    return xdp_action::XDP_DROP;
                }
                Err(Verdict::Slow) => return to_slow_path(&ctx, slot, 0, 0),
            }
        } else {
            0
        };
        if port.kind == port_kind::PROVIDER && vlan_pop(&ctx, &mut key).is_none() {
            count(slot, ctr::DROP_MALFORMED, 1);
            return xdp_action::XDP_DROP;
        }
        if parse_inner(&ctx, inner, &mut key).is_none() {
            count(slot, ctr::DROP_MALFORMED, 1);
            return xdp_action::XDP_DROP;
        }
        let list = if port.kind == port_kind::UPLINK {
            mask_list::UPLINK
        } else {
            // DHCP from a VM (to a server, or posing as one) is the slow path's to answer or
            // refuse, before any megaflow: so no megaflow of other traffic needs the UDP ports.
            if port.kind == port_kind::VM
                && key.eth_type == ETH_P_IPV4.to_be()
                && key.ip_proto == IPPROTO_UDP
                && (key.l4_dst == 67u16.to_be() || key.l4_dst == 68u16.to_be())
            {
                return to_slow_path(&ctx, slot, 0, 0);
            }
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
        if port.kind == port_kind::PROVIDER {
            ct_lookup_fip(&mut key);
        }
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
            None => return to_slow_path(&ctx, slot, key.ct_state, key.tun_out_port),
        };
        run_action(&ctx, slot, inner, &key, &action)
    }

    enum Verdict {
        Pass,
        Drop(u32),
        Slow,
    }

    /// Hands the frame to the slow path, prefixed with a `SlowMeta` (the connection state
    /// XDP found); dropped and counted if that does not fit.
    #[inline(always)]
    fn to_slow_path(ctx: &XdpContext, slot: Ctr, ct_state: u8, vlan: u16) -> u32 {
        // SAFETY: helper call on the live context; the headroom check is the helper's.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(SlowMeta::LEN as i32)) } != 0 {
            count(slot, ctr::DROP_XSK, 1);
            return xdp_action::XDP_DROP;
        }
        let Some(m) = bound(ctx, 0, SlowMeta::LEN) else {
            count(slot, ctr::DROP_XSK, 1);
            return xdp_action::XDP_DROP;
        };
        // `vlan` is the key's tun_out_port: a provider frame's tag (the slow path reads it
        // for provider interfaces only).
        let meta = SlowMeta {
            magic: SlowMeta::MAGIC,
            ct_state,
            pad0: 0,
            vlan,
            pad: [0; 2],
        };
        // SAFETY: [m, m+8) is inside the packet.
        unsafe { core::ptr::write_unaligned(m as *mut SlowMeta, meta) };
        // SAFETY: reads a field of the live context.
        let queue = unsafe { (*ctx.ctx).rx_queue_index };
        if queue >= MAX_QUEUES {
            count(slot, ctr::DROP_XSK, 1);
            return xdp_action::XDP_DROP;
        }
        match XSKS.redirect(slot.slot * MAX_QUEUES + queue, 0) {
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

    /// Tuple-space search over the active masks of the port kind's list, hottest first
    /// (`Config::order`); stale entries (generation moved on) are skipped.
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
                let live = GENS.get(a.gen_slot).map(|g| g.generation);
                if live != Some(a.generation) {
                    // Stale: invalid, not a verdict. A megaflow of the new generation may sit
                    // under another mask (the datapath's rules now look at fields the stale
                    // one did not, e.g. ct_state once a port joins a security group) and
                    // must not stay shadowed until the collector removes this one.
                    continue;
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

    #[inline(always)]
    fn run_action(ctx: &XdpContext, slot: Ctr, inner: usize, key: &FlowKey, a: &FlowAction) -> u32 {
        if a.kind == act::UNNAPT {
            return unnapt(ctx, slot, key);
        }
        // Before any rewrite: a connection without a translation yet goes to the slow path
        // as it came.
        let napt = if a.flags & flag::NAPT != 0 {
            match napt_out_lookup(ctx, key) {
                Some(e) => Some(e),
                None => return to_slow_path(ctx, slot, key.ct_state, key.tun_out_port),
            }
        } else {
            None
        };
        if a.flags & flag::ROUTE != 0 {
            if let Err(v) = route(ctx, slot, key, a) {
                return v;
            }
            if let Some(e) = napt {
                if napt_out_apply(ctx, key, &e).is_none() {
                    return drop_with(slot, ctr::DROP_MALFORMED);
                }
            }
            if a.flags & (flag::SNAT | flag::DNAT) != 0 && nat(ctx, key, a).is_none() {
                return drop_with(slot, ctr::DROP_MALFORMED);
            }
        }
        if a.flags & flag::CT_COMMIT != 0 {
            count(slot, ctr::CT_COMMITTED, ct_commit(key, a));
        }
        match a.kind {
            act::ARP_REPLY => arp_reply(ctx, slot, a),
            act::OUTPUT => {
                if a.vlan != 0 && vlan_push(ctx, a.vlan).is_none() {
                    return drop_with(slot, ctr::DROP_MALFORMED);
                }
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
            count(out, ctr::TX_BYTES, frame_len(ctx, slot) as u64);
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
