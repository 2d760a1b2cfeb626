//! The ARP requests this chassis sent for next hops on provider networks: a reply teaches a
//! neighbour only if this chassis asked for it within 5 s, so that no host on the physical
//! network can move a neighbour with an unsolicited reply. Bounded: the oldest question makes
//! room. Shared by both datapaths' slow paths.

use crate::pipeline::Learn;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// How long an ARP request of this chassis makes the reply welcome.
const VALID: Duration = Duration::from_secs(5);
const MAX: usize = 1024;

#[derive(Default)]
pub struct ArpAsked {
    asked: HashMap<Ipv4Addr, Instant>,
}

impl ArpAsked {
    /// A request for `ip` goes out now.
    pub fn asking(&mut self, ip: Ipv4Addr, now: Instant) {
        if self.asked.len() >= MAX {
            self.asked
                .retain(|_, t| now.saturating_duration_since(*t) < VALID);
        }
        if self.asked.len() >= MAX {
            if let Some(k) = self.asked.iter().min_by_key(|(_, t)| **t).map(|(k, _)| *k) {
                self.asked.remove(&k);
            }
        }
        self.asked.insert(ip, now);
    }

    /// Whether what `l` teaches may be learnt: `Some(asked)` (a reply to a question of
    /// this chassis, or a request, which teaches without being asked), `None` for a reply
    /// nobody asked for.
    pub fn admit(&mut self, l: &Learn, now: Instant) -> Option<bool> {
        let asked = l.solicited
            && self
                .asked
                .remove(&l.ip)
                .is_some_and(|t| now.saturating_duration_since(t) < VALID);
        (asked || !l.solicited).then_some(asked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(ip: [u8; 4]) -> Learn {
        Learn {
            dp: 1,
            ip: Ipv4Addr::from(ip),
            mac: [2, 0, 0, 0, 0, 1],
            solicited: true,
        }
    }

    #[test]
    fn replies_are_learnt_only_when_asked_recently_and_once() {
        let mut a = ArpAsked::default();
        let t = Instant::now();
        assert_eq!(a.admit(&reply([172, 24, 4, 1]), t), None);
        a.asking(Ipv4Addr::new(172, 24, 4, 1), t);
        assert_eq!(a.admit(&reply([172, 24, 4, 1]), t), Some(true));
        assert_eq!(a.admit(&reply([172, 24, 4, 1]), t), None);
        a.asking(Ipv4Addr::new(172, 24, 4, 2), t);
        assert_eq!(a.admit(&reply([172, 24, 4, 2]), t + VALID * 2), None);
        // A request teaches its sender without being asked.
        let req = Learn {
            solicited: false,
            ..reply([172, 24, 4, 3])
        };
        assert_eq!(a.admit(&req, t), Some(false));
    }

    #[test]
    fn the_oldest_question_makes_room() {
        let mut a = ArpAsked::default();
        let t = Instant::now();
        for i in 0..MAX as u32 + 1 {
            a.asking(
                Ipv4Addr::from(0x0a00_0000 + i),
                t + Duration::from_millis(i as u64),
            );
        }
        assert_eq!(a.asked.len(), MAX);
        assert!(!a.asked.contains_key(&Ipv4Addr::from(0x0a00_0000)));
    }
}
