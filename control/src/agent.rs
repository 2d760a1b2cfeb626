//! The control-plane thread of `geneflowd`. It connects to the NB (any backend), works out
//! which topics this chassis needs (selective topology distribution: the tenants of its bound
//! ports, plus the tenants its routers reach), reads them (full resync), compiles, subscribes,
//! and then follows changes, recompiling only the logical datapaths they touch. Each pipeline
//! that changed a datapath goes to the forwarder over a channel.
//!
//! Headless operation: when the NB is unreachable the forwarder keeps the last pipeline; this
//! thread retries with backoff, logs once per state change, and resyncs on reconnect. Bad data
//! (a malformed file, a record that does not parse or validate) is logged once and skipped.
//!
//! Periodic reconciliation (Dragonflow's periodic sync): every so often the agent asks the
//! store for a cheap revision token of its topics and, when it moved since the last check
//! (or after a resync), reads them and compares with what it holds. What differs (a lost
//! notification, a write behind the notifier's back) is logged and applied like a change.

use crate::compiler::{Compiler, Pipeline};
use crate::kv::{self, Kv};
use crate::model::NbDocument;
use crate::nb::{self, Backend, Event, NbError};
use crossbeam_channel::Sender;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

const POLL: Duration = Duration::from_millis(100);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(3);

/// A new compiled pipeline (sent only when a datapath changed). The forwarder works out which
/// datapaths' fast-path entries to invalidate itself, from fingerprints that also cover what the
/// control plane cannot see (interfaces, the uplink) and survive restarts.
#[derive(Debug, Clone)]
pub struct PipelineUpdate {
    pub pipeline: Arc<Pipeline>,
    /// When the NB change was noticed, for change-to-fast-path latency.
    pub noticed: Instant,
    pub compile_time: Duration,
}

/// What the agent reports about its NB session (read by the control socket).
#[derive(Debug, Clone, Default, Serialize)]
pub struct NbStatus {
    pub backend: String,
    pub connected: bool,
    /// Topic prefixes this chassis reads and watches.
    pub topics: Vec<String>,
    /// Records held per table.
    pub records: BTreeMap<String, usize>,
    pub resyncs: u64,
    /// Changes received from the store's notifications (and reconciliation), with the bytes
    /// of their keys and values.
    pub events: u64,
    pub event_bytes: u64,
    /// Periodic reconciliations run, and records they found diverged and repaired.
    pub reconcile_checks: u64,
    pub reconcile_repairs: u64,
    pub last_compile_us: u64,
    pub rejected_records: usize,
    /// The notification transport's counters (ZeroMQ publishers), when it is not the store.
    pub transport: Option<nb::TransportStats>,
}

/// Called after each pipeline is sent, so a sleeping forwarder picks it up at once.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// Where the agent's NB is and how it follows it.
#[derive(Debug, Clone)]
pub struct NbConfig {
    pub url: String,
    pub chassis: String,
    /// How often to reconcile with the store (`None`: never).
    pub reconcile: Option<Duration>,
    /// Selective topology distribution (always, but for measuring what it saves): when off,
    /// the agent reads and follows every tenant of the store.
    pub selective: bool,
}

pub fn spawn(
    cfg: NbConfig,
    tx: Sender<PipelineUpdate>,
    stop: Arc<AtomicBool>,
    status: Arc<Mutex<NbStatus>>,
    wake: Waker,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("gf-control".into())
        .spawn(move || run(cfg, tx, stop, status, wake))
}

struct Agent {
    chassis: String,
    tx: Sender<PipelineUpdate>,
    wake: Waker,
    stop: Arc<AtomicBool>,
    status: Arc<Mutex<NbStatus>>,
    compiler: Compiler,
    /// The accepted underlay peers of the last pipeline sent; `None` before the first. A
    /// chassis added or removed changes no datapath, yet the forwarder must hear of it.
    sent_peers: Option<BTreeSet<std::net::Ipv4Addr>>,
    logged_rejections: BTreeSet<String>,
    last_data_error: Option<String>,
    /// Ports accepted by the last validation: they keep their keys against newcomers.
    incumbents: BTreeSet<String>,
    reconcile_every: Option<Duration>,
    selective: bool,
    /// The store's revision token of the topics at the last reconciliation; `None` after a
    /// resync (the next check compares in full).
    last_rev: Option<u64>,
}

fn run(
    cfg: NbConfig,
    tx: Sender<PipelineUpdate>,
    stop: Arc<AtomicBool>,
    status: Arc<Mutex<NbStatus>>,
    wake: Waker,
) {
    let NbConfig {
        url,
        chassis,
        reconcile,
        selective,
    } = cfg;
    let mut a = Agent {
        compiler: Compiler::new(&chassis),
        chassis,
        reconcile_every: reconcile,
        selective,
        last_rev: None,
        tx,
        wake,
        stop,
        status,
        sent_peers: None,
        logged_rejections: BTreeSet::new(),
        last_data_error: None,
        incumbents: BTreeSet::new(),
    };
    let mut backoff = BACKOFF_MIN;
    let mut was_connected = false;
    let mut logged_down = false;
    while !a.stop.load(Ordering::Relaxed) {
        let mut b = match nb::open(&url) {
            Ok(b) => b,
            Err(e) => {
                error!("{e}");
                return;
            }
        };
        a.set_status(|s| s.backend = b.kind().to_string());
        match a.session(&mut *b, &mut was_connected) {
            Ok(()) => return,
            Err(e) => {
                a.set_status(|s| s.connected = false);
                if was_connected {
                    warn!("NB connection lost ({e}); forwarding on the last pipeline, retrying");
                    was_connected = false;
                    logged_down = true;
                    backoff = BACKOFF_MIN;
                } else if !logged_down {
                    warn!("NB unreachable ({e}); forwarding on the last pipeline, retrying");
                    logged_down = true;
                }
            }
        }
        let until = Instant::now() + backoff;
        while Instant::now() < until && !a.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
        if was_connected {
            logged_down = false;
        }
    }
}

impl Agent {
    fn set_status(&self, f: impl FnOnce(&mut NbStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    /// Topic prefixes: global tables, this chassis's bindings, its tenants and the tenants
    /// its routers reach (followed until nothing new appears).
    fn resync(&mut self, b: &mut dyn Backend) -> Result<(Vec<String>, Kv), NbError> {
        let base = vec![kv::GLOBAL.to_string(), kv::bind_prefix(&self.chassis)];
        let mut data = b.snapshot(&base)?;
        let mut tenants = kv::bound_tenants(&self.chassis, &data);
        if !self.selective {
            let all = b.snapshot(&["/gf/t/".to_string()])?;
            tenants.extend(tenants_of(&all));
        }
        let mut fetched: BTreeSet<String> = BTreeSet::new();
        loop {
            let todo: Vec<String> = tenants.difference(&fetched).cloned().collect();
            if todo.is_empty() {
                break;
            }
            let prefixes: Vec<String> = todo.iter().map(|t| kv::tenant_prefix(t)).collect();
            data.extend(b.snapshot(&prefixes)?);
            fetched.extend(todo);
            tenants.extend(reached_tenants(&data));
        }
        let mut topics = base;
        topics.extend(tenants.iter().map(|t| kv::tenant_prefix(t)));
        Ok((topics, data))
    }

    fn session(&mut self, b: &mut dyn Backend, was_connected: &mut bool) -> Result<(), NbError> {
        'resync: loop {
            let noticed = Instant::now();
            let (topics, mut data) = match self.resync(b) {
                Ok(x) => x,
                Err(e) if e.is_data_error() => {
                    self.data_error(&e);
                    self.wait(POLL);
                    if self.stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    continue 'resync;
                }
                Err(e) => return Err(e),
            };
            b.subscribe(&topics)?;
            let (mut doc, errors) = kv::kv_to_doc(&data);
            for e in errors {
                warn!("NB record skipped: {e}");
            }
            if !*was_connected {
                info!(
                    backend = b.kind(),
                    records = data.len(),
                    topics = ?topics,
                    "NB connected, resynced"
                );
                *was_connected = true;
            }
            self.last_data_error = None;
            self.set_status(|s| {
                s.connected = true;
                s.topics = topics.clone();
                s.resyncs += 1;
            });
            self.publish(&doc, None, noticed);
            self.last_rev = None;
            let mut last_check = Instant::now();
            loop {
                if self.stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let polled = b.poll(POLL);
                if let Some(t) = b.transport() {
                    self.set_status(|s| s.transport = Some(t));
                }
                let mut events = match polled {
                    Ok(ev) => ev,
                    Err(e) if e.is_data_error() => {
                        self.data_error(&e);
                        continue;
                    }
                    Err(NbError::Missed(why)) => {
                        warn!("NB notifications lost ({why}); reading the topics again");
                        continue 'resync;
                    }
                    Err(e) => return Err(e),
                };
                if self
                    .reconcile_every
                    .is_some_and(|every| last_check.elapsed() >= every)
                {
                    last_check = Instant::now();
                    // Against what we hold once the notified changes are in.
                    let mut view = data.clone();
                    for ev in &events {
                        match ev {
                            Event::Put(k, v) => view.insert(k.clone(), v.clone()),
                            Event::Delete(k) => view.remove(k),
                        };
                    }
                    match self.reconcile(b, &topics, &view) {
                        Ok(repairs) => events.extend(repairs),
                        Err(e) if e.is_data_error() => self.data_error(&e),
                        Err(e) => return Err(e),
                    }
                }
                if events.is_empty() {
                    continue;
                }
                self.last_data_error = None;
                let noticed = Instant::now();
                let bytes: usize = events
                    .iter()
                    .map(|e| match e {
                        Event::Put(k, v) => k.len() + v.len(),
                        Event::Delete(k) => k.len(),
                    })
                    .sum();
                self.set_status(|s| {
                    s.events += events.len() as u64;
                    s.event_bytes += bytes as u64;
                });
                let mut dirty: BTreeSet<String> = BTreeSet::new();
                let mut all = false;
                for ev in &events {
                    let (key, value) = match ev {
                        Event::Put(k, v) => (k, Some(v.as_slice())),
                        Event::Delete(k) => (k, None),
                    };
                    // A notification names any key it likes (garbage, another tenant's
                    // record): only this chassis's topics are held.
                    if !topics.iter().any(|t| key.starts_with(t.as_str())) {
                        warn!(key = %key.escape_debug(), "NB notification for a key outside this chassis's topics skipped");
                        continue;
                    }
                    touch(&doc, key, &mut dirty, &mut all);
                    match value {
                        Some(v) => {
                            data.insert(key.clone(), v.to_vec());
                        }
                        None => {
                            data.remove(key);
                        }
                    }
                    if let Err(e) = kv::apply(&mut doc, key, value) {
                        warn!("NB record skipped: {e}");
                    }
                    touch(&doc, key, &mut dirty, &mut all);
                }
                // A binding or router change can change the topics: resync onto the new set.
                let mut tenants = kv::bound_tenants(&self.chassis, &data);
                tenants.extend(reached_tenants(&data));
                if !self.selective {
                    tenants.extend(tenants_of(&data));
                }
                let wanted: Vec<String> = [kv::GLOBAL.to_string(), kv::bind_prefix(&self.chassis)]
                    .into_iter()
                    .chain(tenants.iter().map(|t| kv::tenant_prefix(t)))
                    .collect();
                if wanted != topics {
                    info!(from = ?topics, to = ?wanted, "NB topics changed, resubscribing");
                    continue 'resync;
                }
                self.publish(&doc, if all { None } else { Some(&dirty) }, noticed);
            }
        }
    }

    /// The changes that bring `held` in line with the store under `topics`: none without a
    /// read when the store's revision token has not moved since the last check.
    fn reconcile(
        &mut self,
        b: &mut dyn Backend,
        topics: &[String],
        held: &Kv,
    ) -> Result<Vec<Event>, NbError> {
        let rev = b.revision(topics)?;
        self.set_status(|s| s.reconcile_checks += 1);
        if rev.is_some() && rev == self.last_rev {
            return Ok(Vec::new());
        }
        let fresh = b.snapshot(topics)?;
        let mut events: Vec<Event> = fresh
            .iter()
            .filter(|(k, v)| held.get(*k) != Some(*v))
            .map(|(k, v)| Event::Put(k.clone(), v.clone()))
            .collect();
        events.extend(
            held.keys()
                .filter(|k| !fresh.contains_key(*k))
                .map(|k| Event::Delete(k.clone())),
        );
        self.last_rev = rev;
        if !events.is_empty() {
            let keys: Vec<&str> = events
                .iter()
                .map(|e| match e {
                    Event::Put(k, _) | Event::Delete(k) => k.as_str(),
                })
                .collect();
            warn!(
                diverged = events.len(),
                keys = ?&keys[..keys.len().min(10)],
                "NB reconciliation: records differed from the store (a lost notification?); repaired"
            );
            let n = events.len() as u64;
            self.set_status(|s| s.reconcile_repairs += n);
        }
        Ok(events)
    }

    fn wait(&self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until && !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn data_error(&mut self, e: &NbError) {
        let msg = e.to_string();
        if self.last_data_error.as_deref() != Some(&msg) {
            error!("NB not applied, keeping the last good pipeline: {msg}");
            self.last_data_error = Some(msg);
        }
    }

    fn publish(&mut self, doc: &NbDocument, dirty: Option<&BTreeSet<String>>, noticed: Instant) {
        let v = doc.validated_preferring(false, &self.incumbents);
        self.incumbents = v.doc.ports.keys().cloned().collect();
        for r in &v.rejected {
            if self.logged_rejections.insert(r.clone()) {
                warn!("NB record skipped: {r}");
            }
        }
        let started = Instant::now();
        let changed = self.compiler.update(&v.doc, dirty);
        let compile_time = started.elapsed();
        let p = self.compiler.pipeline();
        for problem in &p.problems {
            if self.logged_rejections.insert(problem.clone()) {
                warn!("NB record not usable: {problem}");
            }
        }
        self.logged_rejections
            .retain(|r| v.rejected.contains(r) || p.problems.contains(r));
        if p.encap_ip.is_none() {
            warn!(chassis = %self.chassis, "no chassis record for this agent in the NB; tunnels need one");
        }
        let counts: BTreeMap<String, usize> = doc
            .record_count()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let rejected = v.rejected.len();
        self.set_status(|s| {
            s.records = counts;
            s.last_compile_us = compile_time.as_micros() as u64;
            s.rejected_records = rejected;
        });
        if changed.is_empty() && self.sent_peers.as_ref() == Some(&p.peer_ips) {
            return;
        }
        info!(
            datapaths = p.datapaths.len(),
            local_ports = p.bindings.len(),
            changed = changed.len(),
            compile_us = compile_time.as_micros() as u64,
            "pipeline compiled"
        );
        self.sent_peers = Some(p.peer_ips.clone());
        let upd = PipelineUpdate {
            pipeline: Arc::new(p.clone()),
            noticed,
            compile_time,
        };
        let _ = self.tx.send(upd);
        (self.wake)();
    }
}

/// Tenants reached by the routers held in `data` (router ports attached to other tenants'
/// switches).
/// Every tenant with a record in `data`.
fn tenants_of(data: &Kv) -> BTreeSet<String> {
    data.keys()
        .filter_map(|k| k.strip_prefix("/gf/t/")?.split('/').next())
        .map(str::to_string)
        .collect()
}

fn reached_tenants(data: &Kv) -> BTreeSet<String> {
    data.iter()
        .filter(|(k, _)| k.contains("/router_ports/"))
        .filter_map(|(_, v)| serde_json::from_slice::<crate::model::RouterPort>(v).ok())
        .filter_map(|rp| rp.peer_tenant)
        .collect()
}

/// Marks the switch a key's record belongs to as dirty (or everything, for chassis).
fn touch(doc: &NbDocument, key: &str, dirty: &mut BTreeSet<String>, all: &mut bool) {
    let Some(kv::KeyKind::Record { table, name }) = kv::parse_key(key) else {
        return;
    };
    match table {
        // Routers reach across switches: recompile everything (routers are small and the
        // switches' entries are reused when their content did not change).
        "chassis" | "routers" | "router_ports" | "routes" | "security_groups" => *all = true,
        "switches" => {
            dirty.insert(name.to_string());
        }
        "ports" => {
            // A port's addresses and groups are in the remote-group rules of other ports.
            if !doc.security_groups.is_empty() {
                *all = true;
            }
            if let Some(p) = doc.ports.get(name) {
                dirty.insert(p.switch.clone());
            }
        }
        "subnets" => {
            if let Some(s) = doc.subnets.get(name) {
                dirty.insert(s.switch.clone());
            }
        }
        _ => {}
    }
}
