//! Item 2, cold fetch: wall time of the first `/tags` for an OCI image of 1,000 tags, one image
//! (digest) per tag, with a fixed latency injected on every upstream request, against
//!
//! - the lower bound that the request count and the concurrency allow: the tag pages are
//!   walked one after another (each needs the previous one's `Link`), then the remaining
//!   requests run `C` at a time, so `bound = P·L + ceil((R − P) / C)·L`, with `R` the upstream
//!   requests the fetch made (counted by the service's own metrics), `P` of them tag pages,
//!   `C` = 8 (`--upstream-concurrency` default) and `L` the injected latency;
//! - the same fetch strictly sequential (`--upstream-concurrency 1`), whose model is `R·L`;
//! - the same fetch with no injected latency: the floor set by local work (the proxy's, the
//!   counting proxy's and the registry's), which the bound leaves out.
//!
//! Each run uses a fresh service on an empty cache directory (so no digest is known).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::metrics::Scrape;
use crate::report::{ItemResult, Row, noise};
use crate::service::{Logging, Service, children_named, cpu_seconds};
use crate::stats::{median, round, summary};
use crate::support::registry::{Fault, Kind, ManyTags};
use crate::{Env, loadavg, progress};

pub const IMAGE: &str = "bench/cold";
/// `--upstream-concurrency`'s default, the `C` of the bound.
const DEFAULT_CONCURRENCY: usize = 8;
/// Both the concurrent and the sequential runs get this: the sequential fetch of 1,000 tags
/// takes about a minute, longer than the 65 s request time-out the default 20 s gives.
const UPSTREAM_TIMEOUT: &str = "30s";

/// Pushes the image of items 2 and 3: `tags` tags, each its own image (manifest and config).
pub async fn push_image(env: &Env) {
    let started = Instant::now();
    let pushed = env
        .registry
        .pusher()
        .push_many_tags(IMAGE, env.plan.tags, &ManyTags::one_image_per_tag())
        .await;
    let mut digests: Vec<&String> = pushed.iter().map(|t| &t.digest).collect();
    digests.sort();
    digests.dedup();
    assert_eq!(digests.len(), env.plan.tags, "one digest per tag");
    progress(&format!(
        "pushed {IMAGE}: {} tags, one image each, in {:.1} s",
        env.plan.tags,
        started.elapsed().as_secs_f64()
    ));
}

/// One cold fetch.
struct Cold {
    seconds: f64,
    /// Upstream requests by kind, as the service counted them.
    by_kind: std::collections::BTreeMap<&'static str, u64>,
    /// Requests that reached the registry (the counting proxy's count).
    arrived: usize,
    /// CPU seconds spent during the fetch: docker-registry, the service, this process (the
    /// counting proxy and the client).
    cpu: [f64; 3],
}

impl Cold {
    fn requests(&self) -> u64 {
        self.by_kind.values().sum()
    }

    fn pages(&self) -> u64 {
        self.by_kind["tag_page"]
    }

    fn json(&self) -> Value {
        json!({ "seconds": round(self.seconds, 3), "upstream_requests": self.by_kind,
                "arrived_at_registry": self.arrived,
                "cpu_s": { "docker_registry": round(self.cpu[0], 2), "proxy": round(self.cpu[1], 2),
                           "harness": round(self.cpu[2], 2) } })
    }
}

/// One repetition: the fetch without and with latency, and the bound.
struct Rep {
    floor: Cold,
    concurrent: Cold,
    bound: f64,
    /// `L`, in seconds.
    latency_s: f64,
}

async fn cold_fetch(env: &Env, latency: Duration, concurrency: Option<usize>) -> Cold {
    env.proxy.clear_faults();
    if !latency.is_zero() {
        env.proxy.fault(Fault::any().delay(latency));
    }
    let concurrency_arg = concurrency.map(|c| c.to_string());
    let mut extra = vec!["--upstream-timeout", UPSTREAM_TIMEOUT];
    if let Some(c) = &concurrency_arg {
        extra.extend(["--upstream-concurrency", c.as_str()]);
    }
    let service = Service::start(
        &env.fresh_dir("cold"),
        &env.upstreams,
        &extra,
        Logging::Default,
    )
    .await;
    env.proxy.reset();
    let url = format!("{}{}", service.url, env.oci_path(IMAGE));
    let registry_pids = children_named("docker-registry");
    let cpu = |svc: &Service| {
        [
            registry_pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>(),
            cpu_seconds(svc.pid),
            cpu_seconds(std::process::id()),
        ]
    };
    let cpu_before = cpu(&service);
    let started = Instant::now();
    let resp = env.client.get(&url).send().await.expect("cold /tags");
    let status = resp.status();
    let cache = resp.headers().get("x-cache").cloned();
    let body = resp.bytes().await.expect("cold /tags body");
    let seconds = started.elapsed().as_secs_f64();
    let cpu_after = cpu(&service);
    assert_eq!(
        status,
        200,
        "cold /tags: {}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(cache.as_ref().map(|v| v.as_bytes()), Some(&b"miss"[..]));
    let tags = serde_json::from_slice::<Vec<Value>>(&body)
        .expect("JSON")
        .len();
    assert_eq!(tags, env.plan.tags, "every tag is in the answer");
    let by_kind = Scrape::take(&env.client, &service.url)
        .await
        .upstream_by_kind();
    let arrived = [
        Kind::TagList,
        Kind::ManifestHead,
        Kind::ManifestGet,
        Kind::Blob,
        Kind::Token,
    ]
    .iter()
    .map(|k| env.proxy.count(*k))
    .sum();
    env.proxy.clear_faults();
    service.stop().await;
    Cold {
        seconds,
        by_kind,
        arrived,
        cpu: [0, 1, 2].map(|i| cpu_after[i] - cpu_before[i]),
    }
}

pub async fn run(env: &Env) -> ItemResult {
    let plan = &env.plan;
    let l = plan.latency;
    let ls = l.as_secs_f64();
    progress(&format!(
        "2 cold fetch: {} tags at {} ms per upstream request; {} repetitions of (0 ms, C={DEFAULT_CONCURRENCY}), {} of C=1",
        plan.tags,
        l.as_millis(),
        plan.reps,
        plan.sequential_reps
    ));
    let load_start = loadavg();
    // Unmeasured: fills the memo of content-addressed reads (manifests and configs by digest),
    // so that the measured fetches do not wait for the test registry's CPU.
    let warmup = cold_fetch(env, Duration::ZERO, None).await;
    progress(&format!(
        "  warm-up (fills the memo of reads by digest): {:.2} s",
        warmup.seconds
    ));
    let memo_before = env.memo.counts();
    let mut runs = Vec::new();
    for rep in 0..plan.reps {
        let floor = cold_fetch(env, Duration::ZERO, None).await;
        let concurrent = cold_fetch(env, l, None).await;
        let (r, p) = (concurrent.requests(), concurrent.pages());
        let c = DEFAULT_CONCURRENCY as u64;
        let bound = (p + (r - p).div_ceil(c)) as f64 * ls;
        progress(&format!(
            "  run {}: C={c} {:.2} s (bound {:.2} s, {r} requests; CPU s registry {:.1}, proxy {:.1}), 0 ms {:.2} s",
            rep + 1,
            concurrent.seconds,
            bound,
            concurrent.cpu[0],
            concurrent.cpu[1],
            floor.seconds
        ));
        runs.push(Rep {
            floor,
            concurrent,
            bound,
            latency_s: ls,
        });
    }
    // The sequential reference takes over a minute per run and is dominated by the injected
    // sleeps (its runs were 4 % apart when repeated): it runs `sequential_reps` times.
    let mut sequential_runs = Vec::new();
    for _ in 0..plan.sequential_reps {
        let cold = cold_fetch(env, l, Some(1)).await;
        let model = cold.requests() as f64 * ls;
        progress(&format!(
            "  C=1: {:.2} s (R·L {:.2} s)",
            cold.seconds, model
        ));
        sequential_runs.push((cold, model));
    }
    let pick = |f: fn(&Rep) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
    let concurrent = pick(|r| r.concurrent.seconds);
    let floor = pick(|r| r.floor.seconds);
    let bound = pick(|r| r.bound);
    let ratio = pick(|r| r.concurrent.seconds / r.bound);
    let in_flight = pick(|r| r.concurrent.requests() as f64 * r.latency_s / r.concurrent.seconds);
    let sequential: Vec<f64> = sequential_runs.iter().map(|(c, _)| c.seconds).collect();
    let seq_model: Vec<f64> = sequential_runs.iter().map(|(_, m)| *m).collect();
    let seq_ratio: Vec<f64> = sequential_runs.iter().map(|(c, m)| c.seconds / m).collect();
    let speedup = vec![median(&sequential) / median(&concurrent)];
    let memo_after = env.memo.counts();
    let first = &runs[0].concurrent;
    let json = json!({
        "image": IMAGE,
        "tags": plan.tags,
        "latency_ms": l.as_millis() as u64,
        "concurrency": DEFAULT_CONCURRENCY,
        "page_size": plan.page_size,
        "upstream_timeout": UPSTREAM_TIMEOUT,
        "bound_formula": "P*L + ceil((R-P)/C)*L: pages one after another, the rest C at a time",
        "upstream_chain": "service -> CountingProxy (count, latency, paging) -> memo of reads by digest -> docker-registry",
        "warmup_s": round(warmup.seconds, 3),
        "warmup_cpu_s": { "docker_registry": round(warmup.cpu[0], 2), "proxy": round(warmup.cpu[1], 2),
                          "harness": round(warmup.cpu[2], 2) },
        "memo_during_measurement": { "answered_from_memory": memo_after.0 - memo_before.0,
                                     "forwarded_and_stored": memo_after.1 - memo_before.1 },
        "requests_R": first.requests(),
        "pages_P": first.pages(),
        "concurrent_s": summary(&concurrent),
        "bound_s": summary(&bound),
        "ratio_to_bound": summary(&ratio),
        "mean_requests_in_flight": summary(&in_flight),
        "sequential_s": summary(&sequential),
        "sequential_model_R_times_L_s": summary(&seq_model),
        "sequential_ratio_to_model": summary(&seq_ratio),
        "speedup_sequential_over_concurrent": summary(&speedup),
        "zero_latency_s": summary(&floor),
        "cpu_s_concurrent": {
            "docker_registry": summary(&pick(|r| r.concurrent.cpu[0])),
            "proxy": summary(&pick(|r| r.concurrent.cpu[1])),
            "harness": summary(&pick(|r| r.concurrent.cpu[2])),
        },
        "target_ratio_max": 2.0,
        "target_met": median(&ratio) <= 2.0,
        "runs": runs.iter().map(|r| json!({
            "zero_latency": r.floor.json(), "concurrent": r.concurrent.json(),
            "bound_s": round(r.bound, 3),
        })).collect::<Vec<_>>(),
        "sequential_runs": sequential_runs.iter().map(|(c, m)| json!({
            "fetch": c.json(), "model_s": round(*m, 3),
        })).collect::<Vec<_>>(),
        "loadavg_1m": [load_start, loadavg()],
    });
    let rows = vec![
        Row {
            item: "2",
            measure: format!(
                "cold OCI fetch, {} tags, {} ms/request, C={DEFAULT_CONCURRENCY}: wall time",
                plan.tags,
                l.as_millis()
            ),
            value: format!("{:.2} s", median(&concurrent)),
            against: format!(
                "bound {:.2} s (R={} requests, P={} pages)",
                median(&bound),
                first.requests(),
                first.pages()
            ),
            ratio: format!("{:.2}", median(&ratio)),
            target: "≤ 2.0".into(),
            met: Some(median(&ratio) <= 2.0),
            noise: noise(&concurrent),
        },
        Row {
            item: "2",
            measure: "same fetch strictly sequential (`--upstream-concurrency 1`)".into(),
            value: format!("{:.2} s", median(&sequential)),
            against: format!(
                "R·L {:.2} s; concurrent {:.2} s",
                median(&seq_model),
                median(&concurrent)
            ),
            ratio: format!("speed-up {:.1}×", median(&speedup)),
            target: "–".into(),
            met: None,
            noise: noise(&sequential),
        },
        Row {
            item: "2",
            measure: "same fetch with 0 ms injected (local work only)".into(),
            value: format!("{:.2} s", median(&floor)),
            against: format!(
                "CPU s: docker-registry {:.1}, proxy {:.1}, harness {:.1}",
                median(&pick(|r| r.floor.cpu[0])),
                median(&pick(|r| r.floor.cpu[1])),
                median(&pick(|r| r.floor.cpu[2]))
            ),
            ratio: "–".into(),
            target: "–".into(),
            met: None,
            noise: noise(&floor),
        },
    ];
    ItemResult {
        json,
        rows,
        tables: vec![],
    }
}
