//! A burst of packet buffers: what one `rte_eth_rx_burst` returned, or what one
//! `rte_eth_tx_burst` will send. The burst owns its buffers: those not handed to a port are
//! freed when it is cleared or dropped. No allocation: the array is inline.

use super::port::{EthPort, Mempool};

/// Frames per burst (DPDK's usual 32).
pub const BURST: usize = 32;

pub struct Burst {
    bufs: [*mut dpdk_sys::rte_mbuf; BURST],
    len: usize,
}

impl Default for Burst {
    fn default() -> Self {
        Burst {
            bufs: [std::ptr::null_mut(); BURST],
            len: 0,
        }
    }
}

impl Burst {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len == BURST
    }

    /// Receives up to the free room from queue `q` of `port`; returns how many came.
    pub fn rx(&mut self, port: &EthPort<'_>, q: u16) -> usize {
        let room = (BURST - self.len) as u16;
        // SAFETY: the port is started and `q` below its queue count (checked by the port's
        // owner); the pointer array has `room` free slots from `len`.
        let n = unsafe {
            dpdk_sys::gf_rx_burst(port.id, q, self.bufs.as_mut_ptr().add(self.len), room)
        } as usize;
        self.len += n;
        n
    }

    /// Frame `i`'s first segment.
    pub fn frame(&self, i: usize) -> &[u8] {
        let m = self.bufs[..self.len][i];
        // SAFETY: `m` is a buffer this burst owns; its first segment holds data_len bytes at
        // the data pointer, valid while we hold it (borrowed from self).
        unsafe {
            std::slice::from_raw_parts(
                dpdk_sys::gf_pktmbuf_data(m),
                dpdk_sys::gf_pktmbuf_data_len(m) as usize,
            )
        }
    }

    /// How many segments frame `i` has (more than one: a frame larger than a buffer).
    pub fn segments(&self, i: usize) -> u16 {
        // SAFETY: a buffer this burst owns.
        unsafe { dpdk_sys::gf_pktmbuf_nb_segs(self.bufs[..self.len][i]) }
    }

    /// Appends a copy of `data` in a new buffer of `pool`; false when the burst is full, the
    /// pool empty or `data` larger than a buffer.
    pub fn push_copy(&mut self, pool: &Mempool<'_>, data: &[u8]) -> bool {
        if self.is_full() || data.len() > u16::MAX as usize {
            return false;
        }
        // SAFETY: a live pool.
        let m = unsafe { dpdk_sys::gf_pktmbuf_alloc(pool.raw) };
        if m.is_null() {
            return false;
        }
        // SAFETY: `m` is a fresh buffer we own; append returns room for data.len() bytes or
        // NULL (then the buffer goes back to its pool).
        unsafe {
            let dst = dpdk_sys::gf_pktmbuf_append(m, data.len() as u16);
            if dst.is_null() {
                dpdk_sys::gf_pktmbuf_free(m);
                return false;
            }
            std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len());
        }
        self.bufs[self.len] = m;
        self.len += 1;
        true
    }

    /// Moves frame `i` (no copy) to the end of `to`; false (and nothing moved) when `to` is
    /// full. The frames after `i` shift down.
    pub fn move_to(&mut self, i: usize, to: &mut Burst) -> bool {
        if to.is_full() || i >= self.len {
            return false;
        }
        to.bufs[to.len] = self.bufs[i];
        to.len += 1;
        self.bufs.copy_within(i + 1..self.len, i);
        self.len -= 1;
        true
    }

    /// Sends every frame on queue `q` of `port`; what the port does not take is freed.
    /// Returns how many were sent.
    pub fn tx(&mut self, port: &EthPort<'_>, q: u16) -> usize {
        // SAFETY: a started port and queue; the first `len` pointers are buffers we own,
        // and the port owns those it took.
        let sent =
            unsafe { dpdk_sys::gf_tx_burst(port.id, q, self.bufs.as_mut_ptr(), self.len as u16) }
                as usize;
        self.bufs.copy_within(sent..self.len, 0);
        self.len -= sent;
        self.clear();
        sent
    }

    /// Frees every frame held.
    pub fn clear(&mut self) {
        for m in &self.bufs[..self.len] {
            // SAFETY: a buffer this burst owns, freed once.
            unsafe { dpdk_sys::gf_pktmbuf_free(*m) };
        }
        self.len = 0;
    }
}

impl Drop for Burst {
    fn drop(&mut self) {
        self.clear();
    }
}
