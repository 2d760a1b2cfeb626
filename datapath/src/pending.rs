//! Frames for a remote chassis whose underlay next hop is not resolved yet, like the kernel's
//! unresolved-neighbour queue: the slow path (the XDP backend's forwarder, a DPDK poll
//! thread) encapsulates them (destination MAC left blank), parks them here, and sends them as
//! soon as the next hop's MAC is known, instead of dropping the first frames of every new
//! remote chassis. Bounded per remote and in all,
//! and by age; everything is allocated once. What cannot wait is dropped and counted
//! (`drop_no_neighbour`).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// Frames parked in all.
const SLOTS: usize = 64;
/// Frames parked per remote chassis (Linux's default unres_qlen_bytes holds a few dozen).
const PER_REMOTE: usize = 16;
/// How long a frame may wait for its next hop (an ARP exchange takes well under this).
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(1);

struct Slot {
    remote: Option<Ipv4Addr>,
    since: Instant,
    /// Counter slot of the interface the frame came in on.
    in_slot: u32,
    len: usize,
    buf: Box<[u8]>,
}

pub(crate) struct Pending {
    slots: Vec<Slot>,
    used: usize,
}

impl Pending {
    pub fn new(frame_size: usize) -> Pending {
        let now = Instant::now();
        Pending {
            slots: (0..SLOTS)
                .map(|_| Slot {
                    remote: None,
                    since: now,
                    in_slot: 0,
                    len: 0,
                    buf: vec![0u8; frame_size].into_boxed_slice(),
                })
                .collect(),
            used: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// A free buffer for a frame to `remote`, or `None` when `remote` or the queue is full.
    /// The frame is parked once `commit` gives its length.
    pub fn park(&mut self, remote: Ipv4Addr) -> Option<ParkedSlot<'_>> {
        let queued = self
            .slots
            .iter()
            .filter(|s| s.remote == Some(remote))
            .count();
        if queued >= PER_REMOTE {
            return None;
        }
        let i = self.slots.iter().position(|s| s.remote.is_none())?;
        Some(ParkedSlot {
            pending: self,
            i,
            remote,
        })
    }

    /// Sends every parked frame whose next hop `mac_of` now knows (its destination MAC
    /// written in), and gives up on those older than `MAX_WAIT` (`expired` is told their
    /// counter slot). Returns how many were sent.
    pub fn flush(
        &mut self,
        now: Instant,
        mac_of: impl Fn(Ipv4Addr) -> Option<[u8; 6]>,
        mut send: impl FnMut(&[u8], u32) -> bool,
        mut expired: impl FnMut(u32),
    ) -> usize {
        let mut sent = 0;
        for s in self.slots.iter_mut() {
            let Some(remote) = s.remote else { continue };
            if let Some(mac) = mac_of(remote) {
                s.buf[..6].copy_from_slice(&mac);
                if !send(&s.buf[..s.len], s.in_slot) {
                    // The uplink's ring is full: try again on the next round.
                    continue;
                }
                sent += 1;
            } else if now.saturating_duration_since(s.since) < MAX_WAIT {
                continue;
            } else {
                expired(s.in_slot);
            }
            s.remote = None;
            self.used -= 1;
        }
        sent
    }
}

/// A slot being filled; parked by `commit`.
pub(crate) struct ParkedSlot<'a> {
    pending: &'a mut Pending,
    i: usize,
    remote: Ipv4Addr,
}

impl ParkedSlot<'_> {
    pub fn buf(&mut self) -> &mut [u8] {
        &mut self.pending.slots[self.i].buf
    }

    pub fn commit(self, len: usize, in_slot: u32, now: Instant) {
        let s = &mut self.pending.slots[self.i];
        s.remote = Some(self.remote);
        s.len = len;
        s.in_slot = in_slot;
        s.since = now;
        self.pending.used += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parks_until_the_next_hop_is_known_within_bounds() {
        let mut p = Pending::new(64);
        let (a, b) = (Ipv4Addr::new(198, 18, 0, 2), Ipv4Addr::new(198, 18, 0, 3));
        let t0 = Instant::now();
        for _ in 0..PER_REMOTE {
            let mut s = p.park(a).unwrap();
            s.buf()[6] = 0xaa;
            s.commit(20, 7, t0);
        }
        assert!(p.park(a).is_none(), "per-remote bound");
        p.park(b).unwrap().commit(20, 8, t0);
        // Nothing known yet: nothing sent, nothing expired.
        let mut out = Vec::new();
        let n = p.flush(
            t0,
            |_| None,
            |f, _| {
                out.push(f.to_vec());
                true
            },
            |_| panic!("expired early"),
        );
        assert_eq!((n, out.len()), (0, 0));
        // a resolves: its frames leave with the MAC written in; b expires after MAX_WAIT.
        let mac = [2, 0, 0, 0, 0, 9];
        let mut gone = Vec::new();
        let n = p.flush(
            t0 + MAX_WAIT,
            |ip| (ip == a).then_some(mac),
            |f, slot| {
                assert_eq!(slot, 7);
                out.push(f.to_vec());
                true
            },
            |slot| gone.push(slot),
        );
        assert_eq!(n, PER_REMOTE);
        assert!(out
            .iter()
            .all(|f| f[..6] == mac && f[6] == 0xaa && f.len() == 20));
        assert_eq!(gone, vec![8]);
        assert!(p.is_empty());
        // The total bound.
        for i in 0..SLOTS as u32 {
            if let Some(s) = p.park(Ipv4Addr::from(0x0a00_0000 + i / 4)) {
                s.commit(1, 0, t0);
            }
        }
        assert!(p.park(Ipv4Addr::new(10, 9, 9, 9)).is_none());
    }
}
