//! The ZeroMQ notification transport, in the way of Dragonflow's `zmq_pubsub_driver`: the
//! records stay in a store (etcd, Redis or a Redis Cluster), and changes reach the
//! agents through one or more `geneflow-publisher` services instead of the store's own watch
//! or pub/sub. Chosen per deployment by the NB URL:
//!
//! ```text
//! etcd://10.0.0.1:2379?publishers=10.0.0.5:6620,10.0.0.6:6620
//! ```
//!
//! Each publisher listens on its port (PUB, for agents) and the next one (PULL, for writers).
//! A writer commits to the store, then PUSHes the change, records included, to every
//! publisher. An agent SUBscribes to its topics on every publisher; copies of a change from
//! several publishers are harmless (records carry versions).
//!
//! Messages can be lost without anyone being told (a publisher restart, a slow subscriber
//! over its queue, a reconnection), so every loss `seq` detects (a new epoch, a gap in a
//! topic's numbering, a `Sync` ahead of what arrived) makes the agent read the topics
//! concerned again from the store (`NbError::Missed`), unless another publisher covers it
//! (see `seq`): restarting one of several publishers costs the agents nothing. A topic is read only after each live
//! publisher has answered its subscription with the topic's current number, so no change can
//! fall between the read and the subscription.

mod seq;
pub mod wire;

use super::{Backend, Event, NbError, TransportStats};
use crate::kv::{self, topic_of, Kv};
use seq::{Loss, Tracker};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tracing::warn;
use wire::{Header, Kind, WireError, HEARTBEAT_TOPIC, MAX_MESSAGE_BYTES};

/// How often a publisher sends a heartbeat (and re-announces recently changed topics).
pub const HEARTBEAT: Duration = Duration::from_millis(500);
/// A publisher unheard for this long is down (four heartbeats).
const DEAD_AFTER: Duration = Duration::from_secs(2);
/// How long a read waits for the live publishers to answer a new subscription.
const WELCOME_WAIT: Duration = Duration::from_secs(2);
/// How long after connecting a publisher not heard yet is still waited for.
const FIRST_CONTACT: Duration = Duration::from_secs(2);
/// How long a writer's process waits at exit for its notifications to leave.
const WRITER_LINGER_MS: i32 = 2000;

pub struct ZmqNotified {
    store: Box<dyn Backend>,
    kind: &'static str,
    /// `host:port` of each publisher (PUB on the port, PULL on the next).
    publishers: Vec<(String, u16)>,
    ctx: Arc<::zmq::Context>,
    subs: Vec<::zmq::Socket>,
    subs_since: Option<Instant>,
    pushes: Vec<::zmq::Socket>,
    subscribed: BTreeSet<String>,
    tracker: Tracker,
    /// Changes received and not yet handed to the agent, per topic.
    queue: Vec<(String, Vec<Event>)>,
    /// Topics whose notifications were lost since they were last read, and the first reason.
    lost: BTreeSet<String>,
    lost_why: Option<String>,
    /// No publisher numbered every topic at the last read: the first that does triggers a
    /// full read.
    uncovered: bool,
    stats: TransportStats,
}

/// One ZeroMQ context (and I/O thread) for every connection of the process, as ZeroMQ
/// advises: a simulation of a thousand agents in one process would otherwise run two thousand
/// threads. It ends with its last user, which waits (linger) for a writer's last messages.
fn shared_context() -> Arc<::zmq::Context> {
    static SHARED: Mutex<Weak<::zmq::Context>> = Mutex::new(Weak::new());
    let mut w = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = w.upgrade() {
        return c;
    }
    let c = Arc::new(::zmq::Context::new());
    *w = Arc::downgrade(&c);
    c
}

fn zerr(e: ::zmq::Error) -> NbError {
    NbError::Unreachable(format!("ZeroMQ: {e}"))
}

/// `host:port[,host:port...]`, each port below 65535 (the next one is the writers').
fn parse_publishers(list: &str, url: &str) -> Result<Vec<(String, u16)>, NbError> {
    let bad = |why: String| NbError::BadUrl(format!("{url}: {why}"));
    let mut out = Vec::new();
    for p in list.split(',') {
        let (host, port) = p
            .rsplit_once(':')
            .ok_or_else(|| bad(format!("publisher {p:?} is not host:port")))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|&p: &u16| p > 0 && p < u16::MAX)
            .ok_or_else(|| bad(format!("publisher {p:?}: port must be 1-65534")))?;
        if host.is_empty() {
            return Err(bad(format!("publisher {p:?} has no host")));
        }
        out.push((host.to_string(), port));
    }
    Ok(out)
}

impl ZmqNotified {
    /// `store` notified through the publishers of `list`; `url` names the whole in errors.
    pub fn open(store: Box<dyn Backend>, list: &str, url: &str) -> Result<ZmqNotified, NbError> {
        let publishers = parse_publishers(list, url)?;
        let kind = match store.kind() {
            "etcd" => "etcd+zmq",
            "redis" => "redis+zmq",
            "redis+cluster" => "redis+cluster+zmq",
            // One host's file has its own watch; publishers serve a networked store.
            other => {
                return Err(NbError::BadUrl(format!(
                "{url}: ZeroMQ publishers serve etcd, redis and redis+cluster stores, not {other}"
            )))
            }
        };
        Ok(ZmqNotified {
            store,
            kind,
            tracker: Tracker::new(publishers.len(), DEAD_AFTER),
            stats: TransportStats {
                publishers: publishers.len(),
                ..Default::default()
            },
            publishers,
            ctx: shared_context(),
            subs: Vec::new(),
            subs_since: None,
            pushes: Vec::new(),
            subscribed: BTreeSet::new(),
            queue: Vec::new(),
            lost: BTreeSet::new(),
            lost_why: None,
            uncovered: false,
        })
    }

    fn ensure_subs(&mut self) -> Result<(), NbError> {
        if !self.subs.is_empty() {
            return Ok(());
        }
        for (host, port) in &self.publishers {
            let s = self.ctx.socket(::zmq::SUB).map_err(zerr)?;
            s.set_maxmsgsize(MAX_MESSAGE_BYTES as i64).map_err(zerr)?;
            s.set_rcvhwm(100_000).map_err(zerr)?;
            s.set_linger(0).map_err(zerr)?;
            s.set_reconnect_ivl(100).map_err(zerr)?;
            s.set_reconnect_ivl_max(1000).map_err(zerr)?;
            s.set_subscribe(HEARTBEAT_TOPIC.as_bytes()).map_err(zerr)?;
            s.connect(&format!("tcp://{host}:{port}")).map_err(zerr)?;
            self.subs.push(s);
        }
        self.subs_since = Some(Instant::now());
        Ok(())
    }

    fn ensure_pushes(&mut self) -> Result<(), NbError> {
        if !self.pushes.is_empty() {
            return Ok(());
        }
        for (host, port) in &self.publishers {
            let s = self.ctx.socket(::zmq::PUSH).map_err(zerr)?;
            s.set_linger(WRITER_LINGER_MS).map_err(zerr)?;
            s.set_sndhwm(10_000).map_err(zerr)?;
            s.connect(&format!("tcp://{host}:{}", port + 1))
                .map_err(zerr)?;
            self.pushes.push(s);
        }
        Ok(())
    }

    /// Takes in what the publishers sent, waiting up to `timeout` for the first message.
    fn pump(&mut self, timeout: Duration) -> Result<(), NbError> {
        let ready: Vec<bool> = {
            let mut items: Vec<::zmq::PollItem> = self
                .subs
                .iter()
                .map(|s| s.as_poll_item(::zmq::POLLIN))
                .collect();
            match ::zmq::poll(&mut items, timeout.as_millis() as i64) {
                Ok(_) | Err(::zmq::Error::EINTR) => {}
                Err(e) => return Err(zerr(e)),
            }
            items.iter().map(|i| i.is_readable()).collect()
        };
        for (p, ready) in ready.into_iter().enumerate() {
            // Bounded, so that a flood on one socket cannot hold the others off for ever.
            for _ in 0..(if ready { 10_000 } else { 0 }) {
                match self.subs[p].recv_multipart(::zmq::DONTWAIT) {
                    Ok(frames) => self.on_frames(p, &frames),
                    Err(::zmq::Error::EAGAIN) | Err(::zmq::Error::EINTR) => break,
                    Err(e) => return Err(zerr(e)),
                }
            }
        }
        Ok(())
    }

    fn on_frames(&mut self, p: usize, frames: &[Vec<u8>]) {
        let topic = frames.first().map(|f| f.as_slice()).unwrap_or_default();
        if let Err(e) = self.on_message(p, frames) {
            self.stats.refused += 1;
            let n = self.stats.refused;
            if wire::worth_logging(n) {
                warn!(
                    publisher = %self.endpoint(p),
                    topic = %String::from_utf8_lossy(topic).escape_debug(),
                    refused = n,
                    "ZeroMQ notification skipped: {e}"
                );
            }
        }
    }

    fn on_message(&mut self, p: usize, frames: &[Vec<u8>]) -> Result<(), WireError> {
        if !(2..=3).contains(&frames.len()) {
            return Err(WireError::Frames(frames.len(), 3));
        }
        let topic = wire::topic(&frames[0])?.to_string();
        let h = Header::decode(&frames[1])?;
        let is_hb = topic == HEARTBEAT_TOPIC;
        if is_hb != (h.kind == Kind::Heartbeat) {
            return Err(WireError::Misplaced(h.kind, topic));
        }
        if !is_hb && !self.subscribed.contains(&topic) {
            return Err(WireError::NotSubscribed(topic));
        }
        let payload = frames.get(2).map(|f| f.as_slice()).unwrap_or_default();
        if h.kind != Kind::Changes && !payload.is_empty() {
            return Err(WireError::Payload {
                kind: h.kind,
                len: payload.len(),
            });
        }
        let changes = match h.kind {
            Kind::Changes => Some(wire::decode_changes(&topic, payload)?),
            _ => None,
        };
        if let Err(loss) = self.tracker.on_message(p, &topic, &h, Instant::now()) {
            self.lose(loss);
        }
        if self.uncovered
            && self
                .subscribed
                .iter()
                .all(|t| self.tracker.has_baseline(p, t))
        {
            self.uncovered = false;
            self.lose_all(format!(
                "publisher {} answered after the last read was made without any",
                self.endpoint(p)
            ));
        }
        if let Some(changes) = changes {
            self.stats.messages += 1;
            self.stats.bytes += payload.len() as u64;
            self.queue.push((topic, changes));
        }
        Ok(())
    }

    fn endpoint(&self, p: usize) -> String {
        let (h, port) = &self.publishers[p];
        format!("{h}:{port}")
    }

    fn lose(&mut self, loss: Loss) {
        self.stats.losses += 1;
        let counted = self.tracker.handle(loss, &self.subscribed, Instant::now());
        if counted.is_empty() {
            self.stats.covered += 1;
        }
        for loss in counted {
            match loss.topic() {
                Some(t) => {
                    self.lost.insert(t.to_string());
                    self.lost_why.get_or_insert_with(|| loss.to_string());
                }
                None => self.lose_all(loss.to_string()),
            }
        }
    }

    fn lose_all(&mut self, why: String) {
        self.lost.extend(self.subscribed.iter().cloned());
        self.lost_why.get_or_insert(why);
    }

    /// Waits until every live publisher (and, just after connecting, every one not heard
    /// yet) has numbered each of `topics`: from then on no change of theirs goes unseen.
    fn await_numbering(&mut self, topics: &[String]) -> Result<(), NbError> {
        let start = Instant::now();
        let first_contact = self
            .subs_since
            .is_none_or(|s| start.duration_since(s) < FIRST_CONTACT);
        let waited: Vec<usize> = (0..self.publishers.len())
            .filter(|&p| self.tracker.alive(p, start) || (first_contact && !self.tracker.heard(p)))
            .collect();
        let numbered = |t: &Tracker, p: usize| topics.iter().all(|x| t.has_baseline(p, x));
        let deadline = start + WELCOME_WAIT;
        loop {
            if waited.iter().all(|&p| numbered(&self.tracker, p)) {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            self.pump((deadline - now).min(Duration::from_millis(50)))?;
        }
        if (0..self.publishers.len()).any(|p| numbered(&self.tracker, p)) {
            return Ok(());
        }
        if !self.uncovered {
            warn!(
                publishers = self.publishers.len(),
                "no ZeroMQ publisher answered: changes made now reach this agent when one does, or at the next reconciliation"
            );
        }
        self.uncovered = true;
        Ok(())
    }
}

impl Backend for ZmqNotified {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn snapshot(&mut self, prefixes: &[String]) -> Result<Kv, NbError> {
        let topics: Vec<String> = prefixes
            .iter()
            .filter(|p| kv::is_topic(p))
            .cloned()
            .collect();
        if topics.is_empty() {
            // A writer's read of the whole NB: nothing to follow.
            return self.store.snapshot(prefixes);
        }
        self.ensure_subs()?;
        for t in &topics {
            if self.subscribed.insert(t.clone()) {
                for s in &self.subs {
                    s.set_subscribe(t.as_bytes()).map_err(zerr)?;
                }
            }
        }
        self.await_numbering(&topics)?;
        // What arrived so far is in the store already (writers commit, then notify).
        self.pump(Duration::ZERO)?;
        self.queue.retain(|(t, _)| !topics.contains(t));
        for t in &topics {
            self.lost.remove(t);
        }
        if self.lost.is_empty() {
            self.lost_why = None;
        }
        self.store.snapshot(prefixes)
    }

    fn subscribe(&mut self, prefixes: &[String]) -> Result<(), NbError> {
        self.ensure_subs()?;
        let want: BTreeSet<String> = prefixes
            .iter()
            .filter(|p| kv::is_topic(p))
            .cloned()
            .collect();
        for t in self.subscribed.difference(&want) {
            for s in &self.subs {
                s.set_unsubscribe(t.as_bytes()).map_err(zerr)?;
            }
            self.tracker.forget(t);
            self.lost.remove(t);
        }
        for t in want.difference(&self.subscribed) {
            for s in &self.subs {
                s.set_subscribe(t.as_bytes()).map_err(zerr)?;
            }
        }
        self.queue.retain(|(t, _)| want.contains(t));
        self.subscribed = want;
        Ok(())
    }

    fn poll(&mut self, timeout: Duration) -> Result<Vec<Event>, NbError> {
        if self.subs.is_empty() {
            std::thread::sleep(timeout);
            return Ok(Vec::new());
        }
        if self.lost.is_empty() {
            self.pump(if self.queue.is_empty() {
                timeout
            } else {
                Duration::ZERO
            })?;
        }
        self.tracker.expire(Instant::now());
        if !self.lost.is_empty() {
            let why = self.lost_why.clone().unwrap_or_default();
            return Err(NbError::Missed(format!(
                "{why} (topics {:?})",
                self.lost.iter().collect::<Vec<_>>()
            )));
        }
        Ok(self.queue.drain(..).flat_map(|(_, c)| c).collect())
    }

    fn commit(
        &mut self,
        puts: Vec<(String, Vec<u8>)>,
        deletes: Vec<String>,
    ) -> Result<(), NbError> {
        let mut changes: BTreeMap<String, Vec<Event>> = BTreeMap::new();
        for (k, v) in &puts {
            if let Some(t) = topic_of(k) {
                changes
                    .entry(t)
                    .or_default()
                    .push(Event::Put(k.clone(), v.clone()));
            }
        }
        for k in &deletes {
            if let Some(t) = topic_of(k) {
                changes.entry(t).or_default().push(Event::Delete(k.clone()));
            }
        }
        self.store.commit(puts, deletes)?;
        // The store has the change: a publisher that does not take it costs the agents a
        // read (they find the gap), never the change.
        if let Err(e) = self.ensure_pushes() {
            warn!("ZeroMQ publishers not notified: {e}");
            return Ok(());
        }
        for (topic, ch) in &changes {
            for payload in wire::encode_split(ch) {
                for (p, s) in self.pushes.iter().enumerate() {
                    let frames = [topic.as_bytes(), payload.as_slice()];
                    if let Err(e) = s.send_multipart(frames, ::zmq::DONTWAIT) {
                        let (h, port) = &self.publishers[p];
                        warn!(publisher = %format!("{h}:{port}"), %topic, "ZeroMQ publisher not notified: {e}");
                    }
                }
            }
        }
        Ok(())
    }

    fn revision(&mut self, prefixes: &[String]) -> Result<Option<u64>, NbError> {
        self.store.revision(prefixes)
    }

    fn transport(&self) -> Option<TransportStats> {
        let mut s = self.stats.clone();
        s.publishers_alive = self.tracker.alive_count(Instant::now());
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publisher_lists_are_checked() {
        let u = "etcd://x?publishers=";
        assert_eq!(
            parse_publishers("10.0.0.5:6620,pub2:7000", u).unwrap(),
            vec![("10.0.0.5".to_string(), 6620), ("pub2".to_string(), 7000)]
        );
        for bad in ["10.0.0.5", ":6620", "h:0", "h:65535", "h:x", "h:6620,"] {
            let e = parse_publishers(bad, u).unwrap_err().to_string();
            assert!(e.contains("publisher"), "{bad}: {e}");
        }
    }
}
