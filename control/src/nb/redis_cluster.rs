//! The Redis Cluster backend (`redis+cluster://h1:p1,h2:p2,...`), as Dragonflow deployed its
//! NB: records are plain keys hashed over the cluster's slots, so they spread over the masters.
//! The `redis` crate's cluster client routes each command to the master of its key's slot and
//! follows MOVED/ASK redirections and topology changes (a failover) itself.
//!
//! A cluster runs no transaction across slots, so a write is ordered instead: every record is
//! written (and added to its topic's index set), the topics' change counters are bumped, and
//! only then is each key PUBLISHed. A cluster carries a PUBLISH to every node, so an agent
//! subscribes on any one node (the next seed when that fails) and reads each notified key
//! back, by then complete. Losing the subscription (its node died, a failover) ends the
//! session, and the agent resyncs in full from the cluster (record versions make that
//! idempotent); periodic reconciliation covers a message lost while connected.
//!
//! A snapshot reads a topic's index set (`gf-idx:<topic>`, one slot) and then its keys, in one
//! cluster pipeline (grouped per master by the client): the cost follows the topic's size,
//! not the cluster's key count as a KEYS on every master would. A prefix wider than a topic
//! (a writer reads the whole NB) reads the topics listed in `gf-topics`.

use super::redis::{idx_key, rev_key, Subscriber, TOPICS};
use super::{Backend, Event, NbError};
use crate::kv::is_topic;
use crate::kv::{topic_of, Kv};
use redis::cluster::{cluster_pipe, ClusterClient, ClusterConnection};
use std::time::Duration;

pub struct RedisClusterStore {
    client: ClusterClient,
    /// The seeds, host:port: where the subscriber connects (in turn, on failure).
    seeds: Vec<String>,
    next_seed: usize,
    cmd: Option<ClusterConnection>,
    sub: Option<Subscriber>,
}

fn unreachable(e: impl std::fmt::Display) -> NbError {
    NbError::Unreachable(e.to_string())
}

impl RedisClusterStore {
    pub fn open(url: &str) -> Result<RedisClusterStore, NbError> {
        let bad = || NbError::BadUrl(url.to_string());
        let list = url.strip_prefix("redis+cluster://").ok_or_else(bad)?;
        let seeds: Vec<String> = list
            .split(',')
            .map(|h| h.trim().trim_end_matches('/'))
            .filter(|h| !h.is_empty())
            .map(|h| {
                if h.contains(':') {
                    h.to_string()
                } else {
                    format!("{h}:6379")
                }
            })
            .collect();
        let valid = |s: &String| {
            s.rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        };
        if seeds.is_empty() || !seeds.iter().all(valid) {
            return Err(bad());
        }
        let client = ClusterClient::builder(
            seeds
                .iter()
                .map(|s| format!("redis://{s}"))
                .collect::<Vec<_>>(),
        )
        .connection_timeout(Duration::from_secs(1))
        .response_timeout(Duration::from_secs(2))
        // A failover takes the cluster's node timeout plus an election: keep retrying a
        // command (with backoff, up to about 10 s in all) rather than fail the write.
        .retries(12)
        .max_retry_wait(1000)
        .build()
        .map_err(|_| bad())?;
        // Agents start on different seeds (by process), so that a thousand of them do not
        // all subscribe on the first node.
        let next_seed = std::process::id() as usize % seeds.len();
        Ok(RedisClusterStore {
            client,
            seeds,
            next_seed,
            cmd: None,
            sub: None,
        })
    }

    fn conn(&mut self) -> Result<&mut ClusterConnection, NbError> {
        if self.cmd.is_none() {
            self.cmd = Some(self.client.get_connection().map_err(unreachable)?);
        }
        Ok(self.cmd.as_mut().expect("just set"))
    }

    fn fail(&mut self, e: impl std::fmt::Display) -> NbError {
        self.cmd = None;
        self.sub = None;
        unreachable(e)
    }

    /// Runs `op` again (on a fresh connection, after a growing pause) while it fails for up
    /// to `FAILOVER_WAIT`: a dead master's slots answer nothing (connection refused, timeouts)
    /// until a replica is promoted, which the client's own per-command retries do not outlast
    /// for pipelines. Every operation retried is idempotent (sets, deletes, set adds and
    /// removes, reads; a change counter bumped twice and a key published twice only cost an
    /// extra comparison or read).
    fn retrying<T>(
        &mut self,
        mut op: impl FnMut(&mut Self) -> Result<T, NbError>,
    ) -> Result<T, NbError> {
        let deadline = std::time::Instant::now() + FAILOVER_WAIT;
        let mut pause = Duration::from_millis(50);
        loop {
            match op(self) {
                Ok(v) => return Ok(v),
                Err(e) if std::time::Instant::now() + pause < deadline => {
                    tracing::debug!("redis cluster: {e}; retrying");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// How long an operation is retried across a failover: the cluster's node timeout, the
/// replica's election and the client's slot refresh (a few seconds with a 1 s node timeout;
/// Redis' default node timeout is 15 s, so deployments with the default see writes fail
/// until it has passed).
const FAILOVER_WAIT: Duration = Duration::from_secs(10);

impl Backend for RedisClusterStore {
    fn kind(&self) -> &'static str {
        "redis-cluster"
    }

    fn snapshot(&mut self, prefixes: &[String]) -> Result<Kv, NbError> {
        self.retrying(|s| s.snapshot_once(prefixes))
    }

    fn subscribe(&mut self, prefixes: &[String]) -> Result<(), NbError> {
        let mut last = None;
        for _ in 0..self.seeds.len() {
            let seed = self.seeds[self.next_seed % self.seeds.len()].clone();
            match Subscriber::connect(&seed, prefixes) {
                Ok(s) => {
                    self.sub = Some(s);
                    return Ok(());
                }
                Err(e) => {
                    last = Some(format!("{seed}: {e}"));
                    self.next_seed += 1;
                }
            }
        }
        Err(NbError::Unreachable(
            last.unwrap_or_else(|| "no seed".into()),
        ))
    }

    fn poll(&mut self, timeout: Duration) -> Result<Vec<Event>, NbError> {
        let Some(sub) = self.sub.as_mut() else {
            return Err(NbError::Unreachable("not subscribed".into()));
        };
        let keys = match sub.notified_keys(timeout) {
            Ok(k) => k,
            Err(e) => {
                // The next session subscribes on another seed.
                self.next_seed += 1;
                return Err(self.fail(e));
            }
        };
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let values = self.retrying(|s| s.get_all(&keys))?;
        Ok(keys
            .into_iter()
            .zip(values)
            .map(|(k, v)| match v {
                Some(v) => Event::Put(k, v),
                None => Event::Delete(k),
            })
            .collect())
    }

    fn revision(&mut self, prefixes: &[String]) -> Result<Option<u64>, NbError> {
        self.retrying(|s| s.revision_once(prefixes)).map(Some)
    }

    fn commit(
        &mut self,
        puts: Vec<(String, Vec<u8>)>,
        deletes: Vec<String>,
    ) -> Result<(), NbError> {
        self.retrying(|s| s.commit_once(&puts, &deletes))
    }
}

impl RedisClusterStore {
    /// The values of `keys` (`None`: absent), in one cluster pipeline.
    fn get_all(&mut self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, NbError> {
        let mut pipe = cluster_pipe();
        for k in keys {
            pipe.get(k);
        }
        let r: redis::RedisResult<Vec<Option<Vec<u8>>>> = pipe.query(self.conn()?);
        r.map_err(|e| {
            self.fail(format!(
                "reading {} ({} keys): {e}",
                keys.first().map_or("", |k| k.as_str()),
                keys.len()
            ))
        })
    }

    fn snapshot_once(&mut self, prefixes: &[String]) -> Result<Kv, NbError> {
        let mut topics = Vec::new();
        for p in prefixes {
            if is_topic(p) {
                topics.push(p.clone());
                continue;
            }
            let r: redis::RedisResult<Vec<String>> =
                redis::cmd("SMEMBERS").arg(TOPICS).query(self.conn()?);
            let all = r.map_err(|e| self.fail(format!("reading {TOPICS}: {e}")))?;
            topics.extend(all.into_iter().filter(|t| t.starts_with(p.as_str())));
        }
        let mut out = Kv::new();
        for p in &topics {
            let r: redis::RedisResult<Vec<String>> =
                redis::cmd("SMEMBERS").arg(idx_key(p)).query(self.conn()?);
            let keys = r.map_err(|e| self.fail(format!("reading {}: {e}", idx_key(p))))?;
            if keys.is_empty() {
                continue;
            }
            let values = self.get_all(&keys)?;
            // A key in the index without a value is being deleted (or was never written
            // whole): absent.
            for (k, v) in keys.into_iter().zip(values) {
                if let Some(v) = v {
                    out.insert(k, v);
                }
            }
        }
        Ok(out)
    }

    fn revision_once(&mut self, prefixes: &[String]) -> Result<u64, NbError> {
        let mut pipe = cluster_pipe();
        for p in prefixes {
            pipe.get(rev_key(p));
        }
        let r: redis::RedisResult<Vec<Option<u64>>> = pipe.query(self.conn()?);
        let counts = r.map_err(|e| self.fail(format!("reading the change counters: {e}")))?;
        Ok(super::token(counts.into_iter().map(|c| c.unwrap_or(0))))
    }

    fn commit_once(
        &mut self,
        puts: &[(String, Vec<u8>)],
        deletes: &[String],
    ) -> Result<(), NbError> {
        let mut pipe = cluster_pipe();
        let mut notify = Vec::new();
        for (k, v) in puts {
            let Some(t) = topic_of(k) else { continue };
            pipe.set(k, v.as_slice()).ignore();
            pipe.sadd(idx_key(&t), k).ignore();
            notify.push((t, k.clone()));
        }
        for k in deletes {
            let Some(t) = topic_of(k) else { continue };
            pipe.del(k).ignore();
            pipe.srem(idx_key(&t), k).ignore();
            notify.push((t, k.clone()));
        }
        let mut topics: Vec<&String> = notify.iter().map(|(t, _)| t).collect();
        topics.sort();
        topics.dedup();
        for t in topics {
            pipe.incr(rev_key(t), 1).ignore();
            pipe.sadd(TOPICS, t).ignore();
        }
        let r: redis::RedisResult<()> = pipe.query(self.conn()?);
        r.map_err(|e| {
            self.fail(format!(
                "writing {} ({} records): {e}",
                notify.first().map_or("", |(_, k)| k.as_str()),
                notify.len()
            ))
        })?;
        // Every record is in: now tell the agents.
        for (t, k) in &notify {
            let r: redis::RedisResult<i64> =
                redis::cmd("PUBLISH").arg(t).arg(k).query(self.conn()?);
            r.map_err(|e| self.fail(format!("publishing {k} on {t}: {e}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_list_seeds_and_bad_ones_are_refused() {
        let s =
            RedisClusterStore::open("redis+cluster://10.0.0.1:7000,10.0.0.2,nb-2:7002").unwrap();
        assert_eq!(s.seeds, ["10.0.0.1:7000", "10.0.0.2:6379", "nb-2:7002"]);
        for bad in [
            "redis+cluster://",
            "redis+cluster://,",
            "redis+cluster://10.0.0.1:notaport",
            "redis://10.0.0.1:7000",
        ] {
            assert!(
                matches!(RedisClusterStore::open(bad), Err(NbError::BadUrl(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn topics_and_wider_prefixes() {
        assert!(is_topic("/gf/t/red/"));
        assert!(is_topic("/gf/global/"));
        assert!(is_topic("/gf/bind/ch1/"));
        assert!(!is_topic("/gf/"));
        assert!(!is_topic("/gf/t/"));
    }
}
