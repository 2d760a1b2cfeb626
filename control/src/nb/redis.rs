//! The Redis backend, in the way of Dragonflow's driver: records are plain keys, and every
//! write is followed by a PUBLISH of the key on its topic's channel (the topic prefix). An
//! agent SUBSCRIBEs to its topics on a second connection and reads each notified key back.
//! Pub/sub is fire-and-forget, so the agent resyncs fully whenever the connection drops.
//!
//! The subscriber speaks RESP itself on a plain socket: redis-rs's blocking connection turns a
//! read timeout into "skip the next message", which would lose notifications.

use super::{Backend, Event, NbError};
use crate::kv::{is_topic, topic_of, Kv};
use redis::{Client, Connection};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::Duration;

pub struct RedisStore {
    client: Client,
    addr: String,
    cmd: Option<Connection>,
    sub: Option<Subscriber>,
    /// The store has the topic index (`TOPICS`): checked once per connection.
    indexed: Option<bool>,
}

/// A RESP2 pub/sub reader on its own connection (the Redis Cluster backend's too: a
/// cluster carries a PUBLISH to every node, so one subscription on any node hears all).
pub(super) struct Subscriber {
    r: BufReader<TcpStream>,
}

enum Resp {
    Bulk(Option<Vec<u8>>),
    Simple(String),
    Int(i64),
    Array(Vec<Resp>),
}

impl Subscriber {
    pub(super) fn connect(addr: &str, channels: &[String]) -> std::io::Result<Subscriber> {
        let sock = std::net::ToSocketAddrs::to_socket_addrs(addr)?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("bad address {addr}")))?;
        let s = TcpStream::connect_timeout(&sock, Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.set_nodelay(true)?;
        let mut sub = Subscriber {
            r: BufReader::new(s),
        };
        if !channels.is_empty() {
            let mut cmd = format!("*{}\r\n$9\r\nSUBSCRIBE\r\n", channels.len() + 1);
            for c in channels {
                cmd.push_str(&format!("${}\r\n{c}\r\n", c.len()));
            }
            sub.r.get_mut().write_all(cmd.as_bytes())?;
            for _ in channels {
                sub.read()?;
            }
        }
        Ok(sub)
    }

    fn line(&mut self) -> std::io::Result<String> {
        let mut l = String::new();
        if self.r.read_line(&mut l)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(l.trim_end().to_string())
    }

    fn read(&mut self) -> std::io::Result<Resp> {
        let l = self.line()?;
        let bad = || std::io::Error::other(format!("bad RESP line {l:?}"));
        let (t, rest) = l.split_at(1.min(l.len()));
        match t {
            "+" => Ok(Resp::Simple(rest.to_string())),
            "-" => Err(std::io::Error::other(format!("redis: {rest}"))),
            ":" => rest.parse().map(Resp::Int).map_err(|_| bad()),
            "$" => {
                let n: i64 = rest.parse().map_err(|_| bad())?;
                if n < 0 {
                    return Ok(Resp::Bulk(None));
                }
                let mut b = vec![0u8; n as usize + 2];
                self.r.read_exact(&mut b)?;
                b.truncate(n as usize);
                Ok(Resp::Bulk(Some(b)))
            }
            "*" => {
                let n: i64 = rest.parse().map_err(|_| bad())?;
                let mut v = Vec::new();
                for _ in 0..n.max(0) {
                    v.push(self.read()?);
                }
                Ok(Resp::Array(v))
            }
            _ => Err(bad()),
        }
    }

    /// Waits up to `timeout` for the socket to have data; whole messages are then read with
    /// the socket's own (generous) timeout, so a parse never stops half-way.
    fn ready(&self, timeout: Duration) -> std::io::Result<bool> {
        if !self.r.buffer().is_empty() {
            return Ok(true);
        }
        let mut p = libc::pollfd {
            fd: self.r.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for a socket we own.
        let n = unsafe { libc::poll(&mut p, 1, timeout.as_millis().min(60_000) as i32) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n > 0)
    }
}

impl Subscriber {
    /// The keys notified within `timeout` (what else has arrived by then too, without
    /// waiting further), in order, duplicates removed.
    pub(super) fn notified_keys(&mut self, timeout: Duration) -> std::io::Result<Vec<String>> {
        let mut keys = Vec::new();
        let mut wait = timeout;
        while self.ready(wait)? {
            if let Some(k) = message_key(self.read()?) {
                keys.push(k);
            }
            // Drain what else is already there without waiting.
            wait = Duration::ZERO;
        }
        keys.dedup();
        Ok(keys)
    }
}

fn message_key(v: Resp) -> Option<String> {
    let Resp::Array(items) = v else { return None };
    let text = |r: &Resp| match r {
        Resp::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
        Resp::Simple(s) => Some(s.clone()),
        Resp::Int(i) => Some(i.to_string()),
        _ => None,
    };
    if items.len() == 3 && text(&items[0]).as_deref() == Some("message") {
        return text(&items[2]);
    }
    None
}

/// The set of a topic's record keys, kept by writers beside the records: a snapshot of a
/// topic reads it and then its keys, at a cost that follows the topic's size. A SCAN per
/// topic visits the whole key space: 1000 agents of 100 tenants took 18.6 s to start against
/// one Redis that way (12.3 s of its CPU), 2.1 s against a cluster with the index.
pub(super) fn idx_key(topic: &str) -> String {
    format!("gf-idx:{topic}")
}

/// The set of every topic that has had a record.
pub(super) const TOPICS: &str = "gf-topics";

/// The change counter of a topic (outside the records' key space), bumped in the transaction
/// of every write to it: what `revision` compares.
pub(super) fn rev_key(topic: &str) -> String {
    format!("gf-rev:{topic}")
}

fn unreachable(e: impl std::fmt::Display) -> NbError {
    NbError::Unreachable(e.to_string())
}

impl RedisStore {
    pub fn open(url: &str) -> Result<RedisStore, NbError> {
        let client = Client::open(url).map_err(|_| NbError::BadUrl(url.to_string()))?;
        let hostport = url
            .trim_start_matches("redis://")
            .split('/')
            .next()
            .unwrap_or("");
        let addr = if hostport.contains(':') {
            hostport.to_string()
        } else {
            format!("{hostport}:6379")
        };
        Ok(RedisStore {
            client,
            addr,
            cmd: None,
            sub: None,
            indexed: None,
        })
    }

    fn conn(&mut self) -> Result<&mut Connection, NbError> {
        if self.cmd.is_none() {
            let c = self
                .client
                .get_connection_with_timeout(Duration::from_secs(1))
                .map_err(unreachable)?;
            c.set_read_timeout(Some(Duration::from_secs(2)))
                .map_err(unreachable)?;
            c.set_write_timeout(Some(Duration::from_secs(2)))
                .map_err(unreachable)?;
            self.cmd = Some(c);
        }
        Ok(self.cmd.as_mut().expect("just set"))
    }

    fn fail(&mut self, e: impl std::fmt::Display) -> NbError {
        self.cmd = None;
        self.sub = None;
        self.indexed = None;
        unreachable(e)
    }

    /// Whether the store has the topic index. A store written by a version without it has
    /// none: readers then SCAN, and the first writer builds it.
    fn indexed(&mut self) -> Result<bool, NbError> {
        if let Some(i) = self.indexed {
            return Ok(i);
        }
        let r: redis::RedisResult<bool> = redis::cmd("EXISTS").arg(TOPICS).query(self.conn()?);
        let i = r.map_err(|e| self.fail(e))?;
        self.indexed = Some(i);
        Ok(i)
    }

    /// Every key under `prefix`, by SCAN (a store without the index).
    fn scan(&mut self, prefix: &str) -> Result<Vec<String>, NbError> {
        let mut out = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let r: redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(1000)
                .query(self.conn()?);
            let (next, keys) = r.map_err(|e| self.fail(e))?;
            out.extend(keys);
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }

    /// Every record key under `prefix`, from the index.
    fn indexed_keys(&mut self, prefix: &str) -> Result<Vec<String>, NbError> {
        let topics: Vec<String> = if is_topic(prefix) {
            vec![prefix.to_string()]
        } else {
            let r: redis::RedisResult<Vec<String>> =
                redis::cmd("SMEMBERS").arg(TOPICS).query(self.conn()?);
            r.map_err(|e| self.fail(e))?
                .into_iter()
                .filter(|t| t.starts_with(prefix))
                .collect()
        };
        let mut keys = Vec::new();
        for t in topics {
            let r: redis::RedisResult<Vec<String>> =
                redis::cmd("SMEMBERS").arg(idx_key(&t)).query(self.conn()?);
            keys.extend(r.map_err(|e| self.fail(e))?);
        }
        Ok(keys)
    }

    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, NbError> {
        let r: redis::RedisResult<Option<Vec<u8>>> = redis::cmd("GET").arg(key).query(self.conn()?);
        r.map_err(|e| self.fail(e))
    }
}

impl Backend for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn snapshot(&mut self, prefixes: &[String]) -> Result<Kv, NbError> {
        let indexed = self.indexed()?;
        let mut out = Kv::new();
        for p in prefixes {
            let keys = if indexed {
                self.indexed_keys(p)?
            } else {
                self.scan(p)?
            };
            // The values in batches of 1000, one round trip each; a key without a value
            // (being deleted) is absent.
            for chunk in keys.chunks(1000) {
                let r: redis::RedisResult<Vec<Option<Vec<u8>>>> =
                    redis::cmd("MGET").arg(chunk).query(self.conn()?);
                let values = r.map_err(|e| self.fail(e))?;
                for (k, v) in chunk.iter().zip(values) {
                    if let Some(v) = v {
                        out.insert(k.clone(), v);
                    }
                }
            }
        }
        Ok(out)
    }

    fn revision(&mut self, prefixes: &[String]) -> Result<Option<u64>, NbError> {
        if prefixes.is_empty() {
            return Ok(Some(0));
        }
        let keys: Vec<String> = prefixes.iter().map(|p| rev_key(p)).collect();
        let r: redis::RedisResult<Vec<Option<u64>>> =
            redis::cmd("MGET").arg(&keys).query(self.conn()?);
        let counts = r.map_err(|e| self.fail(e))?;
        Ok(Some(super::token(
            counts.into_iter().map(|c| c.unwrap_or(0)),
        )))
    }

    fn subscribe(&mut self, prefixes: &[String]) -> Result<(), NbError> {
        self.sub = Some(Subscriber::connect(&self.addr, prefixes).map_err(unreachable)?);
        Ok(())
    }

    fn poll(&mut self, timeout: Duration) -> Result<Vec<Event>, NbError> {
        let Some(sub) = self.sub.as_mut() else {
            return Err(NbError::Unreachable("not subscribed".into()));
        };
        let keys = match sub.notified_keys(timeout) {
            Ok(k) => k,
            Err(e) => return Err(self.fail(e)),
        };
        let mut out = Vec::new();
        for k in keys {
            match self.get(&k)? {
                Some(v) => out.push(Event::Put(k, v)),
                None => out.push(Event::Delete(k)),
            }
        }
        Ok(out)
    }

    fn commit(
        &mut self,
        puts: Vec<(String, Vec<u8>)>,
        deletes: Vec<String>,
    ) -> Result<(), NbError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        if !self.indexed()? {
            // The first writer of this version indexes what an older one wrote.
            for k in self.scan(crate::kv::ROOT)? {
                if let Some(t) = topic_of(&k) {
                    pipe.sadd(idx_key(&t), &k).ignore();
                    pipe.sadd(TOPICS, &t).ignore();
                }
            }
            // Marks the store indexed even when it is empty.
            pipe.sadd(TOPICS, crate::kv::GLOBAL).ignore();
        }
        let mut notify = Vec::new();
        for (k, v) in &puts {
            pipe.set(k, v.as_slice()).ignore();
            if let Some(t) = topic_of(k) {
                pipe.sadd(idx_key(&t), k).ignore();
            }
            notify.push(k.clone());
        }
        for k in &deletes {
            pipe.del(k).ignore();
            if let Some(t) = topic_of(k) {
                pipe.srem(idx_key(&t), k).ignore();
            }
            notify.push(k.clone());
        }
        let mut topics: Vec<String> = notify.iter().filter_map(|k| topic_of(k)).collect();
        topics.sort();
        topics.dedup();
        for t in &topics {
            pipe.incr(rev_key(t), 1).ignore();
            pipe.sadd(TOPICS, t).ignore();
        }
        for k in &notify {
            if let Some(ch) = topic_of(k) {
                pipe.publish(ch, k).ignore();
            }
        }
        let r: redis::RedisResult<()> = pipe.query(self.conn()?);
        r.map_err(|e| self.fail(e))?;
        self.indexed = Some(true);
        Ok(())
    }
}
