//! The wire format of the ZeroMQ notification transport (`geneflow-publisher`).
//!
//! A writer PUSHes one intake message per topic it changed to every publisher:
//! `[topic, changes]`. A publisher numbers the messages of each topic and PUBlishes
//! `[topic, header, changes]`; agents SUBscribe to their topics (ZeroMQ filters by prefix of
//! the first frame; every topic ends in `/`, so `/gf/t/a/` never matches `/gf/t/ab/`).
//! Besides changes a publisher sends a `Sync` on a topic (its latest sequence number) when
//! someone subscribes to it and for a few seconds after it changed, and a `Heartbeat` on
//! `HEARTBEAT_TOPIC`. The header's epoch is drawn when a publisher starts.
//!
//! `changes` carries the records themselves (as Dragonflow's publisher did), so agents do
//! not read each change back from the store:
//!
//! ```text
//! u32 count, then per change: u8 op (1 put, 2 delete), u16 key length, key,
//!                             and for a put u32 value length, value      (big endian)
//! ```
//!
//! Hand-written: a length-prefixed list of byte strings, a few lines each way; no crate in
//! the workspace frames raw bytes without a schema, and JSON would escape every record
//! (itself JSON) once more.

use crate::kv::{self, MAX_RECORD_BYTES};
use crate::nb::Event;
use thiserror::Error;

/// The topic of the publishers' heartbeats (outside the records' key space).
pub const HEARTBEAT_TOPIC: &str = "gf-hb";

/// The largest message a socket accepts (`ZMQ_MAXMSGSIZE`; a peer that sends more is
/// disconnected by libzmq). Writers split a larger change into several messages.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Whether the `n`th refusal of a kind is logged: the first 20, then at powers of two, so that
/// a flood of garbage cannot flood the log.
pub fn worth_logging(n: u64) -> bool {
    n <= 20 || n.is_power_of_two()
}

/// Writers start a new message of a topic beyond this many bytes of changes.
pub const SPLIT_BYTES: usize = 4 << 20;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("{0} frames, want {1}")]
    Frames(usize, usize),
    #[error("topic {0:?} is not a topic of the NB")]
    BadTopic(String),
    #[error("header of {0} bytes, want {HEADER_LEN}")]
    HeaderLength(usize),
    #[error(
        "header magic {0:#04x}, want {MAGIC:#04x} (not a geneflow publisher, or another version)"
    )]
    Magic(u8),
    #[error("unknown message kind {0}")]
    Kind(u8),
    #[error("changes cut short at byte {0}")]
    Truncated(usize),
    #[error("change {0}: unknown operation {1}")]
    Op(usize, u8),
    #[error("change {0}: key is not UTF-8")]
    KeyUtf8(usize),
    #[error("key {key:?} is not under the message's topic {topic:?}")]
    ForeignKey { key: String, topic: String },
    #[error("key {key:?}: value of {len} bytes, over the {MAX_RECORD_BYTES}-byte limit")]
    Oversized { key: String, len: usize },
    #[error("{0} bytes after the last change")]
    Trailing(usize),
    #[error("{0} changes announced, more than the message can hold")]
    Count(u32),
    #[error("a {0:?} message on topic {1:?}")]
    Misplaced(Kind, String),
    #[error("topic {0:?} was not subscribed to")]
    NotSubscribed(String),
    #[error("a {kind:?} message carries {len} bytes of changes")]
    Payload { kind: Kind, len: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Changes = 1,
    Sync = 2,
    Heartbeat = 3,
}

const MAGIC: u8 = 0x67;
const HEADER_LEN: usize = 18;
const OP_PUT: u8 = 1;
const OP_DELETE: u8 = 2;

/// What a publisher puts before the changes: `u8 magic, u8 kind, u64 epoch, u64 seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    /// Drawn when the publisher started: a new one means messages may have been lost.
    pub epoch: u64,
    /// Per topic, from 1; a `Sync` carries the topic's latest (0: none yet).
    pub seq: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = MAGIC;
        b[1] = self.kind as u8;
        b[2..10].copy_from_slice(&self.epoch.to_be_bytes());
        b[10..18].copy_from_slice(&self.seq.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Header, WireError> {
        if b.len() != HEADER_LEN {
            return Err(WireError::HeaderLength(b.len()));
        }
        if b[0] != MAGIC {
            return Err(WireError::Magic(b[0]));
        }
        let kind = match b[1] {
            1 => Kind::Changes,
            2 => Kind::Sync,
            3 => Kind::Heartbeat,
            k => return Err(WireError::Kind(k)),
        };
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(w)
        };
        Ok(Header {
            kind,
            epoch: word(2),
            seq: word(10),
        })
    }
}

/// The topic frame, checked: one topic of the NB, or the heartbeat topic.
pub fn topic(frame: &[u8]) -> Result<&str, WireError> {
    let bad = || WireError::BadTopic(String::from_utf8_lossy(frame).into_owned());
    let t = std::str::from_utf8(frame).map_err(|_| bad())?;
    if t == HEARTBEAT_TOPIC || kv::is_topic(t) {
        Ok(t)
    } else {
        Err(bad())
    }
}

/// The changes' payload (see the module's documentation).
pub fn encode_changes<'a>(changes: impl IntoIterator<Item = &'a Event>) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    let mut n: u32 = 0;
    for c in changes {
        let (op, key, value) = match c {
            Event::Put(k, v) => (OP_PUT, k, Some(v)),
            Event::Delete(k) => (OP_DELETE, k, None),
        };
        out.push(op);
        // Keys are paths of a few dozen bytes; the NB refuses names anywhere near 64 KiB.
        let kb = &key.as_bytes()[..key.len().min(u16::MAX as usize)];
        out.extend_from_slice(&(kb.len() as u16).to_be_bytes());
        out.extend_from_slice(kb);
        if let Some(v) = value {
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v);
        }
        n += 1;
    }
    out[..4].copy_from_slice(&n.to_be_bytes());
    out
}

/// Splits one topic's changes into payloads of about `SPLIT_BYTES` at most (a single larger
/// record travels alone).
pub fn encode_split(changes: &[Event]) -> Vec<Vec<u8>> {
    let size = |c: &Event| match c {
        Event::Put(k, v) => 7 + k.len() + v.len(),
        Event::Delete(k) => 3 + k.len(),
    };
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, c) in changes.iter().enumerate() {
        if i > start && bytes + size(c) > SPLIT_BYTES {
            out.push(encode_changes(&changes[start..i]));
            start = i;
            bytes = 0;
        }
        bytes += size(c);
    }
    if start < changes.len() {
        out.push(encode_changes(&changes[start..]));
    }
    out
}

/// Reads a payload of changes of `topic`, refusing it whole if any change is malformed, is
/// not under the topic, or is larger than a record may be.
pub fn decode_changes(topic: &str, b: &[u8]) -> Result<Vec<Event>, WireError> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], WireError> {
        let s = b.get(at..at + n).ok_or(WireError::Truncated(at))?;
        at += n;
        Ok(s)
    };
    let mut w4 = [0u8; 4];
    w4.copy_from_slice(take(4)?);
    let count = u32::from_be_bytes(w4);
    // The smallest change (a delete of an empty key) takes 3 bytes.
    if count as usize > b.len() / 3 {
        return Err(WireError::Count(count));
    }
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let op = take(1)?[0];
        let mut w2 = [0u8; 2];
        w2.copy_from_slice(take(2)?);
        let klen = u16::from_be_bytes(w2) as usize;
        let key = std::str::from_utf8(take(klen)?)
            .map_err(|_| WireError::KeyUtf8(i))?
            .to_string();
        if !key.starts_with(topic) || kv::topic_of(&key).as_deref() != Some(topic) {
            return Err(WireError::ForeignKey {
                key,
                topic: topic.to_string(),
            });
        }
        match op {
            OP_PUT => {
                w4.copy_from_slice(take(4)?);
                let len = u32::from_be_bytes(w4) as usize;
                if len > MAX_RECORD_BYTES {
                    return Err(WireError::Oversized { key, len });
                }
                out.push(Event::Put(key, take(len)?.to_vec()));
            }
            OP_DELETE => out.push(Event::Delete(key)),
            op => return Err(WireError::Op(i, op)),
        }
    }
    if at != b.len() {
        return Err(WireError::Trailing(b.len() - at));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str, v: &str) -> Event {
        Event::Put(k.into(), v.as_bytes().to_vec())
    }

    #[test]
    fn header_round_trips_and_refuses_garbage() {
        let h = Header {
            kind: Kind::Sync,
            epoch: 0xdead_beef_0102_0304,
            seq: 77,
        };
        assert_eq!(Header::decode(&h.encode()), Ok(h));
        let mut b = h.encode();
        b[0] = 0;
        assert_eq!(Header::decode(&b), Err(WireError::Magic(0)));
        b = h.encode();
        b[1] = 9;
        assert_eq!(Header::decode(&b), Err(WireError::Kind(9)));
        assert_eq!(Header::decode(&b[..17]), Err(WireError::HeaderLength(17)));
    }

    #[test]
    fn changes_round_trip() {
        let t = "/gf/t/red/";
        let ch = vec![
            put("/gf/t/red/ports/a", "{\"version\":3}"),
            Event::Delete("/gf/t/red/ports/b".into()),
            put("/gf/t/red/switches/s", ""),
        ];
        assert_eq!(decode_changes(t, &encode_changes(&ch)), Ok(ch));
        assert_eq!(decode_changes(t, &encode_changes(&[])), Ok(vec![]));
    }

    #[test]
    fn changes_of_another_topic_or_malformed_are_refused_whole() {
        let ch = vec![
            put("/gf/t/red/ports/a", "{}"),
            put("/gf/t/blue/ports/x", "{}"),
        ];
        assert_eq!(
            decode_changes("/gf/t/red/", &encode_changes(&ch)),
            Err(WireError::ForeignKey {
                key: "/gf/t/blue/ports/x".into(),
                topic: "/gf/t/red/".into()
            })
        );
        // A key of a sub-path that only looks like the topic (/gf/t/red/ vs /gf/t/redx/).
        let sneaky = vec![put("/gf/t/redx/ports/a", "{}")];
        assert!(decode_changes("/gf/t/red/", &encode_changes(&sneaky)).is_err());
        let good = encode_changes(&[put("/gf/t/red/ports/a", "{}")]);
        for cut in 0..good.len() {
            assert!(
                decode_changes("/gf/t/red/", &good[..cut]).is_err(),
                "cut {cut}"
            );
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(
            decode_changes("/gf/t/red/", &trailing),
            Err(WireError::Trailing(1))
        );
        let mut op = good.clone();
        op[4] = 7;
        assert_eq!(decode_changes("/gf/t/red/", &op), Err(WireError::Op(0, 7)));
        // A count far beyond the bytes: refused before allocating for it.
        let mut count = good;
        count[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            decode_changes("/gf/t/red/", &count),
            Err(WireError::Count(u32::MAX))
        );
    }

    #[test]
    fn an_oversized_value_is_refused_naming_its_key() {
        let big = vec![b'x'; MAX_RECORD_BYTES + 1];
        let ch = vec![Event::Put("/gf/t/red/ports/a".into(), big)];
        assert_eq!(
            decode_changes("/gf/t/red/", &encode_changes(&ch)),
            Err(WireError::Oversized {
                key: "/gf/t/red/ports/a".into(),
                len: MAX_RECORD_BYTES + 1
            })
        );
    }

    #[test]
    fn large_changes_split_into_messages_that_decode_to_the_same() {
        let v = "y".repeat(1 << 20);
        let ch: Vec<Event> = (0..10)
            .map(|i| put(&format!("/gf/t/red/ports/p{i}"), &v))
            .collect();
        let parts = encode_split(&ch);
        assert_eq!(parts.len(), 4, "3 + 3 + 3 + 1 records of 1 MiB");
        let back: Vec<Event> = parts
            .iter()
            .flat_map(|p| decode_changes("/gf/t/red/", p).unwrap())
            .collect();
        assert_eq!(back, ch);
        assert!(parts.iter().all(|p| p.len() <= SPLIT_BYTES + (2 << 20)));
    }

    #[test]
    fn topics_are_checked() {
        assert_eq!(topic(b"/gf/t/red/"), Ok("/gf/t/red/"));
        assert_eq!(topic(b"gf-hb"), Ok("gf-hb"));
        assert!(topic(b"/gf/").is_err());
        assert!(topic(b"/gf/t/red/ports/").is_err());
        assert!(topic(&[0xff, 0xfe]).is_err());
    }
}
