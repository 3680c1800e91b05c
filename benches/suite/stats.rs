//! Medians and spreads of repeated runs.

/// The median (mean of the middle two for an even count); 0 for no values.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    match v.len() % 2 {
        0 => (v[mid - 1] + v[mid]) / 2.0,
        _ => v[mid],
    }
}

/// (max - min) / median: how far apart the runs were.
pub fn spread(values: &[f64]) -> f64 {
    let m = median(values);
    if values.len() < 2 || m == 0.0 {
        return 0.0;
    }
    let max = values.iter().copied().fold(f64::MIN, f64::max);
    let min = values.iter().copied().fold(f64::MAX, f64::min);
    (max - min) / m
}

/// Runs more than 10 % apart are called noisy in the report.
pub const NOISY_SPREAD: f64 = 0.10;

/// Median, spread and the raw values, as the results file records every repeated figure.
pub fn summary(values: &[f64]) -> serde_json::Value {
    let spread = spread(values);
    serde_json::json!({
        "median": round(median(values), 4),
        "spread": round(spread, 3),
        "noisy": spread > NOISY_SPREAD,
        "runs": values.iter().map(|v| round(*v, 4)).collect::<Vec<_>>(),
    })
}

pub fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}
