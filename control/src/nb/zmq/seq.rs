//! Loss detection for the ZeroMQ transport, sans-IO. ZeroMQ PUB/SUB drops messages without
//! telling anyone (a subscriber over its high-water mark, a reconnection, a publisher
//! restart), so an agent checks the numbering of what it receives, per publisher and topic:
//!
//! - a new epoch from a publisher: it restarted and may have lost changes sent to it;
//! - a change whose number is not the next one: a gap;
//! - a `Sync` announcing another number than the last one seen: the tail of a topic was lost
//!   (or, after a reconnection, everything published meanwhile).
//!
//! A loss makes the agent read the topics concerned again from the store, unless another
//! publisher covers it: one that is alive, has numbered every topic and lost nothing lately
//! (writers send every change to every publisher, so it delivered what this one lost). A
//! covered loss stays pending for a while: if any other publisher loses something meanwhile
//! (a blip of the agent's own network loses the same messages on every connection), the
//! pending losses count after all. So a publisher restarted while another runs costs the
//! agents nothing, and a loss no publisher covers still makes them read.

use super::wire::{Header, Kind};
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loss {
    /// Every topic: the publisher restarted.
    Restarted {
        publisher: usize,
        old: u64,
        new: u64,
    },
    /// One topic.
    Gap {
        publisher: usize,
        topic: String,
        expected: u64,
        got: u64,
    },
    Tail {
        publisher: usize,
        topic: String,
        held: u64,
        announced: u64,
    },
}

impl Loss {
    /// The topic concerned, `None` for every topic.
    pub fn topic(&self) -> Option<&str> {
        match self {
            Loss::Restarted { .. } => None,
            Loss::Gap { topic, .. } | Loss::Tail { topic, .. } => Some(topic),
        }
    }
}

impl fmt::Display for Loss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Loss::Restarted {
                publisher,
                old,
                new,
            } => write!(
                f,
                "publisher {publisher} restarted (epoch {old:#x} -> {new:#x})"
            ),
            Loss::Gap {
                publisher,
                topic,
                expected,
                got,
            } => write!(
                f,
                "publisher {publisher}, topic {topic}: message {got} after {}, {} lost",
                expected - 1,
                got.saturating_sub(*expected).max(1)
            ),
            Loss::Tail {
                publisher,
                topic,
                held,
                announced,
            } => write!(
                f,
                "publisher {publisher}, topic {topic}: at message {announced}, last received {held}"
            ),
        }
    }
}

#[derive(Debug, Default)]
struct Publisher {
    epoch: Option<u64>,
    heard: Option<Instant>,
    /// The last number received per topic (from a change or a `Sync`).
    seqs: HashMap<String, u64>,
}

#[derive(Debug)]
pub struct Tracker {
    pubs: Vec<Publisher>,
    dead_after: Duration,
    /// Per publisher: lost something, and cannot cover others, until then.
    tainted_until: Vec<Option<Instant>>,
    /// Covered losses, dropped at their deadline unless another loss makes them count.
    pending: Vec<(Instant, Loss)>,
}

impl Tracker {
    /// `n` publishers; one unheard for `dead_after` counts as down.
    pub fn new(n: usize, dead_after: Duration) -> Tracker {
        Tracker {
            pubs: (0..n).map(|_| Publisher::default()).collect(),
            dead_after,
            tainted_until: vec![None; n],
            pending: Vec::new(),
        }
    }

    /// What to make of `loss`: nothing yet (another publisher covers it; it stays pending
    /// for `dead_after`), or the losses that count, this one and any pending ones.
    pub fn handle(&mut self, loss: Loss, subscribed: &BTreeSet<String>, now: Instant) -> Vec<Loss> {
        let p = match &loss {
            Loss::Restarted { publisher, .. }
            | Loss::Gap { publisher, .. }
            | Loss::Tail { publisher, .. } => *publisher,
        };
        self.tainted_until[p] = Some(now + self.dead_after);
        let covered = (0..self.pubs.len()).any(|q| {
            q != p
                && self.alive(q, now)
                && self.tainted_until[q].is_none_or(|t| t <= now)
                && subscribed.iter().all(|t| self.has_baseline(q, t))
        });
        if covered {
            self.pending.push((now + self.dead_after, loss));
            return Vec::new();
        }
        let mut out: Vec<Loss> = self.pending.drain(..).map(|(_, l)| l).collect();
        out.push(loss);
        out
    }

    /// Drops the covered losses whose time passed with no other loss.
    pub fn expire(&mut self, now: Instant) {
        self.pending.retain(|(until, _)| *until > now);
    }

    /// Covered losses still pending.
    #[cfg(test)]
    fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Checks a message of `topic` from publisher `p` against what came before.
    pub fn on_message(
        &mut self,
        p: usize,
        topic: &str,
        h: &Header,
        now: Instant,
    ) -> Result<(), Loss> {
        let st = &mut self.pubs[p];
        st.heard = Some(now);
        let restarted = match st.epoch {
            Some(old) if old != h.epoch => Some(old),
            _ => None,
        };
        st.epoch = Some(h.epoch);
        if let Some(old) = restarted {
            st.seqs.clear();
            if h.kind != Kind::Heartbeat {
                st.seqs.insert(topic.to_string(), h.seq);
            }
            return Err(Loss::Restarted {
                publisher: p,
                old,
                new: h.epoch,
            });
        }
        let held = match h.kind {
            Kind::Heartbeat => return Ok(()),
            _ => st.seqs.insert(topic.to_string(), h.seq),
        };
        match (h.kind, held) {
            // The first message of a topic since it was subscribed sets the count (the
            // publisher answers a subscription with a `Sync` before anything else).
            (_, None) => Ok(()),
            (Kind::Changes, Some(s)) if h.seq == s.wrapping_add(1) => Ok(()),
            (Kind::Changes, Some(s)) => Err(Loss::Gap {
                publisher: p,
                topic: topic.to_string(),
                expected: s.wrapping_add(1),
                got: h.seq,
            }),
            (_, Some(s)) if h.seq == s => Ok(()),
            (_, Some(s)) => Err(Loss::Tail {
                publisher: p,
                topic: topic.to_string(),
                held: s,
                announced: h.seq,
            }),
        }
    }

    /// Whether publisher `p` has numbered `topic` for us (answered its subscription).
    pub fn has_baseline(&self, p: usize, topic: &str) -> bool {
        self.pubs[p].seqs.contains_key(topic)
    }

    pub fn heard(&self, p: usize) -> bool {
        self.pubs[p].heard.is_some()
    }

    /// Heard from within `dead_after`.
    pub fn alive(&self, p: usize, now: Instant) -> bool {
        self.pubs[p]
            .heard
            .is_some_and(|t| now.saturating_duration_since(t) < self.dead_after)
    }

    pub fn alive_count(&self, now: Instant) -> usize {
        (0..self.pubs.len()).filter(|&p| self.alive(p, now)).count()
    }

    /// Stops numbering `topic` (unsubscribed).
    pub fn forget(&mut self, topic: &str) {
        for p in &mut self.pubs {
            p.seqs.remove(topic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "/gf/t/red/";

    fn h(kind: Kind, epoch: u64, seq: u64) -> Header {
        Header { kind, epoch, seq }
    }

    #[test]
    fn consecutive_changes_after_the_welcome_are_no_loss() {
        let now = Instant::now();
        let mut t = Tracker::new(1, Duration::from_secs(2));
        assert!(!t.has_baseline(0, T));
        t.on_message(0, T, &h(Kind::Sync, 5, 7), now).unwrap();
        assert!(t.has_baseline(0, T));
        for s in 8..20 {
            t.on_message(0, T, &h(Kind::Changes, 5, s), now).unwrap();
        }
        t.on_message(0, T, &h(Kind::Sync, 5, 19), now).unwrap();
        t.on_message(0, "gf-hb", &h(Kind::Heartbeat, 5, 0), now)
            .unwrap();
    }

    #[test]
    fn a_gap_is_reported_once_and_numbering_goes_on() {
        let now = Instant::now();
        let mut t = Tracker::new(1, Duration::from_secs(2));
        t.on_message(0, T, &h(Kind::Sync, 5, 0), now).unwrap();
        t.on_message(0, T, &h(Kind::Changes, 5, 1), now).unwrap();
        let e = t
            .on_message(0, T, &h(Kind::Changes, 5, 4), now)
            .unwrap_err();
        assert_eq!(
            e,
            Loss::Gap {
                publisher: 0,
                topic: T.into(),
                expected: 2,
                got: 4
            }
        );
        assert_eq!(e.topic(), Some(T));
        assert!(e.to_string().contains("message 4 after 1, 2 lost"), "{e}");
        t.on_message(0, T, &h(Kind::Changes, 5, 5), now).unwrap();
        // A replayed (older) number is a loss too: within an epoch numbers only grow.
        assert!(t.on_message(0, T, &h(Kind::Changes, 5, 3), now).is_err());
    }

    #[test]
    fn a_lost_tail_is_found_by_the_next_sync() {
        let now = Instant::now();
        let mut t = Tracker::new(1, Duration::from_secs(2));
        t.on_message(0, T, &h(Kind::Sync, 5, 3), now).unwrap();
        let e = t.on_message(0, T, &h(Kind::Sync, 5, 4), now).unwrap_err();
        assert!(matches!(
            e,
            Loss::Tail {
                held: 3,
                announced: 4,
                ..
            }
        ));
    }

    #[test]
    fn a_new_epoch_loses_every_topic_and_restarts_the_numbering() {
        let now = Instant::now();
        let mut t = Tracker::new(2, Duration::from_secs(2));
        t.on_message(1, T, &h(Kind::Sync, 5, 9), now).unwrap();
        t.on_message(1, "/gf/global/", &h(Kind::Sync, 5, 2), now)
            .unwrap();
        let e = t
            .on_message(1, "gf-hb", &h(Kind::Heartbeat, 6, 0), now)
            .unwrap_err();
        assert_eq!(e.topic(), None);
        assert!(!t.has_baseline(1, T));
        t.on_message(1, T, &h(Kind::Sync, 6, 0), now).unwrap();
        t.on_message(1, T, &h(Kind::Changes, 6, 1), now).unwrap();
        // Publisher 0 is untouched.
        assert!(!t.heard(0));
    }

    fn topics() -> BTreeSet<String> {
        [T.to_string()].into()
    }

    /// Two publishers numbering T, heard now.
    fn two(now: Instant) -> Tracker {
        let mut t = Tracker::new(2, Duration::from_secs(2));
        for p in 0..2 {
            t.on_message(p, T, &h(Kind::Sync, 5 + p as u64, 0), now)
                .unwrap();
        }
        t
    }

    #[test]
    fn a_loss_another_publisher_covers_counts_for_nothing() {
        let now = Instant::now();
        let mut t = two(now);
        let e = t
            .on_message(0, "gf-hb", &h(Kind::Heartbeat, 9, 0), now)
            .unwrap_err();
        assert!(t.handle(e, &topics(), now).is_empty());
        assert_eq!(t.pending(), 1);
        t.expire(now + Duration::from_secs(3));
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn a_loss_on_every_publisher_counts_all_of_them() {
        let now = Instant::now();
        let mut t = two(now);
        // A blip of the agent's network: both connections lose message 1 of T.
        let e0 = t.on_message(0, T, &h(Kind::Sync, 5, 1), now).unwrap_err();
        assert!(t.handle(e0, &topics(), now).is_empty());
        let e1 = t.on_message(1, T, &h(Kind::Sync, 6, 1), now).unwrap_err();
        let lost = t.handle(e1, &topics(), now + Duration::from_millis(10));
        assert_eq!(lost.len(), 2, "{lost:?}");
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn no_cover_from_a_dead_or_unnumbered_publisher() {
        let now = Instant::now();
        let mut t = two(now);
        let later = now + Duration::from_secs(5);
        t.on_message(0, "gf-hb", &h(Kind::Heartbeat, 5, 0), later)
            .unwrap();
        let e = t.on_message(0, T, &h(Kind::Sync, 5, 3), later).unwrap_err();
        // Publisher 1 was last heard 5 s ago: down.
        assert_eq!(t.handle(e, &topics(), later).len(), 1);
        let mut t = two(now);
        let more: BTreeSet<String> = [T.to_string(), "/gf/global/".to_string()].into();
        let e = t.on_message(0, T, &h(Kind::Sync, 5, 3), now).unwrap_err();
        // Publisher 1 has not numbered /gf/global/.
        assert_eq!(t.handle(e, &more, now).len(), 1);
    }

    #[test]
    fn liveness_follows_what_was_heard() {
        let t0 = Instant::now();
        let mut t = Tracker::new(2, Duration::from_millis(100));
        assert_eq!(t.alive_count(t0), 0);
        t.on_message(0, "gf-hb", &h(Kind::Heartbeat, 1, 0), t0)
            .unwrap();
        assert!(t.alive(0, t0));
        assert!(!t.alive(0, t0 + Duration::from_millis(150)));
        t.forget(T);
    }
}
