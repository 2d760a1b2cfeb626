//! Rate limits for what the slow path generates (ICMP and ARP answers per source address,
//! drop megaflows per port): a token bucket per key in a fixed table (no allocation per packet; a colliding source takes the
//! slot over with a fresh bucket), under a global bucket that bounds the total whatever the
//! number of sources. Like Linux's icmp_ratelimit, but per source first.

use crate::pipeline::{Answer, AnswerKind};
use geneflow_abi::ctr;
use std::net::Ipv4Addr;
use std::time::Instant;

const SLOTS: usize = 1024;

#[derive(Clone, Copy)]
struct Bucket {
    key: u32,
    tokens: f32,
    last: Option<Instant>,
}

impl Bucket {
    fn take(&mut self, now: Instant, rate: f32, burst: f32) -> bool {
        let dt = self
            .last
            .map(|l| now.saturating_duration_since(l).as_secs_f32())
            .unwrap_or(f32::MAX);
        self.tokens = (self.tokens + dt * rate).min(burst);
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub struct RateLimiter {
    per_source: Box<[Bucket]>,
    global: Bucket,
    rate: f32,
    burst: f32,
    global_rate: f32,
    global_burst: f32,
}

impl RateLimiter {
    /// `rate`/s per source with bursts of `burst`, and at most `global_rate`/s in all.
    pub fn new(rate: f32, burst: f32, global_rate: f32) -> RateLimiter {
        let empty = Bucket {
            key: 0,
            tokens: 0.0,
            last: None,
        };
        RateLimiter {
            per_source: vec![empty; SLOTS].into_boxed_slice(),
            global: empty,
            rate,
            burst,
            global_rate,
            global_burst: global_rate / 4.0,
        }
    }

    /// Whether one more answer to `source` may be sent now.
    pub fn allow(&mut self, source: Ipv4Addr, now: Instant) -> bool {
        self.allow_key(u32::from(source), now)
    }

    /// `allow` for any 32-bit key (e.g. an interface index).
    pub fn allow_key(&mut self, key: u32, now: Instant) -> bool {
        let slot = (key.wrapping_mul(0x9e37_79b1) >> 22) as usize % SLOTS;
        let b = &mut self.per_source[slot];
        if b.key != key || b.last.is_none() {
            *b = Bucket {
                key,
                tokens: self.burst,
                last: Some(now),
            };
        }
        b.take(now, self.rate, self.burst)
            && self.global.take(now, self.global_rate, self.global_burst)
    }
}

/// The budget of the answers a slow path generates (ARP, ICMP per asking address; DHCP per
/// port, a client having no address yet) and the counters they move, for both datapaths.
pub struct AnswerLimits {
    answers: RateLimiter,
    dhcp: RateLimiter,
}

impl AnswerLimits {
    /// `dhcp_rate`: DHCP answers per second per port; `share`: the part of every budget
    /// this slow path has (1: the chassis's only one; 1/n: one of n poll threads).
    pub fn new(dhcp_rate: f32, share: f32) -> AnswerLimits {
        let dhcp_all = (dhcp_rate * 250.0).max(5000.0);
        AnswerLimits {
            // Per source: 100 answers/s, bursts of 50 (a traceroute or a ping -f stays
            // whole); 5000/s in all.
            answers: RateLimiter::new(100.0 * share, (50.0 * share).max(1.0), 5000.0 * share),
            // Per port: 20 DHCP answers/s by default, bursts as large (a client needs 2 per
            // lease, a few more when it retries); 5000/s in all, bursts of 1250 (a host's
            // boot storm), or 250 times the per-port rate when that is more.
            dhcp: RateLimiter::new(
                dhcp_rate * share,
                (dhcp_rate * share).max(1.0),
                dhcp_all * share,
            ),
        }
    }

    /// Whether answer `a` to a frame that came in on `in_ifindex` may go out now, and the
    /// counters that moves: `Err` with those of a refused answer (`DROP_RATE_LIMIT` last),
    /// `Ok` with those of a sent one. The frame that needed an ARP request is dropped
    /// (`DROP_NO_NEIGH`) either way; a time-exceeded answer counts `TTL_EXPIRED` either way.
    pub fn admit(&mut self, a: &Answer, in_ifindex: u32, now: Instant) -> Result<Counted, Counted> {
        let mut c = Counted::default();
        match a.kind {
            AnswerKind::IcmpTimeExceeded => c.push(ctr::TTL_EXPIRED),
            AnswerKind::ArpRequest => c.push(ctr::DROP_NO_NEIGH),
            _ => {}
        }
        let allowed = if a.kind == AnswerKind::Dhcp {
            self.dhcp.allow_key(in_ifindex, now)
        } else {
            self.answers.allow(a.source, now)
        };
        if !allowed {
            c.push(ctr::DROP_RATE_LIMIT);
            return Err(c);
        }
        match a.kind {
            AnswerKind::ArpReply => c.push(ctr::ARP_REPLY),
            AnswerKind::Dhcp => c.push(ctr::DHCP_REPLY),
            AnswerKind::ArpRequest => {}
            _ => c.push(ctr::ICMP_SENT),
        }
        Ok(c)
    }
}

/// Up to two counters (`ctr::*`) to bump once each.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    n: usize,
    c: [u32; 2],
}

impl Counted {
    fn push(&mut self, c: u32) {
        if let Some(x) = self.c.get_mut(self.n) {
            *x = c;
            self.n += 1;
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.c[..self.n].iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bursts_then_rate_per_source_and_a_global_cap() {
        let mut l = RateLimiter::new(10.0, 5.0, 1000.0);
        let t0 = Instant::now();
        let a = Ipv4Addr::new(10, 0, 0, 1);
        let b = Ipv4Addr::new(10, 0, 0, 2);
        assert_eq!((0..20).filter(|_| l.allow(a, t0)).count(), 5);
        // Another source has its own budget.
        assert!(l.allow(b, t0));
        // 10/s: one more token every 100 ms.
        assert!(l.allow(a, t0 + Duration::from_millis(110)));
        assert!(!l.allow(a, t0 + Duration::from_millis(120)));
        // The global bucket bounds many sources.
        let mut g = RateLimiter::new(100.0, 100.0, 40.0);
        let n = (0..1000u32)
            .filter(|i| g.allow(Ipv4Addr::from(0x0a00_0000 + i), t0))
            .count();
        assert_eq!(n, 10);
    }
}
