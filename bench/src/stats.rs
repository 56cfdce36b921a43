//! Percentiles over recorded samples.

/// Sorts `ns` and prints `key=value` percentiles in microseconds.
pub fn summary(ns: &mut [u64]) -> String {
    if ns.is_empty() {
        return "n=0".to_owned();
    }
    ns.sort_unstable();
    let pct = |p: f64| {
        let i = ((ns.len() as f64 - 1.0) * p).round() as usize;
        ns[i.min(ns.len() - 1)] as f64 / 1000.0
    };
    let mean = ns.iter().map(|&x| x as f64).sum::<f64>() / ns.len() as f64 / 1000.0;
    format!(
        "n={} p50_us={:.2} p99_us={:.2} mean_us={:.2} min_us={:.2} max_us={:.2}",
        ns.len(),
        pct(0.50),
        pct(0.99),
        mean,
        pct(0.0),
        pct(1.0)
    )
}
