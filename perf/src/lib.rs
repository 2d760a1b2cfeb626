//! geneflow traffic tools and benchmarks: `gf-udp` (bounded UDP stream sender and counting
//! receiver, used by tests and the demo) and `gf-nb-bench` (control-plane benchmark: compile
//! time at scale and NB-write-to-fast-path latency per backend). Orchestrated by
//! `cargo xtask bench-nb`.

/// Median and the given percentile of a sample (sorted in place).
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i.min(v.len() - 1)]
}
pub mod pktgen;
