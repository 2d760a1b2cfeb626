//! Prometheus exporter: `GET /metrics` in the text format, served by a current-thread tokio
//! runtime on its own thread (never a forwarder's). Every scrape reads the counters afresh
//! (XDP per-CPU counters summed, plus the slow path's), so nothing is cached or double
//! counted.

use crate::metrics::Shared;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use aya::maps::{MapData, PerCpuArray};
use geneflow_abi::PortCounters;
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder, TextEncoder};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tracing::{info, warn};

/// Names of the per-interface counters that are not drops: (counter, metric, help).
const PORT_COUNTERS: &[(&str, &str, &str)] = &[
    (
        "rx_packets",
        "geneflow_rx_packets_total",
        "Frames received on the interface by the XDP program.",
    ),
    (
        "rx_bytes",
        "geneflow_rx_bytes_total",
        "Bytes received on the interface by the XDP program.",
    ),
    (
        "tx_packets",
        "geneflow_tx_packets_total",
        "Frames transmitted on the interface (fast path redirects and slow path sends).",
    ),
    (
        "tx_bytes",
        "geneflow_tx_bytes_total",
        "Bytes transmitted on the interface, as sent (Geneve-encapsulated on the uplink).",
    ),
    (
        "fastpath_hit",
        "geneflow_fastpath_hits_total",
        "Frames whose megaflow action ran in XDP.",
    ),
    (
        "miss",
        "geneflow_fastpath_misses_total",
        "Frames sent to the AF_XDP slow path (megaflow miss or stale entry).",
    ),
    (
        "slowpath_rx",
        "geneflow_slowpath_packets_total",
        "Frames processed by the userspace pipeline.",
    ),
    (
        "slowpath_tx",
        "geneflow_slowpath_tx_packets_total",
        "Frames transmitted by the slow path on the interface.",
    ),
    (
        "pass_to_stack",
        "geneflow_passed_to_stack_total",
        "Frames handed to the kernel stack (non-overlay traffic).",
    ),
    (
        "megaflow_install",
        "geneflow_megaflow_installs_total",
        "Megaflows installed into XDP by the slow path.",
    ),
    (
        "megaflow_install_fail",
        "geneflow_megaflow_install_failures_total",
        "Megaflows the slow path could not install.",
    ),
    (
        "fib_miss",
        "geneflow_fib_misses_total",
        "Encapsulations without an underlay next hop in XDP (sent to the slow path).",
    ),
    (
        "redirect_fail",
        "geneflow_redirect_failures_total",
        "Redirects the kernel refused.",
    ),
];

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_string());
    l.set_value(value.to_string());
    l
}

fn family(name: &str, help: &str, t: MetricType) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(t);
    f
}

fn counter(labels: Vec<LabelPair>, v: f64) -> Metric {
    let mut c = Counter::default();
    c.set_value(v);
    let mut m = Metric::default();
    m.set_label(labels);
    m.set_counter(c);
    m
}

fn gauge(labels: Vec<LabelPair>, v: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(v);
    let mut m = Metric::default();
    m.set_label(labels);
    m.set_gauge(g);
    m
}

/// All metric families for one scrape.
pub fn gather(
    shared: &Shared,
    counters: Option<&PerCpuArray<MapData, PortCounters>>,
) -> Vec<MetricFamily> {
    let snap = shared.snapshot(counters);
    let ports = snap["ports"].as_array().cloned().unwrap_or_default();
    let mut out = Vec::new();
    let port_labels = |p: &Value| {
        vec![
            label("iface", p["iface"].as_str().unwrap_or("")),
            label("kind", p["kind"].as_str().unwrap_or("")),
        ]
    };
    for (key, name, help) in PORT_COUNTERS {
        let mut f = family(name, help, MetricType::COUNTER);
        for p in &ports {
            let v = p["counters"][key].as_f64().unwrap_or(0.0);
            f.mut_metric().push(counter(port_labels(p), v));
        }
        out.push(f);
    }
    let mut drops = family(
        "geneflow_drops_total",
        "Frames dropped, by interface and reason (XDP and slow path).",
        MetricType::COUNTER,
    );
    for p in &ports {
        if let Some(c) = p["counters"].as_object() {
            for (k, v) in c {
                if let Some(reason) = k.strip_prefix("drop_") {
                    let mut l = port_labels(p);
                    l.push(label("reason", reason));
                    drops
                        .mut_metric()
                        .push(counter(l, v.as_f64().unwrap_or(0.0)));
                }
            }
        }
    }
    out.push(drops);
    let g = |name: &str, help: &str, v: f64| {
        let mut f = family(name, help, MetricType::GAUGE);
        f.mut_metric().push(gauge(vec![], v));
        f
    };
    out.push(g(
        "geneflow_megaflows",
        "Megaflow entries in XDP.",
        snap["megaflows"].as_f64().unwrap_or(0.0),
    ));
    out.push(g(
        "geneflow_conntrack_entries",
        "Conntrack entries (counted every 10 s; the table holds conntrack_capacity, then the least recently used entry makes room).",
        snap["conntrack_entries"].as_f64().unwrap_or(0.0),
    ));
    let mut full = family(
        "geneflow_conntrack_full_total",
        "Expiry rounds (every 10 s) that found the conntrack table full: its least recently used entries were being evicted.",
        MetricType::COUNTER,
    );
    full.mut_metric().push(counter(
        vec![],
        snap["conntrack_full"].as_f64().unwrap_or(0.0),
    ));
    out.push(full);
    let mut evicted = family(
        "geneflow_conntrack_evictions_total",
        "Conntrack entries the full table evicted to make room (least recently used first), counted every 10 s from the commits, flushes and entry count.",
        MetricType::COUNTER,
    );
    evicted.mut_metric().push(counter(
        vec![],
        snap["conntrack_evicted"].as_f64().unwrap_or(0.0),
    ));
    out.push(evicted);
    out.push(g(
        "geneflow_underlay_peers",
        "Underlay addresses (the other chassis' encap IPs) Geneve is accepted from; the rest is dropped as drop_unknown_source.",
        snap["underlay_peers"].as_f64().unwrap_or(0.0),
    ));
    out.push(g(
        "geneflow_megaflow_masks",
        "Masks in use by the XDP tuple-space search.",
        snap["masks"].as_f64().unwrap_or(0.0),
    ));
    let nb = &snap["nb"];
    out.push(g(
        "geneflow_nb_connected",
        "1 while the NB DB session is up.",
        if nb["connected"].as_bool().unwrap_or(false) {
            1.0
        } else {
            0.0
        },
    ));
    out.push(g(
        "geneflow_last_compile_seconds",
        "Duration of the last pipeline compilation.",
        nb["last_compile_us"].as_f64().unwrap_or(0.0) / 1e6,
    ));
    out.push(g(
        "geneflow_nb_rejected_records",
        "NB records skipped as invalid.",
        nb["rejected_records"].as_f64().unwrap_or(0.0),
    ));
    let mut rec = family(
        "geneflow_nb_records",
        "NB records held, per table.",
        MetricType::GAUGE,
    );
    if let Some(o) = nb["records"].as_object() {
        for (t, v) in o {
            rec.mut_metric()
                .push(gauge(vec![label("table", t)], v.as_f64().unwrap_or(0.0)));
        }
    }
    out.push(rec);
    let mut rs = family(
        "geneflow_nb_resyncs_total",
        "Full NB resyncs (connects and topic changes).",
        MetricType::COUNTER,
    );
    rs.mut_metric()
        .push(counter(vec![], nb["resyncs"].as_f64().unwrap_or(0.0)));
    out.push(rs);
    let mut pa = family(
        "geneflow_pipelines_applied_total",
        "Pipelines applied to the fast path.",
        MetricType::COUNTER,
    );
    pa.mut_metric().push(counter(
        vec![],
        snap["pipelines_applied"].as_f64().unwrap_or(0.0),
    ));
    out.push(pa);
    let mut st = family(
        "geneflow_slowpath_thread_frames_total",
        "Frames each slow-path thread took from its AF_XDP sockets (thread 0 owns the maps).",
        MetricType::COUNTER,
    );
    per_thread(&mut st, &snap["slow_path_threads"]);
    out.push(st);
    let mut si = family(
        "geneflow_slowpath_thread_installs_total",
        "Megaflows each slow-path thread put in the XDP table itself.",
        MetricType::COUNTER,
    );
    per_thread(&mut si, &snap["slow_path_thread_installs"]);
    out.push(si);
    out.extend(shared.registry.gather());
    out
}

/// One sample per slow-path thread, from a list in the stats snapshot.
fn per_thread(f: &mut MetricFamily, list: &serde_json::Value) {
    for (t, v) in list.as_array().into_iter().flatten().enumerate() {
        f.mut_metric().push(counter(
            vec![label("thread", &t.to_string())],
            v.as_f64().unwrap_or(0.0),
        ));
    }
}

pub fn render(shared: &Shared, counters: Option<&PerCpuArray<MapData, PortCounters>>) -> Vec<u8> {
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&gather(shared, counters), &mut buf);
    buf
}

/// What the HTTP handlers read.
#[derive(Clone)]
struct Scrape {
    shared: Arc<Shared>,
    counters: Arc<Mutex<Option<PerCpuArray<MapData, PortCounters>>>>,
}

async fn metrics(State(s): State<Scrape>) -> impl IntoResponse {
    let c = s.counters.lock().ok();
    let body = render(&s.shared, c.as_ref().and_then(|c| c.as_ref()));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

async fn not_found() -> impl IntoResponse {
    (StatusCode::NOT_FOUND, "try /metrics\n")
}

/// Serves `/metrics` on `addr` (hyper through axum: every connection is its own task, so a
/// slow or stalled client holds only its own connection) from a current-thread runtime on a
/// dedicated thread, never a forwarder's.
pub fn start(
    addr: SocketAddr,
    shared: Arc<Shared>,
    counters: Arc<Mutex<Option<PerCpuArray<MapData, PortCounters>>>>,
) -> std::io::Result<()> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    info!(%addr, "metrics exporter listening");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(Scrape { shared, counters });
    std::thread::Builder::new()
        .name("gf-metrics".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    warn!("metrics runtime: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => {
                        warn!("metrics listener: {e}");
                        return;
                    }
                };
                if let Err(e) = axum::serve(listener, app).await {
                    warn!("metrics server stopped: {e}");
                }
            });
        })?;
    Ok(())
}
