//! Bounds-checked access to the frame: `bound` and `ptr_at` prove a range lies inside the
//! packet (the verifier's condition), the `rd*`/`wr*` helpers read and write within it in
//! aligned 2-byte accesses.

use super::*;

#[inline(always)]
pub(super) fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

/// Returns `data + off` once `len` bytes from there are known to be inside the packet.
#[inline(always)]
pub(super) fn bound(ctx: &XdpContext, off: usize, len: usize) -> Option<usize> {
    let p = ctx.data() + off;
    if p + len > ctx.data_end() {
        return None;
    }
    Some(p)
}

/// Unchecked reads and writes for pointers returned by `bound`.
///
/// Every access of 2 or 4 bytes is made of aligned 2-byte ones. A frame's data starts at
/// an even address: the kernel puts it XDP_PACKET_HEADROOM (+ NET_IP_ALIGN) into a
/// buffer of at least cache-line alignment, and the slow path transmits from even UMEM
/// offsets. (The verifier forbids testing a packet pointer's bits; and on the
/// architectures whose verifier lets programs access packets at any alignment, x86-64
/// and arm64, the 2-byte load the JIT emits would read right even at an odd address.)
/// Every header the program touches lies at an even offset: Ethernet 14 bytes, a tag 4,
/// IPv4 and Geneve options in words of 4, the outer headers 50 + 4n.
///
/// LLVM's BPF backend splits an access it cannot prove aligned into bytes
/// (`read_unaligned` of a u32: 4 loads, 3 shifts and 3 ors), and a 4-byte access cannot
/// be proved aligned here (IPv4 addresses lie at 2 mod 4 behind Ethernet).
#[inline(always)]
pub(super) unsafe fn rd8(p: usize) -> u8 {
    // SAFETY: caller checked the range with `bound`.
    unsafe { *(p as *const u8) }
}

#[inline(always)]
pub(super) unsafe fn rd16(p: usize) -> u16 {
    // SAFETY: caller checked the range with `bound`; p is even (see above).
    unsafe { (p as *const u16).read() }
}

/// Two aligned 2-byte loads, combined in memory order.
#[inline(always)]
pub(super) unsafe fn rd32(p: usize) -> u32 {
    // SAFETY: caller checked the range with `bound`; p is even (see above).
    let (a, b) = unsafe { (rd16(p) as u32, rd16(p + 2) as u32) };
    if cfg!(target_endian = "little") {
        a | b << 16
    } else {
        a << 16 | b
    }
}

#[inline(always)]
pub(super) unsafe fn wr16(p: usize, v: u16) {
    // SAFETY: caller checked the range with `bound`; p is even (see above).
    unsafe { (p as *mut u16).write(v) }
}

/// Two aligned 2-byte stores, in memory order.
#[inline(always)]
pub(super) unsafe fn wr32(p: usize, v: u32) {
    let (a, b) = if cfg!(target_endian = "little") {
        (v as u16, (v >> 16) as u16)
    } else {
        ((v >> 16) as u16, v as u16)
    };
    // SAFETY: caller checked the range with `bound`; p is even (see above).
    unsafe {
        wr16(p, a);
        wr16(p + 2, b);
    }
}

/// A MAC address into the packet at `p` (even), in three 2-byte stores.
#[inline(always)]
pub(super) unsafe fn wr_mac(p: usize, mac: [u8; 6]) {
    for i in 0..3 {
        // SAFETY: as `wr16`, for [p, p+6).
        unsafe { wr16(p + 2 * i, u16::from_ne_bytes([mac[2 * i], mac[2 * i + 1]])) };
    }
}

#[inline(always)]
pub(super) fn rd_u8(ctx: &XdpContext, off: usize) -> Option<u8> {
    // SAFETY: ptr_at checked the byte lies inside the packet.
    ptr_at::<u8>(ctx, off).map(|p| unsafe { *p })
}

#[inline(always)]
pub(super) fn rd_u16(ctx: &XdpContext, off: usize) -> Option<u16> {
    // SAFETY: bounds checked by ptr_at; the offsets callers pass are even.
    ptr_at::<u16>(ctx, off).map(|p| unsafe { rd16(p as usize) })
}

#[inline(always)]
pub(super) fn rd_u32(ctx: &XdpContext, off: usize) -> Option<u32> {
    // SAFETY: bounds checked by ptr_at; the offsets callers pass are even.
    ptr_at::<u32>(ctx, off).map(|p| unsafe { rd32(p as usize) })
}
