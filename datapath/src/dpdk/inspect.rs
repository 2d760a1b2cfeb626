//! The DPDK datapath's answers to the control socket: `geneflowctl ports`, `flows`, `trace`,
//! `ct` and `ct flush`, in the XDP datapath's formats (`crate::ctl`), from the calling
//! thread. The megaflows live in the poll threads' own caches: a `flows` request is a number
//! each thread checks when it publishes its counters (every 100 ms, one atomic load), and
//! answers with a copy of its cache; nothing is locked on a thread's frame path.

use super::control::PortSet;
use crate::ctl::{ct_json, port_json};
use crate::flowcache::{CachedFlow, FlowCache};
use crate::metrics::Shared;
use crate::pipeline::{flow_json, trace_answer, Tables};
use crate::userct::ConnTable;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a `flows` request waits for every poll thread.
const FLOWS_WAIT: Duration = Duration::from_secs(2);

/// The `flows` requests to the poll threads, and their answers.
pub struct FlowRequests {
    /// The latest request's number (0: none yet).
    asked: AtomicU64,
    /// Per thread: the request it answered last, and its cache then.
    answers: Vec<Mutex<(u64, Vec<CachedFlow>)>>,
}

impl FlowRequests {
    pub fn new(threads: usize) -> FlowRequests {
        FlowRequests {
            asked: AtomicU64::new(0),
            answers: (0..threads).map(|_| Mutex::new((0, Vec::new()))).collect(),
        }
    }

    /// Poll thread `q`, between bursts: answers a pending request with its cache.
    pub fn serve(&self, q: usize, cache: &FlowCache) {
        let asked = self.asked.load(Ordering::Acquire);
        if asked == 0 {
            return;
        }
        if let Some(slot) = self.answers.get(q) {
            let mut a = slot.lock().unwrap_or_else(|e| e.into_inner());
            if a.0 != asked {
                *a = (asked, cache.snapshot());
            }
        }
    }

    /// Asks every poll thread; their caches by thread, or `None` if one did not answer in
    /// time.
    fn collect(&self) -> Option<Vec<Vec<CachedFlow>>> {
        let asked = self.asked.fetch_add(1, Ordering::AcqRel) + 1;
        let deadline = Instant::now() + FLOWS_WAIT;
        loop {
            let done = self
                .answers
                .iter()
                .all(|a| a.lock().unwrap_or_else(|e| e.into_inner()).0 >= asked);
            if done {
                break;
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(
            self.answers
                .iter()
                .map(|a| std::mem::take(&mut a.lock().unwrap_or_else(|e| e.into_inner()).1))
                .collect(),
        )
    }
}

/// What the answers read.
pub struct Inspect<'a> {
    pub ports: &'a PortSet,
    pub tables: Option<Arc<Tables>>,
    pub conntrack: &'a ConnTable,
    pub flows: &'a FlowRequests,
    pub shared: &'a Shared,
}

impl Inspect<'_> {
    fn ifname(&self, ix: u32) -> String {
        let p = self.ports;
        p.ifindexes
            .iter()
            .position(|&i| i == ix)
            .map(|i| p.ifaces[i].clone())
            .unwrap_or_else(|| format!("ifindex {ix}"))
    }

    pub fn answer(&self, cmd: &str, arg: &Value) -> Value {
        match cmd {
            "ports" => {
                let empty = Default::default();
                let pipeline = self.tables.as_ref().map_or(&empty, |t| &*t.pipeline);
                let p = self.ports;
                let ports: Vec<Value> = p
                    .ifaces
                    .iter()
                    .zip(&p.ifindexes)
                    .enumerate()
                    .map(|(slot, (iface, &ix))| {
                        port_json(pipeline, iface, (ix, slot as u32), p.kind(slot))
                    })
                    .collect();
                json!({ "ports": ports })
            }
            "flows" => match self.flows.collect() {
                None => json!({ "error": "a poll thread did not answer in time" }),
                Some(by_thread) => {
                    let flows: Vec<Value> = by_thread
                        .iter()
                        .enumerate()
                        .flat_map(|(q, flows)| {
                            flows.iter().map(move |f| {
                                let mut v = flow_json(
                                    (&f.key, &f.mask, &f.action),
                                    (f.stale, f.action.hits, None),
                                    &|i| self.ifname(i),
                                );
                                v["thread"] = json!(q);
                                v
                            })
                        })
                        .collect();
                    json!({ "megaflows": flows })
                }
            },
            "trace" => match &self.tables {
                None => json!({ "error": "no pipeline yet" }),
                // A provider network by physnet or by interface.
                Some(t) => {
                    let p = self.ports;
                    let provider = |name: &str| {
                        p.physnets.get(name).copied().or_else(|| {
                            let i = p.ifaces.iter().position(|n| n == name)?;
                            p.physnets
                                .values()
                                .find(|&&ix| ix == p.ifindexes[i])
                                .copied()
                        })
                    };
                    trace_answer(t, arg, &provider, &|i| self.ifname(i))
                }
            },
            "ct" => ct_json(self.conntrack.entries(), self.conntrack.ns(Instant::now())),
            "ct-flush" => {
                let zone = arg["zone"].as_u64().map(|z| z as u32);
                let n = self
                    .conntrack
                    .delete(|k, _| zone.is_none_or(|z| z == k.zone));
                self.shared
                    .conntrack_flushed
                    .fetch_add(n as u64, Ordering::Relaxed);
                json!({ "flushed": n })
            }
            other => json!({ "error": format!("unknown request {other:?}") }),
        }
    }
}
