//! One AF_XDP socket (xsk-rs) bound to one receive queue of an interface, with its own UMEM: half the
//! frames feed the fill ring (slow-path receive), half are a free list for transmit; each
//! ring holds half the frames. This is the ring boundary, so the `unsafe` of the datapath
//! lives here.

use geneflow_abi::MAX_QUEUES;
use std::io::Write;
use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;
use thiserror::Error;
use xsk_rs::config::{BindFlags, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

pub const BATCH: usize = 64;
/// UMEM frames (4096 bytes each) of a socket on the uplink or a provider network's
/// interface: every chassis's and every outside host's first frames come there.
pub const FRAMES_WIDE: u32 = 4096;
/// UMEM frames of a socket on a VM port, which sees one VM's first frames: 4 MB instead of
/// 16 per socket (`perf/README.md`, memory of a chassis). A VM that sends more new flows at
/// once than its ring holds loses the rest, counted `drop_xsk_ring_full`.
pub const FRAMES_VM: u32 = 1024;
/// The largest frame the slow path takes or sends: a 9216-byte jumbo frame with room to
/// spare. A frame longer than one UMEM frame (4096 bytes) spans several descriptors
/// (AF_XDP multi-buffer, `XDP_USE_SG`): received ones are gathered into one buffer, sent
/// ones split.
pub const MAX_FRAME: usize = 16384;
/// `XDP_PKT_CONTD` (linux/if_xdp.h): more descriptors of this packet follow.
const PKT_CONTD: u32 = 1;

#[derive(Debug, Error)]
pub enum XskError {
    #[error("AF_XDP on {iface}: {msg}")]
    Setup { iface: String, msg: String },
}

pub struct Xsk {
    umem: Umem,
    tx: TxQueue,
    rx: RxQueue,
    fq: FillQueue,
    cq: CompQueue,
    rx_descs: Vec<FrameDesc>,
    comp_descs: Vec<FrameDesc>,
    free_tx: Vec<FrameDesc>,
    tx_pending: bool,
    /// Bound with `XDP_USE_SG`: frames may span descriptors.
    sg: bool,
    /// A multi-descriptor frame being gathered (capacity `MAX_FRAME`, never grown).
    gather: Vec<u8>,
    /// The frame being gathered is longer than `MAX_FRAME`: dropped when it ends.
    overflow: bool,
    /// Frames dropped for that, since the socket was bound.
    oversized: u64,
    tx_descs: Vec<FrameDesc>,
    /// Bytes one UMEM frame holds (its size less the kernel's XDP headroom).
    chunk: usize,
}

/// Zero-copy needs driver support (i40e, ice, mlx5); veth only does copy mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindMode {
    Copy,
    ZeroCopy,
}

impl Xsk {
    /// One socket per receive queue of `iface` (index = queue), at most `MAX_QUEUES`: XDP
    /// hands a frame that misses to the socket of the queue it arrived on.
    /// `frames`: the UMEM of each (`FRAMES_WIDE` or `FRAMES_VM`).
    pub fn open_all(iface: &str, mode: BindMode, frames: u32) -> Result<Vec<Xsk>, XskError> {
        let queues = crate::netdev::rx_queues(iface);
        if queues > MAX_QUEUES {
            tracing::warn!(
                iface,
                queues,
                "slow-path sockets on the first {MAX_QUEUES} receive queues only: misses on the others count drop_xsk (ethtool -L {iface} combined {MAX_QUEUES})"
            );
        }
        (0..queues.min(MAX_QUEUES))
            .map(|q| Xsk::open(iface, q, mode, frames))
            .collect()
    }

    pub fn open(iface: &str, queue: u32, mode: BindMode, frames: u32) -> Result<Xsk, XskError> {
        let err = |msg: String| XskError::Setup {
            iface: format!("{iface} queue {queue}"),
            msg,
        };
        // Rings are powers of two, each half the frames (`FRAMES_WIDE` or `FRAMES_VM`).
        assert!(frames.is_power_of_two() && frames >= 4 * BATCH as u32);
        let ring = frames / 2;
        let q = |n| QueueSize::new(n).map_err(|e| err(format!("{e}")));
        let umem_cfg = UmemConfig::builder()
            .fill_queue_size(q(ring)?)
            .comp_queue_size(q(ring)?)
            .build()
            .map_err(|e| err(format!("{e}")))?;
        let chunk = umem_cfg.mtu() as usize;
        let (umem, umem_frames) =
            Umem::new(umem_cfg, NonZeroU32::new(frames).expect("non-zero"), false)
                .map_err(|e| err(format!("{e}")))?;
        let bind = match mode {
            BindMode::Copy => BindFlags::XDP_COPY,
            BindMode::ZeroCopy => BindFlags::XDP_ZEROCOPY,
        } | BindFlags::XDP_USE_NEED_WAKEUP;
        let cfg = |flags: BindFlags| -> Result<SocketConfig, XskError> {
            Ok(SocketConfig::builder()
                .rx_queue_size(q(ring)?)
                .tx_queue_size(q(ring)?)
                .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
                .bind_flags(flags)
                .build())
        };
        let name: Interface = iface.parse().map_err(|e| err(format!("{e:?}")))?;
        // Rebinding right after a previous owner exits can give EBUSY for a moment. A kernel
        // or driver without AF_XDP multi-buffer (before 6.6, or a zero-copy driver without
        // it) refuses XDP_USE_SG: bind without it, frames then end at one UMEM frame.
        let mut delay = Duration::from_millis(10);
        let mut sg = true;
        let (tx, rx, fqcq) = loop {
            let flags = if sg {
                bind | BindFlags::XDP_USE_SG
            } else {
                bind
            };
            // SAFETY: the UMEM is not shared with another socket, so no libxdp program-load
            // interaction applies; the rings returned are owned by this Xsk.
            match unsafe { Socket::new(cfg(flags)?, &umem, &name, queue) } {
                Ok(s) => break s,
                Err(e) if sg && os_error(&e) == Some(libc::EOPNOTSUPP) => {
                    tracing::warn!(iface, "AF_XDP multi-buffer not supported here ({e}): the slow path takes frames of at most one UMEM frame");
                    sg = false;
                }
                Err(e) if delay < Duration::from_secs(2) => {
                    tracing::debug!(iface, "AF_XDP bind failed ({e}), retrying");
                    std::thread::sleep(delay);
                    delay *= 2;
                }
                Err(e) => return Err(err(format!("{e}"))),
            }
        };
        let (mut fq, cq) = fqcq.ok_or_else(|| err("no fill/completion queue".into()))?;
        let (fill, free_tx) = umem_frames.split_at(ring as usize);
        // SAFETY: these frames belong to this UMEM and are handed to the kernel exactly once.
        let n = unsafe { fq.produce(fill) };
        if n != fill.len() {
            return Err(err(format!("fill ring took {n} of {} frames", fill.len())));
        }
        let proto = umem_frames[0];
        Ok(Xsk {
            umem,
            tx,
            rx,
            fq,
            cq,
            rx_descs: vec![proto; BATCH],
            comp_descs: vec![proto; BATCH],
            free_tx: free_tx.to_vec(),
            tx_pending: false,
            sg,
            gather: Vec::with_capacity(MAX_FRAME),
            overflow: false,
            oversized: 0,
            tx_descs: Vec::with_capacity(MAX_FRAME / 2048 + 1),
            chunk,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.rx.fd().as_raw_fd()
    }

    /// What the kernel dropped on the way into this socket since it was bound: (rx ring full,
    /// other rx drops). One getsockopt; called once per second, not per packet.
    pub fn rx_drops(&self) -> (u64, u64) {
        match self.rx.fd().xdp_statistics() {
            Ok(s) => (s.rx_ring_full(), s.rx_dropped() + self.oversized),
            Err(_) => (0, self.oversized),
        }
    }

    /// Returns completed transmit frames to the free list.
    pub fn reap(&mut self) {
        // SAFETY: the completion queue only returns frames of this UMEM that we produced.
        let n = unsafe { self.cq.consume(&mut self.comp_descs) };
        self.free_tx.extend_from_slice(&self.comp_descs[..n]);
    }

    /// Receives up to BATCH descriptors and calls `f` on each whole frame (a frame spanning
    /// several descriptors is gathered first, and may complete in a later call); descriptors
    /// go back to the fill ring afterwards. Returns how many descriptors were received.
    pub fn recv(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        // SAFETY: rx descriptors come from this UMEM; they are read and then returned to the
        // fill ring below, never used after that.
        let n = unsafe { self.rx.consume(&mut self.rx_descs) };
        for d in &self.rx_descs[..n] {
            // SAFETY: `d` was just received on this socket's UMEM and is not in any ring.
            let data = unsafe { self.umem.data(d) };
            let bytes = data.contents();
            let more = d.options() & PKT_CONTD != 0;
            if !more && self.gather.is_empty() && !self.overflow {
                f(bytes);
                continue;
            }
            if self.gather.len() + bytes.len() > MAX_FRAME {
                self.overflow = true;
            } else if !self.overflow {
                self.gather.extend_from_slice(bytes);
            }
            if !more {
                if self.overflow {
                    self.oversized += 1;
                } else {
                    f(&self.gather);
                }
                self.gather.clear();
                self.overflow = false;
            }
        }
        if n > 0 {
            // SAFETY: returning the frames we just consumed.
            unsafe {
                let mut done = 0;
                while done < n {
                    let k = self.fq.produce(&self.rx_descs[done..n]);
                    if k == 0 {
                        break;
                    }
                    done += k;
                }
            }
        }
        n
    }

    /// Queues one frame for transmit; `false` if no frame or ring slot was free.
    pub fn send(&mut self, bytes: &[u8]) -> bool {
        if bytes.len() > self.chunk {
            return self.send_multi(bytes);
        }
        let Some(mut d) = self.free_tx.pop() else {
            self.reap();
            return false;
        };
        // SAFETY: `d` is a free frame of this UMEM, owned by us until produced to the tx ring.
        let ok = unsafe {
            let mut data = self.umem.data_mut(&mut d);
            let mut c = data.cursor();
            c.set_pos(0);
            c.write_all(bytes).is_ok()
        };
        d.set_options(0);
        // SAFETY: `d` belongs to this UMEM and is in no ring.
        if !ok || unsafe { self.tx.produce_one(&d) } == 0 {
            self.free_tx.push(d);
            return false;
        }
        self.tx_pending = true;
        true
    }

    /// A frame longer than one UMEM frame, in several descriptors (all but the last marked
    /// `XDP_PKT_CONTD`), produced together or not at all.
    fn send_multi(&mut self, bytes: &[u8]) -> bool {
        let parts = bytes.len().div_ceil(self.chunk);
        if !self.sg || bytes.len() > MAX_FRAME {
            return false;
        }
        if self.free_tx.len() < parts {
            self.reap();
            if self.free_tx.len() < parts {
                return false;
            }
        }
        self.tx_descs.clear();
        for (i, chunk) in bytes.chunks(self.chunk).enumerate() {
            let mut d = self.free_tx.pop().expect("counted above");
            // SAFETY: `d` is a free frame of this UMEM, owned by us until produced.
            let ok = unsafe {
                let mut data = self.umem.data_mut(&mut d);
                let mut c = data.cursor();
                c.set_pos(0);
                c.write_all(chunk).is_ok()
            };
            d.set_options(if i + 1 < parts { PKT_CONTD } else { 0 });
            self.tx_descs.push(d);
            if !ok {
                self.free_tx.append(&mut self.tx_descs);
                return false;
            }
        }
        // SAFETY: every descriptor belongs to this UMEM and is in no ring; the ring takes all
        // of them or none (libxdp reserves all-or-nothing).
        if unsafe { self.tx.produce(&self.tx_descs) } != parts {
            for d in &mut self.tx_descs {
                d.set_options(0);
            }
            self.free_tx.append(&mut self.tx_descs);
            return false;
        }
        self.tx_descs.clear();
        self.tx_pending = true;
        true
    }

    /// Kicks the kernel to transmit what was queued (copy mode transmits in the syscall).
    pub fn flush(&mut self) {
        if self.tx_pending {
            self.tx_pending = false;
            if self.tx.needs_wakeup() {
                let _ = self.tx.wakeup();
            }
        }
    }
}

/// The errno under an xsk-rs socket error, if it carries one.
fn os_error(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    e.source()?.downcast_ref::<std::io::Error>()?.raw_os_error()
}
