//! The ZeroMQ publisher service (`geneflow-publisher`), Dragonflow's `df-publisher-service`:
//! writers PUSH each change to it (`[topic, changes]`, port + 1), it numbers the messages of
//! each topic and PUBlishes them (`[topic, header, changes]`, port) to the agents that
//! subscribed to the topic. ZeroMQ filters on the publisher's side, so an agent receives
//! only its tenants' topics.
//!
//! So that agents find what they lost (see `nb::zmq`), it also sends:
//! - a `Sync` with a topic's latest number to whoever subscribes to it (an XPUB socket
//!   hands it every subscription), before anything else of that topic;
//! - a `Sync` of each topic changed in the last `RECENT`, every heartbeat, so that a lost
//!   last message is found within a heartbeat or so;
//! - a heartbeat carrying its epoch, drawn at start: a restart changes it.
//!
//! What a writer sends is checked before it goes out: a topic of the NB, changes that decode
//! and belong to it, no record over the size limit. Anything else is dropped and counted.

use crate::nb::zmq::wire::{self, Header, Kind, HEARTBEAT_TOPIC, MAX_MESSAGE_BYTES};
use serde::Serialize;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use thiserror::Error;
use tracing::{info, warn};

/// Topics changed within this long are re-announced every heartbeat.
const RECENT: Duration = Duration::from_secs(5);
/// How often the counters are logged (when they moved).
const REPORT: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum PublisherError {
    #[error("cannot listen on {endpoint}: {source}")]
    Bind {
        endpoint: String,
        source: ::zmq::Error,
    },
    #[error("ZeroMQ: {0}")]
    Zmq(#[from] ::zmq::Error),
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The address to listen on.
    pub listen: String,
    /// Agents subscribe here; writers push to the next port.
    pub port: u16,
    pub heartbeat: Duration,
    /// Topics numbered at most (a writer inventing names cannot grow the table for ever).
    pub max_topics: usize,
}

/// What the publisher did, logged every minute and at exit.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counters {
    pub received: u64,
    pub published: u64,
    pub syncs: u64,
    pub heartbeats: u64,
    pub subscriptions: u64,
    pub dropped_malformed: u64,
    pub dropped_too_many_topics: u64,
}

struct Topic {
    seq: u64,
    changed: Instant,
}

pub struct Publisher {
    out: ::zmq::Socket,
    intake: ::zmq::Socket,
    epoch: u64,
    topics: HashMap<String, Topic>,
    cfg: Config,
    pub counters: Counters,
    // Keeps the sockets' context alive.
    _ctx: ::zmq::Context,
}

/// A number no earlier run of this publisher drew (the standard library's hasher seeds are
/// random per process), mixed with the clock.
fn draw_epoch() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.write_u32(std::process::id());
    h.finish()
}

impl Publisher {
    pub fn bind(cfg: Config) -> Result<Publisher, PublisherError> {
        let ctx = ::zmq::Context::new();
        let out = ctx.socket(::zmq::XPUB)?;
        // Every subscription, even to a topic someone else already has: each subscriber
        // needs its own `Sync`.
        out.set_xpub_verbose(true)?;
        out.set_sndhwm(100_000)?;
        out.set_linger(0)?;
        let intake = ctx.socket(::zmq::PULL)?;
        intake.set_maxmsgsize(MAX_MESSAGE_BYTES as i64)?;
        intake.set_rcvhwm(100_000)?;
        intake.set_linger(0)?;
        let host = if cfg.listen.contains(':') {
            format!("[{}]", cfg.listen)
        } else {
            cfg.listen.clone()
        };
        if cfg.listen.contains(':') {
            out.set_ipv6(true)?;
            intake.set_ipv6(true)?;
        }
        for (s, port) in [(&out, cfg.port), (&intake, cfg.port.wrapping_add(1))] {
            let endpoint = format!("tcp://{host}:{port}");
            s.bind(&endpoint)
                .map_err(|source| PublisherError::Bind { endpoint, source })?;
        }
        Ok(Publisher {
            out,
            intake,
            epoch: draw_epoch(),
            topics: HashMap::new(),
            cfg,
            counters: Counters::default(),
            _ctx: ctx,
        })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Serves until `stop` is set.
    pub fn run(&mut self, stop: &AtomicBool) -> Result<(), PublisherError> {
        info!(
            listen = %self.cfg.listen,
            port = self.cfg.port,
            intake = self.cfg.port.wrapping_add(1),
            epoch = format!("{:#018x}", self.epoch),
            "publisher up"
        );
        let mut next_beat = Instant::now();
        let mut next_report = Instant::now() + REPORT;
        let mut reported = String::new();
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= next_beat {
                self.beat(now)?;
                next_beat = now + self.cfg.heartbeat;
            }
            if now >= next_report {
                next_report = now + REPORT;
                let c = serde_json::to_string(&self.counters).unwrap_or_default();
                if c != reported {
                    info!(counters = %c, topics = self.topics.len(), "publisher");
                    reported = c;
                }
            }
            // Wakes for the next heartbeat, and at least every 100 ms to see `stop`.
            let wait = next_beat
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100));
            let (subs, writes) = {
                let mut items = [
                    self.out.as_poll_item(::zmq::POLLIN),
                    self.intake.as_poll_item(::zmq::POLLIN),
                ];
                match ::zmq::poll(&mut items, wait.as_millis() as i64) {
                    Ok(_) | Err(::zmq::Error::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
                (items[0].is_readable(), items[1].is_readable())
            };
            // Subscriptions first: a new subscriber's `Sync` goes out before any change
            // received in the same round. Both bounded, so neither side starves the other.
            if subs {
                for _ in 0..10_000 {
                    match self.out.recv_bytes(::zmq::DONTWAIT) {
                        Ok(sub) => self.on_subscription(&sub)?,
                        Err(::zmq::Error::EAGAIN) | Err(::zmq::Error::EINTR) => break,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            if writes {
                for _ in 0..10_000 {
                    match self.intake.recv_multipart(::zmq::DONTWAIT) {
                        Ok(frames) => self.on_write(&frames)?,
                        Err(::zmq::Error::EAGAIN) | Err(::zmq::Error::EINTR) => break,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        info!(counters = %serde_json::to_string(&self.counters).unwrap_or_default(), "publisher stopped");
        Ok(())
    }

    fn send(&mut self, topic: &[u8], h: Header, payload: &[u8]) -> Result<(), PublisherError> {
        let head = h.encode();
        let r = if h.kind == Kind::Changes {
            self.out
                .send_multipart([topic, &head[..], payload], ::zmq::DONTWAIT)
        } else {
            self.out.send_multipart([topic, &head[..]], ::zmq::DONTWAIT)
        };
        match r {
            // XPUB drops for a subscriber over its high-water mark; so does EAGAIN here.
            // The subscriber finds the gap.
            Ok(()) | Err(::zmq::Error::EAGAIN) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn beat(&mut self, now: Instant) -> Result<(), PublisherError> {
        let hb = Header {
            kind: Kind::Heartbeat,
            epoch: self.epoch,
            seq: 0,
        };
        self.send(HEARTBEAT_TOPIC.as_bytes(), hb, &[])?;
        self.counters.heartbeats += 1;
        let recent: Vec<(String, u64)> = self
            .topics
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(t.changed) < RECENT)
            .map(|(k, t)| (k.clone(), t.seq))
            .collect();
        for (topic, seq) in recent {
            self.sync(&topic, seq)?;
        }
        Ok(())
    }

    fn sync(&mut self, topic: &str, seq: u64) -> Result<(), PublisherError> {
        let h = Header {
            kind: Kind::Sync,
            epoch: self.epoch,
            seq,
        };
        self.counters.syncs += 1;
        self.send(topic.as_bytes(), h, &[])
    }

    /// An XPUB subscription message: 1 then the topic (0 then the topic unsubscribes).
    fn on_subscription(&mut self, msg: &[u8]) -> Result<(), PublisherError> {
        let Some((&1, topic)) = msg.split_first() else {
            return Ok(());
        };
        self.counters.subscriptions += 1;
        let Ok(topic) = wire::topic(topic) else {
            return Ok(());
        };
        if topic == HEARTBEAT_TOPIC {
            return Ok(());
        }
        let seq = self.topics.get(topic).map_or(0, |t| t.seq);
        let topic = topic.to_string();
        self.sync(&topic, seq)
    }

    fn on_write(&mut self, frames: &[Vec<u8>]) -> Result<(), PublisherError> {
        self.counters.received += 1;
        let checked = match frames {
            [topic, payload] => wire::topic(topic).and_then(|t| {
                if t == HEARTBEAT_TOPIC {
                    return Err(wire::WireError::BadTopic(t.to_string()));
                }
                wire::decode_changes(t, payload).map(|_| t)
            }),
            _ => Err(wire::WireError::Frames(frames.len(), 2)),
        };
        let topic = match checked {
            Ok(t) => t.to_string(),
            Err(e) => {
                self.counters.dropped_malformed += 1;
                let n = self.counters.dropped_malformed;
                if wire::worth_logging(n) {
                    let t = frames.first().map(|f| f.as_slice()).unwrap_or_default();
                    warn!(
                        topic = %String::from_utf8_lossy(t).escape_debug(),
                        dropped = n,
                        "write notification dropped: {e}"
                    );
                }
                return Ok(());
            }
        };
        let now = Instant::now();
        if !self.topics.contains_key(&topic) && self.topics.len() >= self.cfg.max_topics {
            self.counters.dropped_too_many_topics += 1;
            let n = self.counters.dropped_too_many_topics;
            if wire::worth_logging(n) {
                warn!(%topic, max_topics = self.cfg.max_topics, dropped = n, "write notification dropped: too many topics");
            }
            return Ok(());
        }
        let t = self.topics.entry(topic.clone()).or_insert(Topic {
            seq: 0,
            changed: now,
        });
        t.seq += 1;
        t.changed = now;
        let h = Header {
            kind: Kind::Changes,
            epoch: self.epoch,
            seq: t.seq,
        };
        self.counters.published += 1;
        self.send(topic.as_bytes(), h, &frames[1])
    }
}
