//! Benchmark XDP programs: `gf_pktgen` (run by BPF_PROG_RUN in live-frames mode: stamps a
//! per-flow value into the template frame and transmits it with XDP_TX), `gf_sink` (counts and
//! drops), `gf_redirect` (plain redirect to one interface: the machine's limit) and
//! `gf_redirect_lookup` (the same after one hash lookup shaped like geneflow's megaflow: the
//! floor of any datapath that looks each frame up once).
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{
        bindings::{xdp_action, BPF_F_NO_PREALLOC},
        helpers::generated::bpf_redirect,
        macros::{map, xdp},
        maps::{Array, HashMap, PerCpuArray},
        programs::XdpContext,
    };

    /// Generator config (slot 0): flows, offset of the 16-bit field varied per flow, its base
    /// value, and the offsets of up to two 16-bit checksums covering it (0 = none). Frame n
    /// carries base + n % flows there; with a second field (`field2_off` != 0) that one
    /// carries base2 + n / flows, so the two together go through flows x 65,536 values.
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct GenConf {
        pub flows: u32,
        pub field_off: u32,
        pub base: u32,
        pub csum_off: u32,
        pub redirect_ifindex: u32,
        /// 8-byte words of the template's head (`HEAD`) written back before every stamp.
        pub head_words: u32,
        pub csum_off_b: u32,
        pub field2_off: u32,
        pub base2: u32,
        pub csum2_off: u32,
        pub csum2_off_b: u32,
        pub pad: u32,
    }

    /// Words of the template frame's head, up to 64 bytes.
    pub const HEAD_WORDS: usize = 8;

    #[map]
    static GEN: Array<GenConf> = Array::with_max_entries(1, 0);
    /// The template's first bytes. In live-frames mode the kernel recycles the frame pages
    /// without resetting their data, so whatever the device under test rewrote in place (a
    /// router's MACs and TTL) would come back on the next use of the page: the head is restored
    /// on every run.
    #[map]
    static HEAD: Array<[u64; HEAD_WORDS]> = Array::with_max_entries(1, 0);
    /// Per CPU, the generator's position: [n % flows, n / flows], moved on by compare and
    /// reset, not by a 64-bit division per frame (the costliest instruction it had).
    #[map]
    static SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);
    /// Sink counters: [packets, bytes].
    #[map]
    static SINK: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

    /// `gf_redirect_lookup`'s table, shaped as geneflow's megaflow table: a 40-byte key, a
    /// 104-byte value, 262,144 entries, not preallocated.
    #[map]
    static FLOOR: HashMap<[u64; 5], [u64; 13]> =
        HashMap::with_max_entries(262_144, BPF_F_NO_PREALLOC);

    #[inline(always)]
    fn fold(mut s: u32) -> u16 {
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        s as u16
    }

    /// Writes `v` at `off` and updates the checksums at `csums` (0 = none) for it; false if
    /// the field is outside the frame.
    #[inline(always)]
    fn stamp(ctx: &XdpContext, off: u32, v: u16, csums: [u32; 2]) -> bool {
        let p = ctx.data() + (off & 0x1ff) as usize;
        if p + 2 > ctx.data_end() {
            return false;
        }
        // SAFETY: [p, p+2) is inside the frame.
        let old = unsafe { core::ptr::read_unaligned(p as *const u16) };
        let new = v.to_be();
        // SAFETY: as above.
        unsafe { core::ptr::write_unaligned(p as *mut u16, new) };
        for c in csums {
            if c == 0 {
                continue;
            }
            let q = ctx.data() + (c & 0x1ff) as usize;
            if q + 2 <= ctx.data_end() {
                // RFC 1624 incremental update: HC' = ~(~HC + ~m + m').
                // SAFETY: [q, q+2) is inside the frame.
                unsafe {
                    let hc = core::ptr::read_unaligned(q as *const u16);
                    let s = (!hc as u32) + (!old as u32) + new as u32;
                    core::ptr::write_unaligned(q as *mut u16, !fold(s));
                }
            }
        }
        true
    }

    #[xdp]
    pub fn gf_pktgen(ctx: XdpContext) -> u32 {
        let Some(c) = GEN.get(0) else {
            return xdp_action::XDP_ABORTED;
        };
        let flows = if c.flows == 0 { 1 } else { c.flows };
        let (Some(seq), Some(round)) = (SEQ.get_ptr_mut(0), SEQ.get_ptr_mut(1)) else {
            return xdp_action::XDP_ABORTED;
        };
        // SAFETY: per-CPU slots, this CPU only.
        let (i, r) = unsafe {
            *seq += 1;
            if *seq >= flows as u64 {
                *seq = 0;
                *round += 1;
            }
            (*seq, *round)
        };
        if c.head_words != 0 {
            if let Some(h) = HEAD.get(0) {
                for (i, w) in h.iter().enumerate() {
                    let q = ctx.data() + i * 8;
                    if i as u32 >= c.head_words || q + 8 > ctx.data_end() {
                        break;
                    }
                    // SAFETY: [q, q+8) is inside the frame.
                    unsafe { core::ptr::write_unaligned(q as *mut u64, *w) };
                }
            }
        }
        let v = ((c.base as u64 + i) & 0xffff) as u16;
        if !stamp(&ctx, c.field_off, v, [c.csum_off, c.csum_off_b]) {
            return xdp_action::XDP_ABORTED;
        }
        if c.field2_off != 0 {
            let v = ((c.base2 as u64 + r) & 0xffff) as u16;
            if !stamp(&ctx, c.field2_off, v, [c.csum2_off, c.csum2_off_b]) {
                return xdp_action::XDP_ABORTED;
            }
        }
        if c.redirect_ifindex != 0 {
            // SAFETY: plain helper call.
            return unsafe { bpf_redirect(c.redirect_ifindex, 0) } as u32;
        }
        xdp_action::XDP_TX
    }

    /// Every frame to the kernel stack: on a veth that a datapath reads without XDP (the
    /// DPDK backend's af_packet ports), it makes the veth take the frames an XDP program on the
    /// other end sends, which it drops otherwise.
    #[xdp]
    pub fn gf_pass(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_PASS
    }

    /// The minimal generator: every frame out as it came (the live-frames path's own limit).
    #[xdp]
    pub fn gf_pktgen_min(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_TX
    }

    #[xdp]
    pub fn gf_sink(ctx: XdpContext) -> u32 {
        let len = (ctx.data_end() - ctx.data()) as u64;
        if let Some(p) = SINK.get_ptr_mut(0) {
            // SAFETY: per-CPU slot, this CPU only.
            unsafe { *p += 1 };
        }
        if let Some(p) = SINK.get_ptr_mut(1) {
            // SAFETY: as above.
            unsafe { *p += len };
        }
        xdp_action::XDP_DROP
    }

    #[xdp]
    pub fn gf_redirect(_ctx: XdpContext) -> u32 {
        let Some(c) = GEN.get(0) else {
            return xdp_action::XDP_ABORTED;
        };
        // SAFETY: plain helper call.
        unsafe { bpf_redirect(c.redirect_ifindex, 0) as u32 }
    }

    /// The frame's first 40 bytes (its MACs, its IP header, its ports) looked up in `FLOOR`,
    /// inserted on a miss; a hit redirects to the interface its value names.
    #[xdp]
    pub fn gf_redirect_lookup(ctx: XdpContext) -> u32 {
        let (data, end) = (ctx.data(), ctx.data_end());
        if data + 40 > end {
            return xdp_action::XDP_DROP;
        }
        let p = data as *const u64;
        // SAFETY: the 40 bytes are within the frame (checked above); unaligned reads.
        let key = unsafe {
            [
                p.read_unaligned(),
                p.add(1).read_unaligned(),
                p.add(2).read_unaligned(),
                p.add(3).read_unaligned(),
                p.add(4).read_unaligned(),
            ]
        };
        // SAFETY: a hash map value, read in place.
        if let Some(v) = unsafe { FLOOR.get(&key) } {
            // SAFETY: plain helper call.
            return unsafe { bpf_redirect(v[0] as u32, 0) as u32 };
        }
        let Some(c) = GEN.get(0) else {
            return xdp_action::XDP_ABORTED;
        };
        let mut v = [0u64; 13];
        v[0] = c.redirect_ifindex as u64;
        let _ = FLOOR.insert(&key, &v, 0);
        // SAFETY: plain helper call.
        unsafe { bpf_redirect(c.redirect_ifindex, 0) as u32 }
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
