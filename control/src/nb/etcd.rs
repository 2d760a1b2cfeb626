//! The etcd v3 backend: a range read per topic prefix, then one watch per prefix starting just
//! after the snapshot's revision (so nothing between the read and the watch is missed).
//! Writes are one transaction. The client is async; this backend owns a current-thread tokio
//! runtime and blocks on it, so the control thread stays a plain thread.

use super::{Backend, Event, NbError};
use crate::kv::Kv;
use etcd_client::{
    Client, ConnectOptions, DeleteOptions, EventType, GetOptions, SortOrder, SortTarget, Txn,
    TxnOp, WatchOptions,
};
use std::time::Duration;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

pub struct EtcdStore {
    rt: Runtime,
    endpoints: Vec<String>,
    /// The member we talk to; rotated on every failure, so a dead member (a killed leader)
    /// costs one retry, not an outage.
    current: usize,
    client: Option<Client>,
    revision: i64,
    events: Option<mpsc::UnboundedReceiver<Result<Vec<Event>, String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn unreachable(e: impl std::fmt::Display) -> NbError {
    NbError::Unreachable(e.to_string())
}

impl EtcdStore {
    pub fn open(url: &str) -> Result<EtcdStore, NbError> {
        let hosts = url
            .strip_prefix("etcd://")
            .ok_or_else(|| NbError::BadUrl(url.to_string()))?;
        let endpoints: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.trim().is_empty())
            .map(|h| format!("http://{}", h.trim()))
            .collect();
        if endpoints.is_empty() {
            return Err(NbError::BadUrl(url.to_string()));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| NbError::Invalid(e.to_string()))?;
        Ok(EtcdStore {
            rt,
            endpoints,
            current: 0,
            client: None,
            revision: 0,
            events: None,
            tasks: Vec::new(),
        })
    }

    fn client(&mut self) -> Result<Client, NbError> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(Duration::from_secs(2))
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1));
        let eps = vec![self.endpoints[self.current % self.endpoints.len()].clone()];
        let c = self
            .rt
            .block_on(Client::connect(eps, Some(opts)))
            .map_err(unreachable)?;
        self.client = Some(c.clone());
        Ok(c)
    }

    fn reset(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.events = None;
        self.client = None;
        self.current = (self.current + 1) % self.endpoints.len();
    }

    /// Runs `op` against one member after another until one answers.
    fn retrying<T>(
        &mut self,
        mut op: impl FnMut(&mut Self) -> Result<T, NbError>,
    ) -> Result<T, NbError> {
        let mut last = None;
        for _ in 0..self.endpoints.len() {
            match op(self) {
                Ok(v) => return Ok(v),
                // Another member would refuse it the same way.
                Err(e) if e.is_data_error() => return Err(e),
                Err(e) => {
                    self.reset();
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| NbError::Unreachable("no etcd endpoint".into())))
    }
}

impl Backend for EtcdStore {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    fn snapshot(&mut self, prefixes: &[String]) -> Result<Kv, NbError> {
        self.retrying(|s| s.snapshot_once(prefixes))
    }

    fn subscribe(&mut self, prefixes: &[String]) -> Result<(), NbError> {
        self.subscribe_once(prefixes)
    }

    fn revision(&mut self, prefixes: &[String]) -> Result<Option<u64>, NbError> {
        self.retrying(|s| s.revision_once(prefixes)).map(Some)
    }

    fn poll(&mut self, timeout: Duration) -> Result<Vec<Event>, NbError> {
        self.poll_once(timeout)
    }

    fn commit(
        &mut self,
        puts: Vec<(String, Vec<u8>)>,
        deletes: Vec<String>,
    ) -> Result<(), NbError> {
        // Puts and deletes are idempotent, so retrying a transaction on another member is safe.
        self.retrying(|s| s.commit_once(puts.clone(), deletes.clone()))
    }
}

impl EtcdStore {
    /// Per prefix, its key count and its latest modification revision (a put anywhere under
    /// it moves the latter, a delete the former), folded into one token: one small range
    /// request per prefix, keys only, limit 1.
    fn revision_once(&mut self, prefixes: &[String]) -> Result<u64, NbError> {
        let mut c = self.client()?;
        let r = self.rt.block_on(async {
            let mut words = Vec::with_capacity(prefixes.len() * 2);
            for p in prefixes {
                let opts = GetOptions::new()
                    .with_prefix()
                    .with_keys_only()
                    .with_sort(SortTarget::Mod, SortOrder::Descend)
                    .with_limit(1);
                let resp = c.get(p.as_str(), Some(opts)).await?;
                let latest = resp.kvs().first().map(|kv| kv.mod_revision()).unwrap_or(0);
                words.extend([resp.count() as u64, latest as u64]);
            }
            Ok::<_, etcd_client::Error>(super::token(words))
        });
        r.map_err(|e| {
            self.reset();
            unreachable(e)
        })
    }

    fn snapshot_once(&mut self, prefixes: &[String]) -> Result<Kv, NbError> {
        let mut c = self.client()?;
        let r = self.rt.block_on(async {
            let mut out = Kv::new();
            let mut rev = 0;
            for p in prefixes {
                let resp = c
                    .get(p.as_str(), Some(GetOptions::new().with_prefix()))
                    .await?;
                if let Some(h) = resp.header() {
                    rev = rev.max(h.revision());
                }
                for kv in resp.kvs() {
                    out.insert(
                        String::from_utf8_lossy(kv.key()).into_owned(),
                        kv.value().to_vec(),
                    );
                }
            }
            Ok::<_, etcd_client::Error>((out, rev))
        });
        match r {
            Ok((kv, rev)) => {
                self.revision = rev;
                Ok(kv)
            }
            Err(e) => {
                self.reset();
                Err(unreachable(e))
            }
        }
    }

    fn subscribe_once(&mut self, prefixes: &[String]) -> Result<(), NbError> {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        let mut c = self.client()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let start = self.revision + 1;
        let mut tasks = Vec::new();
        for p in prefixes {
            let opts = WatchOptions::new().with_prefix().with_start_revision(start);
            let (watcher, mut stream) = match self.rt.block_on(c.watch(p.as_str(), Some(opts))) {
                Ok(w) => w,
                Err(e) => {
                    self.reset();
                    return Err(unreachable(e));
                }
            };
            let tx = tx.clone();
            tasks.push(self.rt.spawn(async move {
                let _keep = watcher;
                loop {
                    match stream.message().await {
                        Ok(Some(resp)) => {
                            if resp.canceled() {
                                let _ = tx
                                    .send(Err(format!("watch canceled: {}", resp.cancel_reason())));
                                return;
                            }
                            let ev = resp
                                .events()
                                .iter()
                                .filter_map(|e| {
                                    let kv = e.kv()?;
                                    let k = String::from_utf8_lossy(kv.key()).into_owned();
                                    Some(match e.event_type() {
                                        EventType::Put => Event::Put(k, kv.value().to_vec()),
                                        EventType::Delete => Event::Delete(k),
                                    })
                                })
                                .collect::<Vec<_>>();
                            if !ev.is_empty() && tx.send(Ok(ev)).is_err() {
                                return;
                            }
                        }
                        Ok(None) => {
                            let _ = tx.send(Err("watch stream ended".into()));
                            return;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e.to_string()));
                            return;
                        }
                    }
                }
            }));
        }
        self.tasks = tasks;
        self.events = Some(rx);
        Ok(())
    }

    fn poll_once(&mut self, timeout: Duration) -> Result<Vec<Event>, NbError> {
        let Some(rx) = self.events.as_mut() else {
            return Err(NbError::Unreachable("not subscribed".into()));
        };
        let first = self
            .rt
            .block_on(async { tokio::time::timeout(timeout, rx.recv()).await });
        let mut out = Vec::new();
        let mut failed = None;
        let mut push = |m: Option<Result<Vec<Event>, String>>| match m {
            Some(Ok(ev)) => out.extend(ev),
            Some(Err(e)) => failed = Some(e),
            None => failed = Some("watch channel closed".into()),
        };
        match first {
            Err(_) => return Ok(Vec::new()),
            Ok(m) => push(m),
        }
        while let Ok(m) = rx.try_recv() {
            push(Some(m));
        }
        if let Some(e) = failed {
            self.reset();
            return Err(NbError::Unreachable(e));
        }
        Ok(out)
    }

    fn commit_once(
        &mut self,
        puts: Vec<(String, Vec<u8>)>,
        deletes: Vec<String>,
    ) -> Result<(), NbError> {
        let mut c = self.client()?;
        let mut ops: Vec<TxnOp> = puts
            .into_iter()
            .map(|(k, v)| TxnOp::put(k, v, None))
            .collect();
        ops.extend(
            deletes
                .into_iter()
                .map(|k| TxnOp::delete(k, None::<DeleteOptions>)),
        );
        if ops.is_empty() {
            return Ok(());
        }
        let n = ops.len();
        let r = self.rt.block_on(c.txn(Txn::new().and_then(ops)));
        match r {
            Ok(_) => Ok(()),
            // etcd takes at most --max-txn-ops (128 by default) operations per transaction;
            // the write is one transaction, so it must be smaller.
            Err(e) if e.to_string().contains("too many operations in txn request") => {
                Err(NbError::Invalid(format!(
                    "a write of {n} records is more than etcd takes in one transaction (its --max-txn-ops, 128 by default): write fewer at once, or raise the limit"
                )))
            }
            Err(e) => {
                self.reset();
                Err(unreachable(e))
            }
        }
    }
}
