//! Counters: the XDP program counts into a per-CPU BPF array, the slow path into atomics laid
//! out the same way (slot x reason), so each reason has one name whichever path counted it.
//! The forwarder is the only writer of the atomics (relaxed, uncontended). Both live in pinned
//! maps (the atomics in a memory-mapped one), so totals never go backwards across a restart.

use aya::maps::{MapData, PerCpuArray};
use geneflow_abi::{ctr, PortCounters, MAX_PORTS};
use geneflow_control::agent::NbStatus;
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct PortInfo {
    pub iface: String,
    pub ifindex: u32,
    pub slot: u32,
    pub kind: &'static str,
    pub port: Option<String>,
}

pub struct Shared {
    pub chassis: String,
    user: CounterStore,
    pub ports: Mutex<Vec<PortInfo>>,
    pub megaflows: AtomicU64,
    pub masks: AtomicU64,
    /// Conntrack entries, as of the last expiry round (every 10 s).
    pub conntrack: AtomicU64,
    /// Expiry rounds that found the conntrack table full (its LRU evicting to make room).
    pub conntrack_full: AtomicU64,
    /// Conntrack entries deleted by flushes (`ct-flush`, a zone's groups changed).
    pub conntrack_flushed: AtomicU64,
    /// Conntrack entries the full table evicted, as counted by the expiry rounds.
    pub conntrack_evicted: AtomicU64,
    pub nb_version: AtomicU64,
    /// Underlay addresses Geneve is accepted from (the chassis of the NB but this one).
    pub underlay_peers: AtomicU64,
    /// Pipelines applied to the fast path (generation bumps done): an NB change is "in the
    /// fast path" once this moves.
    pub pipelines_applied: AtomicU64,
    /// Nanoseconds from a missed frame's arrival on the AF_XDP ring to its megaflow being in
    /// the BPF map, for the last install.
    pub last_flow_setup_ns: AtomicU64,
    /// The DPDK datapath's poll threads: time spent on frames (from a burst's first frame
    /// to its last) and frames handled, for the per-packet cost of the engine.
    pub busy_ns: AtomicU64,
    pub busy_frames: AtomicU64,
    /// The XDP backend's slow-path threads in use, and the frames each took from its
    /// sockets (index = thread; thread 0 is the forwarder that owns the maps).
    pub slow_threads: AtomicU64,
    pub slow_thread_frames: Vec<AtomicU64>,
    /// The megaflows each slow-path thread put in the map itself.
    pub slow_thread_installs: Vec<AtomicU64>,
    /// Written by the control thread.
    pub nb: Arc<Mutex<NbStatus>>,
    /// Registry of the metrics that are observed, not read (histograms).
    pub registry: prometheus::Registry,
    /// From the agent noticing an NB change to the fast path running the new pipeline.
    pub nb_latency: prometheus::Histogram,
}

/// Where the slow path's counters live: the memory-mapped pinned map (`Bpf::slow_counters`),
/// or, failing that, the heap (then they restart from zero with the process).
pub type CounterStore = Box<dyn std::ops::Deref<Target = [AtomicU64]> + Send + Sync>;

/// Counters on the heap, `MAX_PORTS` x `ctr::COUNT`.
pub fn heap_counters() -> CounterStore {
    Box::new(
        (0..MAX_PORTS * ctr::COUNT)
            .map(|_| AtomicU64::new(0))
            .collect::<Vec<_>>(),
    )
}

impl Shared {
    /// Counts and reports the `n` connections ended because the security groups of `zones`
    /// changed (both backends).
    pub fn ended_by_group_change(&self, zones: &[u32], n: usize) {
        self.conntrack_flushed
            .fetch_add(n as u64, Ordering::Relaxed);
        if n > 0 {
            tracing::info!(
                ?zones,
                ended = n,
                "security groups changed: their connections are checked again"
            );
        }
    }

    pub fn new(chassis: &str, user: CounterStore) -> Shared {
        let registry = prometheus::Registry::new();
        let nb_latency = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(
                "geneflow_nb_change_to_fastpath_seconds",
                "From the agent noticing an NB change to the fast path running the new pipeline.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )
        .expect("static histogram options are valid");
        registry
            .register(Box::new(nb_latency.clone()))
            .expect("one registration");
        Shared {
            registry,
            nb_latency,
            chassis: chassis.to_string(),
            user,
            ports: Mutex::new(Vec::new()),
            megaflows: AtomicU64::new(0),
            masks: AtomicU64::new(0),
            conntrack: AtomicU64::new(0),
            conntrack_full: AtomicU64::new(0),
            conntrack_flushed: AtomicU64::new(0),
            conntrack_evicted: AtomicU64::new(0),
            nb_version: AtomicU64::new(0),
            underlay_peers: AtomicU64::new(0),
            pipelines_applied: AtomicU64::new(0),
            last_flow_setup_ns: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            busy_frames: AtomicU64::new(0),
            slow_threads: AtomicU64::new(1),
            slow_thread_frames: (0..geneflow_abi::MAX_QUEUES)
                .map(|_| AtomicU64::new(0))
                .collect(),
            slow_thread_installs: (0..geneflow_abi::MAX_QUEUES)
                .map(|_| AtomicU64::new(0))
                .collect(),
            nb: Arc::new(Mutex::new(NbStatus::default())),
        }
    }

    #[inline]
    pub fn count(&self, slot: u32, idx: u32, n: u64) {
        if let Some(c) = self.user.get((slot * ctr::COUNT + idx) as usize) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The slow path's count of `idx` over every port.
    pub fn user_total(&self, idx: u32) -> u64 {
        (0..self.user.len() as u32 / ctr::COUNT)
            .filter_map(|slot| self.user.get((slot * ctr::COUNT + idx) as usize))
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// JSON snapshot of every counter, XDP and userspace summed per name.
    pub fn snapshot(&self, xdp: Option<&PerCpuArray<MapData, PortCounters>>) -> Value {
        let ports = self.ports.lock().map(|p| p.clone()).unwrap_or_default();
        let mut out = Vec::new();
        for p in ports {
            let mut c = Map::new();
            let percpu = xdp.and_then(|m| m.get(&p.slot, 0).ok());
            for (idx, name) in ctr::NAMES {
                let i = p.slot * ctr::COUNT + idx;
                let user = self
                    .user
                    .get(i as usize)
                    .map_or(0, |c| c.load(Ordering::Relaxed));
                let fast: u64 = percpu
                    .as_ref()
                    .map(|v| v.iter().map(|pc| pc.c[idx as usize]).sum())
                    .unwrap_or(0);
                c.insert(name.to_string(), json!(user + fast));
            }
            out.push(json!({
                "iface": p.iface, "ifindex": p.ifindex, "kind": p.kind,
                "port": p.port, "counters": c,
            }));
        }
        json!({
            "chassis": self.chassis,
            "nb_version": self.nb_version.load(Ordering::Relaxed),
            "megaflows": self.megaflows.load(Ordering::Relaxed),
            "masks": self.masks.load(Ordering::Relaxed),
            "conntrack_entries": self.conntrack.load(Ordering::Relaxed),
            "conntrack_capacity": geneflow_abi::ct::MAX_ENTRIES,
            "conntrack_full": self.conntrack_full.load(Ordering::Relaxed),
            "conntrack_evicted": self.conntrack_evicted.load(Ordering::Relaxed),
            "conntrack_flushed": self.conntrack_flushed.load(Ordering::Relaxed),
            "underlay_peers": self.underlay_peers.load(Ordering::Relaxed),
            "pipelines_applied": self.pipelines_applied.load(Ordering::Relaxed),
            "last_flow_setup_us": self.last_flow_setup_ns.load(Ordering::Relaxed) as f64 / 1e3,
            "busy_ns": self.busy_ns.load(Ordering::Relaxed),
            "busy_frames": self.busy_frames.load(Ordering::Relaxed),
            "slow_path_threads": self.slow_thread_frames.iter()
                .take(self.slow_threads.load(Ordering::Relaxed) as usize)
                .map(|c| c.load(Ordering::Relaxed)).collect::<Vec<_>>(),
            "slow_path_thread_installs": self.slow_thread_installs.iter()
                .take(self.slow_threads.load(Ordering::Relaxed) as usize)
                .map(|c| c.load(Ordering::Relaxed)).collect::<Vec<_>>(),
            "nb": self.nb.lock().map(|s| serde_json::to_value(&*s).unwrap_or_default()).unwrap_or_default(),
            "ports": out,
        })
    }
}
