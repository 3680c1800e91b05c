//! Reading the service's `/metrics` (Prometheus text): upstream requests by kind, fetches.

use std::collections::BTreeMap;

/// The request kinds of `tag_proxy_upstream_requests_total`, in report order.
/// Request counts by kind (the keys of [`KINDS`]).
pub type Counts = std::collections::BTreeMap<&'static str, u64>;

pub const KINDS: [&str; 5] = ["tag_page", "manifest_head", "manifest_get", "blob", "token"];

/// One scrape: every sample as (metric name, labels, value).
pub struct Scrape {
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    pub async fn take(client: &reqwest::Client, base: &str) -> Scrape {
        let text = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("/metrics answers")
            .text()
            .await
            .expect("/metrics body");
        Scrape::parse(&text)
    }

    fn parse(text: &str) -> Scrape {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let value: f64 = value.trim().parse().ok()?;
                let (name, labels) = match series.split_once('{') {
                    Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
                    None => (series, BTreeMap::new()),
                };
                Some((name.to_owned(), labels, value))
            })
            .collect();
        Scrape { samples }
    }

    /// Sum of the samples of `name` whose labels include every `(key, value)` of `filter`.
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, labels, _)| {
                n == name
                    && filter
                        .iter()
                        .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    /// Upstream requests sent, by kind (all registries and statuses).
    pub fn upstream_by_kind(&self) -> BTreeMap<&'static str, u64> {
        KINDS
            .iter()
            .map(|kind| {
                let n = self.sum("tag_proxy_upstream_requests_total", &[("kind", kind)]);
                (*kind, n as u64)
            })
            .collect()
    }

    /// Whole-image upstream fetches finished (the fetch histogram's count).
    pub fn fetches(&self) -> u64 {
        self.sum("tag_proxy_registry_fetch_seconds_count", &[]) as u64
    }
}

/// `a="x",b="y"` (values here never hold quotes or commas).
fn parse_labels(raw: &str) -> BTreeMap<String, String> {
    raw.split("\",")
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((k.trim().to_owned(), v.trim_matches('"').to_owned()))
        })
        .collect()
}

/// `after - before`, per kind.
pub fn delta(
    before: &BTreeMap<&'static str, u64>,
    after: &BTreeMap<&'static str, u64>,
) -> BTreeMap<&'static str, u64> {
    after
        .iter()
        .map(|(k, v)| (*k, v.saturating_sub(before.get(k).copied().unwrap_or(0))))
        .collect()
}
