//! Every Prometheus metric of the service, declared in one place.
//!
//! Labels stay low-cardinality: the registry label is `docker`, `ghcr` or an allow-listed host,
//! never an image name, URL or credential.

use std::collections::HashSet;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// How a `/tags` request was answered.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RequestStatus {
    /// Fetched from upstream while the caller waited (a cache miss).
    success,
    /// Answered from a fresh cache entry.
    cache_hit,
    /// Answered from a stale entry while a refresh runs (or after it failed).
    cache_stale,
    /// An error answer (bad input or upstream failure with nothing cached).
    error,
}

/// What an upstream request was for.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum UpstreamKind {
    token,
    tag_page,
    manifest_head,
    manifest_get,
    blob,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub registry: String,
    pub status: RequestStatus,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistryLabels {
    pub registry: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub registry: String,
    pub kind: UpstreamKind,
    /// The HTTP status code, or `error` / `timeout` when there was none.
    pub status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub registry: String,
    /// `backoff` (rate-limited) or `breaker_open`.
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    pub tier: &'static str,
}

/// The metric handles; cheap to clone (each is an `Arc` inside).
#[derive(Clone)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub fetch_seconds: Family<RegistryLabels, Histogram>,
    pub upstream_requests: Family<UpstreamLabels, Counter>,
    pub refresh_errors: Family<RegistryLabels, Counter>,
    pub cache_entries: Family<TierLabels, Gauge>,
    pub digests_cached: Gauge,
    pub refused: Family<RefusalLabels, Counter>,
    pub rate_limit: Family<RegistryLabels, Gauge>,
    pub rate_remaining: Family<RegistryLabels, Gauge>,
    pub redis_up: Gauge,
}

impl Metrics {
    /// Creates the metrics and registers them in a new registry. `with_redis`: whether the
    /// shared tier is configured (`tag_proxy_redis_up` exists only then).
    pub fn new(with_redis: bool) -> (Metrics, Registry) {
        let metrics = Metrics {
            requests: Family::default(),
            fetch_seconds: Family::new_with_constructor(|| {
                Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0])
            }),
            upstream_requests: Family::default(),
            refresh_errors: Family::default(),
            cache_entries: Family::default(),
            digests_cached: Gauge::default(),
            refused: Family::default(),
            rate_limit: Family::default(),
            rate_remaining: Family::default(),
            redis_up: Gauge::default(),
        };
        let mut registry = Registry::with_prefix("tag_proxy");
        registry.register(
            "requests",
            "Tag requests by registry and how they were answered",
            metrics.requests.clone(),
        );
        registry.register(
            "registry_fetch_seconds",
            "Time to fetch one image's tag list from its registry",
            metrics.fetch_seconds.clone(),
        );
        registry.register(
            "upstream_requests",
            "HTTP requests sent to registries, by kind and response status",
            metrics.upstream_requests.clone(),
        );
        registry.register(
            "refresh_errors",
            "Upstream fetches that failed: background refreshes (the previous answer kept being served) and misses with no answer to fall back on",
            metrics.refresh_errors.clone(),
        );
        registry.register(
            "cache_entries",
            "Images cached, by tier",
            metrics.cache_entries.clone(),
        );
        registry.register(
            "digests_cached",
            "Manifest digests whose platforms and dates are known (on disk)",
            metrics.digests_cached.clone(),
        );
        registry.register(
            "upstream_refused",
            "Upstream requests not sent because the host was backing off or its breaker was open",
            metrics.refused.clone(),
        );
        registry.register(
            "upstream_ratelimit_limit",
            "The request limit a registry last announced (ratelimit-limit / X-RateLimit-Limit)",
            metrics.rate_limit.clone(),
        );
        registry.register(
            "upstream_ratelimit_remaining",
            "Requests a registry last said were left (ratelimit-remaining / X-RateLimit-Remaining)",
            metrics.rate_remaining.clone(),
        );
        if with_redis {
            registry.register(
                "redis_up",
                "1 when the shared Redis tier answered its last operation, 0 when it did not",
                metrics.redis_up.clone(),
            );
        }
        (metrics, registry)
    }

    pub fn count_refusal(&self, registry: &str, refusal: crate::upstream::politeness::Refusal) {
        use crate::upstream::politeness::Refusal;
        let reason = match refusal {
            Refusal::BackingOff(_) => "backoff",
            Refusal::BreakerOpen(_) => "breaker_open",
        };
        self.refused
            .get_or_create(&RefusalLabels {
                registry: registry.to_owned(),
                reason,
            })
            .inc();
    }

    /// Exports a registry's announced rate limit (`which` is `limit` or `remaining`).
    pub fn set_rate_limit(&self, registry: &str, which: &str, value: u64) {
        let family = if which == "limit" {
            &self.rate_limit
        } else {
            &self.rate_remaining
        };
        family
            .get_or_create(&RegistryLabels {
                registry: registry.to_owned(),
            })
            .set(i64::try_from(value).unwrap_or(i64::MAX));
    }

    pub fn count_request(&self, registry: &str, status: RequestStatus) {
        self.requests
            .get_or_create(&RequestLabels {
                registry: registry.to_owned(),
                status,
            })
            .inc();
    }

    pub fn count_upstream(&self, registry: &str, kind: UpstreamKind, status: String) {
        self.upstream_requests
            .get_or_create(&UpstreamLabels {
                registry: registry.to_owned(),
                kind,
                status,
            })
            .inc();
    }

    pub fn observe_fetch(&self, registry: &str, seconds: f64) {
        self.fetch_seconds
            .get_or_create(&RegistryLabels {
                registry: registry.to_owned(),
            })
            .observe(seconds);
    }

    pub fn count_refresh_error(&self, registry: &str) {
        self.refresh_errors
            .get_or_create(&RegistryLabels {
                registry: registry.to_owned(),
            })
            .inc();
    }

    pub fn set_cache_entries(&self, tier: &'static str, n: u64) {
        self.cache_entries
            .get_or_create(&TierLabels { tier })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// `Content-Type` of the OpenMetrics exposition.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of the classic Prometheus text exposition.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Encodes every metric. `prometheus-client` writes OpenMetrics; scrapers that did not ask for
/// it (and `promtool check metrics`) get the classic text format, where a counter family is
/// named with its `_total` suffix and there is no `# EOF` or `# UNIT`.
pub fn encode(registry: &Registry, openmetrics: bool) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    if openmetrics {
        return Ok(text);
    }
    Ok(to_prometheus_text(&text))
}

fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_counters_with_total() {
        let (m, registry) = Metrics::new(false);
        m.count_request("docker", RequestStatus::cache_hit);
        let text = encode(&registry, false).unwrap();
        assert!(
            text.contains("# TYPE tag_proxy_requests_total counter"),
            "{text}"
        );
        assert!(text.contains("# HELP tag_proxy_requests_total "), "{text}");
        assert!(!text.contains("# EOF"));
        let om = encode(&registry, true).unwrap();
        assert!(om.contains("# TYPE tag_proxy_requests counter"));
        assert!(om.trim_end().ends_with("# EOF"));
    }
}
