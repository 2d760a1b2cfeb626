//! NB DB backends behind one trait. Each stores the key/value projection of the model (see
//! `kv`): `file` (one JSON document, the embedded default), `etcd` (v3 API, watch) and `redis`
//! (keys plus pub/sub notifications, as Dragonflow's driver did) and `redis+cluster` (the same
//! over a Redis Cluster). A URL chooses: `file:///path`, `etcd://h1:2379,h2:2379`,
//! `redis://h:6379`, `redis+cluster://h1:7000,h2:7001,...`. Any of them can take its change
//! notifications from ZeroMQ publishers instead (`zmq`): `<url>?publishers=h1:6620,h2:6620`.

mod etcd;
mod file;
mod redis;
mod redis_cluster;
pub mod zmq;

pub use file::FileStore;

use crate::kv::{self, Kv};
use crate::model::NbDocument;
use serde::Serialize;
use std::collections::BTreeSet;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NbError {
    #[error("{path}:{line}:{column}: malformed NB document: {msg}")]
    Parse {
        path: String,
        line: usize,
        column: usize,
        msg: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("unsupported NB URL {0:?} (want file:///path, etcd://host:port[,host:port...], redis://host:port or redis+cluster://host:port[,host:port...], each optionally followed by ?publishers=host:port[,host:port...])")]
    BadUrl(String),
    #[error("{0}")]
    Invalid(String),
    #[error("NB unreachable: {0}")]
    Unreachable(String),
    /// Notifications were lost (the transport saw it): what the agent holds of the named
    /// topics may be stale, so it reads them again.
    #[error("NB notifications lost: {0}")]
    Missed(String),
}

impl NbError {
    /// Bad data (the store answered, with something unusable) as opposed to a lost store.
    pub fn is_data_error(&self) -> bool {
        matches!(self, NbError::Parse { .. } | NbError::Invalid(_))
    }
}

/// What a notification transport reports (the ZeroMQ publishers').
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TransportStats {
    pub publishers: usize,
    /// Heard from within the last two seconds.
    pub publishers_alive: usize,
    /// Messages of changes received, and their bytes.
    pub messages: u64,
    pub bytes: u64,
    /// Losses detected; those another publisher covered made no read.
    pub losses: u64,
    pub covered: u64,
    /// Messages skipped as malformed or not for this agent.
    pub refused: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(String, Vec<u8>),
    Delete(String),
}

pub trait Backend: Send {
    fn kind(&self) -> &'static str;
    /// Every key/value under these prefixes.
    fn snapshot(&mut self, prefixes: &[String]) -> Result<Kv, NbError>;
    /// Follows changes under these prefixes from the last snapshot on (replaces earlier
    /// subscriptions).
    fn subscribe(&mut self, prefixes: &[String]) -> Result<(), NbError>;
    /// Waits up to `timeout` for changes.
    fn poll(&mut self, timeout: Duration) -> Result<Vec<Event>, NbError>;
    /// Applies puts and deletes as one transaction and notifies subscribers.
    fn commit(&mut self, puts: Vec<(String, Vec<u8>)>, deletes: Vec<String>)
        -> Result<(), NbError>;
    /// A token that changes whenever anything under these prefixes changes (etcd: their
    /// key counts and latest modification revisions; Redis: the per-topic change counters
    /// writers bump; file: the document's identity), so that periodic reconciliation reads
    /// everything only when it moved. `None`: no cheap token, compare in full.
    fn revision(&mut self, _prefixes: &[String]) -> Result<Option<u64>, NbError> {
        Ok(None)
    }
    /// The notification transport's counters, when it is not the store's own.
    fn transport(&self) -> Option<TransportStats> {
        None
    }
    /// The file store does its read-modify-write under a lock; others use `update` below.
    fn as_file(&mut self) -> Option<&mut FileStore> {
        None
    }
}

pub fn open(url: &str) -> Result<Box<dyn Backend>, NbError> {
    match url.split_once("?publishers=") {
        Some((store, list)) => Ok(Box::new(zmq::ZmqNotified::open(
            open_store(store)?,
            list,
            url,
        )?)),
        None => open_store(url),
    }
}

fn open_store(url: &str) -> Result<Box<dyn Backend>, NbError> {
    if url.starts_with("etcd://") {
        Ok(Box::new(etcd::EtcdStore::open(url)?))
    } else if url.starts_with("redis://") {
        Ok(Box::new(redis::RedisStore::open(url)?))
    } else if url.starts_with("redis+cluster://") {
        Ok(Box::new(redis_cluster::RedisClusterStore::open(url)?))
    } else {
        Ok(Box::new(FileStore::open(url)?))
    }
}

/// The whole document as stored (unreadable records are left out).
pub fn load(b: &mut dyn Backend) -> Result<NbDocument, NbError> {
    if let Some(f) = b.as_file() {
        return f.load();
    }
    let kv = b.snapshot(&[kv::ROOT.to_string()])?;
    Ok(kv::kv_to_doc(&kv).0)
}

/// Applies `f` to the document and writes back what changed, with record versions bumped.
/// The result must be valid: a change that adds a validation error is refused with it.
pub fn update<F>(b: &mut dyn Backend, f: F) -> Result<(), NbError>
where
    F: FnOnce(&mut NbDocument) -> Result<(), String>,
{
    if let Some(fs) = b.as_file() {
        return fs.update(f).map(|_| ());
    }
    let stored = b.snapshot(&[kv::ROOT.to_string()])?;
    let (old, _) = kv::kv_to_doc(&stored);
    let mut new = old.clone();
    f(&mut new).map_err(NbError::Invalid)?;
    check_new_errors(&old, &new)?;
    kv::bump_versions(&old, &mut new);
    let (puts, dels) = kv::diff(&kv::doc_to_kv(&old), &kv::doc_to_kv(&new));
    check_record_sizes(puts.iter().map(|(k, v)| (k, v)))?;
    b.commit(puts, dels)
}

/// A revision token: the values (counters, revisions, a file's identity) folded into one
/// (FNV-1a over 64-bit words), equal only while none of them moved.
pub(crate) fn token(values: impl IntoIterator<Item = u64>) -> u64 {
    values.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, v| {
        (h ^ v).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Refuses a write with a record larger than agents accept (`kv::MAX_RECORD_BYTES`).
pub(crate) fn check_record_sizes<'a>(
    records: impl IntoIterator<Item = (&'a String, &'a Vec<u8>)>,
) -> Result<(), NbError> {
    match records
        .into_iter()
        .find(|(_, v)| v.len() > kv::MAX_RECORD_BYTES)
    {
        Some((k, v)) => Err(NbError::Invalid(format!(
            "{k} would be {} bytes, over the {}-byte limit of a record",
            v.len(),
            kv::MAX_RECORD_BYTES
        ))),
        None => Ok(()),
    }
}

/// Refuses `new` if it has a validation error `old` did not have (so records written behind
/// geneflowctl's back do not make the NB uneditable).
pub fn check_new_errors(old: &NbDocument, new: &NbDocument) -> Result<(), NbError> {
    let before: BTreeSet<String> = old.validated_with(true).rejected.into_iter().collect();
    for e in new.validated_with(true).rejected {
        if !before.contains(&e) {
            return Err(NbError::Invalid(e));
        }
    }
    Ok(())
}
