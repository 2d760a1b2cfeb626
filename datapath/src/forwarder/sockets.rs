//! What every slow-path thread does with its sockets and its eventfd: the poll set, the
//! port index, receiving a batch (each frame's `SlowMeta` stripped), counting what the
//! kernel could not hand over.

use super::*;
use std::os::fd::{AsRawFd, OwnedFd};

/// Interface index -> position, for ports listed in this order.
pub(super) fn positions(ifindexes: impl Iterator<Item = u32>) -> HashMap<u32, usize> {
    ifindexes.enumerate().map(|(i, ix)| (ix, i)).collect()
}

/// What a slow-path thread polls: its sockets, then its eventfd `wake`.
pub(super) fn poll_set<'a>(
    xsks: impl Iterator<Item = &'a Xsk>,
    wake: std::os::fd::RawFd,
) -> Vec<libc::pollfd> {
    xsks.map(|x| x.fd())
        .chain([wake])
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect()
}

/// Frames the kernel could not hand to the slow path are drops too: counts, for the port in
/// `slot`, what its sockets `xsks` dropped since `seen` (ring full, other).
pub(super) fn count_socket_drops(shared: &Shared, slot: u32, xsks: &[Xsk], seen: &mut (u64, u64)) {
    let now = xsks
        .iter()
        .map(|x| x.rx_drops())
        .fold((0, 0), |a, d| (a.0 + d.0, a.1 + d.1));
    shared.count(slot, ctr::DROP_XSK_RING_FULL, now.0.saturating_sub(seen.0));
    shared.count(slot, ctr::DROP_XSK_RX, now.1.saturating_sub(seen.1));
    *seen = now;
}

/// Drains an eventfd (nonblocking).
pub(super) fn drain(fd: &OwnedFd) {
    let mut buf = 0u64;
    // SAFETY: reads at most 8 bytes into a live u64 from a nonblocking eventfd we own.
    unsafe { libc::read(fd.as_raw_fd(), &mut buf as *mut u64 as *mut libc::c_void, 8) };
}

/// A nonblocking eventfd.
pub(super) fn eventfd() -> Result<OwnedFd, ForwarderError> {
    // SAFETY: plain eventfd(2); the descriptor is owned right away.
    let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if efd < 0 {
        return Err(ForwarderError::Io(std::io::Error::last_os_error()));
    }
    // SAFETY: efd is a fresh descriptor nobody else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(efd) })
}

/// Receives one batch from `x` into `rxbuf` (frame `k` at `k * STRIDE`), each frame's
/// `SlowMeta` stripped into `rxct` (`None`: the frame came without one). Returns how many.
pub(super) fn receive_batch(
    x: &mut Xsk,
    rxbuf: &mut [u8],
    rxlen: &mut [usize; BATCH],
    rxct: &mut [Option<(u8, u16)>; BATCH],
) -> usize {
    let mut n = 0;
    x.recv(|frame| {
        // Every frame from our XDP program starts with its SlowMeta.
        let meta = (frame.len() >= SlowMeta::LEN
            && u16::from_ne_bytes([frame[0], frame[1]]) == SlowMeta::MAGIC)
            .then(|| (frame[2], u16::from_ne_bytes([frame[4], frame[5]])));
        let frame = if meta.is_some() {
            &frame[SlowMeta::LEN..]
        } else {
            frame
        };
        let len = frame.len().min(STRIDE);
        rxbuf[n * STRIDE..n * STRIDE + len].copy_from_slice(&frame[..len]);
        rxlen[n] = len;
        rxct[n] = meta;
        n += 1;
    });
    n
}
