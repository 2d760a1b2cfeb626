//! The Redis backend, in the way of Dragonflow's driver: records are plain keys, and every
//! write is followed by a PUBLISH of the key on its topic's channel (the topic prefix). An
//! agent SUBSCRIBEs to its topics on a second connection and reads each notified key back.
//! Pub/sub is fire-and-forget, so the agent resyncs fully whenever the connection drops.

use super::{Backend, Event, NbError};
use crate::kv::{topic_of, Kv};
use redis::{Client, Connection, Value};
use std::time::Duration;

pub struct RedisStore {
    client: Client,
    cmd: Option<Connection>,
    sub: Option<Connection>,
}

fn unreachable(e: impl std::fmt::Display) -> NbError {
    NbError::Unreachable(e.to_string())
}

impl RedisStore {
    pub fn open(url: &str) -> Result<RedisStore, NbError> {
        let client = Client::open(url).map_err(|_| NbError::BadUrl(url.to_string()))?;
        Ok(RedisStore {
            client,
            cmd: None,
            sub: None,
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
        unreachable(e)
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
        let mut out = Kv::new();
        for p in prefixes {
            let mut cursor: u64 = 0;
            loop {
                let r: redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{p}*"))
                    .arg("COUNT")
                    .arg(1000)
                    .query(self.conn()?);
                let (next, keys) = r.map_err(|e| self.fail(e))?;
                for k in keys {
                    if let Some(v) = self.get(&k)? {
                        out.insert(k, v);
                    }
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(out)
    }

    fn subscribe(&mut self, prefixes: &[String]) -> Result<(), NbError> {
        let mut c = self
            .client
            .get_connection_with_timeout(Duration::from_secs(1))
            .map_err(unreachable)?;
        if !prefixes.is_empty() {
            let cmd = redis::cmd("SUBSCRIBE").arg(prefixes).get_packed_command();
            c.send_packed_command(&cmd).map_err(unreachable)?;
            c.set_read_timeout(Some(Duration::from_secs(2)))
                .map_err(unreachable)?;
            for _ in prefixes {
                c.recv_response().map_err(unreachable)?;
            }
        }
        self.sub = Some(c);
        Ok(())
    }

    fn poll(&mut self, timeout: Duration) -> Result<Vec<Event>, NbError> {
        let mut keys = Vec::new();
        {
            let Some(sub) = self.sub.as_mut() else {
                return Err(NbError::Unreachable("not subscribed".into()));
            };
            let mut wait = timeout.max(Duration::from_millis(1));
            loop {
                sub.set_read_timeout(Some(wait)).map_err(unreachable)?;
                match sub.recv_response() {
                    Ok(v) => {
                        if let Some(k) = message_key(v) {
                            keys.push(k);
                        }
                        // Drain what else is already there, without waiting long.
                        wait = Duration::from_millis(1);
                    }
                    Err(e) if e.is_timeout() => break,
                    Err(e) => {
                        let e = unreachable(e);
                        self.cmd = None;
                        self.sub = None;
                        return Err(e);
                    }
                }
            }
        }
        let mut out = Vec::new();
        keys.dedup();
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
        let mut notify = Vec::new();
        for (k, v) in &puts {
            pipe.set(k, v.as_slice()).ignore();
            notify.push(k.clone());
        }
        for k in &deletes {
            pipe.del(k).ignore();
            notify.push(k.clone());
        }
        for k in &notify {
            if let Some(ch) = topic_of(k) {
                pipe.publish(ch, k).ignore();
            }
        }
        let r: redis::RedisResult<()> = pipe.query(self.conn()?);
        r.map_err(|e| self.fail(e))
    }
}

/// The key carried by a pub/sub "message" push, if `v` is one.
fn message_key(v: Value) -> Option<String> {
    let items = match v {
        Value::Array(a) => a,
        Value::Push { data, .. } => data,
        _ => return None,
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    if items.len() == 3 && text(&items[0]).as_deref() == Some("message") {
        return text(&items[2]);
    }
    None
}
